"""Caches of evaluation work, as Parquet, so re-running a table or adding the reranker redoes nothing.

    <cache_dir>/embeddings/<model fingerprint>/model.json               what the fingerprint stands for
    <cache_dir>/embeddings/<model fingerprint>/results/<dataset>--<h>.parquet   text, image, embedding
    <cache_dir>/rerank/<reranker fingerprint>/results/<dataset>--<h>.parquet    key, pick, p_yes

A model's fingerprint covers everything that changes its outputs: the model and adapter folders, the
size and modification time of their weight files (a checkpoint retrained into the same folder must not
reuse stale vectors), image size, token limit and dtype. Within it, rows are cached per dataset and
per row key: only rows never computed before go through Ray, in request shards run by
`engine.shards.run_shards`, each result shard written atomically as it completes — so a killed
evaluation of a 7B model keeps every finished shard and resumes with the rest.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from unime_ray.config import ModelConfig, output_settings
from unime_ray.engine.embed import embed_dataset, embeddings_table
from unime_ray.engine.shards import PATH_COL, run_shards
from unime_ray.eval.ranking import Collection
from unime_ray.io import digest, weight_stamps, write_json, write_parquet

EMBEDDINGS = pa.schema([("text", pa.string()), ("image", pa.string()), ("embedding", pa.list_(pa.float32()))])


def cache_identity(model: ModelConfig, extra: dict | None = None) -> dict:
    """What a model's cached outputs depend on (batch size only changes speed), its weights known by
    path, size and mtime (`weight_stamps`): instant at every run. Unlike `serve.index.model_identity`,
    which hashes the weights' contents so that an index outlives a copied model folder."""
    ident = output_settings(model)
    weights = weight_stamps(model.path, model.adapter)
    ident.update(path=str(Path(model.path).resolve()), weights=weights, **(extra or {}))
    if model.adapter:
        ident["adapter"] = str(Path(model.adapter).resolve())
    return ident


def model_folder(root: Path, identity: dict) -> Path:
    folder = root / digest(identity)
    if not (folder / "model.json").is_file():
        write_json(identity, folder / "model.json")
    return folder


def _prefix(dataset: str) -> str:
    # readable and filesystem-safe, plus a hash of the exact name so no two datasets share a prefix
    return f"{re.sub(r'[^A-Za-z0-9._]+', '_', dataset)}.{digest(dataset)[:8]}"


def _read_results(results: Path, prefix: str, schema: pa.Schema) -> pa.Table:
    tables = [pq.read_table(f).select(schema.names) for f in sorted(results.glob(f"{prefix}--*.parquet"))]
    return pa.concat_tables(tables).cast(schema) if tables else schema.empty_table()


def cached_map(
    parts: dict[str, pa.Table],
    key: list[str],
    folder: Path,
    transform: Callable[[ray.data.Dataset], ray.data.Dataset],
    schema: pa.Schema,
    shard_rows: int,
    label: str,
) -> tuple[dict[str, pa.Table], int]:
    """{dataset: request rows} -> ({dataset: its cached result rows (`schema`, holding the `key`
    columns)}, rows computed now). Only keys with no cached result go through `transform`, and the
    shards of every dataset run in ONE Ray Data pipeline: the actor pool starts once, not per dataset."""
    results, requests = folder / "results", folder / "requests"
    key_schema = pa.schema([schema.field(k) for k in key])
    shards: list[Path] = []
    computed = 0
    for dataset, rows in parts.items():
        prefix = _prefix(dataset)
        done = _read_results(results, prefix, key_schema)
        have = set(zip(*(done[k].to_pylist() for k in key), strict=True))
        missing, seen = [], set()
        for i, k in enumerate(zip(*(rows[c].to_pylist() for c in key), strict=True)):
            if k not in have and k not in seen:
                seen.add(k)
                missing.append(i)
        # A killed run leaves requests without results; their rows are in `missing` again, re-sharded.
        for stale in requests.glob(f"{prefix}--*.parquet"):
            if not (results / stale.name).exists():
                stale.unlink()
        for start in range(0, len(missing), shard_rows):
            part = rows.take(missing[start : start + shard_rows])
            name = f"{prefix}--{digest([part[c].to_pylist() for c in key])}.parquet"
            shards.append(write_parquet(part, requests / name))
        computed += len(missing)
    if shards:
        run_shards(shards, results, transform, schema, key, label)
    return {dataset: _read_results(results, _prefix(dataset), schema) for dataset in parts}, computed


def embed_collections(
    collections: list[Collection],
    model: ModelConfig,
    cache_dir: str | Path,
    *,
    num_actors: int = 1,
    gpus_per_actor: float = 0.0,
    shard_rows: int = 4096,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """{collection key: [items, dim] unit vectors aligned with its items} and {"embedded", "cached"}
    item counts. All collections' missing items stream through ONE Ray Data actor pool."""
    folder = model_folder(Path(cache_dir) / "embeddings", cache_identity(model))

    def transform(ds: ray.data.Dataset) -> ray.data.Dataset:
        # image paths in items are absolute, so the actors need no image root
        ds = embed_dataset(ds, model, "", num_actors=num_actors, gpus_per_actor=gpus_per_actor)
        columns = ("text", "image", PATH_COL)
        return ds.map_batches(embeddings_table, fn_kwargs={"columns": columns}, batch_format="numpy")

    items = pa.schema([("text", pa.string()), ("image", pa.string())])
    parts = {
        c.key: pa.table({"text": [t for t, _ in c.items], "image": [i for _, i in c.items]}, schema=items)
        for c in collections
    }
    done, embedded = cached_map(parts, ["text", "image"], folder, transform, EMBEDDINGS, shard_rows, "embed")
    vectors = {}
    for c in collections:
        table = done[c.key]
        index = {
            k: i
            for i, k in enumerate(zip(table["text"].to_pylist(), table["image"].to_pylist(), strict=True))
        }
        flat = table["embedding"].combine_chunks().flatten()
        matrix = np.asarray(flat, dtype=np.float32).reshape(table.num_rows, -1)
        vectors[c.key] = matrix[[index[item] for item in c.items]]
    total = sum(len(c.items) for c in collections)
    return vectors, {"embedded": embedded, "cached": total - embedded}
