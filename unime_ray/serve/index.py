"""The search index of a corpus: unit vectors plus the records they came from, on disk and in memory.

    python jobs/build_index.py --config jobs/configs/tiny.yaml --corpus runs/tiny/world/retrieval
    unime-ray build-index --config FILE --corpus FILE_OR_DIR [--rebuild] [--set index.type=hnsw]

Building embeds the corpus (`unime_ray.serve.corpus`) with a Ray Data actor pool of embedders
(`engine.embed.embed_dataset`, the same code as mining), then writes the folder `index.dir`
(default `<run.output_dir>/index`):

    meta.json              the commit point: embedder identity, dim, type, count, and the files below
    part-g00000.parquet    INDEX_RECORDS rows (id, source, text, image, embedding) in FAISS row order,
    part-g00001.parquet    one more part per incremental add
    ann-g00001.faiss       ivf / hnsw only: the FAISS index over the same rows (exact search needs none)
    quarantine.parquet     the corpus rows set aside by the last build, with reasons

Search: "exact" (default) is FAISS inner product over every vector (`engine.index.PoolIndex`:
chunked, ties by row, on GPU when FAISS sees one); "ivf" (trained IndexIVFFlat, GPU too; a corpus
too small to train it is searched exactly) and "hnsw" (IndexHNSWFlat, CPU) are approximate, for large
corpora. Vectors are unit length, so scores are cosines.

Atomic writes. New files get fresh names (the generation number in them), each written to a temporary
file and renamed; meta.json is replaced last, atomically, and only then are the files it no longer names
removed. A crash at any point leaves the previous index whole. A server loads the files meta.json names
when its replica starts and keeps them in memory; it sees later additions after a redeploy.

Incremental add. A rerun embeds only the corpus records whose ids are not in the index yet and appends
them as a new part; ivf / hnsw add them to the trained index without retraining (rebuild with
`--rebuild` once the corpus has grown several-fold, so ivf's lists stay balanced). For exact search an
index grown by adds searches like one built at once.

Refusal. meta.json records the embedder's identity (`model_identity`). Adding to or serving an index with
an embedder of other weights, adapter, image size, token limit or dimension raises `IndexMismatchError`
naming what differs: vectors of two models live in different spaces, so mixing them would return
confident nonsense. Weights are read from safetensors files only.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unime_ray.config import Config, IndexConfig, ModelConfig, add_config_args, config_from_args
from unime_ray.data.schemas import INDEX_RECORDS
from unime_ray.engine.index import PoolIndex, build_ivf
from unime_ray.io import atomic_path, write_json, write_parquet
from unime_ray.record import record_stage, stage_key
from unime_ray.tracking import log_stage, numbers

FORMAT_VERSION = 1
META = "meta.json"
# What must match for two sets of vectors to share a space; paths may differ across machines.
IDENTITY_KEYS = ("weights", "adapter_weights", "image_size", "max_length", "dim")
FULL_HASH_BYTES = 1 << 30  # weight files up to this size are hashed whole
SAMPLE_BLOCKS, SAMPLE_BYTES = 64, 1 << 16  # larger ones: their size plus 64 evenly spaced 64 KiB blocks


class IndexMismatchError(ValueError):
    """The index was built with another embedder (weights, adapter, settings or dimension)."""


def index_dir(cfg: Config) -> Path:
    return Path(cfg.index.dir or Path(cfg.run.output_dir) / "index")


# ---- embedder identity --------------------------------------------------------------------------------


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        if size <= FULL_HASH_BYTES:
            digest.update(f.read())
        else:
            # Reading 15 GB at every server start to tell checkpoints apart is not worth it: fine-tuning
            # changes weights throughout the file, so blocks spread over it differ too.
            for i in range(SAMPLE_BLOCKS):
                f.seek(i * (size - SAMPLE_BYTES) // (SAMPLE_BLOCKS - 1))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def _weights_digest(folder: Path, what: str) -> str:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{folder}: no *.safetensors files ({what} weights load from safetensors only)"
        )
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}\0{_file_digest(f)}\0".encode())
    return digest.hexdigest()[:16]


def model_identity(model: ModelConfig) -> dict[str, Any]:
    """What an index's vectors depend on: a digest of the weights (and adapter), the image size and token
    limit, and the embedding dimension (read from config.json, no model loaded). Not the dtype: 'auto'
    is bf16 on GPU and fp32 on CPU, and both give vectors of the same space."""
    path = Path(model.path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a local Hugging Face model folder")
    config = json.loads(config_file.read_text())
    dim = (config.get("text_config") or {}).get("hidden_size") or config.get("hidden_size")
    return {
        "path": str(path.resolve()),
        "adapter": str(Path(model.adapter).resolve()) if model.adapter else "",
        "weights": _weights_digest(path, "model"),
        "adapter_weights": _weights_digest(Path(model.adapter), "adapter") if model.adapter else "",
        "image_size": model.image_size,
        "max_length": model.max_length,
        "dim": dim,
    }


# ---- reading ------------------------------------------------------------------------------------------


def read_meta(directory: str | Path, model: dict[str, Any] | None = None) -> dict[str, Any]:
    """The index's meta.json; with `model` (a `model_identity`), refuse an index built with another one."""
    path = Path(directory) / META
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory}: no index here ({META} missing); build one with "
            "`unime-ray build-index --config FILE --corpus FILE_OR_DIR`"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: index format {meta.get('format')!r}, this code reads {FORMAT_VERSION}")
    if model is not None:
        built = meta["model"]
        diff = [k for k in IDENTITY_KEYS if built.get(k) != model.get(k)]
        if diff:
            what = ", ".join(f"{k} {built.get(k)!r} (index) vs {model.get(k)!r} (config)" for k in diff)
            raise IndexMismatchError(
                f"{directory}: this index was built with a different embedder ({what}). Use that "
                f"embedder ({_options(directory, built)}), or rebuild the index with this one "
                "(build-index --rebuild)."
            )
    return meta


def _options(directory: str | Path, built: dict[str, Any]) -> str:
    """The command-line options that select the embedder which built an index: `--run RUN_DIR` when
    it is the final embedder of the training run the index belongs to (the demo's), else its own path
    and adapter."""
    from unime_ray.runs import final_weights

    run = Path(directory).parent
    try:
        if str(final_weights(run, "embed").resolve()) in (built["path"], built["adapter"]):
            return f"--run {run}"
    except FileNotFoundError:
        pass
    return f"--set embedder.path={built['path']} --set embedder.adapter={built['adapter']}"


def index_ids(directory: str | Path, meta: dict[str, Any]) -> set[str]:
    """The ids of every record in the index (read from the id column alone)."""
    return {
        rid
        for part in meta["parts"]
        for rid in pq.read_table(Path(directory) / part, columns=["id"])["id"].to_pylist()
    }


class CorpusIndex:
    """An index loaded into memory: `search` vectors, then read the `records` of the rows it returns."""

    def __init__(self, meta: dict[str, Any], table: pa.Table, ann: faiss.Index | None, cfg: IndexConfig):
        self.meta = meta
        dim = meta["dim"]
        column = table["embedding"].combine_chunks()
        lengths = pc.list_value_length(column).fill_null(-1).to_numpy()
        if (lengths != dim).any():
            raise ValueError(f"index records must all have {dim}-dimensional embeddings")
        vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(len(table), dim)
        self.table = table.drop_columns(["embedding"])
        use_gpu = faiss.get_num_gpus() > 0 if cfg.faiss_gpu is None else cfg.faiss_gpu
        self.exact = PoolIndex(vectors, use_gpu=use_gpu) if ann is None else None
        self.ann = ann
        if meta["type"] == "ivf":
            faiss.extract_index_ivf(ann).nprobe = cfg.ivf_nprobe
            if use_gpu:
                self.gpu = faiss.StandardGpuResources()  # must outlive the GPU index
                self.ann = faiss.index_cpu_to_gpu(self.gpu, 0, ann)
        elif meta["type"] == "hnsw":
            ann.hnsw.efSearch = cfg.hnsw_ef_search

    @classmethod
    def load(
        cls, directory: str | Path, model: dict[str, Any] | None = None, cfg: IndexConfig | None = None
    ) -> CorpusIndex:
        """Load what meta.json names; `model` refuses another embedder; `cfg` sets the search knobs."""
        directory = Path(directory)
        meta = read_meta(directory, model)
        table = pa.concat_tables([pq.read_table(directory / p, schema=INDEX_RECORDS) for p in meta["parts"]])
        ann = faiss.read_index(str(directory / meta["ann"])) if meta["ann"] else None
        sizes = {table.num_rows, meta["count"]} | ({ann.ntotal} if ann is not None else set())
        if len(sizes) != 1:
            raise ValueError(
                f"{directory}: records, meta.json and the FAISS index disagree on the count {sizes}"
            )
        return cls(meta, table, ann, cfg or IndexConfig())

    def __len__(self) -> int:
        return self.table.num_rows

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores [nq, k] (cosine, descending) and rows [nq, k]; -inf / -1 where fewer than k exist."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.exact is not None:
            return self.exact.search(queries, k)
        scores, rows = self.ann.search(queries, k)
        return np.where(rows < 0, -np.inf, scores).astype(np.float32), rows

    def records(self, rows: np.ndarray) -> list[dict[str, str]]:
        """`{id, source, text, image}` of each row (row numbers from `search`, without the -1 padding)."""
        return self.table.take(pa.array(rows, pa.int64())).to_pylist()

    def record(self, record_id: str) -> dict[str, str] | None:
        """The record with this id, None when the index has none. A linear scan of the id column (a few
        ms per million records) rather than an id -> row map, which would hold ~100 bytes per record in
        every replica for a lookup that only the search page's thumbnails make."""
        row = pc.index(self.table["id"], record_id).as_py()
        return None if row < 0 else self.table.slice(row, 1).to_pylist()[0]

    def image_file(self, record_id: str) -> Path | None:
        """The image file of record `record_id`: its stored path under the index's image root, or None
        (unknown id, no image, no such file, or a stored path that resolves outside the root). The path
        comes only from the index's own records, never from the caller."""
        record = self.record(record_id)
        if record is None or not record["image"]:
            return None
        root = Path(self.meta["image_root"]).resolve()
        path = (root / record["image"]).resolve()
        return path if path.is_relative_to(root) and path.is_file() else None


# ---- writing ------------------------------------------------------------------------------------------


def create_index(
    directory: str | Path,
    records: pa.Table,
    vectors: np.ndarray,
    *,
    model: dict[str, Any],
    cfg: IndexConfig,
    image_root: str | Path,
) -> dict[str, Any]:
    """A new index of `records` (`{id, source, text, image}` rows) with their `vectors`, replacing any
    index in `directory` atomically. Returns the new meta."""
    directory = Path(directory)
    previous = json.loads((directory / META).read_text()) if (directory / META).is_file() else None
    generation = previous["generation"] + 1 if previous else 0
    vectors = _checked(records, vectors, model["dim"], set())
    ann = _build_ann(vectors, cfg)
    meta = {
        "format": FORMAT_VERSION,
        "generation": generation,
        "model": model,
        "dim": model["dim"],
        "requested_type": cfg.type,
        "type": "exact" if ann is None else cfg.type,
        "build": {"hnsw_m": cfg.hnsw_m, "hnsw_ef_construction": cfg.hnsw_ef_construction},
        "image_root": str(Path(image_root).resolve()),
        "count": records.num_rows,
        "parts": [_write_part(directory, generation, records, vectors)],
        "ann": _write_ann(directory, generation, ann) if ann is not None else "",
    }
    return _commit(directory, meta)


def add_to_index(
    directory: str | Path, records: pa.Table, vectors: np.ndarray, *, model: dict[str, Any]
) -> dict[str, Any]:
    """Append `records` (ids not yet in the index) with their `vectors`; the trained ivf / hnsw index
    gets them added, not rebuilt. Returns the new meta (the old one when there is nothing to add)."""
    directory = Path(directory)
    meta = read_meta(directory, model)
    vectors = _checked(records, vectors, meta["dim"], index_ids(directory, meta))
    if not records.num_rows:
        return meta
    generation = meta["generation"] + 1
    ann_file = ""
    if meta["ann"]:
        ann = faiss.read_index(str(directory / meta["ann"]))
        ann.add(vectors)
        ann_file = _write_ann(directory, generation, ann)
    part = _write_part(directory, generation, records, vectors)
    return _commit(
        directory,
        {
            **meta,
            "generation": generation,
            "count": meta["count"] + records.num_rows,
            "parts": [*meta["parts"], part],
            "ann": ann_file,
        },
    )


def _checked(records: pa.Table, vectors: np.ndarray, dim: int, existing: set[str]) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape != (records.num_rows, dim):
        raise ValueError(f"expected vectors of shape ({records.num_rows}, {dim}), got {vectors.shape}")
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad.size:
        raise ValueError(f"record {records['id'][int(bad[0])].as_py()!r} has a non-finite vector")
    ids = records["id"].to_pylist()
    seen = set(existing)
    for rid in ids:
        if rid in seen:
            raise ValueError(f"record id {rid!r} is already in the index or twice in the records")
        seen.add(rid)
    return vectors


def _build_ann(vectors: np.ndarray, cfg: IndexConfig) -> faiss.Index | None:
    """The FAISS index of ivf / hnsw (None: exact search, or a corpus too small to train ivf)."""
    if cfg.type == "hnsw":
        index = faiss.IndexHNSWFlat(vectors.shape[1], cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.hnsw_ef_construction
        index.add(vectors)
        return index
    if cfg.type == "ivf":
        use_gpu = faiss.get_num_gpus() > 0 if cfg.faiss_gpu is None else cfg.faiss_gpu
        gpu = faiss.StandardGpuResources() if use_gpu else None
        index = build_ivf(vectors, cfg.ivf_nprobe, gpu)
        return faiss.index_gpu_to_cpu(index) if gpu is not None and index is not None else index
    return None


def _write_part(directory: Path, generation: int, records: pa.Table, vectors: np.ndarray) -> str:
    name = f"part-g{generation:05d}.parquet"
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    columns = [records[f.name] for f in INDEX_RECORDS if f.name != "embedding"]
    table = pa.Table.from_arrays([*columns, embedding.cast(pa.list_(pa.float32()))], schema=INDEX_RECORDS)
    write_parquet(table, directory / name)
    return name


def _write_ann(directory: Path, generation: int, index: faiss.Index) -> str:
    name = f"ann-g{generation:05d}.faiss"
    with atomic_path(directory / name) as tmp:
        faiss.write_index(index, str(tmp))
    return name


def _commit(directory: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Make `meta` the index (one atomic rename), then remove the part and ann files it does not name."""
    meta = {**meta, "updated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    write_json(meta, directory / META)
    named = {*meta["parts"], meta["ann"]}
    for path in [*directory.glob("part-g*.parquet"), *directory.glob("ann-g*.faiss")]:
        if path.name not in named:
            path.unlink()
    return meta


# ---- the build job ------------------------------------------------------------------------------------


def embed_records(records: pa.Table, cfg: Config) -> np.ndarray:
    """float32 [n, dim] vectors of `records` in row order, from a Ray Data actor pool of embedders."""
    import ray

    from unime_ray.engine.embed import embed_dataset

    ds = ray.data.from_arrow(
        records.select(["text", "image"]).append_column("row", pa.array(np.arange(records.num_rows)))
    )
    ds = embed_dataset(
        ds,
        cfg.embedder,
        cfg.data.image_root,
        num_actors=cfg.index.num_actors,
        gpus_per_actor=cfg.index.gpus_per_actor,
    )
    vectors: np.ndarray | None = None
    done = np.zeros(records.num_rows, dtype=bool)
    # Ray Data does not keep row order across an actor pool: place each vector by its row number.
    for batch in ds.select_columns(["row", "embedding"]).iter_batches(batch_format="numpy"):
        emb = np.asarray(batch["embedding"], dtype=np.float32)
        if vectors is None:
            vectors = np.empty((records.num_rows, emb.shape[1]), dtype=np.float32)
        vectors[batch["row"]] = emb
        done[batch["row"]] = True
    if not done.all():
        raise RuntimeError(f"{int((~done).sum())} records came back from embedding without a vector")
    return vectors


def build_index(cfg: Config, corpus: str | Path, rebuild: bool = False) -> dict[str, Any]:
    """Index `corpus` (see `unime_ray.serve.corpus`), or add its new records to the existing index."""
    from unime_ray.serve.corpus import read_corpus

    directory = index_dir(cfg)
    changed, started = record_stage(cfg, directory), time.time()
    if changed:
        print(f"[build-index] {directory} was last built with other settings, now: {', '.join(changed)}")
    model = model_identity(cfg.embedder)
    meta = None if rebuild or not (directory / META).is_file() else read_meta(directory, model)
    if meta is not None and meta["requested_type"] != cfg.index.type:
        raise ValueError(
            f"{directory}: the index is {meta['requested_type']!r}, the config asks for {cfg.index.type!r}; "
            "rebuild it (--rebuild) to change the type"
        )
    read = read_corpus(
        corpus,
        cfg.data.image_root,
        cfg.index,
        check_images=cfg.data.check_images,
        allow_absolute_images=cfg.data.allow_absolute_images,
    )
    records = read.table
    if meta is not None:
        records = records.filter(
            pc.invert(pc.is_in(records["id"], pa.array(sorted(index_ids(directory, meta)), pa.string())))
        )
    elif not records.num_rows:
        raise ValueError(f"{corpus}: no usable records to index (quarantined: {read.quarantine.num_rows})")
    vectors = embed_records(records, cfg) if records.num_rows else np.zeros((0, model["dim"]), np.float32)
    if meta is None:
        meta = create_index(
            directory, records, vectors, model=model, cfg=cfg.index, image_root=cfg.data.image_root
        )
    else:
        meta = add_to_index(directory, records, vectors, model=model)
    read.write_quarantine(directory / "quarantine.parquet")
    report = {
        "index": str(directory),
        "read": read.counts(),
        "added": records.num_rows,
        "count": meta["count"],
        "type": meta["type"],
        "dim": meta["dim"],
    }
    params = {"index": asdict(cfg.index), "corpus": str(corpus), "embedder": asdict(cfg.embedder)}
    log_stage(
        cfg, stage_key(Path(cfg.run.output_dir), directory), started, params=params, metrics=numbers(report)
    )
    return report


def main(argv: list[str] | None = None) -> None:
    from unime_ray.assets import prepare_synthetic
    from unime_ray.ray_utils import init_ray
    from unime_ray.runlock import command_lock

    p = argparse.ArgumentParser(
        prog="unime-ray build-index",
        description="Embed a corpus into the search index, or add its new records to it.",
    )
    add_config_args(p, default="jobs/configs/tiny.yaml", run=True)
    p.add_argument(
        "--corpus", required=True, help="corpus file or folder (MMEB pairs / eval, image + captions)"
    )
    p.add_argument("--rebuild", action="store_true", help="replace the index instead of adding new records")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    with command_lock(cfg.run.output_dir, "build-index"):
        prepare_synthetic(cfg)
        init_ray(cfg.ray.address, verbose=cfg.ray.verbose)
        try:
            report = build_index(cfg, args.corpus, rebuild=args.rebuild)
        except IndexMismatchError as e:
            raise SystemExit(f"error: {e}") from None
    print(json.dumps(report, indent=2))
