"""Judge stage: score (query, positive) and (query, candidate) for every potential hard negative.

Request shards hold whole queries (positive first, then candidates by retrieval rank), so the ~51
prompts of a query travel together and share their prefix in vLLM's cache; shards are the unit of
resume (see `shards.py`). Backends: `vllm`, `transformers` (both through a Ray Data actor pool), or
`precomputed`: scores from a user's own file (`query_id`, `cand_id`, `score`, Parquet or JSONL),
validated against the requests by id, for users who judged elsewhere.

A batch that fails is retried row by row; a row that still fails gets score NaN and is counted, so one
bad row never kills a 9-hour run (the sample stage quarantines what it cannot use).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from unime_ray.config import JudgeConfig, MiningConfig, config_from_dict
from unime_ray.data.schemas import JUDGE_REQUESTS, JUDGE_SCORES
from unime_ray.io import write_parquet
from unime_ray.mining.shards import PATH_COL, run_shards, write_request_shards

log = logging.getLogger(__name__)


class JudgeActor:
    """`map_batches` callable owning one judge model (a vLLM engine or a transformers model)."""

    def __init__(self, judge: dict, image_root: str):
        from unime_ray.models.judge import make_judge

        self.judge = make_judge(config_from_dict(JudgeConfig, judge), image_root)

    def _score(self, batch: pa.Table) -> np.ndarray:
        pairs = list(
            zip(
                *(batch[c].to_pylist() for c in ("qry_text", "qry_image", "cand_text", "cand_image")),
                strict=True,
            )
        )
        try:
            return self.judge.score(pairs)
        except Exception:
            log.exception("judge batch failed; retrying its %d rows one by one", len(pairs))
        scores = np.full(len(pairs), np.nan, dtype=np.float32)
        for i, pair in enumerate(pairs):
            try:
                scores[i] = self.judge.score([pair])[0]
            except Exception:
                log.exception("judge row failed: query %s cand %s", batch["query_id"][i], batch["cand_id"][i])
        return scores

    def __call__(self, batch: pa.Table) -> pa.Table:
        keep = [n for n in JUDGE_SCORES.names if n != "score"] + [PATH_COL]
        return batch.select(keep).append_column("score", pa.array(self._score(batch), pa.float32()))


def build_requests(candidates: pa.Table, queries: pa.Table, pool: pa.Table) -> pa.Table:
    """CANDIDATES rows -> JUDGE_REQUESTS rows, ordered by query, each query's positive first."""
    q = {r["id"]: r for r in queries.to_pylist()}
    texts = dict(
        zip(
            pool["id"].to_pylist(),
            zip(pool["text"].to_pylist(), pool["image"].to_pylist(), strict=True),
            strict=True,
        )
    )
    by_query: dict[str, list[dict]] = {}
    for c in candidates.to_pylist():
        by_query.setdefault(c["query_id"], []).append(c)
    rows = []
    for qid in sorted(by_query):
        query = q[qid]
        cands = sorted(by_query[qid], key=lambda c: c["rank"])
        pos = {"cand_id": query["pos_id"], "rank": -1, "sim": float("nan"), "is_positive": True}
        for c in [pos] + [{**c, "is_positive": False} for c in cands]:
            cand_text, cand_image = texts[c["cand_id"]]
            rows.append(
                {
                    "query_id": qid,
                    "dataset": query["dataset"],
                    "cand_id": c["cand_id"],
                    "is_positive": c["is_positive"],
                    "rank": c["rank"],
                    "sim": c["sim"],
                    "qry_text": query["text"],
                    "qry_image": query["image"],
                    "cand_text": cand_text,
                    "cand_image": cand_image,
                }
            )
    return pa.Table.from_pylist(rows, schema=JUDGE_REQUESTS)


def write_requests(
    candidate_files: list[Path], queries: pa.Table, pool: pa.Table, out_dir: Path, cfg: MiningConfig
) -> list[Path]:
    """One dataset at a time, `judge_shard_queries` queries per shard file."""
    shards = []
    for path in sorted(candidate_files):
        requests = build_requests(pq.read_table(path), queries, pool)
        shards += write_request_shards(
            requests, out_dir, cfg.judge_shard_queries, prefix=path.stem, group="query_id"
        )
    return shards


def _read_user_scores(path: str) -> pa.Table:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"judge.scores_path: no file {path}")
    if p.suffix == ".parquet":
        table = pq.read_table(p)
    else:
        table = pa.Table.from_pylist(
            [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        )
    missing = {"query_id", "cand_id", "score"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}; need query_id, cand_id, score")
    return table.select(["query_id", "cand_id", "score"]).cast(
        pa.schema([("query_id", pa.string()), ("cand_id", pa.string()), ("score", pa.float32())])
    )


def attach_precomputed(requests: list[Path], out_dir: Path, scores_path: str) -> dict:
    """Join a user's scores onto the requests; every request must have exactly one score."""
    user = _read_user_scores(scores_path)
    if user.group_by(["query_id", "cand_id"]).aggregate([]).num_rows != user.num_rows:
        raise ValueError(f"{scores_path}: duplicate (query_id, cand_id) rows")
    used = 0
    for path in requests:
        req = pq.read_table(path)
        joined = req.join(user, ["query_id", "cand_id"], join_type="inner")
        if joined.num_rows != req.num_rows:
            have = set(zip(joined["query_id"].to_pylist(), joined["cand_id"].to_pylist(), strict=True))
            lacking = [
                k
                for k in zip(req["query_id"].to_pylist(), req["cand_id"].to_pylist(), strict=True)
                if k not in have
            ]
            raise ValueError(
                f"{scores_path}: {len(lacking)} requests of {path.name} lack a score, e.g. {lacking[:3]}"
            )
        used += joined.num_rows
        order = pc.sort_indices(joined, [("query_id", "ascending"), ("rank", "ascending")])
        write_parquet(joined.take(order).select(JUDGE_SCORES.names).cast(JUDGE_SCORES), out_dir / path.name)
    return {"rows": used, "user_rows_unused": user.num_rows - used}


def run_judge(
    requests: list[Path], out_dir: Path, judge: JudgeConfig, image_root: str, cfg: MiningConfig
) -> dict:
    if judge.backend == "precomputed":
        return attach_precomputed(requests, out_dir, judge.scores_path)

    def transform(ds: ray.data.Dataset) -> ray.data.Dataset:
        return ds.map_batches(
            JudgeActor,
            fn_constructor_kwargs=dict(judge=asdict(judge), image_root=str(image_root)),
            batch_size=judge.model.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.num_actors),
            num_gpus=cfg.gpus_per_actor,
            num_cpus=0 if cfg.gpus_per_actor else 1,
        )

    report = run_shards(requests, out_dir, transform, JUDGE_SCORES, ["query_id", "cand_id"], "judge")
    scores = [pq.read_table(out_dir / p.name, columns=["score"])["score"] for p in requests]
    report["nan_scores"] = sum(int(pc.sum(pc.is_nan(col)).as_py() or 0) for col in scores)
    return report
