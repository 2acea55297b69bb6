"""Embedding through a real Ray Data actor pool on a local Ray bound to 127.0.0.1."""

import numpy as np
import ray

from unime_ray.config import ModelConfig
from unime_ray.data.mmeb import read_folder
from unime_ray.engine.embed import embed_dataset
from unime_ray.eval.metrics import precision_at_1
from unime_ray.eval.mmeb import evaluate_mmeb
from unime_ray.models.embedder import Embedder


def test_ray_is_on_loopback(local_ray):
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}


def test_actor_pool_embeddings_equal_direct(local_ray, tiny_qwen, world):
    pairs = read_folder(world / "train", "pairs", image_root=world / "images").table.slice(0, 40)
    rows = [{"id": r["id"], "text": r["qry_text"], "image": r["qry_image"]} for r in pairs.to_pylist()]
    model = ModelConfig(path=str(tiny_qwen), image_size=56, batch_size=7)
    ds = embed_dataset(ray.data.from_items(rows), model, str(world / "images"))
    got = {
        b: e
        for batch in ds.iter_batches(batch_format="numpy")
        for b, e in zip(batch["id"], batch["embedding"])
    }
    direct = Embedder(model, image_root=world / "images").embed(rows)
    assert sorted(got) == sorted(r["id"] for r in rows)  # every row exactly once
    np.testing.assert_allclose(np.stack([got[r["id"]] for r in rows]), direct, atol=1e-5)


def test_precision_at_1_hand_cases():
    scores = np.array(
        [
            [0.9, 0.1, 0.2],  # correct
            [0.5, 0.5, 0.1],  # tie with a distractor: not correct
            [0.1, 0.3, 0.2],  # wrong
            [0.7, 0.6, 0.69],  # correct
        ]
    )
    assert precision_at_1(scores) == 0.5
    assert np.isnan(precision_at_1(np.zeros((0, 3))))


def test_evaluate_mmeb_matches_direct_computation(local_ray, tiny_qwen, world):
    table = read_folder(world / "eval", "eval", image_root=world / "images").table
    model = ModelConfig(path=str(tiny_qwen), image_size=56, batch_size=16)
    got = evaluate_mmeb(table, model, str(world / "images"))
    emb = Embedder(model, image_root=world / "images")
    for name in {"ShapesCLS", "ShapesT2I"}:
        rows = [r for r in table.to_pylist() if r["dataset"] == name]
        q = emb.embed([{"text": r["qry_text"], "image": r["qry_image"]} for r in rows])
        scores = np.stack(
            [
                emb.embed([{"text": t, "image": i} for t, i in zip(r["tgt_text"], r["tgt_image"])]) @ q[k]
                for k, r in enumerate(rows)
            ]
        )
        assert abs(got[name] - 100 * precision_at_1(scores)) < 1e-9
