"""Dataset groups of the paper's tables, and the averages over them, against hand computations."""

import re
from pathlib import Path

import pytest

from unime_ray.eval.groups import (
    IND,
    META_TASKS,
    MMEB,
    OOD,
    compositional_group,
    mmeb_summary,
    parse_meta_tasks,
    retrieval_kind,
)

# Transcribed from the project's notes (/work/shared/notes/method-facts.md, "MMEB (VLM2Vec)").
EXPECTED = {
    "Classification": "ImageNet-1K, N24News, HatefulMemes, VOC2007, SUN397, Place365, ImageNet-A, "
    "ImageNet-R, ObjectNet, Country211",
    "VQA": "OK-VQA, A-OKVQA, DocVQA, InfographicsVQA, ChartQA, Visual7W, ScienceQA, VizWiz, GQA, TextVQA",
    "Retrieval": "VisDial, CIRR, VisualNews_t2i, VisualNews_i2t, MSCOCO_t2i, MSCOCO_i2t, NIGHTS, WebQA, "
    "FashionIQ, Wiki-SS-NQ, OVEN, EDIS",
    "Grounding": "MSCOCO, RefCOCO, RefCOCO-Matching, Visual7W-Pointing",
}
EXPECTED_IND = (
    "ImageNet-1K, N24News, HatefulMemes, VOC2007, SUN397, OK-VQA, A-OKVQA, DocVQA, InfographicsVQA, ChartQA, "
    "Visual7W, VisDial, CIRR, VisualNews_t2i, VisualNews_i2t, MSCOCO_t2i, MSCOCO_i2t, NIGHTS, WebQA, MSCOCO"
)
NOTES = Path("/work/shared/notes/method-facts.md")


def _names(text: str) -> set[str]:
    return {n.strip() for n in text.split(",")}


def test_meta_task_and_split_lists_are_the_papers():
    assert {t: len(n) for t, n in META_TASKS.items()} == {
        "Classification": 10,
        "VQA": 10,
        "Retrieval": 12,
        "Grounding": 4,
    }
    assert {t: set(n) for t, n in META_TASKS.items()} == {t: _names(n) for t, n in EXPECTED.items()}
    assert len(MMEB) == 36 and len(IND) == 20 and len(OOD) == 16
    assert set(IND) == _names(EXPECTED_IND)
    assert OOD == set(MMEB) - _names(EXPECTED_IND)


@pytest.mark.skipif(not NOTES.is_file(), reason="the project notes are not on this machine")
def test_lists_match_the_notes_file():
    text = " ".join(NOTES.read_text().split())
    found = re.findall(r"(Classification|VQA|Retrieval|Grounding) \((\d+)\): ([^.]+)\.", text)
    assert len(found) == 4
    for task, count, names in found:
        assert set(META_TASKS[task]) == _names(names) and len(META_TASKS[task]) == int(count)
    (ind,) = re.findall(r"In-distribution \(20, the training subsets\): ([^;]+);", text)
    assert set(IND) == _names(ind)


def test_summary_averages_over_present_datasets_and_keeps_others_apart():
    scores = {
        "ImageNet-1K": 50.0,  # Classification, IND
        "Place365": 30.0,  # Classification, OOD
        "OK-VQA": 40.0,  # VQA, IND
        "MSCOCO": 70.0,  # Grounding, IND
        "ShapesCLS": 99.0,  # not MMEB: mapped to Classification, but never in the paper's averages
        "Mystery": 10.0,  # not MMEB, no mapping
    }
    s = mmeb_summary(scores, {"ShapesCLS": "Classification"})
    mmeb = {k: (v["score"], v["datasets"]) for k, v in s["mmeb"].items()}
    assert mmeb == {
        "Classification": (40.0, 2),
        "VQA": (40.0, 1),
        "Retrieval": (None, 0),  # empty group: no number, not zero
        "Grounding": (70.0, 1),
        "IND": (pytest.approx(160 / 3), 3),
        "OOD": (30.0, 1),
        "Overall": (47.5, 4),  # a mean over datasets, as the paper's Overall (not over meta-tasks)
    }
    other = {k: (v["score"], v["datasets"]) for k, v in s["other"].items()}
    assert other == {"Classification": (99.0, 1), "unknown": (10.0, 1), "Overall": (54.5, 2)}
    assert list(s["other"]) == ["Classification", "unknown", "Overall"]


def test_summary_of_nothing_and_missing_scores():
    s = mmeb_summary({"VOC2007": None, "SUN397": 20.0})
    assert s["mmeb"]["Classification"] == {"score": 20.0, "datasets": 2}
    assert s["other"] == {"Overall": {"score": None, "datasets": 0}}
    assert mmeb_summary({})["mmeb"]["Overall"] == {"score": None, "datasets": 0}


def test_meta_task_mapping():
    assert parse_meta_tasks(["ShapesCLS=Classification", " X = VQA "]) == {
        "ShapesCLS": "Classification",
        "X": "VQA",
    }
    with pytest.raises(ValueError, match="DATASET=META_TASK"):
        parse_meta_tasks(["ShapesCLS"])
    with pytest.raises(ValueError, match="MMEB Classification dataset"):
        parse_meta_tasks(["ImageNet-1K=VQA"])


def test_retrieval_kinds_and_compositional_groups():
    assert [
        retrieval_kind(n) for n in ("Flickr30K", "dataset_coco", "ShareGPT4V", "Urban1K", "captions")
    ] == [
        "short",
        "short",
        "long",
        "long",
        "other",
    ]
    assert [compositional_group(n) for n in ("replace_att", "swap_obj", "add", "negate")] == [
        "replace",
        "swap",
        "add",
        "negate",
    ]
