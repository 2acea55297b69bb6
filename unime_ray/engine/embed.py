"""An actor pool of embedders on Ray Data: records stream through actors, each holding one embedder
(`engine.actors`), and the vectors they return as Arrow rows.

Used by mining (queries and candidates), evaluation and index building.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import ray

from unime_ray.config import ModelConfig, model_dict
from unime_ray.engine.actors import map_with_actors


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
    whole_blocks: bool = False,
) -> ray.data.Dataset:
    """Lazily add an `embedding` column to `ds` using an actor pool of `num_actors` embedders.

    With `whole_blocks`, each actor call gets one whole block (mining's request shard), which the
    embedder cuts into batches from the block's first row: a row's batch-mates, hence its vector to the
    last bit (padding changes the float sums), are then the same in every run, resumed or not.
    Otherwise Ray Data forms the batches, across blocks, as they arrive."""
    return map_with_actors(
        ds,
        EmbedActor,
        dict(model=model_dict(model), image_root=str(image_root), text_col=text_col, image_col=image_col),
        batch_size=None if whole_blocks else model.batch_size,
        batch_format="numpy",
        num_actors=num_actors,
        gpus_per_actor=gpus_per_actor,
    )


def embeddings_table(batch: dict[str, np.ndarray], columns: Sequence[str]) -> pa.Table:
    """A numpy batch of `embed_dataset` as Arrow: `columns` as strings, in that order, then `embedding`
    as list<float32> (the layout of every embedding file the stages write)."""
    emb = np.asarray(batch["embedding"], dtype=np.float32)
    flat = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
    cols = {n: pa.array(batch[n].tolist(), pa.string()) for n in columns}
    return pa.table({**cols, "embedding": flat.cast(pa.list_(pa.float32()))})
