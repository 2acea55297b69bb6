"""Evaluation metrics on small hand-worked cases: ties, duplicates, several captions per image, empty sets.

Embeddings are built so that dot products are exactly the score matrix written in the test: images are
one-hot vectors and a caption's vector is its column of scores.
"""

import numpy as np
import pyarrow as pa
import pytest

from unime_ray.data.schemas import EVAL
from unime_ray.eval.compositional import compositional_collection
from unime_ray.eval.metrics import (
    first_positive_rank,
    mean_or_none,
    pessimistic_order,
    precision_at_1,
    recall_at_k,
)
from unime_ray.eval.mmeb import mmeb_collections
from unime_ray.eval.ranking import rank
from unime_ray.eval.retrieval import retrieval_collection


def test_first_positive_rank_counts_ties_against_the_query():
    scores = np.array(
        [
            [0.9, 0.1, 0.2],  # right
            [0.5, 0.5, 0.1],  # tie with a distractor: one wrong candidate ahead
            [0.1, 0.3, 0.2],  # two ahead
            [0.4, 0.4, 0.4],  # constant model: two ahead, never a success
        ]
    )
    positive = np.zeros_like(scores, dtype=bool)
    positive[:, 0] = True
    assert first_positive_rank(scores, positive).tolist() == [0, 1, 2, 2]
    assert precision_at_1(scores) == 0.25
    assert np.isnan(precision_at_1(np.zeros((0, 3))))


def test_ties_among_correct_candidates_cost_nothing_and_padding_never_counts():
    scores = np.array([[0.5, 0.5, 0.5, np.nan], [0.2, np.nan, 0.7, 0.2]])
    positive = np.array([[True, True, False, False], [True, False, False, True]])
    # row 0: one wrong candidate ties the two right ones; row 1: 0.7 ahead, padding ignored
    assert first_positive_rank(scores, positive).tolist() == [1, 1]
    order = pessimistic_order(scores, positive)
    assert order.tolist() == [[2, 0, 1, 3], [2, 0, 3, 1]]  # wrong first on ties, padding last


def test_query_without_a_correct_candidate_is_an_error():
    with pytest.raises(ValueError, match="no correct candidate"):
        first_positive_rank(np.zeros((2, 3)), np.array([[True, False, False], [False] * 3]))


def test_recall_and_means_of_empty_sets_are_none():
    assert recall_at_k(np.array([], dtype=int), 1) is None
    assert recall_at_k(np.array([0, 1, 4, 5]), 5) == 75.0
    assert mean_or_none([None, None]) is None
    assert mean_or_none([10.0, None, 20.0]) == 15.0


def _embed(collection, vectors: dict) -> np.ndarray:
    """[items, d] with each item's hand-made vector, looked up by text (images by path)."""
    return np.stack(
        [np.asarray(vectors[image or text], dtype=np.float64) for text, image in collection.items]
    )


def test_retrieval_five_captions_per_image_both_directions():
    # 3 images (A, B, C) x 5 captions; S[i, j] = similarity of image i to caption j.
    S = np.zeros((3, 15))
    S[0] = [0.6, 0.2, 0.2, 0.1, 0.1] + [0.7, 0, 0, 0, 0] + [0.6, 0, 0.2, 0, 0]
    S[1] = [0, 0, 0, 0, 0] + [0.9, 0.5, 0.5, 0.5, 0.5] + [0.1, 0, 0, 0, 0]
    S[2] = [0.8] * 10 + [0.3, 0.2, 0.2, 0.2, 0.2]
    pairs = [(f"{name}.png", [f"{name}{j}" for j in range(5)]) for name in "ABC"]
    c = retrieval_collection("Flickr30K", pairs, "/imgs")
    vectors = {f"/imgs/{name}.png": np.eye(3)[i] for i, name in enumerate("ABC")}
    vectors |= {f"{name}{j}": S[:, 5 * i + j] for i, name in enumerate("ABC") for j in range(5)}
    emb = _embed(c, vectors)
    i2t, t2i = (rank(t, emb, top_k=10) for t in c.tasks)
    # image -> text: A's best caption 0.6 has B0 (0.7) and C0 (0.6, a tie) ahead; B first; C: ten
    # captions of A and B at 0.8 ahead of its best (0.3): rank 10, outside the top 10.
    assert i2t.ranks.tolist() == [2, 0, 10]
    assert [recall_at_k(i2t.ranks, k) for k in (1, 5, 10)] == pytest.approx([100 / 3, 200 / 3, 200 / 3])
    # text -> image: A's captions all lose to C (0.8); B0 wins (0.9 > 0.8); B1-4 lose to C; C0 loses
    # to A (0.6 > 0.3); C2 ties with A (0.2 = 0.2): lost; C1, C3, C4 win.
    assert t2i.ranks.tolist() == [1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 0, 0]
    assert recall_at_k(t2i.ranks, 1) == pytest.approx(100 * 4 / 15)
    assert recall_at_k(t2i.ranks, 5) == recall_at_k(t2i.ranks, 10) == 100.0
    assert c.info == {"images": 3, "captions": 15, "kind": "short"}


def test_retrieval_duplicate_caption_is_right_for_every_image_that_has_it():
    # "a dog" belongs to both images: one gallery entry, correct for both; one text query, both right.
    c = retrieval_collection("x", [("1.png", ["a dog", "a cat"]), ("2.png", ["a dog", "a cow"])], "/r")
    i2t, t2i = c.tasks
    assert len(i2t.candidates) == 3 and [p.tolist() for p in i2t.positives] == [[0, 1], [0, 2]]
    assert len(t2i.queries) == 3 and [p.tolist() for p in t2i.positives] == [[0, 1], [0], [1]]
    vectors = {"/r/1.png": [1.0, 0.0], "/r/2.png": [0.0, 1.0]}
    vectors |= {"a dog": [0.5, 0.9], "a cat": [0.8, 0.0], "a cow": [0.0, 0.1]}
    i2t_ranked, t2i_ranked = (rank(t, _embed(c, vectors), top_k=3) for t in c.tasks)
    # image 1: "a cat" 0.8 > "a dog" 0.5, both right -> rank 0; image 2: "a dog" 0.9 -> rank 0
    assert i2t_ranked.ranks.tolist() == [0, 0]
    # "a dog" -> image 2 (0.9), right; "a cat" -> image 1; "a cow" -> image 2
    assert t2i_ranked.ranks.tolist() == [0, 0, 0]


def test_sugarcrepe_accuracy_tie_is_a_failure():
    rows = [
        ("1.png", "pos win", "neg lose"),  # 0.9 > 0.1: right
        ("1.png", "pos tie", "neg tie"),  # 0.5 = 0.5: wrong
        ("2.png", "pos lose", "neg win"),  # 0.2 < 0.8: wrong
        ("2.png", "same", "same"),  # identical captions are one candidate: right
    ]
    c = compositional_collection("replace_att", rows, "/r")
    vectors = {"/r/1.png": [1.0, 0.0], "/r/2.png": [0.0, 1.0], "same": [0.3, 0.3]}
    vectors |= {"pos win": [0.9, 0], "neg lose": [0.1, 0], "pos tie": [0.5, 0], "neg tie": [0.5, 0]}
    vectors |= {"pos lose": [0, 0.2], "neg win": [0, 0.8]}
    ranked = rank(c.tasks[0], _embed(c, vectors), top_k=10)
    assert ranked.ranks.tolist() == [0, 1, 1, 0]
    assert recall_at_k(ranked.ranks, 1) == 50.0
    assert c.info == {"rows": 4, "group": "replace"}
    assert ranked.top.shape == (4, 2)  # top-K is capped by the two candidates


def test_mmeb_duplicated_ground_truth_is_correct_and_ragged_lists_pad():
    rows = [
        # the ground truth appears twice; the distractor ties it: wrong (a tie is never a success)
        {"tgt_text": ["cat", "cat", "dog"], "qry_text": "q1"},
        # only two candidates; the ground truth wins
        {"tgt_text": ["cow", "dog"], "qry_text": "q2"},
    ]
    table = pa.Table.from_pylist(
        [
            {
                "id": str(i),
                "dataset": "ImageNet-1K",
                "qry_image": "",
                "tgt_image": [""] * len(r["tgt_text"]),
                **r,
            }
            for i, r in enumerate(rows)
        ],
        schema=EVAL,
    )
    (c,) = mmeb_collections(table, "/r")
    task = c.tasks[0]
    assert [p.tolist() for p in task.positives] == [[0, 1], [0]]
    assert task.candidates.tolist() == [[2, 2, 3], [4, 3, -1]]  # queries are items 0 and 1
    vectors = {"q1": [1.0, 0.0], "q2": [0.0, 1.0], "cat": [0.5, 0.0], "dog": [0.5, 0.2], "cow": [0.0, 0.9]}
    ranked = rank(task, _embed(c, vectors), top_k=10)
    assert ranked.ranks.tolist() == [1, 0]
    assert ranked.top[1].tolist() == [0, 1, -1]  # padding stays out of the top-K
    assert c.info == {"queries": 2, "candidates": 2}
