"""Rows looked up by id in Arrow, at a cost that does not grow with the square of a run.

`pc.index_in(values, value_set=ids)` hashes `ids` on every call. A stage that looks up each of its parts
(a batch of scores, a part of embeddings, a score file) in a whole id table of the run or of a dataset
pays that table's size once per part, and the number of parts grows with the run too: at 6.6M pairs
that turned minutes into hours (docs/benchmarks.md). So:
- `rows_named`, for a lookup per part that runs on its own (a Ray task per part): the part's values are
  hashed and the table's ids probed against them, one cheap pass;
- `index_in_many`, for a task that reads many parts in a row: the table is hashed once for all of them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def rows_named(table: pa.Table, column: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    """The rows of `table` whose `column` is among `values`, in table order: looking `values` up in them
    finds what looking them up in `table` would (its first match)."""
    return table.filter(pc.is_in(table[column], value_set=pc.unique(values)))


def index_in_many(parts: list[pa.ChunkedArray], ids: pa.ChunkedArray) -> list[pa.ChunkedArray]:
    """`pc.index_in(part, value_set=ids)` of each part, with `ids` hashed once for all of them."""
    if not parts:
        return []
    where = pc.index_in(pa.chunked_array([c for p in parts for c in p.chunks], parts[0].type), value_set=ids)
    ends = np.cumsum([len(p) for p in parts])
    return [where.slice(int(a), int(b - a)) for a, b in zip(np.r_[0, ends[:-1]], ends, strict=True)]
