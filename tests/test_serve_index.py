"""The corpus index: embedder identity, incremental add vs full build, refusal of another embedder,
atomic writes, and the build job (corpus readers + Ray Data embedding) end to end."""

import json
import os
import shutil
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unime_ray.config import Config, IndexConfig, ModelConfig
from unime_ray.data.mmeb import DataError
from unime_ray.models.embedder import Embedder
from unime_ray.serve import index as index_mod
from unime_ray.serve.corpus import CORPUS, read_corpus
from unime_ray.serve.index import (
    CorpusIndex,
    IndexMismatchError,
    add_to_index,
    build_index,
    create_index,
    model_identity,
    read_meta,
)

DIM = 16


def unit(rng, n, dim=DIM):
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def corpus(n, start=0):
    ids = [f"r{i:05d}" for i in range(start, start + n)]
    return pa.table(
        {"id": ids, "source": ["s"] * n, "text": [f"text {i}" for i in ids], "image": [""] * n}, schema=CORPUS
    )


def identity(**changes):
    return {
        "path": "/m",
        "adapter": "",
        "weights": "w0",
        "adapter_weights": "",
        "image_size": 56,
        "max_length": 256,
        "dim": DIM,
        **changes,
    }


def files(directory):
    return sorted(os.listdir(directory))  # os.listdir shows the hidden temp files of atomic writes too


def test_model_identity(tiny_qwen, tmp_path):
    model = ModelConfig(path=str(tiny_qwen), image_size=56, max_length=256)
    ident = model_identity(model)
    assert ident["dim"] == Embedder(model).dim == 64
    copy = shutil.copytree(tiny_qwen, tmp_path / "copy")
    moved = model_identity(ModelConfig(path=str(copy), image_size=56, max_length=256))
    assert {k: v for k, v in moved.items() if k != "path"} == {k: v for k, v in ident.items() if k != "path"}
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert model_identity(ModelConfig(path=str(copy), image_size=56))["weights"] != ident["weights"]
    assert model_identity(ModelConfig(path=str(tiny_qwen), image_size=112))["image_size"] == 112

    (tmp_path / "adapter").mkdir()
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        model_identity(ModelConfig(path=str(tiny_qwen), adapter=str(tmp_path / "adapter")))
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        model_identity(ModelConfig(path=str(copy)))


def test_incremental_add_equals_full_build(tmp_path):
    rng = np.random.default_rng(0)
    vecs, recs, queries = unit(rng, 500), corpus(500), unit(rng, 40)
    cfg = IndexConfig()
    create_index(tmp_path / "full", recs, vecs, model=identity(), cfg=cfg, image_root=tmp_path)
    create_index(
        tmp_path / "grown", recs.slice(0, 300), vecs[:300], model=identity(), cfg=cfg, image_root=tmp_path
    )
    add_to_index(tmp_path / "grown", recs.slice(300, 150), vecs[300:450], model=identity())
    meta = add_to_index(tmp_path / "grown", recs.slice(450), vecs[450:], model=identity())
    assert meta["count"] == 500 and len(meta["parts"]) == 3 and meta["generation"] == 2

    full, grown = CorpusIndex.load(tmp_path / "full"), CorpusIndex.load(tmp_path / "grown")
    for a, b in zip(full.search(queries, 25), grown.search(queries, 25)):
        np.testing.assert_array_equal(a, b)
    rows = full.search(queries, 5)[1]
    assert full.records(rows[0]) == grown.records(rows[0])
    # the reference: brute force over the same vectors
    np.testing.assert_array_equal(rows, np.argsort(-(queries @ vecs.T), axis=1, kind="stable")[:, :5])
    # k beyond the corpus pads with -1 / -inf
    scores, rows = full.search(queries[:1], 600)
    assert (rows[0, 500:] == -1).all() and np.isneginf(scores[0, 500:]).all()
    # nothing new: nothing written
    assert add_to_index(tmp_path / "grown", recs.slice(0, 0), vecs[:0], model=identity()) == meta


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_grows_without_retraining(tmp_path, kind):
    rng = np.random.default_rng(1)
    vecs, recs = unit(rng, 3000), corpus(3000)
    create_index(
        tmp_path,
        recs.slice(0, 2000),
        vecs[:2000],
        model=identity(),
        cfg=IndexConfig(type=kind),
        image_root=".",
    )
    meta = add_to_index(tmp_path, recs.slice(2000), vecs[2000:], model=identity())
    assert meta["type"] == kind and meta["count"] == 3000 and meta["ann"].startswith("ann-g00001")
    assert files(tmp_path) == sorted(["meta.json", "part-g00000.parquet", "part-g00001.parquet", meta["ann"]])
    rows = CorpusIndex.load(tmp_path, cfg=IndexConfig(type=kind, ivf_nprobe=64)).search(vecs, 1)[1][:, 0]
    assert (rows == np.arange(3000)).mean() > 0.95  # each vector finds itself, added ones included


def test_small_corpus_asked_for_ivf_is_searched_exactly(tmp_path):
    meta = create_index(
        tmp_path,
        corpus(50),
        unit(np.random.default_rng(2), 50),
        model=identity(),
        cfg=IndexConfig(type="ivf"),
        image_root=".",
    )
    assert (meta["type"], meta["requested_type"], meta["ann"]) == ("exact", "ivf", "")


def test_refuses_another_embedder(tmp_path):
    vecs = unit(np.random.default_rng(3), 20)
    create_index(tmp_path, corpus(20), vecs, model=identity(), cfg=IndexConfig(), image_root=".")
    for changes, words in [
        ({"weights": "w1"}, "weights 'w0' (index) vs 'w1' (config)"),
        ({"dim": 32}, "dim 16 (index) vs 32 (config)"),
        ({"image_size": 112}, "image_size 56 (index) vs 112 (config)"),
        ({"adapter_weights": "a1"}, "adapter_weights"),
    ]:
        other = identity(**changes)
        for call in (
            partial(read_meta, tmp_path, other),
            partial(CorpusIndex.load, tmp_path, other),
            partial(add_to_index, tmp_path, corpus(1, start=99), vecs[:1], model=other),
        ):
            with pytest.raises(IndexMismatchError, match="different embedder") as error:
                call()
            assert words in str(error.value) and "--rebuild" in str(error.value)
    assert CorpusIndex.load(tmp_path, identity(path="/elsewhere")).meta["count"] == 20  # same weights, moved
    with pytest.raises(ValueError, match=r"shape \(1, 16\)"):
        add_to_index(tmp_path, corpus(1, start=99), unit(np.random.default_rng(4), 1, 8), model=identity())
    with pytest.raises(ValueError, match="already in the index"):
        add_to_index(tmp_path, corpus(1), vecs[:1], model=identity())
    with pytest.raises(FileNotFoundError, match="build-index"):
        read_meta(tmp_path / "nothing")


def test_writes_are_atomic(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    vecs, recs, queries = unit(rng, 400), corpus(400), unit(rng, 10)
    create_index(
        tmp_path,
        recs.slice(0, 300),
        vecs[:300],
        model=identity(),
        cfg=IndexConfig(type="hnsw"),
        image_root=".",
    )
    before_files, before = files(tmp_path), CorpusIndex.load(tmp_path).search(queries, 10)

    def dies_half_way(index, path):
        with open(path, "wb") as f:
            f.write(b"half an index")
        raise OSError("disk full")

    monkeypatch.setattr(index_mod.faiss, "write_index", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        add_to_index(tmp_path, recs.slice(300), vecs[300:], model=identity())
    monkeypatch.undo()
    assert files(tmp_path) == before_files  # no temp file, no new part, meta.json untouched
    for a, b in zip(before, CorpusIndex.load(tmp_path).search(queries, 10)):
        np.testing.assert_array_equal(a, b)

    meta = add_to_index(tmp_path, recs.slice(300), vecs[300:], model=identity())
    assert files(tmp_path) == sorted(["meta.json", *meta["parts"], meta["ann"]])  # old ann file removed
    rebuilt = create_index(tmp_path, recs, vecs, model=identity(), cfg=IndexConfig(), image_root=".")
    assert rebuilt["generation"] == 2 and files(tmp_path) == ["meta.json", "part-g00002.parquet"]
    assert json.loads((tmp_path / "meta.json").read_text())["count"] == 400


def test_build_job_embeds_once_and_adds_only_new_records(local_ray, tiny_qwen, world, tmp_path):
    cfg = Config()
    cfg.run.output_dir = str(tmp_path)
    cfg.data.image_root = str(world / "images")
    cfg.embedder = ModelConfig(path=str(tiny_qwen), image_size=56, max_length=256, batch_size=8)
    captions = world / "retrieval" / "captions.jsonl"

    report = build_index(cfg, captions)
    records = read_corpus(captions, world / "images", cfg.index).table
    assert report["added"] == report["count"] == records.num_rows == 24 + 72  # 24 images, 3 captions each
    loaded = CorpusIndex.load(tmp_path / "index", model_identity(cfg.embedder))
    assert loaded.table.to_pylist() == records.to_pylist()
    direct = Embedder(cfg.embedder, image_root=world / "images").embed(records.to_pylist())
    np.testing.assert_allclose(loaded.exact.pool, direct, atol=1e-5)
    images = [r for r in records.to_pylist() if r["image"]]
    assert len(images) == 24 and images[0]["text"] == cfg.index.image_prompt

    assert build_index(cfg, captions)["added"] == 0  # a rerun embeds nothing
    eval_targets = read_corpus(world / "eval", world / "images", cfg.index).table.num_rows
    report = build_index(cfg, world / "eval")  # MMEB-eval files: their distinct targets
    assert report["added"] == eval_targets and report["count"] == 96 + eval_targets

    messy = tmp_path / "messy.jsonl"
    messy.write_text(
        json.dumps({"image": "eval/00000.png", "captions": ["a new caption", " "]})
        + "\n"
        + json.dumps({"image": "eval/missing.png", "captions": ["another new caption"]})
        + "\n"
    )
    report = build_index(cfg, messy)
    assert report["read"] == {"rows_in": 5, "rows_out": 3, "empty_text": 1, "missing_image": 1}
    assert report["added"] == 3  # two captions and one image, under the source "messy"
    quarantine = pq.read_table(tmp_path / "index" / "quarantine.parquet").to_pylist()
    assert {(q["field"], q["reason"]) for q in quarantine} == {
        ("captions[1]", "empty_text"),
        ("image", "missing_image"),
    }

    cfg.index.type = "hnsw"
    with pytest.raises(ValueError, match="--rebuild"):
        build_index(cfg, captions)
    cfg.index.type = "exact"
    cfg.embedder.image_size = 28
    with pytest.raises(IndexMismatchError, match="image_size 56 .index. vs 28 .config."):
        build_index(cfg, captions)
    with pytest.raises(DataError, match="unknown corpus format"):
        (tmp_path / "odd.jsonl").write_text('{"title": "x"}\n')
        read_corpus(tmp_path / "odd.jsonl", world / "images", cfg.index)
