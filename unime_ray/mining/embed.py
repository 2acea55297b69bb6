"""Embedding stage on Ray Data: records stream through a pool of actors, each holding one embedder.

Used by mining (queries and candidates), evaluation and index building. On a cluster each actor owns
a GPU (`gpus_per_actor`); on a laptop one CPU actor does the same work.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from unime_ray.config import MiningConfig, ModelConfig
from unime_ray.data.schemas import EMBEDDINGS
from unime_ray.mining.shards import PATH_COL, requests_once, run_shards, write_request_shards


class EmbedActor:
    """`map_batches` callable: adds an `embedding` column (float32 [b, d]) to each batch."""

    def __init__(self, model: dict, image_root: str, text_col: str, image_col: str):
        from unime_ray.models.embedder import Embedder

        self.embedder = Embedder(ModelConfig(**model), image_root=image_root)
        self.text_col, self.image_col = text_col, image_col

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = [
            {"text": str(t), "image": str(i)}
            for t, i in zip(batch[self.text_col], batch[self.image_col], strict=True)
        ]
        batch["embedding"] = self.embedder.embed(records)
        return batch


def embed_dataset(
    ds: ray.data.Dataset,
    model: ModelConfig,
    image_root: str,
    *,
    text_col: str = "text",
    image_col: str = "image",
    num_actors: int = 1,
    gpus_per_actor: float = 0.0,
) -> ray.data.Dataset:
    """Lazily add an `embedding` column to `ds` using an actor pool of `num_actors` embedders."""
    return ds.map_batches(
        EmbedActor,
        fn_constructor_kwargs=dict(
            model=asdict(model), image_root=str(image_root), text_col=text_col, image_col=image_col
        ),
        batch_size=model.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors),
        num_gpus=gpus_per_actor,
        num_cpus=0 if gpus_per_actor else 1,
    )


def _to_arrow(batch: dict[str, np.ndarray]) -> pa.Table:
    """Embedding rows in the EMBEDDINGS layout (list<float32>), keeping the shard path."""
    emb = np.asarray(batch["embedding"], dtype=np.float32)
    flat = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]).cast(
        pa.list_(pa.float32())
    )
    cols = {n: pa.array(batch[n].tolist(), pa.string()) for n in ("id", "dataset", "kind", PATH_COL)}
    return pa.table({**cols, "embedding": flat})


def run_embed(
    queries: pa.Table, pool: pa.Table, out_dir: Path, model: ModelConfig, image_root: str, cfg: MiningConfig
) -> dict:
    """Embed every query and every pool candidate once; shards of `embed_shard_rows` items."""
    items = pa.concat_tables(
        [
            t.select(["id", "dataset", "text", "image"]).append_column("kind", pa.array([kind] * t.num_rows))
            for t, kind in ((queries, "query"), (pool, "candidate"))
        ]
    )
    requests = requests_once(
        out_dir / "requests", lambda d: write_request_shards(items, d, cfg.embed_shard_rows)
    )

    def transform(ds: ray.data.Dataset) -> ray.data.Dataset:
        ds = embed_dataset(
            ds, model, image_root, num_actors=cfg.num_actors, gpus_per_actor=cfg.gpus_per_actor
        )
        return ds.map_batches(_to_arrow, batch_format="numpy")

    return run_shards(requests, out_dir / "results", transform, EMBEDDINGS, ["id", "kind"], "embed")
