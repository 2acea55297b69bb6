"""The sharded runner: every request row exactly once, finished shards never redone."""

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from unime_ray.engine.shards import requests_once, run_shards, write_request_shards

SCHEMA = pa.schema([("id", pa.string()), ("x", pa.int64()), ("y", pa.int64()), ("run", pa.int64())])


def _requests(tmp_path, n=23, per_shard=5):
    table = pa.table({"id": [f"r{i}" for i in range(n)], "x": list(range(n))})
    return requests_once(tmp_path / "req", lambda d: write_request_shards(table, d, per_shard))


def _square(run):
    def transform(ds):
        return ds.map_batches(
            lambda b: b.append_column("y", pc.multiply(b["x"], b["x"])).append_column(
                "run", pa.array([run] * b.num_rows, pa.int64())
            ),
            batch_format="pyarrow",
            batch_size=3,
        )

    return transform


def _results(out):
    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))])


def test_all_rows_once_and_resume_skips_finished_shards(local_ray, tmp_path):
    reqs = _requests(tmp_path)
    assert [p.name for p in reqs] == [f"shard-{i:05d}.parquet" for i in range(5)]
    assert [pq.ParquetFile(p).metadata.num_rows for p in reqs] == [5, 5, 5, 5, 3]
    out = tmp_path / "out"
    report = run_shards(reqs, out, _square(1), SCHEMA, ["id"], "test")
    assert report["rows"] == 23 and report["shards_done_before"] == 0
    res = _results(out)
    assert sorted(res["id"].to_pylist()) == sorted(f"r{i}" for i in range(23))
    assert all(y == x * x for x, y in zip(res["x"].to_pylist(), res["y"].to_pylist()))
    # A "killed" run: two shard results are missing. Only those are redone (run 2), the rest kept (run 1).
    (out / "shard-00001.parquet").unlink()
    (out / "shard-00004.parquet").unlink()
    report = run_shards(reqs, out, _square(2), SCHEMA, ["id"], "test")
    assert report["shards_done_before"] == 3 and report["rows"] == 8
    runs = {p.name: set(pq.read_table(p)["run"].to_pylist()) for p in out.glob("*.parquet")}
    assert runs == {
        "shard-00000.parquet": {1},
        "shard-00001.parquet": {2},
        "shard-00002.parquet": {1},
        "shard-00003.parquet": {1},
        "shard-00004.parquet": {2},
    }
    assert sorted(_results(out)["id"].to_pylist()) == sorted(f"r{i}" for i in range(23))
    assert not list(out.glob(".*"))  # no temp files left


def test_duplicated_rows_are_deduplicated(local_ray, tmp_path):
    reqs = _requests(tmp_path, n=7, per_shard=4)

    def twice(ds):
        return _square(1)(ds).flat_map(lambda row: [row, row])

    run_shards(reqs, tmp_path / "out", twice, SCHEMA, ["id"], "test")
    res = _results(tmp_path / "out")
    assert sorted(res["id"].to_pylist()) == [f"r{i}" for i in range(7)]


def test_lost_rows_are_an_error_not_a_silent_gap(local_ray, tmp_path):
    reqs = _requests(tmp_path, n=6, per_shard=3)

    def lossy(ds):
        return _square(1)(ds).filter(lambda row: row["id"] != "r4")

    with pytest.raises(RuntimeError, match=r"shard-00001.parquet': 1"):
        run_shards(reqs, tmp_path / "out", lossy, SCHEMA, ["id"], "test")
    assert (tmp_path / "out" / "shard-00000.parquet").is_file()  # the complete shard was kept
    assert not (tmp_path / "out" / "shard-00001.parquet").exists()


def test_request_shards_are_rewritten_after_an_interrupted_write(tmp_path):
    table = pa.table({"id": ["a", "b", "c"], "x": [1, 2, 3]})
    d = tmp_path / "req"
    d.mkdir()
    pq.write_table(table.slice(0, 1), d / "shard-00000.parquet")  # left by a kill, no marker
    pq.write_table(table, d / "stale-00009.parquet")
    paths = requests_once(d, lambda p: write_request_shards(table, p, 2))
    assert [p.name for p in paths] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert sorted(p.name for p in d.glob("*.parquet")) == ["shard-00000.parquet", "shard-00001.parquet"]
    again = requests_once(d, lambda p: pytest.fail("must not rewrite a complete set"))
    assert again == paths


def test_grouped_shards_never_split_a_group(tmp_path):
    q = ["a", "a", "a", "b", "c", "c", "d", "d", "e"]
    table = pa.table({"query_id": q, "x": list(range(len(q)))})
    paths = write_request_shards(table, tmp_path, 2, prefix="ds", group="query_id")
    assert [pq.read_table(p)["query_id"].to_pylist() for p in paths] == [
        ["a", "a", "a", "b"],
        ["c", "c", "d", "d"],
        ["e"],
    ]
    assert [p.name for p in paths] == ["ds-00000.parquet", "ds-00001.parquet", "ds-00002.parquet"]
    assert write_request_shards(table.slice(0, 0), tmp_path / "empty", 2, group="query_id") == []
