"""MMEB-style evaluation: each query ranks its own candidate list; Precision@1 per dataset."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from unime_ray.config import ModelConfig
from unime_ray.eval.metrics import precision_at_1
from unime_ray.mining.embed import embed_dataset


def _items(table: pa.Table) -> list[dict]:
    """Every distinct (text, image) of queries and targets once, so shared candidates embed once."""
    seen: dict[tuple[str, str], int] = {}
    for row in table.to_pylist():
        for key in [
            (row["qry_text"], row["qry_image"]),
            *zip(row["tgt_text"], row["tgt_image"], strict=True),
        ]:
            seen.setdefault(key, len(seen))
    return [{"item": i, "text": t, "image": im} for (t, im), i in seen.items()]


def evaluate_mmeb(
    table: pa.Table, model: ModelConfig, image_root: str, num_actors: int = 1, gpus_per_actor: float = 0.0
) -> dict[str, float]:
    """EVAL-schema table -> {dataset: P@1} (in %), embedding through a Ray Data actor pool."""
    items = _items(table)
    ds = embed_dataset(
        ray.data.from_items(items), model, image_root, num_actors=num_actors, gpus_per_actor=gpus_per_actor
    )
    emb = {}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=1024):
        emb.update(zip(batch["item"].tolist(), batch["embedding"], strict=True))
    index = {(it["text"], it["image"]): it["item"] for it in items}
    results: dict[str, list[np.ndarray]] = {}
    for row in table.to_pylist():
        q = emb[index[(row["qry_text"], row["qry_image"])]]
        cands = np.stack([emb[index[k]] for k in zip(row["tgt_text"], row["tgt_image"], strict=True)])
        results.setdefault(row["dataset"], []).append(cands @ q)
    return {name: 100.0 * precision_at_1(np.stack(rows)) for name, rows in sorted(results.items())}
