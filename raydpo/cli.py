"""The ``raydpo`` command line (also ``python -m raydpo``)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _load(args):
    from raydpo.config import load

    level = "quiet" if getattr(args, "quiet", False) else "verbose" if getattr(args, "verbose", False) else None
    return load(args.config, args.overrides + ([f"logging.console={level}"] if level else []))


def cmd_train(args) -> int:
    from raydpo.pipeline import run

    result = run(_load(args), force=args.force)
    s = result.summary
    if result.status == "finished":
        print(f"[raydpo] {result.output_dir} already holds a finished run ({s.get('steps')} steps); nothing to do "
              "(--force trains again from the start)")
        return 0
    if result.status == "resume":
        print("[raydpo] resumed the unfinished run in output.dir from its latest checkpoint")
    ev = s.get("final_eval_metrics") or {}
    print(
        f"[raydpo] done: {s['steps']} steps, {s['rows_used']} pairs used of {s['rows_read']} read "
        f"({s['rows_quarantined']} quarantined, {s['rows_filtered']} filtered)"
        + (f", eval reward accuracy {ev['eval/rewards/accuracies']:.3f}" if ev else "")
    )
    print(f"[raydpo] model: {result.model_path}")
    print(f"[raydpo] run directory: {result.output_dir}")
    return 0


def cmd_online(args) -> int:
    from raydpo.online.run import run_online

    result = run_online(_load(args), force=args.force)
    s = result.summary
    if result.status == "finished":
        print(f"[raydpo] {result.output_dir} already holds a finished online run ({s.get('rounds')} rounds); nothing to do "
              "(--force runs it again from the start)")
        return 0
    print(f"[raydpo] done: {s['rounds']} rounds, {s['steps']} steps, {s['pairs']} pairs from {s['samples']} samples "
          f"({s['ties']} ties, {s['judge_failures']} judge failures)"
          + (f", held-out reward {s['initial_eval_reward']:.3f} -> {s['final_eval_reward']:.3f}"
             if s.get("initial_eval_reward") is not None and s.get("final_eval_reward") is not None else ""))
    print(f"[raydpo] model: {result.model_path}")
    print(f"[raydpo] run directory: {result.output_dir}")
    return 0


def cmd_sweep(args) -> int:
    import yaml

    from raydpo.config import apply_overrides
    from raydpo.sweep import sweep

    from raydpo import storage

    raw = yaml.safe_load(storage.read_text(args.config)) or {}
    level = "quiet" if args.quiet else "verbose" if args.verbose else None
    raw = apply_overrides(raw, args.overrides + ([f"logging.console={level}"] if level else []))
    summary = sweep(raw, args.grid, args.concurrent)
    return 1 if any(r["status"] == "failed" for r in summary["runs"]) else 0


def cmd_precompute(args) -> int:
    from raydpo.data.stats import export_reference
    from raydpo.pipeline import precompute

    data, refs = precompute(_load(args))
    if args.export:
        n = export_reference(data.processed, data.files, [r.dataset for r in refs.values()], args.export)
        print(f"[raydpo] exported {n} pairs to {args.export}", file=sys.stderr)
    for split, r in refs.items() if not args.quiet else ():
        state = "cache hit" if r.cache_hit else f"scored {r.pairs_scored} pairs"
        print(f"[raydpo] {split}: {state}, cache entry {r.entry}", file=sys.stderr)
    print(refs["train"].entry)
    return 0


def cmd_validate(args) -> int:
    from raydpo.pipeline import validate_data

    summary = validate_data(_load(args))
    summary.pop("token_length_histogram")  # in summary.json and `raydpo report`; too long for a terminal
    print(json.dumps(summary, indent=1))
    return 0


def cmd_tiny_model(args) -> int:
    from raydpo.fixtures.tiny import TinyModelSpec, write_tiny_model

    if args.family:  # one of the model-family matrix's architectures, at the matrix's sizes
        from raydpo.fixtures.families import write_family_model

        print(write_family_model(args.out_dir, args.family, seed=args.seed, vocab_size=args.vocab_size))
        return 0

    spec = TinyModelSpec(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size or 2 * args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        seed=args.seed,
    )
    if args.reward_model:
        from raydpo.fixtures.tiny import write_tiny_reward_model

        print(write_tiny_reward_model(args.out_dir, spec))
        return 0
    print(write_tiny_model(args.out_dir, spec))
    return 0


def cmd_synthetic(args) -> int:
    from raydpo.fixtures.synthetic import write_task

    for path in write_task(args.out_dir, args.n_train, args.n_eval, args.seed):
        print(path)
    return 0


def cmd_report(args) -> int:
    from raydpo.observability.report import write_report

    out = args.out or (os.path.join(args.run_dirs[0], "report") if len(args.run_dirs) == 1 else "raydpo-report")
    print(write_report(args.run_dirs, out))
    return 0


def _cache_roots(args) -> list[tuple[str, str]]:
    """[("reference", root), ("tokenized", root)]: the flags', else the config's, else the defaults."""
    from raydpo.config import Config
    from raydpo.data.cache import cache_root

    cfg = _load(args) if args.config else Config()
    if args.cache_dir:
        cfg.reference.cache_dir = args.cache_dir
    if args.data_cache_dir:
        cfg.data.cache_dir = args.data_cache_dir
    from raydpo import storage

    return [("reference", storage.normalize(cfg.reference.cache_dir)), ("tokenized", cache_root(cfg))]


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _describe_entry(e: dict) -> str:
    if e["status"] != "complete":
        return f"{e['status']} ({e['n_files']} files of unfinished or other-format writers)"
    if e["kind"] == "tokenized":
        return f"{e.get('pairs')} rows read, {len(e.get('files') or [])} source(s)"
    return f"{e.get('pairs')} pairs, {e.get('dtype')}, {e.get('backend')}, reference {e.get('reference')}"


def cmd_cache(args) -> int:
    import time

    from raydpo.reference import store
    from raydpo.storage import entries

    roots = _cache_roots(args)
    if args.action == "list":
        found = [e | {"kind": kind} for kind, root in roots for e in store.list_entries(root)]
        if args.json:
            print(json.dumps(found, indent=1))
            return 0
        for kind, root in roots:
            mine = [e for e in found if e["kind"] == kind]
            print(f"{len(mine)} {kind} entries in {root}")
            for e in mine:
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["created"]))
                print(f"{e['key']}  {when}  {_human_bytes(e['bytes']):>10}  {_describe_entry(e)}"
                      + (f"; {_human_bytes(e['unlisted'])} unlisted" if e["status"] == "complete" and e["unlisted"] else ""))
        return 0
    removed = [e | {"kind": kind} for kind, root in roots
               for e in entries.prune(root, keys=args.key or None, older_than_days=args.older_than_days,
                                      keep_last=args.keep_last, min_age_s=args.min_age_minutes * 60, dry_run=args.dry_run)]
    verb = "would remove" if args.dry_run else "removed"
    for e in removed:
        what = "" if e["removed"] == "entry" else "unlisted files of "
        print(f"{verb} {what}{e['key']} ({e['kind']}, {e['status']}, {_human_bytes(e['bytes'])})")
    print(f"[raydpo] {verb} {len(removed)} entries, {_human_bytes(sum(e['bytes'] for e in removed))}", file=sys.stderr)
    return 0


def cmd_config_docs(args) -> int:
    from raydpo.config.reference import render

    page = render()
    if args.check:
        try:
            with open(args.out, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != page:
            state = "is missing" if current is None else "is stale: it differs from the config dataclasses' docstrings"
            print(f"raydpo: {args.out} {state}; run `raydpo config-docs --out {args.out}` (or `make docs`) and commit it",
                  file=sys.stderr)
            return 1
        print(f"[raydpo] {args.out} is up to date")
        return 0
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(page)
    print(args.out)
    return 0


def entries_min_age_minutes() -> float:
    from raydpo.storage.entries import MIN_AGE_S

    return MIN_AGE_S / 60


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raydpo", description="DPO and relatives at cluster scale on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_: str):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", help="YAML config file")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.beta=0.05")
        level = sp.add_mutually_exclusive_group()
        level.add_argument("-q", "--quiet", action="store_true", help="no progress: errors and the final result only (logging.console=quiet)")
        level.add_argument("-v", "--verbose", action="store_true",
                           help="every logged step with all metrics, Ray's own logs and progress bars (logging.console=verbose)")
        return sp

    tr = with_config("train", "run data, reference and train stages (re-running resumes an unfinished run)")
    tr.add_argument("--force", action="store_true", help="train again from the start even if output.dir holds a finished run")
    tr.set_defaults(fn=cmd_train)
    on = with_config("online", "online / iterative DPO rounds: generate, judge, reference, train, sync (re-running resumes)")
    on.add_argument("--force", action="store_true", help="start again from round 0 even if output.dir holds a finished run")
    on.set_defaults(fn=cmd_online)
    sw = with_config("sweep", "a grid of runs as Ray Tune trials sharing one data and reference stage (re-running resumes)")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="a config key and its values (repeatable: the runs are the cartesian product)")
    sw.add_argument("--concurrent", type=int, default=1, help="runs training at once (clamped to what the cluster can place)")
    sw.set_defaults(fn=cmd_sweep)
    pc = with_config("precompute", "data and reference stages only; prints the cache directory")
    pc.add_argument("--export", metavar="FILE.jsonl", help="write reference log-probs per kept pair, in input order")
    pc.set_defaults(fn=cmd_precompute)
    with_config("validate-data", "read, validate and tokenize; no model").set_defaults(fn=cmd_validate)

    ca = sub.add_parser("cache", help="list or prune the reference log-prob and tokenized-data caches")
    ca.add_argument("action", choices=["list", "prune"])
    ca.add_argument("config", nargs="?", help="YAML config whose reference.cache_dir to use")
    ca.add_argument("overrides", nargs="*", help="dotted overrides, e.g. reference.cache_dir=/data/cache")
    ca.add_argument("--cache-dir", help="the reference cache root (default: the config's, else ~/.cache/raydpo/reference)")
    ca.add_argument("--data-cache-dir", help="the tokenized-data cache root (default: the config's data.cache_dir, "
                    "else tokenized/ beside the reference cache root)")
    ca.add_argument("--json", action="store_true", help="list: machine-readable output")
    ca.add_argument("--key", action="append", help="prune: this entry (repeatable)")
    ca.add_argument("--older-than-days", type=float, help="prune: entries created longer ago than this")
    ca.add_argument("--keep-last", type=int, help="prune: all but the newest N complete entries of each cache")
    ca.add_argument("--dry-run", action="store_true", help="prune: only say what would go")
    ca.add_argument("--min-age-minutes", type=float, default=entries_min_age_minutes(),
                    help="prune: leave alone anything with a file written more recently than this (a run may be "
                         "writing it); default %(default)g, 0 includes everything")
    ca.set_defaults(fn=cmd_cache)

    tm = sub.add_parser("tiny-model", help="write a tiny random Llama + trained BPE tokenizer")
    tm.add_argument("out_dir")
    tm.add_argument("--vocab-size", type=int, default=1024)
    tm.add_argument("--hidden-size", type=int, default=128)
    tm.add_argument("--intermediate-size", type=int, default=0, help="default: 2 x hidden size")
    tm.add_argument("--num-layers", type=int, default=2)
    tm.add_argument("--num-heads", type=int, default=2)
    tm.add_argument("--seed", type=int, default=0)
    tm.add_argument("--family", default=None, help="another architecture with its own tokenizer class: "
                    "llama, qwen2, qwen3, mistral, gemma2, gemma3_text, phi3, gpt2, gpt_neox, opt, mixtral, qwen2_moe "
                    "(the sizes options other than --vocab-size do not apply)")
    tm.add_argument("--reward-model", action="store_true", help="a sequence-classification head with one score instead "
                    "of the LM head (a judge for raydpo online)")
    tm.set_defaults(fn=cmd_tiny_model)

    sd = sub.add_parser("synthetic-data", help="write the synthetic preference task (train.jsonl, eval.jsonl)")
    sd.add_argument("out_dir")
    sd.add_argument("--n-train", type=int, default=2000)
    sd.add_argument("--n-eval", type=int, default=200)
    sd.add_argument("--seed", type=int, default=0)
    sd.set_defaults(fn=cmd_synthetic)

    rp = sub.add_parser("report", help="write report.html and PNG plots for one run directory, or compare several")
    rp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (output.dir of train, precompute or validate-data)")
    rp.add_argument("--out", help="where to write (default: RUN_DIR/report for one run, ./raydpo-report for several)")
    rp.set_defaults(fn=cmd_report)

    cd = sub.add_parser("config-docs", help="write the config reference page (docs/config.md) from the config dataclasses")
    cd.add_argument("--out", default="docs/config.md", help="where to write (default: %(default)s)")
    cd.add_argument("--check", action="store_true", help="write nothing; exit 1 when the page at --out differs from the code's")
    cd.set_defaults(fn=cmd_config_docs)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import yaml

    from raydpo.train.guard import GuardError

    try:
        return args.fn(args)
    # Bad config, data, paths or cache, or a missing tracker extra: the message says it all.
    except (ValueError, OSError, yaml.YAMLError, GuardError) as e:
        if os.environ.get("RAYDPO_TRACEBACK"):
            import traceback

            traceback.print_exc()
        print(f"raydpo: error: {e}", file=sys.stderr)
        return 2
