"""An actor pool of embedders on Ray Data: records stream through actors, each holding one embedder.

Used by mining (queries and candidates), evaluation and index building. On a cluster each actor owns
a GPU (`gpus_per_actor`); on a laptop one CPU actor does the same work.
"""

from __future__ import annotations

import numpy as np
import ray

from unime_ray.config import ModelConfig, model_dict


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
            model=model_dict(model), image_root=str(image_root), text_col=text_col, image_col=image_col
        ),
        batch_size=model.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors),
        num_gpus=gpus_per_actor,
        num_cpus=0 if gpus_per_actor else 1,
    )
