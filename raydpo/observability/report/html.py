"""report.html: one self-describing page per report (tables as HTML, plots as the PNG files beside it)."""

from __future__ import annotations

import html
import math
import statistics
import time

import yaml

from raydpo.observability.report.runs import Run, config_differences

#: Training rows listed in full up to this many per run; beyond it, evenly spaced ones (first and last kept).
MAX_ROWS = 100
STEP_COLUMNS = ["step", "epoch", "loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
                "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "pairs_per_s", "tokens_per_s"]
EVAL_COLUMNS = ["step", "eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/rewards/chosen",
                "eval/rewards/rejected", "eval/logps/chosen", "eval/logps/rejected", "eval/pairs"]

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.note{color:#a33}pre{background:#f7f7f7;padding:1em;overflow-x:auto}figure{margin:1em 0}"""


def fmt(value) -> str:
    """How a value is written in the report: integers (and whole float counts such as
    ``eval/pairs``) as is, rates of 100 and more to 1 decimal, other floats to 4 decimals, and
    tiny or huge ones in scientific notation (a learning rate)."""
    if value is None:
        return "-"
    if isinstance(value, (bool, int)):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value.is_integer() and 10 <= abs(value) < 1e15:
            return str(int(value))
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e7):
            return f"{value:.3e}"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"
    return str(value)


def _e(text) -> str:
    return html.escape(str(text))


def table(header: list, rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def sample(rows: list[dict], limit: int = MAX_ROWS) -> list[dict]:
    """At most ``limit`` rows, evenly spaced, always the first and the last."""
    if len(rows) <= limit:
        return rows
    idx = sorted({round(i * (len(rows) - 1) / (limit - 1)) for i in range(limit)})
    return [rows[i] for i in idx]


def _median(rows: list[dict], key: str):
    values = [r[key] for r in rows[1:] if isinstance(r.get(key), (int, float))]  # step 1 includes start-up
    return statistics.median(values) if values else None


def overview(runs: list[Run]) -> str:
    """Runs as columns: outcome, final metrics, data counts and stage timings."""
    def last(rows, key):
        return rows[-1].get(key) if rows else None

    s = [r.summary for r in runs]
    t = [r.summary.get("timings_s", {}) for r in runs]
    lines = [
        ("finished", [x.get("finished", False) for x in s]),
        ("steps", [x.get("steps", last(r.train, "step")) for x, r in zip(s, runs)]),
        ("final train loss", [last(r.train, "loss") for r in runs]),
        ("final train reward accuracy", [last(r.train, "rewards/accuracies") for r in runs]),
        ("final train reward margin", [last(r.train, "rewards/margins") for r in runs]),
        ("final eval loss", [last(r.eval, "eval/loss") for r in runs]),
        ("final eval reward accuracy", [last(r.eval, "eval/rewards/accuracies") for r in runs]),
        ("final eval reward margin", [last(r.eval, "eval/rewards/margins") for r in runs]),
        ("median pairs/s", [_median(r.train, "pairs_per_s") for r in runs]),
        ("median tokens/s", [_median(r.train, "tokens_per_s") for r in runs]),
        ("rows read", [x.get("rows_read") for x in s]),
        ("rows used", [x.get("rows_used") for x in s]),
        ("rows quarantined", [x.get("rows_quarantined") for x in s]),
        ("rows filtered", [x.get("rows_filtered") for x in s]),
        ("counts add up", [x.get("counts_add_up") for x in s]),
        *[(f"{stage.replace('_', ' ')} time (s)", [x.get(stage) for x in t]) for stage in ("data", "reference", "train", "first_step", "total")],
    ]
    return table(["", *[r.label for r in runs]], [[name, *values] for name, values in lines])


def data_section(runs: list[Run]) -> str:
    """Every row's fate by reason, and token-length statistics, per run."""
    reasons = []
    for r in runs:
        for kind in ("quarantined", "filtered"):
            reasons += [(kind, k) for k in r.summary.get(f"{kind}_by_reason", {}) if (kind, k) not in reasons]
    rows = [["read", *[r.summary.get("rows_read") for r in runs]]]
    splits = sorted({k for r in runs for k in r.summary.get("rows_used_by_split", {})}, key=lambda k: k != "train")
    rows += [[f"used: {k}", *[r.summary.get("rows_used_by_split", {}).get(k, 0) for r in runs]] for k in splits]
    rows += [[f"{kind}: {k}", *[r.summary.get(f"{kind}_by_reason", {}).get(k, 0) for r in runs]] for kind, k in reasons]
    out = "<h3>Rows by outcome and reason</h3>" + table(["", *[r.label for r in runs]], rows)
    quarantine = [r.summary.get("quarantine_file") for r in runs if r.summary.get("rows_quarantined")]
    if quarantine:
        out += "<p>Each quarantined row with its source, position and reason: " + ", ".join(f"<code>{_e(q)}</code>" for q in quarantine) + "</p>"
    stats = [[r.label, name, *[r.summary["token_lengths"][name].get(k) for k in ("mean", "p50", "p95", "max")]]
             for r in runs if r.summary.get("token_lengths") for name in r.summary["token_lengths"] if r.summary["token_lengths"].get(name)]
    if stats:
        out += "<h3>Token lengths of kept pairs (after truncation)</h3>" + table(["run", "part", "mean", "p50", "p95", "max"], stats)
    return out


def render(runs: list[Run], plots: list[tuple[str, str]]) -> str:
    """The whole page."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>raydpo report</title><style>{CSS}</style></head><body>",
             "<h1>raydpo report</h1>",
             f"<p>Generated {_e(time.strftime('%Y-%m-%d %H:%M:%S'))} from:</p><ul>"
             + "".join(f"<li><b>{_e(r.label)}</b>: <code>{_e(r.path)}</code></li>" for r in runs) + "</ul>"]
    for r in runs:
        parts += [f"<p class='note'>{_e(r.label)}: {_e(n)}</p>" for n in r.notes]
    parts += ["<h2>Overview</h2>", overview(runs)]
    diffs = config_differences(runs)
    if len(runs) > 1:
        parts += ["<h2>Config differences</h2>",
                  table(["key", *[r.label for r in runs]], [[k, *[_json(v) for v in vals]] for k, vals in diffs.items()])
                  if diffs else "<p>The configs do not differ (beyond where the runs wrote).</p>"]
    parts.append("<h2>Plots</h2>")
    parts += [f"<figure><img src='{_e(f)}' alt='{_e(title)}'><figcaption>{_e(title)}</figcaption></figure>" for f, title in plots]
    parts += ["<h2>Data</h2>", data_section(runs)]
    for r in runs:
        if r.eval:
            parts += [f"<h2>Evaluations: {_e(r.label)}</h2>", table(EVAL_COLUMNS, [[row.get(c) for c in EVAL_COLUMNS] for row in r.eval])]
        if r.train:
            shown = sample(r.train)
            parts += [f"<h2>Training steps: {_e(r.label)}</h2>",
                      f"<details{' open' if len(runs) == 1 else ''}><summary>{len(shown)} of {len(r.train)} logged steps</summary>",
                      table(STEP_COLUMNS, [[row.get(c) for c in STEP_COLUMNS] for row in shown]), "</details>"]
    for r in runs:
        if r.config:
            parts.append(f"<h2>Config: {_e(r.label)}</h2><details><summary>config.yaml (resolved)</summary>"
                         f"<pre>{_e(yaml.safe_dump(r.config, sort_keys=False))}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _json(value) -> str:
    return value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
