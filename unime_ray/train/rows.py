"""The training rows and the order a training reads them in, the same in every run of the same seed.

Every epoch is a permutation of all rows fixed by (seed, epoch) alone, cut into global batches of
`micro_batch_size x workers` consecutive rows, of which rank r takes the r-th micro-batch. A run resumed
at step s skips exactly the micro-batches its checkpoint holds (s x accumulation per rank), so it trains
on the rows a run that never stopped would have, in the same batches. With the optimizer state restored
and dropout reseeded per micro-batch (train/loop.py), the resumed run's weights are then those of the
run that never stopped.

Why not Ray Data's per-epoch `random_shuffle` into `get_dataset_shard`: its split hands blocks to
whichever rank asks first and its shuffle reseeds per execution within one driver, so neither the rows a
rank sees nor an epoch's order survive a restart (docs/benchmarks.md, the chaos run).

The rows (texts and image paths, ~3 KB each) are read once by Ray Data into the object store and every
worker maps the same blocks (zero-copy on its node), as the Ray Data stream did. Rows are addressed in
id order, not block order: Ray Data may finish a read's blocks in any order.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray


def read_rows(path: str, exclude: set[str] = frozenset()) -> list[ray.ObjectRef]:
    """The rows of a mined Parquet file, but those whose id is in `exclude`, as Arrow blocks in the
    object store (the driver holds the references; the workers read the blocks)."""
    from ray.data.expressions import col

    rows = ray.data.read_parquet(path)
    if exclude:  # the held-out rows of the reranker's ranking check
        rows = rows.filter(expr=col("id").not_in(sorted(exclude)))
    return rows.materialize().to_arrow_refs()


def epoch_batches(n: int, seed: int, epoch: int, world: int, rank: int, micro: int) -> list[np.ndarray]:
    """Rank `rank`'s micro-batches of one epoch, as row numbers in 0..n-1: the epoch's permutation of
    the n rows (fixed by seed and epoch) in global batches of micro x world, the rows that do not fill
    one dropped (every rank runs the same number of micro-batches: DeepSpeed all-reduces each step)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    per_step = micro * world
    starts = range(rank * micro, n - per_step + 1 + rank * micro, per_step)
    return [order[start : start + micro] for start in starts]


class TrainRows:
    """The rows one worker trains on, read from the blocks of `read_rows`; `source` names the file in
    errors."""

    def __init__(self, blocks: list[ray.ObjectRef], source: str):
        self.source = source
        self.table = pa.concat_tables(ray.get(blocks))
        ids = self.table["id"]
        self.by_id = pc.sort_indices(ids).to_numpy().astype(np.int64)  # row number -> position in the blocks
        # A row is read as a slice of its own record batch: `Table.take` of a few rows from a table of
        # many chunks works through every chunk of every column, which at the paper's size cost far more
        # than the rows themselves (docs/benchmarks.md, "The training read").
        self.batches = self.table.to_batches()
        self.starts = np.cumsum([0] + [len(b) for b in self.batches])
        counts = pc.value_counts(ids)
        twice = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
        if len(twice):  # a repeated id would make the order depend on how the blocks were read
            raise ValueError(f"{source}: id {twice[0]} is on more than one row; training needs unique ids")

    def __len__(self) -> int:
        return self.table.num_rows

    def batches_per_epoch(self, world: int, micro: int) -> int:
        per_epoch = len(self) // (world * micro)
        if per_epoch == 0:
            raise ValueError(
                f"{self.source}: {len(self)} training rows do not fill one step of "
                f"micro_batch_size x workers = {micro} x {world}"
            )
        return per_epoch

    def epoch(
        self, seed: int, epoch: int, world: int, rank: int, micro: int, skip: int = 0
    ) -> Iterator[list[dict]]:
        """Rank `rank`'s micro-batches of `epoch` (rows as dicts), the first `skip` left out."""
        for numbers in epoch_batches(len(self), seed, epoch, world, rank, micro)[skip:]:
            yield [self.row(p) for p in self.by_id[numbers]]

    def row(self, position: int) -> dict:
        """The row at `position` of the blocks, as a dict (a zero-copy slice of its record batch)."""
        batch = int(np.searchsorted(self.starts, position, side="right")) - 1
        return self.batches[batch].slice(position - self.starts[batch], 1).to_pylist()[0]
