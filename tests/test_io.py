"""Parquet helpers of io.py: batches read a row group at a time, a streaming merge, the datasets of a
file from its statistics."""

import pyarrow as pa
import pyarrow.parquet as pq

from unime_ray.io import merge_sorted, parquet_batches, parquet_datasets


def test_parquet_batches_are_the_rows_a_row_group_at_a_time(tmp_path):
    """10 rows in row groups of 4 read in batches of at most 3: no batch spans two row groups, so the
    sizes are 3, 1 | 3, 1 | 2, and the rows are the file's in order."""
    table = pa.table({"id": [f"r{i}" for i in range(10)], "x": list(range(10))})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=4)
    batches = list(parquet_batches(tmp_path / "t.parquet", 3))
    assert [b.num_rows for b in batches] == [3, 1, 3, 1, 2]
    assert pa.Table.from_batches(batches).equals(table)
    only_x = list(parquet_batches(tmp_path / "t.parquet", 8, columns=["x"]))
    assert [b.schema.names for b in only_x] == [["x"]] * 3
    assert [v for b in only_x for v in b.column(0).to_pylist()] == list(range(10))


def test_merge_sorted_interleaves_parts_by_key(tmp_path):
    """Three parts, each sorted by id, whose ids interleave: the merge is every row once in id order,
    read through row groups of 2."""
    ids = [["a", "d", "g", "h"], ["b", "e"], ["c", "f", "i"]]
    schema = pa.schema([("id", pa.string()), ("part", pa.int32())])
    parts = []
    for i, part_ids in enumerate(ids):
        parts.append(tmp_path / f"p{i}.parquet")
        pq.write_table(
            pa.table({"id": part_ids, "part": [i] * len(part_ids)}, schema=schema),
            parts[-1],
            row_group_size=2,
        )
    assert merge_sorted(parts, "id", tmp_path / "m.parquet", schema) == 9
    merged = pq.read_table(tmp_path / "m.parquet")
    assert merged["id"].to_pylist() == list("abcdefghi")
    assert merged["part"].to_pylist() == [0, 1, 2, 0, 1, 2, 0, 0, 2]


def test_parquet_datasets_from_statistics_or_the_column(tmp_path):
    one = pa.table({"dataset": ["A"] * 5, "x": list(range(5))})
    pq.write_table(one, tmp_path / "one.parquet", row_group_size=2)
    assert parquet_datasets(tmp_path / "one.parquet") == ("A",)
    mixed = pa.table({"dataset": ["B", "A", "B"], "x": [1, 2, 3]})
    pq.write_table(mixed, tmp_path / "mixed.parquet")
    assert parquet_datasets(tmp_path / "mixed.parquet") == ("A", "B")
