"""Passes over a materialized dataset's blocks that run where the blocks are, not on the driver.

The driver of a run holds block *refs* and per-block metadata: O(blocks), never O(pairs). A block
the driver reads (``ray.get``) maps its object-store pages into the driver's memory, where they stay
counted in its RSS for the rest of the run; at a million pairs that was gigabytes. So every pass that
reads rows -- filtering, counting, joining log-probs, writing the quarantine file -- is a Ray task:
:func:`map_blocks` for a pass that makes new blocks (the results are owned by the driver, which fetches
only their metadata), :func:`reduce_blocks` for a pass that makes a small answer (counts, a few keys).

The tasks reserve no CPU, so they never wait behind the stages' actor pools; at most
``IN_FLIGHT`` run at once, so they never crowd a small node either. Worker processes are reused:
after the first, a task costs milliseconds.
"""

from __future__ import annotations

from typing import Callable, Iterator

import pyarrow as pa

#: Block tasks in flight at once (each holds one block and its output, and may need a worker process
#: of its own: more would start workers faster than Ray expects on a small node).
IN_FLIGHT = 2


def refs_of(dataset) -> list:
    """The block refs of a materialized dataset (nothing is fetched)."""
    return list(dataset.to_arrow_refs())


def blocks(dataset_or_refs) -> Iterator[pa.Table]:
    """The blocks of a materialized dataset (or a list of block refs), fetched one at a time: for use
    inside a task (:func:`reduce_blocks`), in tests, or on tables the driver made itself."""
    import ray

    refs = dataset_or_refs if isinstance(dataset_or_refs, list) else dataset_or_refs.to_arrow_refs()
    for ref in refs:
        yield ray.get(ref)


def _apply(fn: Callable, table: pa.Table, *args):
    out = fn(table, *args)
    return out, block_metadata(out)


def map_blocks(fn: Callable[..., pa.Table], dataset_or_refs, *args, per_block: list | None = None):
    """``fn(block, *args)`` for every block, each as a Ray task; returns the results as a materialized
    dataset in block order. ``args`` may hold object refs (resolved in the task): a table the driver
    put once, shared by every task without a copy per task. ``per_block``: one more argument per
    block, passed right after it (``fn(block, per_block[i], *args)``)."""
    import ray

    refs = dataset_or_refs if isinstance(dataset_or_refs, list) else refs_of(dataset_or_refs)
    extra = [(x,) for x in per_block] if per_block is not None else [()] * len(refs)
    if not ray.is_initialized():
        return from_tables([fn(t, *more, *args) for t, more in zip(blocks(refs), extra)])
    task = ray.remote(num_cpus=0, num_returns=2, max_retries=3)(_apply).options(name=f"raydpo.{fn.__name__}")
    out, meta, pending = [], [], []
    for ref, more in zip(refs, extra):
        if len(pending) >= IN_FLIGHT:
            ray.wait(pending, num_returns=len(pending) - IN_FLIGHT + 1, fetch_local=False)
            pending = [p for p in pending if not _ready(p)]
        table_ref, meta_ref = task.remote(fn, ref, *more, *args)
        out.append(table_ref)
        meta.append(meta_ref)
        pending.append(meta_ref)
    return materialized(out, _got(meta))


def reduce_blocks(fn: Callable[..., object], dataset_or_refs, *args, num_returns: int = 1, on_driver_node: bool = False):
    """``fn(blocks, *args)`` in one Ray task that reads the blocks one at a time; returns its (small)
    result, or with ``num_returns`` > 1 refs to its results (tables stay in the object store). For
    passes that need every row in order (duplicates across blocks, input order, a file of them)."""
    from raydpo.storage.remote import on_cluster

    refs = dataset_or_refs if isinstance(dataset_or_refs, list) else refs_of(dataset_or_refs)
    return on_cluster(_reduce, fn, refs, *args, num_returns=num_returns, on_driver_node=on_driver_node)


def _reduce(fn, refs: list, *args):
    return fn(blocks(refs), *args)


def _ready(ref) -> bool:
    import ray

    return bool(ray.wait([ref], timeout=0, fetch_local=False)[0])


def _got(refs: list) -> list:
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        raise (cause if isinstance(cause, BaseException) else e) from None


def from_tables(tables: list[pa.Table]):
    """A materialized ``ray.data.Dataset`` of tables the driver made itself (small ones: an online
    round's pairs, a test's rows), with block metadata computed here."""
    import ray

    return materialized([ray.put(t) for t in tables], [block_metadata(t) for t in tables])


def _slice(table: pa.Table, start: int, end: int) -> pa.Table:
    return table.slice(start, end - start)


def collect(dataset, on_block: Callable[[object, object], None] | None = None):
    """Execute ``dataset`` (streaming, in order) and return it materialized, calling
    ``on_block(ref, metadata)`` with each output block as it arrives (progress while a pipeline runs,
    where ``Dataset.materialize()`` says nothing until it is done). Nothing is fetched: the blocks
    stay where they were made; a slice of a block is cut by a task."""
    import ray

    refs, metadata = [], []
    cut = ray.remote(num_cpus=0, num_returns=2, max_retries=3)(_apply).options(name="raydpo.slice")
    for bundle in dataset.iter_internal_ref_bundles():
        for entry, piece in zip(bundle.blocks, bundle.slices):
            if piece is None:
                ref, meta = entry.ref, _with_schema(entry.metadata, bundle.schema)
            else:
                ref, meta = cut.remote(_slice, entry.ref, piece.start_offset, piece.end_offset)
                meta = _got([meta])[0]
            if on_block is not None:
                on_block(ref, meta)
            refs.append(ref)
            metadata.append(meta)
    return materialized(refs, metadata)


def _with_schema(meta, schema):
    try:
        from ray.data.block import BlockMetadataWithSchema
    except ImportError:
        return None
    return BlockMetadataWithSchema.from_metadata(meta, schema=schema)


def block_metadata(table: pa.Table):
    try:
        from ray.data.block import BlockExecStats, BlockMetadataWithSchema
    except ImportError:
        return None
    return BlockMetadataWithSchema.from_block(table, block_exec_stats=BlockExecStats.builder().build())


def materialized(refs: list, metadata: list):
    """The plan ``ray.data.from_arrow_refs`` builds (ray 2.60), minus its remote metadata tasks (the
    metadata is known here); falls back to ``ray.data.from_arrow_refs`` if those internals move."""
    import ray.data

    try:
        from ray.data._internal.logical.interfaces import LogicalPlan
        from ray.data._internal.logical.operators import FromArrow
        from ray.data._internal.stats import DatasetStats
        from ray.data.dataset import MaterializedDataset
    except ImportError:
        return ray.data.from_arrow_refs(refs)
    if any(m is None for m in metadata):
        return ray.data.from_arrow_refs(refs)
    context = ray.data.DataContext.get_current().copy()
    stats = DatasetStats(metadata={"FromArrow": metadata}, parent=None)
    return MaterializedDataset(LogicalPlan(FromArrow(refs, metadata), context), context, stats)


class Column:
    """The values of one column of blocks, iterated block by block: passed to a task in place of a
    list (``collections.Counter(Column(refs, "digest"))`` counts a million digests where the blocks
    are, and the driver never holds them)."""

    def __init__(self, refs: list, name: str):
        self.refs, self.name = refs, name

    def __iter__(self):
        for array in self.arrays():
            yield from array.to_pylist()

    def arrays(self) -> Iterator[pa.ChunkedArray]:
        """The column of each block in turn, as arrow arrays (for vectorized passes)."""
        for table in blocks(self.refs):
            yield table[self.name]
