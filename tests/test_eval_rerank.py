"""Reranking the embedding top-K: listwise picks (with the unparsed fallback counted) and pointwise
Yes-probabilities with score fusion, on a hand-made top-K."""

import numpy as np
import pytest

from unime_ray.eval.ranking import Ranked
from unime_ray.eval.rerank import listwise_ranks, pointwise_ranks
from unime_ray.models.prompts import parse_listwise_answer

T, F = True, False


def _ranked() -> Ranked:
    """Four queries, top-4 each. q0: the correct candidate is 4th; q1: 1st; q2: only two candidates, the
    correct one 2nd; q3: none correct in the top-4 (embedding rank 12)."""
    return Ranked(
        ranks=np.array([3, 0, 1, 12]),
        top=np.array([[0, 1, 2, 3], [5, 6, 7, 8], [0, 1, -1, -1], [4, 3, 2, 1]]),
        top_cos=np.array(
            [[0.9, 0.8, 0.7, 0.6], [0.9, 0.5, 0.4, 0.3], [0.9, 0.1, np.nan, np.nan], [0.9, 0.8, 0.7, 0.6]]
        ),
        top_positive=np.array([[F, F, F, T], [T, F, F, F], [F, T, F, F], [F, F, F, F]]),
    )


def test_listwise_pick_moves_to_front_and_unparsed_keeps_embedding_order():
    # q0 picks its 4th (correct) -> rank 0; q1 unparsed -> order kept, still 0; q2 picks the wrong
    # first -> correct stays 2nd; q3 picks a wrong one -> the embedding rank beyond the top-K stays.
    ranks, unparsed = listwise_ranks(_ranked(), [3, -1, 0, 2])
    assert ranks.tolist() == [0, 0, 1, 12]
    assert unparsed == 1
    ranks, unparsed = listwise_ranks(_ranked(), [-1, -1, -1, -1])
    assert ranks.tolist() == [3, 0, 1, 12] and unparsed == 4


P_YES = [[0.1, 0.2, 0.3, 0.9], [0.4, 0.4, 0.1, 0.1], [0.2, 0.8], [0.9, 0.8, 0.7, 0.6]]


@pytest.mark.parametrize(
    "alpha, expected",
    [
        (1.0, [0, 1, 0, 12]),  # q1: the correct candidate ties a wrong one on p_yes -> behind it
        (0.0, [3, 0, 1, 12]),  # cosine only: the embedding ranks come back
        # q0: fused [0.5, 0.5, 0.5, 0.75] -> 1st; q1: [0.65, 0.45, ...] -> 1st; q2: [0.55, 0.45] -> 2nd
        (0.5, [0, 0, 1, 12]),
    ],
)
def test_pointwise_fusion(alpha, expected):
    assert pointwise_ranks(_ranked(), P_YES, alpha).tolist() == expected


@pytest.mark.parametrize(
    "text, n, pick",
    [
        ("Ans: (3)", 10, 2),
        ("(1) or maybe (2)", 10, 0),  # the first number named
        ("Ans: (10)", 10, 9),
        ("Ans: (11)", 10, None),  # out of range: fallback
        ("Ans: (0)", 10, None),
        ("Ans: 3", 10, None),  # the trained format has parentheses; anything else is unparsed
        ("", 10, None),
    ],
)
def test_listwise_answer_parsing(text, n, pick):
    assert parse_listwise_answer(text, n) == pick
