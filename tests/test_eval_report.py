"""Readers of the retrieval / SugarCrepe layouts, the results dict, its Markdown tables, and the
comparison of two result folders (exact deltas)."""

import json

import numpy as np
import pyarrow as pa
import pytest

from unime_ray.data.mmeb import DataError
from unime_ray.data.schemas import EVAL
from unime_ray.eval.compare import compare, flatten
from unime_ray.eval.compositional import compositional_collection, read_compositional
from unime_ray.eval.mmeb import mmeb_collections
from unime_ray.eval.report import build_results, markdown
from unime_ray.eval.retrieval import read_captions, retrieval_collection
from unime_ray.io import write_json


@pytest.fixture
def images(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg", "val2014/d.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_karpathy_split_file(images):
    doc = {
        "images": [
            {"filename": "a.jpg", "split": "test", "sentences": [{"raw": f"a{i}"} for i in range(6)]},
            {"filename": "b.jpg", "split": "train", "sentences": [{"raw": "b"}]},
            {"filepath": "val2014", "filename": "d.jpg", "split": "test", "sentences": [{"raw": "d"}]},
        ]
    }
    (images / "dataset_coco.json").write_text(json.dumps(doc))
    pairs = read_captions(images / "dataset_coco.json", images)
    assert pairs == [("a.jpg", ["a0", "a1", "a2", "a3", "a4"]), ("val2014/d.jpg", ["d"])]  # 5 captions kept
    assert len(read_captions(images / "dataset_coco.json", images, max_captions=0)[0][1]) == 6
    assert read_captions(images / "dataset_coco.json", images, split="train") == [("b.jpg", ["b"])]


def test_caption_jsonl_merges_rows_of_one_image_and_names_bad_rows(images):
    path = images / "urban1k.jsonl"
    rows = [
        {"image": "a.jpg", "caption": "long a"},
        {"image": "b.jpg", "captions": ["b1"]},
        {"image": "a.jpg", "captions": ["a2"]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_captions(path, images) == [("a.jpg", ["long a", "a2"]), ("b.jpg", ["b1"])]
    path.write_text(
        json.dumps({"image": "a.jpg", "captions": ["x"]})
        + "\n"
        + json.dumps({"image": "zz.jpg", "captions": ["y"]})
    )
    with pytest.raises(
        DataError, match=r"urban1k.jsonl: line 2: field 'image': 'zz.jpg' under .*: no such file"
    ):
        read_captions(path, images)
    path.write_text(json.dumps({"image": "a.jpg"}) + "\n")
    with pytest.raises(DataError, match="line 1: missing required field 'caption'"):
        read_captions(path, images)


def test_sugarcrepe_native_and_jsonl(images):
    native = {
        "0": {"filename": "a.jpg", "caption": "p", "negative_caption": "n"},
        "7": {"filename": "b.jpg", "caption": "p2", "negative_caption": "n2"},
    }
    (images / "swap_att.json").write_text(json.dumps(native))
    assert read_compositional(images / "swap_att.json", images) == [
        ("a.jpg", "p", "n"),
        ("b.jpg", "p2", "n2"),
    ]
    (images / "add.jsonl").write_text(json.dumps({"image": "c.jpg", "pos": "p", "neg": "n"}) + "\n")
    assert read_compositional(images / "add.jsonl", images) == [("c.jpg", "p", "n")]
    native["7"].pop("negative_caption")
    (images / "swap_att.json").write_text(json.dumps(native))
    with pytest.raises(DataError, match="entry '7': field 'neg' must be a string, got null"):
        read_compositional(images / "swap_att.json", images)


def _collections():
    table = pa.Table.from_pylist(
        [
            {
                "id": f"{d}{i}",
                "dataset": d,
                "qry_text": f"q{i}",
                "qry_image": "",
                "tgt_text": ["t", "u"],
                "tgt_image": ["", ""],
            }
            for d in ("ImageNet-1K", "ShapesCLS")
            for i in range(2)
        ],
        schema=EVAL,
    )
    return (
        mmeb_collections(table, "/r")
        + [retrieval_collection("Flickr30K", [("a.jpg", ["a1", "a2"]), ("b.jpg", ["b1"])], "/r")]
        + [compositional_collection("replace_att", [("a.jpg", "p", "n")] * 2, "/r")]
    )


def _results(mmeb_ranks: list[int], listwise: bool = False) -> dict:
    """Results from hand-set ranks: ImageNet-1K gets `mmeb_ranks`, everything else fixed."""
    collections = _collections()
    methods = ["embedding", "listwise"] if listwise else ["embedding"]
    given = {
        ("mmeb/ImageNet-1K", "ImageNet-1K"): mmeb_ranks,
        ("mmeb/ShapesCLS", "ShapesCLS"): [0, 0],
        ("retrieval/Flickr30K", "i2t"): [0, 3],  # R@1 50, R@5 100
        ("retrieval/Flickr30K", "t2i"): [0, 0, 1],  # R@1 66.7
        ("compositional/replace_att", "replace_att"): [0, 1],  # 50
    }
    ranks = {(c, t, m): np.array(r) for (c, t), r in given.items() for m in methods}
    unparsed = {(c, t): 1 for (c, t) in given} if listwise else {}
    return build_results(collections, ranks, methods, unparsed, {"ShapesCLS": "Classification"}, [1, 5, 10])


def test_results_numbers_and_table_layout():
    r = _results([0, 1], listwise=True)
    assert r["mmeb"]["datasets"]["ImageNet-1K"]["scores"] == {"embedding": 50.0, "listwise": 50.0}
    assert r["mmeb"]["datasets"]["ImageNet-1K"]["unparsed"] == 1
    assert r["mmeb"]["summary"]["embedding"]["other"]["Classification"] == {"score": 100.0, "datasets": 1}
    assert r["retrieval"]["Flickr30K"]["i2t"]["scores"]["embedding"] == {
        "R@1": 50.0,
        "R@5": 100.0,
        "R@10": 100.0,
    }
    assert r["retrieval"]["Flickr30K"]["t2i"]["curve"]["embedding"] == pytest.approx([200 / 3] + [100] * 9)
    assert r["compositional"]["groups"] == {"replace": {"embedding": 50.0, "listwise": 50.0}}
    t3 = r["table3"]["embedding"]
    assert t3 == {
        "MMEB": 50.0,
        "MMEB_Other": 100.0,  # the synthetic set never enters the MMEB column
        "R_Short": pytest.approx((50 + 200 / 3) / 2),
        "R_Long": None,
        "R_Other": None,
        "R_Compos": 50.0,
    }
    md = markdown(r)
    assert (
        "| Method | Classification (1/10) | VQA (0/10) | Retrieval (0/12) | Grounding (0/4) | IND (1/20) "
        "| OOD (0/16) | Overall (1/36) |" in md
    )
    assert "| embedding | 50.0 | – | – | – | 50.0 | – | 50.0 |" in md
    assert "| Method | Flickr30K i→t | Flickr30K t→i | Replace |" in md
    assert "| Method | MMEB | MMEB_Other | R_Short | R_Compos |" in md  # columns with no data are left out
    assert "MMEB ImageNet-1K: 1/2" in md


def test_compare_gives_exact_deltas(tmp_path):
    a, b = tmp_path / "base", tmp_path / "new"
    for folder, ranks in ((a, [0, 1]), (b, [0, 0])):
        folder.mkdir()
        write_json(_results(ranks), folder / "results.json")  # as the job writes it: keys sorted
    report = compare(a, b)
    deltas = report["deltas"]
    assert deltas["mmeb.datasets.ImageNet-1K.scores.embedding"] == {"a": 50.0, "b": 100.0, "delta": 50.0}
    assert deltas["table3.embedding.MMEB"]["delta"] == 50.0
    assert deltas["retrieval.Flickr30K.i2t.scores.embedding.R@1"]["delta"] == 0.0
    assert report["only_a"] == report["only_b"] == []
    md = (b / "compare" / "compare.md").read_text()
    assert "| embedding | 100.0 (+50.0) | – | – | – | 100.0 (+50.0) | – | 100.0 (+50.0) |" in md
    # read back from key-sorted JSON, the tables keep the paper's column order
    assert "| Method | Classification (1) | Overall (1) |" in md
    assert "| Dataset | Direction | Queries | Method | R@1 | R@5 | R@10 |" in md
    assert "| Method | MMEB | MMEB_Other | R_Short | R_Compos |" in md
    assert json.loads((b / "compare" / "compare.json").read_text())["deltas"] == deltas


def test_flatten_skips_non_numbers():
    assert flatten({"a": {"b": 1, "c": None, "d": "x", "e": True}, "f": [2.5, {"g": 3}]}) == {
        "a.b": 1.0,
        "f.0": 2.5,
        "f.1.g": 3.0,
    }
