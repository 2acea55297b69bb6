"""A finished mining run made in seconds, for the inspector and web tests: the real pipeline (ingest,
retrieve, judge, sample as Ray tasks) over two synthetic datasets, with planted embeddings instead of the
embedder and seeded judge scores instead of the judge, so the run has all the outcomes the inspector
shows: kept and dropped candidates, padded and unpadded negatives, and fallbacks (the first two
queries of each dataset get a positive score under every candidate's).

`expected_outcomes` recomputes what the sampling rules say from the judge score files and beta alone,
written out here independently of `unime_ray.mining.sample` and `unime_ray.inspector`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from planted import planted_embeddings

from unime_ray.config import load_config
from unime_ray.io import write_parquet
from unime_ray.mining.pipeline import run_mining

ROOT = Path(__file__).parents[1]
BETA = 0.05  # not the default (0.01): the inspector must read the run's own beta
DATASETS = ("ShapesI2T", "ShapesT2I")  # image queries with text candidates, and the other way round
FALLBACKS_PER_DATASET = 2


def make_mining_run(out: Path, world: Path, model: Path) -> Path:
    """Mine `world`'s two datasets under `out`; returns `out` (the run folder)."""
    cfg = load_config(
        ROOT / "jobs/configs/tiny.yaml",
        [
            f"run.output_dir={out}",
            f"data.train_dir={world}/train",
            f"data.image_root={world}/images",
            f"data.datasets=[{','.join(DATASETS)}]",
            "data.synthetic=false",
            f"embedder.path={model}",
            "embedder.backend=precomputed",
            f"embedder.embeddings_path={out}/embeddings.parquet",
            "judge.backend=precomputed",
            f"judge.scores_path={out}/scores.parquet",
            f"mining.beta={BETA}",
        ],
    )
    run_mining(cfg, ("ingest",))
    write_parquet(planted_embeddings(out / "mining/ingest"), out / "embeddings.parquet")
    run_mining(cfg, ("retrieve",))
    write_parquet(_scores(out / "mining"), out / "scores.parquet")
    run_mining(cfg)
    return out


def _scores(mining: Path) -> pa.Table:
    queries = pq.read_table(mining / "ingest/queries.parquet").sort_by("id").to_pylist()
    cands = pa.concat_tables(pq.read_table(p) for p in sorted((mining / "retrieve").glob("*.parquet")))
    by_query: dict[str, list[str]] = {}
    for q, c in zip(cands["query_id"].to_pylist(), cands["cand_id"].to_pylist(), strict=True):
        by_query.setdefault(q, []).append(c)
    rng = np.random.default_rng(7)
    rows: list[tuple[str, str, float]] = []
    seen: dict[str, int] = {}
    for q in queries:
        n = seen[q["dataset"]] = seen.get(q["dataset"], 0) + 1
        ids = by_query[q["id"]]
        if n <= FALLBACKS_PER_DATASET:  # every candidate above the positive: nothing survives
            pos, scores = 0.02, rng.uniform(0.3, 0.6, len(ids))
        else:  # most candidates below the positive, some within beta of it or above (false negatives)
            pos, scores = rng.uniform(0.55, 0.95), rng.uniform(0.0, 0.75, len(ids))
        rows.append((q["id"], q["pos_id"], pos))
        rows += zip([q["id"]] * len(ids), ids, scores.tolist(), strict=True)
    qid, cid, score = zip(*rows, strict=True)
    return pa.table({"query_id": qid, "cand_id": cid, "score": pa.array(score, pa.float32())})


def expected_outcomes(run: Path, beta: float = BETA, interval: int = 5, min_neg: int = 10, num_neg: int = 10):
    """{query id: {pos_score, dropped (set of candidate ids), survivors, fallback, neg_ids (None on a
    fallback: random picks)}}, from the judge score files: a candidate is a false negative when its
    score is above s_pos - beta; the survivors, hardest first (score down, rank up), are read every
    `interval`-th from offsets 0..interval-1, repeated to `min_neg` and cut to `num_neg`."""
    table = pa.concat_tables(
        pq.read_table(p) for p in sorted((run / "mining/judge/results").glob("*.parquet"))
    )
    rows: dict[str, list[dict]] = {}
    for r in table.to_pylist():
        rows.setdefault(r["query_id"], []).append(r)
    out = {}
    for qid, rs in rows.items():
        (pos,) = [r["score"] for r in rs if r["is_positive"]]
        cands = [r for r in rs if not r["is_positive"]]
        dropped = {r["cand_id"] for r in cands if r["score"] > pos - beta}
        kept = sorted(
            (r for r in cands if r["cand_id"] not in dropped), key=lambda r: (-r["score"], r["rank"])
        )
        picks = [kept[i]["cand_id"] for start in range(interval) for i in range(start, len(kept), interval)]
        while picks and len(picks) < min_neg:
            picks += picks[: min_neg - len(picks)]
        out[qid] = {
            "pos_score": pos,
            "dropped": dropped,
            "survivors": len(kept),
            "fallback": not kept,
            "neg_ids": picks[:num_neg] if kept else None,
            "candidates": {r["cand_id"]: r for r in cands},
        }
    return out
