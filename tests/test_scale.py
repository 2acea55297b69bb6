"""Mining at scale, in small: the stages that run as Ray tasks give the same output as the code before
the scale-out, and bad bring-your-own inputs give a clear error or a counted quarantine.

The regression fixture `fixtures/synthetic_hard_negatives.parquet` was written by commit 72b41fa (the
code before the rework: retrieve, request building and sampling in the driver) on the synthetic world
(seed 0, tiny.yaml's mining settings) with the embeddings of `planted.py`, normalized, and the world's
oracle judge scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from planted import planted_embeddings

from unime_ray.assets import synthetic_overrides
from unime_ray.config import load_config
from unime_ray.data.schemas import (
    JUDGE_SCORES,
    USER_EMBEDDINGS,
    USER_SCORES,
    DataError,
    check_parquet_types,
)
from unime_ray.data.synthetic import make_world, write_oracle_scores
from unime_ray.mining.embed import import_embeddings
from unime_ray.mining.judge import attach_precomputed
from unime_ray.mining.pipeline import run_mining

ROOT = Path(__file__).parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "synthetic_hard_negatives.parquet"


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    """The synthetic world ingested once; each test copies nothing and mines into its own folder."""
    out = tmp_path_factory.mktemp("scale")
    make_world(out / "world", seed=0)
    return out


def _cfg(out: Path, world: Path, *extra: str):
    overrides = synthetic_overrides(world) + [f"run.output_dir={out}", "data.synthetic=false", *extra]
    return load_config(ROOT / "jobs/configs/tiny.yaml", overrides)


def _embeddings(cfg, path: Path) -> Path:
    run_mining(cfg, ("ingest",))
    table = planted_embeddings(Path(cfg.run.output_dir) / "mining/ingest").select(["id", "embedding"])
    pq.write_table(table, path)
    return path


def test_precomputed_mining_equals_the_code_before_the_scale_out(local_ray, ingested, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(out, ingested)
    emb = _embeddings(cfg, tmp_path / "emb.parquet")
    cfg = _cfg(out, ingested, "embedder.backend=precomputed", f"embedder.embeddings_path={emb}")
    report = run_mining(cfg, ("retrieve",))
    # planted.py's vectors are not unit length: every one was normalized, and counted.
    assert report["embed"]["normalized"] == report["embed"]["rows"] == 192 + 134
    scores = write_oracle_scores(
        sorted((out / "mining/retrieve").glob("*.parquet")),
        out / "mining/ingest",
        ingested / "world/world.json",
        tmp_path / "oracle.parquet",
    )
    cfg.judge.backend, cfg.judge.scores_path = "precomputed", str(scores)
    report = run_mining(cfg)
    candidates = sum(pq.read_metadata(f).num_rows for f in (out / "mining/retrieve").glob("*.parquet"))
    assert report["judge"]["rows"] == 192 + candidates and report["judge"]["user_rows_unused"] == 0
    # bring-your-own scores are joined on ids: the request shards carry no texts
    requests = {tuple(pq.read_schema(f).names) for f in (out / "mining/judge/requests").glob("*.parquet")}
    assert requests == {tuple(n for n in JUDGE_SCORES.names if n != "score")}
    got, want = pq.read_table(out / "mining/sample/hard_negatives.parquet"), pq.read_table(FIXTURE)
    assert got.schema.equals(want.schema)
    assert got.to_pylist() == want.to_pylist()
    official = json.loads((out / "mining/sample/hard_negatives.json").read_text())
    assert [r["query_text"] for r in official] == want["qry_text"].to_pylist()


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t: t.slice(1), r"no embedding for query 'ShapesCLS/0' of dataset 'ShapesCLS'"),
        (lambda t: pa.concat_tables([t, t.slice(5, 1)]), r"id 'ShapesCLS/5' appears more than once"),
        (
            lambda t: t.set_column(
                1, "embedding", pa.array([[1.0] * (3 if i == 7 else 16) for i in range(len(t))])
            ),
            r"row 7: field 'embedding' of 'ShapesCLS/7' has dimension 3 .* expected 16",
        ),
        (
            lambda t: t.set_column(
                1, "embedding", pa.array([[0.0 if i == 9 else 1.0] * 16 for i in range(len(t))])
            ),
            r"row 9: field 'embedding' of 'ShapesCLS/9' is not finite or is all zeros",
        ),
    ],
    ids=["missing-id", "duplicate-id", "wrong-dimension", "zero-vector"],
)
def test_bad_embeddings_file_names_the_row_and_id(local_ray, ingested, tmp_path, change, match):
    cfg = _cfg(tmp_path / "run", ingested)
    emb = _embeddings(cfg, tmp_path / "emb.parquet")
    pq.write_table(change(pq.read_table(emb)), emb)
    cfg = _cfg(tmp_path / "run", ingested, "embedder.backend=precomputed", f"embedder.embeddings_path={emb}")
    with pytest.raises(DataError, match=match):
        run_mining(cfg, ("embed",))


GOOD_EMBEDDINGS = {"id": ["a", "b"], "embedding": [[1.0, 0.0], [0.0, 1.0]]}
GOOD_SCORES = {"query_id": ["q0", "q1"], "cand_id": ["c0", "c1"], "score": [0.25, 0.75]}


@pytest.mark.parametrize(
    "column, values, holds, expected",
    [
        ("id", pa.array([1, 2]), "int64", "string"),
        ("embedding", pa.array(["[1.0, 0.0]", "[0.0, 1.0]"]), "string", "list of numbers"),
        ("embedding", pa.array([["1", "0"], ["0", "1"]]), "list<element: string>", "list of numbers"),
        ("embedding", pa.array([1.0, 0.5]), "double", "list of numbers"),
    ],
    ids=["int-id", "string-embedding", "list-of-strings-embedding", "scalar-embedding"],
)
def test_embeddings_file_of_wrong_types_names_file_column_and_type(tmp_path, column, values, holds, expected):
    path = tmp_path / "emb.parquet"
    pq.write_table(pa.table({**GOOD_EMBEDDINGS, column: values}), path)
    with pytest.raises(DataError) as error:  # before the queries and pool files are even opened
        import_embeddings(str(path), tmp_path / "no-queries", tmp_path / "no-pool", tmp_path / "out")
    assert str(error.value) == (
        f"{path}: column '{column}' holds {holds}, expected {expected} "
        f"(read as {'string' if column == 'id' else 'list<item: float>'})"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "column, values, holds, expected",
    [
        ("score", pa.array([[0.25], [0.75]]), "list<element: double>", "number"),
        ("score", pa.array(["0.25", "0.75"]), "string", "number"),
        ("query_id", pa.array([0, 1]), "int64", "string"),
        ("cand_id", pa.array([0.0, 1.0]), "double", "string"),
    ],
    ids=["list-score", "string-score", "int-query-id", "float-cand-id"],
)
def test_score_file_of_wrong_types_names_file_column_and_type(tmp_path, column, values, holds, expected):
    path = tmp_path / "scores.parquet"
    pq.write_table(pa.table({**GOOD_SCORES, column: values}), path)
    with pytest.raises(ValueError) as error:  # before any request file is read or task started
        attach_precomputed([tmp_path / "no-requests.parquet"], tmp_path / "out", str(path))
    assert str(error.value) == (
        f"{path}: column '{column}' holds {holds}, expected {expected} "
        f"(read as {'float' if column == 'score' else 'string'})"
    )
    assert not (tmp_path / "out").exists()


def test_user_files_of_other_layouts_of_the_right_kind_pass_the_type_check(tmp_path):
    """What the readers cast without loss passes: wide or dictionary strings, any integer or float for
    a score, any list layout of numbers for an embedding."""
    path = tmp_path / "ok.parquet"
    pq.write_table(
        pa.table(
            {
                "id": pa.array(["a", "b"], pa.large_string()).dictionary_encode(),
                "embedding": pa.array([[1, 0], [0, 1]], pa.list_(pa.int8(), 2)),
                "query_id": pa.array(["q0", "q1"], pa.large_string()),
                "cand_id": ["c0", "c1"],
                "score": pa.array([0, 1], pa.int64()),
            }
        ),
        path,
    )
    check_parquet_types(path, USER_EMBEDDINGS)
    check_parquet_types(path, USER_SCORES)


def test_score_file_in_jsonl_with_nan_and_unknown_rows_is_streamed_and_counted(local_ray, ingested, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(out, ingested)
    emb = _embeddings(cfg, tmp_path / "emb.parquet")
    cfg = _cfg(out, ingested, "embedder.backend=precomputed", f"embedder.embeddings_path={emb}")
    run_mining(cfg, ("retrieve",))
    oracle = write_oracle_scores(
        sorted((out / "mining/retrieve").glob("*.parquet")),
        out / "mining/ingest",
        ingested / "world/world.json",
        tmp_path / "oracle.parquet",
    ).read_bytes()
    rows = pq.read_table(pa.BufferReader(oracle)).to_pylist()
    nan_query = rows[0]["query_id"]  # every score of one query NaN: the query is quarantined, counted
    lines = [
        json.dumps({**r, "score": float("nan") if r["query_id"] == nan_query else r["score"]}) for r in rows
    ] + [json.dumps({"query_id": "nobody", "cand_id": "x", "score": 0.5})]
    scores = tmp_path / "scores.jsonl"
    scores.write_text("\n".join(lines) + "\n")
    cfg.judge.backend, cfg.judge.scores_path = "precomputed", str(scores)
    report = run_mining(cfg)
    assert report["judge"]["rows"] == len(rows) and report["judge"]["user_rows_unused"] == 1
    # Its NaN rows are quarantined one by one; with no usable row left, the query has no judge scores.
    per_query = sum(r["query_id"] == nan_query for r in rows)
    assert report["sample"]["quarantine_by_reason"] == {"nan_score": per_query, "no_judge_scores": 1}
    quarantine = pq.read_table(out / "mining/sample/quarantine.parquet")
    assert set(quarantine["id"].to_pylist()) == {nan_query}
    assert report["sample"]["queries_out"] == 192 - 1
    judged = pa.concat_tables(pq.read_table(f) for f in (out / "mining/judge/results").glob("*.parquet"))
    assert int(np.isnan(judged["score"].to_numpy()).sum()) == per_query  # stored as given, not dropped


def test_ingest_in_tasks_equals_one_sequential_read_with_ids_shared_across_files(local_ray, tmp_path):
    from unime_ray.config import DataConfig
    from unime_ray.data.mmeb import read_folder
    from unime_ray.mining.ingest import run_ingest

    folder = tmp_path / "train"
    folder.mkdir()
    rows = {
        "A": [
            {
                "id": f"x{i}",
                "qry": f"q{i}",
                "qry_image_path": "",
                "pos_text": f"p{i % 2}",
                "pos_image_path": "",
            }
            for i in range(4)
        ],
        # x1 and x3 were A's; b2 appears twice in B itself; "" text is an empty query
        "B": [
            {"id": i, "qry": f"r{i}", "qry_image_path": "", "pos_text": "same", "pos_image_path": ""}
            for i in ("b0", "x1", "b2", "b2", "x3")
        ]
        + [{"id": "b5", "qry": " ", "qry_image_path": "", "pos_text": "t", "pos_image_path": ""}],
    }
    for name, records in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = DataConfig(train_dir=str(folder), image_root=str(tmp_path))
    report = run_ingest(data, tmp_path / "out")
    sequential = read_folder(folder, "pairs", image_root=tmp_path)
    quarantine = pq.read_table(tmp_path / "out/quarantine.parquet")
    assert quarantine.to_pylist() == sequential.quarantine.to_pylist()
    assert [(r["id"], r["reason"]) for r in quarantine.to_pylist()] == [
        ("x1", "duplicate_id"),
        ("b2", "duplicate_id"),
        ("x3", "duplicate_id"),
        ("b5", "empty_query"),
    ]
    queries = pq.read_table(tmp_path / "out/queries.parquet")
    assert (
        queries["id"].to_pylist()
        == sequential.table["id"].to_pylist()
        == ["x0", "x1", "x2", "x3", "b0", "b2"]
    )
    assert report["read"] == sequential.counts() and report["datasets"] == {
        "A": {"queries": 4, "pool": 2},
        "B": {"queries": 2, "pool": 1},
    }
    pool = pq.read_table(tmp_path / "out/pool.parquet")
    assert pool["id"].to_pylist() == sorted(pool["id"].to_pylist()) and pool.num_rows == 3


def _hand_sample(pos: float, cands: list[tuple[str, int, float]], beta: float, interval: int, k: int):
    """The paper's rules written out again, independently of sample.py: drop s > pos - beta, order the
    rest by score descending then rank, visit them with a step of `interval`, repeat up to k."""
    kept = sorted((c for c in cands if c[2] <= pos - beta), key=lambda c: (-c[2], c[1]))
    picks = [kept[p] for offset in range(interval) for p in range(offset, len(kept), interval)]
    return [picks[i % len(picks)][0] for i in range(k)] if picks else None


def test_scale_harness_small_end_to_end(tmp_path):
    """bench/scale.py at 3000 pairs (20 MMEB-shaped datasets, planted embeddings and judge scores), as a
    user runs it; then its outputs checked against independent computations."""
    import subprocess
    import sys

    n = 3000
    cmd = [sys.executable, str(ROOT / "bench/scale.py"), "--n", str(n), "--dim", "32", "--out", str(tmp_path)]
    cmd += ["--label", "ci", "--results", str(tmp_path / "scale.json"), "--max-rss-gb", "12"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / f"ci-n{n}"
    mining = run / "mining"
    report = json.loads((mining / "report.json").read_text())
    queries = pq.read_table(mining / "ingest/queries.parquet")
    assert queries.num_rows == n and len(report["ingest"]["datasets"]) == 20

    # Every request judged exactly once: the positive and the retrieved candidates of every query.
    retrieved = pa.concat_tables(pq.read_table(f) for f in sorted((mining / "retrieve").glob("*.parquet")))
    judged = pa.concat_tables(pq.read_table(f) for f in sorted((mining / "judge/results").glob("*.parquet")))
    pairs = list(zip(judged["query_id"].to_pylist(), judged["cand_id"].to_pylist(), strict=True))
    expected = set(zip(queries["id"].to_pylist(), queries["pos_id"].to_pylist(), strict=True))
    expected |= set(zip(retrieved["query_id"].to_pylist(), retrieved["cand_id"].to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs)) == len(expected) and set(pairs) == expected

    # Every query has its negatives, or is a counted fallback (scores 1.0), or is counted in quarantine.
    hard = pq.read_table(mining / "sample/hard_negatives.parquet")
    sample = report["sample"]
    assert hard.num_rows + sample["queries_quarantined"] == n and sample["queries_quarantined"] == 0
    assert all(len(r) == 10 for r in hard["neg_ids"].to_pylist())
    fallback = hard.filter(hard["fallback"])
    assert fallback.num_rows == sample["fallback"] > 0
    assert all(set(s) == {1.0} for s in fallback["neg_scores"].to_pylist())

    # A sample of queries recomputed independently: numpy brute-force retrieval over the planted
    # embeddings (normalized here), the exclusions, the top 50, then the sampling rules by hand.
    emb = pq.read_table(run / "inputs/embeddings.parquet")
    vectors = np.stack(emb["embedding"].to_numpy(zero_copy_only=False)).astype(np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    row_of = {id_: i for i, id_ in enumerate(emb["id"].to_pylist())}
    pool = pq.read_table(mining / "ingest/pool.parquet")
    scores = pq.read_table(run / "inputs/scores.parquet").to_pylist()
    score = {(r["query_id"], r["cand_id"]): r["score"] for r in scores}
    by_id = {r["id"]: r for r in hard.to_pylist()}
    rng = np.random.default_rng(0)
    for q in rng.choice(queries.to_pylist(), size=40, replace=False):
        mates = [c for c in pool.to_pylist() if c["dataset"] == q["dataset"]]
        sims = [(float(vectors[row_of[q["id"]]] @ vectors[row_of[c["id"]]]), c["id"]) for c in mates]
        kept = sorted(((s, c) for s, c in sims if c != q["pos_id"] and s < 0.98), key=lambda x: (-x[0], x[1]))
        top = [(c, rank) for rank, (_, c) in enumerate(kept[:50])]
        mine = retrieved.filter(pc.equal(retrieved["query_id"], q["id"]))
        assert [
            (c, r) for c, r in zip(mine["cand_id"].to_pylist(), mine["rank"].to_pylist(), strict=True)
        ] == top
        row = by_id[q["id"]]
        want = _hand_sample(
            score[(q["id"], q["pos_id"])], [(c, r, score[(q["id"], c)]) for c, r in top], 0.01, 5, 10
        )
        if want is None:
            assert row["fallback"] and set(row["neg_ids"]) <= {c for c, _ in top}
        else:
            assert not row["fallback"] and row["neg_ids"] == want


def test_a_replaced_input_file_changes_the_fingerprint_its_path_alone_would_not(tmp_path):
    import os

    from unime_ray.mining.pipeline import fingerprints

    scores, emb = tmp_path / "scores.parquet", tmp_path / "emb.parquet"
    scores.write_bytes(b"x" * 10)
    emb.write_bytes(b"y" * 10)
    sets = [f"judge.scores_path={scores}", "judge.backend=precomputed", f"embedder.embeddings_path={emb}"]
    cfg = lambda *more: load_config(ROOT / "jobs/configs/tiny.yaml", [*sets, *more])  # noqa: E731
    first = fingerprints(cfg())
    assert fingerprints(cfg()) == first
    # a check's threshold is not an output setting: ingest and everything after stay done
    assert fingerprints(cfg("data.max_quarantined_fraction=0.9")) == first
    scores.write_bytes(b"x" * 11)  # the same path, other scores: judge and sample are redone
    again = fingerprints(cfg())
    assert [again[s] == first[s] for s in ("ingest", "embed", "retrieve", "judge", "sample")] == [
        True,
        True,
        True,
        False,
        False,
    ]
    os.utime(emb, ns=(1, 1))  # the same size, touched: embed and everything after are redone
    assert [fingerprints(cfg())[s] == again[s] for s in ("ingest", "embed")] == [True, False]


def test_planted_topics_make_neighbourhoods_and_leave_the_flat_vectors_alone():
    """bench/scale_data.py's vectors against the cosines its docstring promises, grouped by concept and
    topic indices computed here from the id hashes: flat, concept mates ~0.8 and everything else ~0;
    with topics of 4 concepts, concept mates ~(1 + 0.49) / 1.74 = 0.86, topic mates ~1 / 1.74 = 0.57,
    the rest ~0. Judge scores key on concepts, which topics leave as they were."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import scale_data

    ids = pa.array([f"D/{i}" for i in range(800)])
    datasets = pa.array(["D"] * 800)
    concepts = {"D": 40}  # 20 items per concept; 10 topics of 4 concepts
    concept = scale_data.hash_ids(ids) % np.uint64(40)
    topic = concept % np.uint64(10)
    same_concept = concept[:, None] == concept[None, :]
    same_topic = (topic[:, None] == topic[None, :]) & ~same_concept
    other = ~same_concept & ~same_topic
    off_diagonal = ~np.eye(800, dtype=bool)

    def mean_cos(v: np.ndarray, mask: np.ndarray) -> float:
        return float((v @ v.T)[mask & off_diagonal].mean())

    flat = scale_data.item_vectors(0, ids, datasets, concepts, 256)
    assert abs(mean_cos(flat, same_concept) - 0.8) < 0.03
    assert abs(mean_cos(flat, same_topic)) < 0.02 and abs(mean_cos(flat, other)) < 0.02
    topics = scale_data.item_vectors(0, ids, datasets, concepts, 256, topics=4)
    assert abs(mean_cos(topics, same_concept) - 1.49 / 1.74) < 0.03
    assert abs(mean_cos(topics, same_topic) - 1 / 1.74) < 0.03
    assert abs(mean_cos(topics, other)) < 0.02
    with_topics, flat_keys = (scale_data.concept_of(ids, datasets, concepts, k)[1] for k in (4, 0))
    assert np.array_equal(with_topics, flat_keys)
