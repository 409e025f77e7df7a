"""The data stage on Ray Data: read, validate, tokenize, split, account for every row.

read_preferences -> map_batches(Preprocess) on an actor pool (one tokenizer per actor, one
batched tokenizer call per batch) -> a materialized table where every input row is ``ok``,
``quarantined`` (bad input, with its reason) or ``filtered`` (valid but unusable, e.g. the prompt
alone exceeds max_length). Counts always add up: read = used + quarantined + filtered.
"""

from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from raydpo.observability import console
from raydpo.data.blocks import block_metadata, collect, materialized, reduce_blocks
from raydpo.data.passes import first_reason, mark_duplicates, pick, rows_with, status_counts, write_quarantine
from raydpo.data.summary import DataSummary, describe, summarize
from raydpo.data.tokenizer import TokenizerSpec, driver_tokenizer_spec
from raydpo.data.tokenize import TokenizeSettings, pair_id, pair_key, token_digest, tokenize_normalized
from raydpo.config.rules import loss_names, unpaired
from raydpo.data.unpaired import UNPAIRED_ROW, example_key, example_order, parse_examples, with_kl_sequences
from raydpo.data.validate import parse_row

IDS = pa.list_(pa.int32())
OUT_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("source", pa.string()),
        ("index", pa.int64()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("raw", pa.binary()),
        ("prompt_ids", IDS),
        ("chosen_ids", IDS),
        ("rejected_ids", IDS),
        ("digest", pa.binary()),
        ("split", pa.string()),
        ("part", pa.int8()),
        ("label", pa.int8()),
        ("kl_group", pa.int64()),
    ]
)
#: Columns of a kept pair, as the reference and train stages consume them.
PAIR_COLUMNS = ["pair_id", "source", "index", "prompt_ids", "chosen_ids", "rejected_ids", "digest"]
#: What an unpaired example (KTO, :mod:`raydpo.data.unpaired`) carries besides: completion in
#: ``chosen_ids``, KL completion in ``rejected_ids``.
EXAMPLE_COLUMNS = ["label"]


def kept_columns(unpaired: bool) -> list[str]:
    """The columns of a kept pair or unpaired example."""
    return PAIR_COLUMNS + EXAMPLE_COLUMNS if unpaired else PAIR_COLUMNS


def eval_bucket(pid: str, eval_fraction: float) -> bool:
    """Deterministic content split: the same pair lands in the same split on every run and machine."""
    return int(pid[:8], 16) / 0x1_0000_0000 < eval_fraction


class Preprocess:
    """Ray Data callable: raw rows -> validated, tokenized rows with a status (one tokenizer per actor).

    One pool serves both splits: a row whose ``source`` is in ``eval_sources`` is an eval row; the
    others are train rows, ``eval_fraction`` of which (by content) are held out for eval."""

    def __init__(self, tokenizer: TokenizerSpec, settings: TokenizeSettings, eval_sources: list[str] = (), eval_fraction: float = 0.0,
                 columns: dict | None = None, fmt: str = "auto", marker: str = "\n\nAssistant:",
                 shared_prompt: bool = True, unpaired: bool = False, unpair_pairs: bool = True):
        # One thread per actor: the pool is the parallelism. The Rust tokenizer would otherwise
        # run a thread per core in every actor, which costs 20% more CPU per pair here.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        from raydpo.data.prompt_cut import special_prefix
        from raydpo.data.tokenizer import load_spec

        # AutoTokenizer's pipeline as the driver loaded it, checked on probe texts (raydpo.data.tokenizer).
        self.tokenizer = load_spec(tokenizer)
        self.cut_prefix = special_prefix(self.tokenizer)[0] if shared_prompt else None
        self.settings = settings
        self.eval_sources = frozenset(eval_sources)
        self.eval_fraction = eval_fraction
        self.unpaired = unpaired
        self.parse = (lambda raw: parse_examples(raw, columns, fmt, marker, unpair_pairs)) if unpaired else \
            (lambda raw: [(*parse_row(raw, columns, fmt, marker), UNPAIRED_ROW, None)])

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = {name: batch.column(name).to_pylist() for name in ("source", "index", "raw")}
        # One unit per pair, or per unpaired example (a split pair gives two): (row, Pair or None, reason, part, label).
        units = [(i, *unit) for i, raw in enumerate(rows["raw"]) for unit in self.parse(raw)]
        good = [u for u, unit in enumerate(units) if unit[1] is not None]
        tokens = tokenize_normalized(self.tokenizer, [units[u][1] for u in good], self.settings, self.cut_prefix)
        tokenized = dict(zip(good, tokens))
        out = {name: [] for name in OUT_SCHEMA.names}
        for u, (i, pair, reason, part, desirable) in enumerate(units):
            tok = tokenized.get(u)
            if pair is not None and tok["error"]:
                pair, reason = None, tok["error"]
            if pair is None:
                status, pid = "quarantined", ""
            else:
                pid = example_key(pair, desirable) if self.unpaired else pair_key(pair)
                status, reason = ("filtered", tok["filtered"]) if tok["filtered"] else ("ok", "")
            ok = status == "ok"
            split = "eval" if rows["source"][i] in self.eval_sources else "train"
            # An unpaired example is split by its prompt, so a prompt's examples (a split pair's two) stay together.
            bucket = pair_id(pair.prompt, None, None) if ok and self.unpaired else pid
            if ok and split == "train" and self.eval_fraction > 0 and eval_bucket(bucket, self.eval_fraction):
                split = "eval"
            ids = (tok["prompt_ids"], tok["chosen_ids"], tok["rejected_ids"]) if ok else ([], [], [])
            values = {
                "pair_id": pid,
                "source": rows["source"][i],
                "index": rows["index"][i],
                "status": status,
                "reason": reason or "",
                "raw": b"" if ok else rows["raw"][i],
                "prompt_ids": ids[0],
                "chosen_ids": ids[1],
                "rejected_ids": ids[2],
                "digest": token_digest(*ids) if ok else b"",
                "split": split,
                "part": part,
                "label": -1 if desirable is None or pair is None else int(desirable),
                "kl_group": -1,
            }
            for name, value in values.items():
                out[name].append(value)
        return pa.table(out, schema=OUT_SCHEMA)


class _LiveCounts:
    """Counts of the rows leaving the tokenizer pool, shown on the console as they stream: each
    block's statuses are counted by a task where the block is (the driver fetches three numbers)."""

    def __init__(self):
        self.by_status: collections.Counter = collections.Counter()
        self.rate = console.Rate("rows")
        self.pending: list = []
        self.read = 0  # from the blocks' metadata, at once; the statuses follow from the tasks

    def __call__(self, ref, metadata) -> None:
        from raydpo.storage.remote import on_cluster

        import ray

        from raydpo.data.blocks import IN_FLIGHT

        self.read += metadata.num_rows if metadata is not None else 0
        if len(self.pending) >= IN_FLIGHT:  # a bounded number of count tasks (each may need a worker process)
            ray.wait(self.pending, num_returns=len(self.pending) - IN_FLIGHT + 1, fetch_local=False)
        self.pending.append(on_cluster(status_counts, ref, fetch=False))
        self.take(wait=False)

    def take(self, wait: bool) -> None:
        import ray

        done = []
        if self.pending:
            done, self.pending = ray.wait(self.pending, num_returns=len(self.pending),
                                          timeout=None if wait else 0, fetch_local=True)
        for counts in ray.get(done):
            self.by_status.update(counts)
        read = max(self.read, sum(self.by_status.values()))
        tokenized = self.by_status["ok"] + self.by_status["filtered"]
        console.get().update("data", f"data: {read:,} rows read, {tokenized:,} tokenized, "
                                     f"{self.by_status['quarantined']:,} quarantined{self.rate.suffix(read)}")


@dataclass
class PreparedData:
    """The data stage's result: kept pairs per split (materialized) and the accounting."""

    train: object
    """``ray.data.Dataset`` of kept training pairs (``PAIR_COLUMNS``)."""
    eval: object | None
    """Kept eval pairs, or None when there is no eval split."""
    n_train: int
    n_eval: int
    summary: DataSummary
    files: list[str]
    """Resolved input files, train then eval: the 'input order' of exports."""
    processed: object
    """Every row read with its status (for exports and statistics)."""
    settings: TokenizeSettings
    cache: dict = field(default_factory=dict)
    """How the tokenized-data cache served this run: ``hit``, ``key``, ``entry``, ``status``."""


def tokenize_settings(cfg) -> TokenizeSettings:
    from raydpo import storage

    d = cfg.data
    template = d.chat_template
    if template and template.endswith(".jinja"):
        try:
            template = storage.read_text(template)
        except FileNotFoundError:
            raise FileNotFoundError(f"data.chat_template file {template!r} does not exist") from None
    return TokenizeSettings(
        max_length=d.max_length,
        truncation_mode=d.truncation_mode,
        max_prompt_length=d.max_prompt_length,
        chat_template=template,
    )


def add_kl_sequences(processed, files: list[str], group: int, settings: TokenizeSettings, kl: bool = True):
    """Every kept unpaired example with its KL sequence (:func:`raydpo.data.unpaired.with_kl_sequences`),
    per split in input order; the other rows unchanged. Group ids are unique across splits."""
    if not processed.num_blocks():
        return processed
    *tables, metadata = reduce_blocks(_with_kl, processed, files, group, settings, kl, num_returns=4)
    import ray

    return materialized(tables, ray.get(metadata))


def _with_kl(tables, files: list[str], group: int, settings: TokenizeSettings, kl: bool):
    """:func:`add_kl_sequences` in a task: (the other rows, train examples, eval examples, their
    block metadata)."""
    rank = {f: i for i, f in enumerate(files)}
    everything = pa.concat_tables(list(tables))
    out, first = [everything.filter(pc.invert(pc.equal(everything["status"], "ok")))], 0
    for split in ("train", "eval"):
        kept = rows_with(everything, "ok", split)
        if not kept.num_rows:
            continue
        keys = [example_order(rank.get(src, len(rank)), src, idx, part)
                for src, idx, part in zip(kept["source"].to_pylist(), kept["index"].to_pylist(), kept["part"].to_pylist())]
        order = sorted(range(kept.num_rows), key=keys.__getitem__)
        paired = with_kl_sequences(kept, order, group, settings, first, kl)
        first = int(pc.max(paired["kl_group"]).as_py()) + 1
        out.append(paired)
    out += [out[0].slice(0, 0)] * (3 - len(out))
    return (*out, [block_metadata(t) for t in out])


def _process(raw_rows, eval_sources: list[str], cfg, eval_fraction: float, pool: tuple[int, float]):
    """The tokenizer pool over ``raw_rows`` (both splits: one pool, so the reads that feed it keep
    their CPUs); ``pool``: (actors, CPUs each), :func:`raydpo.cluster.tokenizer_pool`."""
    import ray.data

    return raw_rows.map_batches(
        Preprocess,
        fn_constructor_kwargs={
            "tokenizer": driver_tokenizer_spec(cfg.model.name_or_path, cfg.model.trust_remote_code),
            "settings": tokenize_settings(cfg),
            "eval_sources": eval_sources,
            "eval_fraction": eval_fraction,
            "columns": cfg.data.columns,
            "fmt": cfg.data.format,
            "marker": cfg.data.prompt_marker,
            "shared_prompt": cfg.data.shared_prompt,
            "unpaired": unpaired(cfg.loss),
            "unpair_pairs": cfg.data.unpair_pairs,
        },
        compute=ray.data.ActorPoolStrategy(size=pool[0]),
        num_cpus=pool[1],
        batch_size=cfg.data.tokenize_batch_size,
        batch_format="pyarrow",
    )


def read_and_tokenize(cfg, train, eval) -> tuple[object, list[str]]:
    """The Ray Data pipeline: read, validate and tokenize on the actor pool, then de-duplicate and
    pair KL sequences. Returns (every row with its status, the resolved source names)."""
    from raydpo.cluster import tokenizer_pool
    from raydpo.data.sources import from_ray, read_preferences

    actors, actor_cpus, read_cpus = tokenizer_pool(cfg.data.num_workers)

    def source(given, specs, split):
        if given is not None:
            return from_ray(given, f"<ray.data.Dataset:{split}>"), [f"<ray.data.Dataset:{split}>"]
        default = "train" if split == "train" else "test"
        return read_preferences(specs, default_split=default, read_cpus=read_cpus) if specs else (None, [])

    train_raw, train_files = source(train, cfg.data.train, "train")
    eval_raw, eval_files = source(eval, cfg.data.eval, "eval")
    raw = train_raw if eval_raw is None else train_raw.union(eval_raw)
    ds = _process(raw, eval_files, cfg, cfg.data.eval_fraction if eval_raw is None else 0.0, (actors, actor_cpus))
    inputs = train_files + eval_files
    fewer = (f" (data.num_workers={cfg.data.num_workers} would hold every CPU of this cluster and leave none for "
             "the read tasks)") if actors < cfg.data.num_workers else ""
    console.get().say(f"data: reading {len(inputs)} source(s), tokenizing on {actors} actor(s){fewer}"
                      + (f": {', '.join(inputs)}" if len(inputs) <= 3 else ""))
    live = _LiveCounts()
    processed = collect(ds, live)
    live.take(wait=True)
    if cfg.data.deduplicate:
        processed = mark_duplicates(processed, inputs)
    if unpaired(cfg.loss):
        processed = add_kl_sequences(processed, inputs, cfg.train.micro_batch_size, tokenize_settings(cfg),
                                     kl="kto" in loss_names(cfg.loss))
    return processed, inputs


def prepare(cfg, quarantine_path: str, train=None, eval=None) -> PreparedData:
    """Read, validate and tokenize ``data.train`` (and ``data.eval``), or read them from the
    tokenized-data cache; write the quarantine file.

    ``train`` / ``eval``: optional ``ray.data.Dataset`` s of preference rows used instead of the
    configured paths (the Python API's way to hand data from an earlier pipeline stage).
    Raises ValueError when the quarantined fraction exceeds ``data.max_bad_fraction`` (after the
    quarantine file is written, so the user can see why) or when no training pair is left.
    """
    if train is None and not cfg.data.train:
        raise ValueError("data.train is empty: give at least one preference data file")
    started = time.perf_counter()
    from raydpo.data.cache import cached_or_tokenized

    processed, inputs, data_cache = cached_or_tokenized(cfg, train, eval)
    is_unpaired = unpaired(cfg.loss)
    summary = summarize(processed, is_unpaired)
    console.get().update("data", describe(summary, time.perf_counter() - started), final=True)
    write_quarantine(processed, quarantine_path)
    if summary.quarantined:
        console.get().say(f"quarantined rows, each with its source, position and reason: {quarantine_path}")
    bad = sum(summary.quarantined.values())
    if summary.read and bad / summary.read > cfg.data.max_bad_fraction:
        kind, n = max(summary.quarantined.items(), key=lambda kv: kv[1])
        raise ValueError(
            f"{bad} of {summary.read} rows ({bad / summary.read:.2%}) are malformed, more than "
            f"data.max_bad_fraction={cfg.data.max_bad_fraction}; most often ({n:,} rows) {first_reason(processed, kind)}; "
            f"see {quarantine_path} for each row and its reason"
        )
    columns = kept_columns(is_unpaired)
    train = pick(processed, "ok", "train", columns)
    n_train = summary.used.get("train", 0)
    if n_train == 0:
        raise ValueError(f"no usable training pair in {summary.read} rows read; see {quarantine_path}")
    n_eval = summary.used.get("eval", 0)
    evals = pick(processed, "ok", "eval", columns) if n_eval else None
    return PreparedData(train, evals, n_train, n_eval, summary, inputs, processed, tokenize_settings(cfg), data_cache)
