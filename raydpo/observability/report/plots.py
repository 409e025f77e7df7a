"""PNG plots of runs with matplotlib (no display needed): one colour per run, one line style per
series, training rows as lines and evaluation rows as lines with markers."""

from __future__ import annotations

import os
from dataclasses import dataclass

from raydpo.observability.report.runs import Run

STYLES = ["-", "--", ":", "-."]


@dataclass(frozen=True)
class Series:
    key: str
    """metrics.jsonl name; ``eval/...`` names are read from the evaluation rows."""
    name: str
    """Legend text."""


@dataclass(frozen=True)
class Plot:
    file: str
    title: str
    ylabel: str
    panels: tuple[tuple[Series, ...], ...]
    """One tuple of series per subplot."""
    x: str = "step"
    """``step`` (training and evaluation rows) or ``round`` (an online run's round rows)."""


def _both(key: str) -> tuple[Series, ...]:
    return (Series(key, "train"), Series(f"eval/{key}", "eval"))


PLOTS = [
    Plot("loss.png", "Loss: train vs eval", "loss", (_both("loss"),)),
    Plot("reward_accuracy.png", "Reward accuracy (chosen reward > rejected): train vs eval", "accuracy", (_both("rewards/accuracies"),)),
    Plot("reward_margins.png", "Reward margin (chosen - rejected): train vs eval", "margin", (_both("rewards/margins"),)),
    Plot("kto_kl.png", "KTO: KL estimate (policy vs reference on mismatched prompt/completion pairs)", "KL", (_both("kl"),)),
    Plot("rewards.png", "Rewards: beta x (policy - reference) log-prob", "reward",
         ((Series("rewards/chosen", "chosen"), Series("rewards/rejected", "rejected"),
           Series("eval/rewards/chosen", "eval chosen"), Series("eval/rewards/rejected", "eval rejected")),)),
    Plot("logps.png", "Policy sequence log-probs (sum over completion tokens)", "log-prob",
         ((Series("logps/chosen", "chosen"), Series("logps/rejected", "rejected"),
           Series("eval/logps/chosen", "eval chosen"), Series("eval/logps/rejected", "eval rejected")),)),
    Plot("learning_rate.png", "Learning rate and gradient norm", "",
         ((Series("learning_rate", "learning rate"),), (Series("grad_norm", "grad norm (before clipping)"),))),
    Plot("throughput.png", "Throughput", "", ((Series("pairs_per_s", "pairs/s"),), (Series("tokens_per_s", "tokens/s"),))),
    Plot("online_rewards.png", "Online rounds: sample rewards, held-out reward (at each round's start) and pair gap", "reward",
         ((Series("reward/mean", "sample mean"), Series("reward/max", "sample max"), Series("eval/reward_mean", "held-out mean")),
          (Series("reward/gap", "chosen - rejected reward"),)), x="round"),
    Plot("online_pairs.png", "Online rounds: pairs made, ties and judge failures", "count",
         ((Series("pairs", "pairs"), Series("ties", "ties"), Series("judge_failures", "judge failures")),), x="round"),
    Plot("online_phases.png", "Online rounds: seconds per phase, and generation throughput", "",
         (tuple(Series(f"seconds/{p}", p) for p in ("generate", "judge", "reference", "train", "sync", "overhead")),
          (Series("gen_tokens_per_s", "generated tokens/s"),)), x="round"),
]


def _figure(panels: int, width: float, height: float):
    """A figure of ``panels`` side by side and the colour cycle. matplotlib's object API, not
    pyplot: no display, no global figure state (safe to call from a notebook)."""
    import matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * panels, height))
    return fig, fig.subplots(1, panels, squeeze=False)[0], matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]


def _save(fig, title: str, out_dir: str, file: str) -> str:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, file), dpi=100)
    return file


def points(run: Run, key: str, x: str = "step") -> tuple[list[int], list[float]]:
    """(steps or rounds, values) of ``key`` in ``run``, skipping rows without a number for it."""
    rows = run.rounds if x == "round" else run.eval if key.startswith("eval/") else run.train
    pairs = [(r[x], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [p[0] for p in pairs], [float(p[1]) for p in pairs]


def line_plot(runs: list[Run], plot: Plot, out_dir: str) -> str | None:
    """Write ``plot`` for ``runs``; returns the file name, or None when no run has any of its series."""
    # A panel without data (grad norm where DeepSpeed's stage does not compute it) is left out.
    panels = [p for p in plot.panels if any(points(r, s.key, plot.x)[0] for r in runs for s in p)]
    if not panels:
        return None
    fig, axes, colors = _figure(len(panels), 7, 4)
    for ax, panel in zip(axes, panels):
        for i, run in enumerate(runs):
            for j, series in enumerate(panel):
                x, y = points(run, series.key, plot.x)
                if not x:
                    continue
                # One run: a colour per series; several: a colour per run and a line style per series.
                name = series.name if len(runs) == 1 else f"{run.label}: {series.name}"
                color = colors[(j if len(runs) == 1 else i) % len(colors)]
                ax.plot(x, y, STYLES[j % len(STYLES)], color=color, label=name,
                        marker="o" if series.key.startswith("eval/") or plot.x == "round" else None, markersize=4)
        ax.set_xlabel("optimizer step" if plot.x == "step" else "round")
        ax.set_ylabel(plot.ylabel or panel[0].name)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, plot.title, out_dir, plot.file)


def length_histograms(runs: list[Run], out_dir: str, file: str = "token_lengths.png") -> str | None:
    """Token-length histograms (prompt, chosen, rejected, total) from summary.json, runs overlaid."""
    hists = [(r, r.summary.get("token_length_histogram")) for r in runs]
    hists = [(r, h) for r, h in hists if h]
    if not hists:
        return None
    names = [n for n in hists[0][1] if n != "edges"]  # prompt, chosen, rejected (KTO: completion, kl_completion), total
    fig, axes, colors = _figure(len(names), 4, 3.5)
    for ax, name in zip(axes, names):
        for i, (run, h) in enumerate(hists):
            ax.stairs(h[name], h["edges"], fill=len(hists) == 1, alpha=0.6 if len(hists) == 1 else 1.0,
                      color=colors[i % len(colors)], label=run.label if len(hists) > 1 else None)
        ax.set_title(f"{name} tokens")
        ax.set_xlabel("tokens")
        ax.set_ylabel("pairs")
        ax.grid(alpha=0.3)
        if len(hists) > 1:
            ax.legend(fontsize=7)
    return _save(fig, "Token lengths of kept pairs (after truncation; total = prompt + longer completion)", out_dir, file)


def write_plots(runs: list[Run], out_dir: str) -> list[tuple[str, str]]:
    """Every plot that has data: [(file name, title)]."""
    made = []
    for plot in PLOTS:
        if line_plot(runs, plot, out_dir):
            made.append((plot.file, plot.title))
    if length_histograms(runs, out_dir):
        made.append(("token_lengths.png", "Token lengths of kept pairs"))
    return made
