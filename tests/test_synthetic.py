"""The synthetic world: deterministic, in MMEB / SugarCrepe / Karpathy formats, its text true to its pixels.

Truth is checked against the pixels and the scenes in world.json with tables and parsers declared here,
not imported from the generator, so a bug there cannot hide itself.
"""

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unime_ray.data.real import main
from unime_ray.data.synthetic import make_world, oracle_truth

RGB = {
    "red": (230, 25, 25),
    "green": (30, 170, 50),
    "blue": (30, 80, 230),
    "yellow": (245, 210, 20),
    "purple": (140, 40, 190),
    "orange": (250, 130, 10),
}
WHITE = (255, 255, 255)
# Centre of the half of the image each position names, as fractions of the side (x, y).
REGION_CENTRE = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}
PLACE = {"on the left": "left", "on the right": "right", "at the top": "top", "at the bottom": "bottom"}
TOKEN = "<|image_1|>"
TRAIN_KEYS = {"qry", "qry_image_path", "pos_text", "pos_image_path"}
EVAL_KEYS = {"qry_text", "qry_img_path", "tgt_text", "tgt_img_path"}

_COLOUR = "(" + "|".join(RGB) + ")"
_SHAPE = "(circle|square|triangle)"
_PLACE = "(" + "|".join(PLACE) + ")"
# "a red circle on the left" and "on the left there is a red circle"
OBJECT_FIRST = re.compile(rf"\ban? {_COLOUR} {_SHAPE} {_PLACE}")
PLACE_FIRST = re.compile(rf"{_PLACE} there is an? {_COLOUR} {_SHAPE}")


def described(text: str) -> Counter:
    """The (shape, colour, position) objects a caption states."""
    found = [(s, c, PLACE[p]) for c, s, p in OBJECT_FIRST.findall(text)]
    found += [(s, c, PLACE[p]) for p, c, s in PLACE_FIRST.findall(text)]
    return Counter(found)


def truth(scene: list[dict]) -> Counter:
    return Counter((o["shape"], o["colour"], o["position"]) for o in scene)


def vqa_answer(question: str, scene: list[dict]) -> str:
    """Answer a ShapesVQA question from the true scene."""
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        (obj,) = [o for o in scene if o["shape"] == m[1]]
        return obj["colour"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (obj,) = [o for o in scene if o["colour"] == m[1]]
        return obj["shape"]
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        (obj,) = [o for o in scene if (o["colour"], o["shape"]) == (m[1], m[2])]
        return obj["position"]
    if m := re.fullmatch(rf"What is {_PLACE}\?", question):
        (obj,) = [o for o in scene if o["position"] == PLACE[m[1]]]
        return f"{obj['colour']} {obj['shape']}"
    raise AssertionError(f"unknown question {question!r}")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("world")
    return out, make_world(out, seed=0)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    make_world(tmp_path / "a", seed=3)
    make_world(tmp_path / "b", seed=3)
    make_world(tmp_path / "c", seed=4)
    a, b, c = (all_files(tmp_path / name) for name in "abc")
    assert len(a) == 4 * 2 + 3 + 1 + 1 + 48 + 24
    assert a == b
    assert a.keys() == c.keys()
    assert [name for name in a if a[name] != c[name]]


def test_manifest_is_returned_and_written(world):
    out, manifest = world
    assert json.loads((out / "world.json").read_text()) == manifest
    assert set(manifest["datasets"]) == {"ShapesCLS", "ShapesVQA", "ShapesI2T", "ShapesT2I"}
    assert {d["meta_task"] for d in manifest["datasets"].values()} == {"Classification", "VQA", "Retrieval"}
    assert len(manifest["scenes"]) == 48 + 24


@pytest.mark.parametrize("image_size", [64, 37])
def test_pixels_show_the_stated_scene(tmp_path, image_size):
    manifest = make_world(tmp_path, seed=1, n_train=12, n_eval=9, image_size=image_size)
    for path, scene in manifest["scenes"].items():
        pixels = np.asarray(Image.open(tmp_path / "images" / path).convert("RGB"))
        size = pixels.shape[0]
        assert pixels.shape == (image_size, image_size, 3)
        for y, x in [(0, 0), (0, size - 1), (size - 1, 0), (size - 1, size - 1)]:
            assert tuple(pixels[y, x]) == WHITE, path
        colours_seen = {tuple(int(v) for v in px) for px in pixels.reshape(-1, 3)}
        assert colours_seen == {WHITE} | {RGB[o["colour"]] for o in scene}, path
        for obj in scene:
            fx, fy = REGION_CENTRE[obj["position"]]
            assert tuple(pixels[int(fy * size), int(fx * size)]) == RGB[obj["colour"]], (path, obj)
            # The share of its bounding box a shape fills tells it: square 1, circle pi/4, triangle 1/2.
            ys, xs = np.nonzero((pixels == RGB[obj["colour"]]).all(axis=-1))
            fill = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
            shape = "square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle"
            assert shape == obj["shape"], (path, obj, fill)
            # The whole shape lies in its half of the image.
            inside = {
                "left": xs < size / 2,
                "right": xs >= size / 2,
                "top": ys < size / 2,
                "bottom": ys >= size / 2,
            }
            assert inside[obj["position"]].all(), (path, obj)


def test_train_files_are_mmeb_train_pairs_and_true(world):
    out, manifest = world
    scenes = manifest["scenes"]
    for name, info in manifest["datasets"].items():
        rows = read_jsonl(out / info["train"])
        assert len(rows) == info["rows_train"] == 48
        for row in rows:
            assert set(row) == TRAIN_KEYS
            for text, image in [
                (row["qry"], row["qry_image_path"]),
                (row["pos_text"], row["pos_image_path"]),
            ]:
                assert (TOKEN in text) == bool(image), row
                if image:
                    assert image.startswith("train/") and (out / "images" / image).is_file()
            image = row["qry_image_path"] or row["pos_image_path"]
            scene = scenes[image]
            if name == "ShapesCLS":
                assert row["pos_text"] == f"{scene[0]['colour']} {scene[0]['shape']}"
            elif name == "ShapesVQA":
                question = row["qry"].split("question: ")[1]
                assert row["pos_text"] == vqa_answer(question, scene)
            elif name == "ShapesI2T":
                assert described(row["pos_text"]) == truth(scene)
            else:
                assert row["qry"].startswith("Find me an everyday image that matches the given caption: ")
                assert described(row["qry"]) == truth(scene)
    labels = {row["pos_text"] for row in read_jsonl(out / "train/ShapesCLS.jsonl")}
    assert len(labels) >= 6


def test_oracle_judges_other_objects_and_partial_captions_true_by_hand():
    red_left = {"shape": "circle", "colour": "red", "position": "left"}
    blue_right = {"shape": "square", "colour": "blue", "position": "right"}
    red_right = {"shape": "circle", "colour": "red", "position": "right"}
    world = {"scenes": {"ab.png": [red_left, blue_right], "a.png": [red_left], "c.png": [red_right]}}
    true_of = oracle_truth(world)
    both = "a red circle on the left and a blue square on the right"
    img = {"text": TOKEN, "image": "ab.png"}
    # classification: either object's label, not a label of neither
    assert true_of("ShapesCLS", img, {"text": "blue square", "image": ""})
    assert true_of("ShapesCLS", img, {"text": "red circle", "image": ""})
    assert not true_of("ShapesCLS", img, {"text": "red square", "image": ""})
    # a caption of part of the image is true; the same object elsewhere is not
    assert true_of("ShapesI2T", img, {"text": "a red circle on the left", "image": ""})
    assert true_of("ShapesI2T", img, {"text": both, "image": ""})
    assert not true_of("ShapesI2T", img, {"text": "a red circle on the right", "image": ""})
    assert not true_of("ShapesI2T", {"text": TOKEN, "image": "a.png"}, {"text": both, "image": ""})
    query = {
        "text": "Find me an everyday image that matches the given caption: a red circle on the left",
        "image": "",
    }
    assert true_of("ShapesT2I", query, {"text": TOKEN, "image": "ab.png"})
    assert not true_of("ShapesT2I", query, {"text": TOKEN, "image": "c.png"})
    assert not true_of(
        "ShapesVQA", {"text": "What colour is the circle?", "image": "ab.png"}, {"text": "blue"}
    )
    with pytest.raises(ValueError, match="'ShapesOCR' is not a dataset of the synthetic world"):
        true_of("ShapesOCR", img, {"text": "blue square", "image": ""})


def test_oracle_agrees_with_the_scenes_on_every_train_pair_of_the_world(world):
    """Each train query against every other distinct train positive of its dataset (a query's own
    positive is scored by id, not by the oracle), judged independently here."""
    out, manifest = world
    scenes, true_of = manifest["scenes"], oracle_truth(manifest)
    judged_true = Counter()
    for name, info in manifest["datasets"].items():
        rows = read_jsonl(out / info["train"])
        positives = {(r["pos_text"], r["pos_image_path"]) for r in rows}
        for row in rows:
            query = {"text": row["qry"], "image": row["qry_image_path"]}
            others = positives - {(row["pos_text"], row["pos_image_path"])}
            for text, image in others:
                if name == "ShapesCLS":
                    expected = text in {f"{o['colour']} {o['shape']}" for o in scenes[query["image"]]}
                elif name == "ShapesVQA":
                    expected = False  # another answer string is another answer
                elif name == "ShapesI2T":
                    expected = not described(text) - truth(scenes[query["image"]])
                else:
                    expected = not described(query["text"]) - truth(scenes[image])
                got = true_of(name, query, {"text": text, "image": image})
                assert got == expected, (name, row, text, image)
                judged_true[name] += got
    # the world has such pairs: labels of second objects, one-shape captions inside two-shape images
    assert judged_true["ShapesCLS"] > 0 and judged_true["ShapesI2T"] > 0 and judged_true["ShapesT2I"] > 0


def test_eval_files_are_mmeb_eval_lists_with_the_answer_first(world):
    out, manifest = world
    scenes = manifest["scenes"]
    for name, info in manifest["datasets"].items():
        rows = read_jsonl(out / info["eval"])
        assert len(rows) == info["rows_eval"] == 24
        for row in rows:
            assert set(row) == EVAL_KEYS
            texts, images = row["tgt_text"], row["tgt_img_path"]
            assert len(texts) == len(images) == manifest["n_candidates"] == 8
            assert len(set(zip(texts, images, strict=True))) == 8, row
            sides = [(row["qry_text"], row["qry_img_path"]), *zip(texts, images, strict=True)]
            for text, image in sides:
                assert (TOKEN in text) == bool(image), row
                if image:
                    assert image.startswith("eval/") and (out / "images" / image).is_file()
            if name == "ShapesT2I":
                assert described(row["qry_text"]) == truth(scenes[images[0]])
                # No distractor image shows what the caption says, not even among other shapes.
                assert all(not described(row["qry_text"]) <= truth(scenes[i]) for i in images[1:]), row
                continue
            scene = scenes[row["qry_img_path"]]
            if name == "ShapesCLS":
                in_image = {f"{o['colour']} {o['shape']}" for o in scene}
                assert texts[0] == f"{scene[0]['colour']} {scene[0]['shape']}"
                assert not in_image & set(texts[1:]), row
            elif name == "ShapesVQA":
                assert texts[0] == vqa_answer(row["qry_text"].split("question: ")[1], scene)
            else:
                assert described(texts[0]) == truth(scene)
                # A distractor caption must not be true of the image, not even partly.
                assert all(not described(t) <= truth(scene) for t in texts[1:]), row


def test_compositional_negatives_make_one_change(world):
    out, manifest = world
    scenes = manifest["scenes"]
    rows = {kind: read_jsonl(out / path) for kind, path in manifest["compositional"].items()}
    assert set(rows) == {"replace", "swap", "add"}
    for kind_rows in rows.values():
        assert len(kind_rows) == 24
        assert len({(r["image"], r["neg"]) for r in kind_rows}) == 24
        for row in kind_rows:
            assert set(row) == {"image", "pos", "neg"}
            scene = scenes[row["image"]]
            assert row["image"].startswith("eval/")
            assert described(row["pos"]) == truth(scene)
            assert described(row["neg"]) != truth(scene)
    for row in rows["replace"]:
        # "a red" -> "an orange" is one word changed once articles are compared as one word.
        pos, neg = ([w if w != "an" else "a" for w in text.split()] for text in (row["pos"], row["neg"]))
        assert len(pos) == len(neg)
        assert sum(p != n for p, n in zip(pos, neg, strict=True)) == 1, row
    for row in rows["swap"]:
        assert len(scenes[row["image"]]) == 2
        assert row["neg"] != row["pos"]
        assert Counter(row["neg"].split()) == Counter(row["pos"].split()), row
    for row in rows["add"]:
        pos, neg = described(row["pos"]), described(row["neg"])
        (extra,) = (neg - pos).elements()
        assert pos < neg and sum(neg.values()) == sum(pos.values()) + 1, row
        assert (extra[0], extra[1]) not in {(o["shape"], o["colour"]) for o in scenes[row["image"]]}


def test_retrieval_captions_are_true_paraphrases(world):
    out, manifest = world
    rows = read_jsonl(out / manifest["retrieval"])
    assert [r["image"] for r in rows] == [p for p in manifest["scenes"] if p.startswith("eval/")]
    for row in rows:
        assert 2 <= len(row["captions"]) <= 3 and len(set(row["captions"])) == len(row["captions"])
        for text in row["captions"]:
            assert described(text) == truth(manifest["scenes"][row["image"]]), text


def test_train_and_eval_scenes_are_disjoint(world):
    out, manifest = world
    split = {"train": [], "eval": []}
    for path, scene in manifest["scenes"].items():
        split[path.split("/")[0]].append(frozenset(truth(scene).items()))
    assert len(split["train"]) == 48 and len(split["eval"]) == 24
    assert len(set(split["train"])) == 48 and len(set(split["eval"])) == 24
    assert not set(split["train"]) & set(split["eval"])
    train_pixels = {(out / "images" / p).read_bytes() for p in manifest["scenes"] if p.startswith("train/")}
    eval_pixels = {(out / "images" / p).read_bytes() for p in manifest["scenes"] if p.startswith("eval/")}
    assert not train_pixels & eval_pixels


def test_cli_writes_a_world(tmp_path, capsys):
    main([str(tmp_path), "--seed", "5", "--n-train", "6", "--n-eval", "4", "--n-candidates", "3"])
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 and "10 images" in printed
    manifest = json.loads((tmp_path / "world.json").read_text())
    assert manifest["seed"] == 5 and manifest["n_candidates"] == 3


def test_impossible_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="n_candidates"):
        make_world(tmp_path, n_eval=4, n_candidates=5)
    with pytest.raises(ValueError, match="distinct scenes"):
        make_world(tmp_path, n_train=400, n_eval=100)
