"""The sampling replay: the mining rules (false-negative filter, cyclic hard-negative sampling, fallback)
applied to each setting's scores of the same queries, exactly as the sample stage applies them
(`mining.sample`), and how far the two settings' outcomes agree per query and overall."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from unime_ray.config import Config
from unime_ray.mining.agree.stats import (
    Spread,
    TwoWay,
    defined,
    jaccard,
    kendall_tau_b,
    spearman,
    spread,
    two_way,
)
from unime_ray.mining.sample import query_rng, sample_negatives, survives


@dataclass
class Rules:
    """The sampling settings both settings' scores go through (the run's `mining` section and seed)."""

    beta: float
    interval: int
    min_negatives: int
    num_negatives: int
    seed: int

    @classmethod
    def of(cls, cfg: Config) -> Rules:
        m = cfg.mining
        return cls(m.beta, m.interval, m.min_negatives, m.num_negatives, cfg.run.seed)


@dataclass
class QueryAgreement:
    """One query under both settings: rank correlations over its judged pairs (None when a side is
    constant), and per setting the candidates the false-negative filter drops, the hard negatives
    sampled (distinct ids, sorted) and whether the query fell back; the hard negatives' overlap."""

    query_id: str
    pairs: int
    spearman: float | None
    kendall: float | None
    dropped_a: list[str]
    hard_negatives_a: list[str]
    fallback_a: bool
    dropped_b: list[str]
    hard_negatives_b: list[str]
    fallback_b: bool
    hard_negatives_jaccard: float


@dataclass
class Agreement:
    """The per-query agreements summed up; queries with a failed call (a NaN score) are named, not
    compared. The false-negative filter is counted per candidate, the fallback per query."""

    queries: int
    pairs: int
    queries_with_failed_calls: list[str]
    spearman: Spread
    kendall: Spread
    false_negative_filter: TwoWay
    hard_negatives_jaccard: Spread
    identical_hard_negatives: int
    fallback: TwoWay


def _outcome(s: np.ndarray, pos: int, cand: np.ndarray, ranks: np.ndarray, query_id: str, rules: Rules):
    """One setting's outcome for one query: the survivor mask of its candidates and the sample drawn."""
    kept = survives(s[pos], s[cand], rules.beta)
    sampled = sample_negatives(
        s[pos],
        s[cand],
        ranks[cand],
        beta=rules.beta,
        interval=rules.interval,
        min_negatives=rules.min_negatives,
        num_negatives=rules.num_negatives,
        rng=query_rng(rules.seed, query_id),
    )
    return kept, sampled


def compare_query(
    query_id: str,
    cand_ids: list[str],
    is_positive: np.ndarray,
    ranks: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    rules: Rules,
) -> tuple[QueryAgreement, np.ndarray, np.ndarray]:
    """One query's agreement, and the false-negative filter's drop mask over its candidates (in row
    order) under A and under B."""
    pos = np.flatnonzero(is_positive)
    if len(pos) != 1 or len(pos) == len(a):
        raise ValueError(f"query {query_id!r}: needs exactly one positive and a candidate, got {len(pos)}")
    cand = np.flatnonzero(~np.asarray(is_positive, bool))
    ids = [cand_ids[i] for i in cand]
    kept_a, sampled_a = _outcome(a, pos[0], cand, ranks, query_id, rules)
    kept_b, sampled_b = _outcome(b, pos[0], cand, ranks, query_id, rules)
    picked_a, picked_b = ({ids[i] for i in s.indices} for s in (sampled_a, sampled_b))
    row = QueryAgreement(
        query_id=query_id,
        pairs=len(a),
        spearman=defined(spearman(a, b)),
        kendall=defined(kendall_tau_b(a, b)),
        dropped_a=[c for c, k in zip(ids, kept_a, strict=True) if not k],
        hard_negatives_a=sorted(picked_a),
        fallback_a=sampled_a.fallback,
        dropped_b=[c for c, k in zip(ids, kept_b, strict=True) if not k],
        hard_negatives_b=sorted(picked_b),
        fallback_b=sampled_b.fallback,
        hard_negatives_jaccard=jaccard(picked_a, picked_b),
    )
    return row, ~kept_a, ~kept_b


def compare(table: pa.Table, rules: Rules) -> tuple[list[QueryAgreement], Agreement]:
    """Per-query results and their summary for `table`: one row per judged pair of both settings, columns
    query_id, cand_id, is_positive, rank, score_a, score_b."""
    table = table.sort_by([("query_id", "ascending"), ("rank", "ascending")])
    qids = table["query_id"].to_numpy(zero_copy_only=False)
    cols = {c: table[c].to_numpy(zero_copy_only=False) for c in ("is_positive", "rank", "score_a", "score_b")}
    cand_ids = table["cand_id"].to_pylist()
    starts = np.flatnonzero(np.r_[len(qids) > 0, qids[1:] != qids[:-1]]) if len(qids) else np.zeros(0, int)
    per_query, drops_a, drops_b, unscored = [], [], [], []
    for start, end in zip(starts, np.r_[starts[1:], len(qids)], strict=True):
        scores = np.r_[cols["score_a"][start:end], cols["score_b"][start:end]].astype(np.float64)
        if not np.isfinite(scores).all():  # a judge call that failed (NaN): the mining job drops the row
            unscored.append(str(qids[start]))
            continue
        row, da, db = compare_query(
            str(qids[start]),
            cand_ids[start:end],
            cols["is_positive"][start:end].astype(bool),
            cols["rank"][start:end],
            cols["score_a"][start:end].astype(np.float64),
            cols["score_b"][start:end].astype(np.float64),
            rules,
        )
        drops_a.append(da)
        drops_b.append(db)
        per_query.append(row)
    return per_query, summarize(per_query, drops_a, drops_b, unscored)


def summarize(
    per_query: list[QueryAgreement], drops_a: list[np.ndarray], drops_b: list[np.ndarray], unscored: list[str]
) -> Agreement:
    """The `Agreement` of the compared queries, from their drop masks (`compare_query`) and the queries
    left out for a failed call."""
    cat = (lambda parts: np.concatenate(parts)) if per_query else (lambda parts: np.zeros(0, bool))
    return Agreement(
        queries=len(per_query),
        pairs=sum(r.pairs for r in per_query),
        queries_with_failed_calls=unscored,
        spearman=spread([r.spearman for r in per_query]),
        kendall=spread([r.kendall for r in per_query]),
        false_negative_filter=two_way(cat(drops_a), cat(drops_b)),
        hard_negatives_jaccard=spread([r.hard_negatives_jaccard for r in per_query]),
        identical_hard_negatives=sum(r.hard_negatives_a == r.hard_negatives_b for r in per_query),
        fallback=two_way(
            np.array([r.fallback_a for r in per_query], bool),
            np.array([r.fallback_b for r in per_query], bool),
        ),
    )
