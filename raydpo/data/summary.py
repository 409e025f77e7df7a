"""The data stage's accounting: every row read is used, quarantined (with its reason) or filtered."""

from __future__ import annotations

from dataclasses import dataclass, field

from raydpo.observability import console
from raydpo.data.blocks import reduce_blocks
from raydpo.data.unpaired import REJECTED_HALF


@dataclass
class DataSummary:
    """What happened to every row read. Pairs: ``read == used + quarantined + filtered``. Unpaired
    examples (KTO): a split pair is two examples, so ``read + pairs_split == used + quarantined +
    filtered``, and every used example is desirable or undesirable."""

    read: int = 0
    used: dict[str, int] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)
    filtered: dict[str, int] = field(default_factory=dict)
    pairs_split: int = 0
    """Paired rows split into a desirable and an undesirable example (unpaired losses only)."""
    desirable: dict[str, int] = field(default_factory=dict)
    """Used desirable examples per split (unpaired losses only)."""
    undesirable: dict[str, int] = field(default_factory=dict)
    """Used undesirable examples per split."""
    unpaired: bool = False

    def as_dict(self) -> dict:
        q, f, u = sum(self.quarantined.values()), sum(self.filtered.values()), sum(self.used.values())
        out = {
            "rows_read": self.read,
            "rows_used": u,
            "rows_used_by_split": dict(self.used),
            "rows_quarantined": q,
            "quarantined_by_reason": dict(self.quarantined),
            "rows_filtered": f,
            "filtered_by_reason": dict(self.filtered),
            "counts_add_up": self.read + self.pairs_split == u + q + f,
        }
        if self.unpaired:
            labelled = sum(self.desirable.values()) + sum(self.undesirable.values())
            out |= {"examples": self.read + self.pairs_split, "pairs_split": self.pairs_split,
                    "desirable_by_split": dict(self.desirable), "undesirable_by_split": dict(self.undesirable),
                    "counts_add_up": out["counts_add_up"] and labelled == u}
        return out


def reason_kind(reason: str) -> str:
    """'wrong_type: chosen is int, expected str' -> 'wrong_type' (the countable part)."""
    return reason.split(":", 1)[0]


def _bump(counts: dict, key: str, n: int) -> None:
    counts[key] = counts.get(key, 0) + n


def summarize(processed, unpaired: bool = False) -> DataSummary:
    """Count rows by status, split and reason kind (and unpaired examples by label), in a task that
    reads the blocks where they are (:mod:`raydpo.data.blocks`)."""
    return reduce_blocks(count_rows, processed, unpaired)


def count_rows(tables, unpaired: bool = False) -> DataSummary:
    """:func:`summarize` over an iterable of blocks."""
    summary = DataSummary(unpaired=unpaired)
    names = ["status", "reason", "split", "part", "label"]
    for block in tables:
        counts = block.select(names).group_by(names).aggregate([([], "count_all")])
        for status, reason, split, part, label, n in zip(*(counts[c].to_pylist() for c in names + ["count_all"])):
            if part == REJECTED_HALF:
                summary.pairs_split += n
            else:
                summary.read += n
            if status == "ok":
                _bump(summary.used, split, n)
                if label >= 0:
                    _bump(summary.desirable if label else summary.undesirable, split, n)
            else:
                _bump(summary.quarantined if status == "quarantined" else summary.filtered, reason_kind(reason), n)
    return summary


def describe(summary: DataSummary, seconds: float) -> str:
    """The data stage's closing console line: every row accounted for, reasons included."""
    splits = ", ".join(f"{k} {v:,}" for k, v in sorted(summary.used.items(), key=lambda kv: kv[0] != "train"))
    line = f"data: {summary.read:,} rows read in {console.duration(seconds)}: {sum(summary.used.values()):,} kept ({splits})"
    if summary.unpaired:
        line = (f"data: {summary.read:,} rows read in {console.duration(seconds)}"
                + (f", {summary.pairs_split:,} pairs split in two" if summary.pairs_split else "")
                + f": {sum(summary.used.values()):,} examples kept ({splits}; {sum(summary.desirable.values()):,} desirable, "
                  f"{sum(summary.undesirable.values()):,} undesirable)")
    for name, by_reason in (("quarantined", summary.quarantined), ("filtered", summary.filtered)):
        n = sum(by_reason.values())
        line += f", {n:,} {name}" + (f" ({console.counts(by_reason)})" if n else "")
    return line
