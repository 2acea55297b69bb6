"""Model-free inputs for the scale harness (`bench/scale.py`): MMEB-train shaped pairs, embeddings and
judge scores with planted structure. Every subcommand streams (bounded memory at N=662k) and is
deterministic from `--seed`: every random number is a stable hash (blake2b) of the seed and a name, so
nothing depends on batch boundaries or on the order rows are visited in.

    python bench/scale_data.py pairs      --n 20000 --out DIR            # DIR/train/*.jsonl, DIR/images/
    python bench/scale_data.py embeddings --ingest RUN/mining/ingest --out FILE.parquet [--dim 256]
    python bench/scale_data.py embeddings --ingest ... --out RUN/mining/embed/results --shards  # old code
    python bench/scale_data.py scores     --ingest ... --retrieve RUN/mining/retrieve --out FILE.parquet

Shape of the data (approximate: the VLM2Vec / MMEB releases as we recall them, not re-counted). MMEB-train
has 20 training subsets; raw sizes ImageNet_1K ~100k, N24News ~49k, HatefulMemes ~8.5k, VOC2007 ~7.8k,
SUN397 ~20k, OK-VQA ~9k, A-OKVQA ~17k, DocVQA ~40k, InfographicsVQA ~24k, ChartQA ~28k, Visual7W ~70k,
VisDial ~123k, CIRR ~26k, VisualNews_t2i ~100k, VisualNews_i2t ~100k, MSCOCO_t2i ~100k, MSCOCO_i2t ~113k,
NIGHTS ~16k, WebQA ~17k, MSCOCO (grounding) ~100k. VLM2Vec trains on at most 50k per subset
(num_sample_per_subset); capped, they sum to ~662k, the size UniME-V2 mines. `--n` scales the capped
sizes proportionally (largest remainder, so they sum to exactly N; N=662300 gives them exactly, N=662000
within 0.05%).

Candidate pools (distinct positives per dataset, which is what ingest turns into the pool):
classification subsets have label pools (ImageNet_1K 1000, N24News 24, HatefulMemes 2, VOC2007 20,
SUN397 397); VQA subsets have answer pools of many thousand distinct short texts (a share of new answers
plus a few hundred popular ones, "yes", "2", ...); retrieval and grounding subsets have nearly one
distinct item per query (captions for i2t, images for t2i / image+text->image). Modalities follow MMEB:
image->text (classification, VQA, i2t: an image with an instruction holding `<|image_1|>`, a text
positive), text->image (t2i, VisDial, WebQA: the positive is an image with a short text) and
image+text->image (CIRR, NIGHTS, MSCOCO grounding). Text lengths are roughly MMEB's: labels 1-3 words,
answers 1-5, captions 10-20, VQA instruction + question ~20-50, VisDial dialogues ~50-90.

Images: 16 tiny real files (8 PNG, 8 JPEG) under `images/scale/`; every image path is one of them, so the
reader's missing-image check passes. MMEB's image positives are distinct images with one fixed text;
here the images repeat, so an image positive carries a short tag in its text to stay a distinct pool
item (the pool is keyed by text + image).

Planted structure. Each pool item belongs to a latent concept: hash(item id) mod C, with C = pool/4
(pools under 50 items: one concept per item). An item's vector is its concept's centre plus noise
(cosine to a concept mate ~0.8, to anything else ~0 +- 0.06 at dim 256); a query's vector is its
positive's plus noise (cosine ~0.96), so the positive is the query's nearest item and its positive's ~3
concept mates come next: the planted false negatives. With `--topics T` the concepts are grouped in topics
of T concepts (the concept's index mod the dataset's topic count), and an item's vector is topic centre +
0.7 x concept centre + noise: concept mates at cosine ~0.86, topic mates at ~0.57, so a query's top 50 is a
neighbourhood, as in a trained embedding space (related captions, similar images), where the flat default
leaves ranks 4-50 to near-orthogonal noise that no approximate index can find (`bench/ivf_recall.py`).
Topics change the vectors only: judge scores key on concepts either way.

Judge scores: the positive ~0.9 +- 0.03; the concept mates within beta/2 of the positive or above it (the
false-negative filter drops them); other candidates 0.75 -> 0.2 with rank, +-0.08 noise; 0.5% of queries
(hash mod 200 == 0) score every candidate above the positive minus beta, so the sample stage's fallback
runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# (name, capped rows, kind, pool): pool is the label count for classification, else the share of rows
# that bring a new positive (the rest repeat an earlier / a popular one).
DATASETS: list[tuple[str, int, str, float]] = [
    ("ImageNet_1K", 50_000, "cls", 1000),
    ("N24News", 49_000, "cls_caption", 24),
    ("HatefulMemes", 8_500, "cls", 2),
    ("VOC2007", 7_800, "cls", 20),
    ("SUN397", 20_000, "cls", 397),
    ("OK-VQA", 9_000, "vqa", 0.5),
    ("A-OKVQA", 17_000, "vqa", 0.5),
    ("DocVQA", 40_000, "vqa", 0.8),
    ("InfographicsVQA", 24_000, "vqa", 0.75),
    ("ChartQA", 28_000, "vqa", 0.6),
    ("Visual7W", 50_000, "vqa", 0.7),
    ("VisDial", 50_000, "dialog", 0.98),
    ("CIRR", 26_000, "edit", 0.95),
    ("VisualNews_t2i", 50_000, "t2i", 0.98),
    ("VisualNews_i2t", 50_000, "i2t", 0.98),
    ("MSCOCO_t2i", 50_000, "t2i", 0.97),
    ("MSCOCO_i2t", 50_000, "i2t", 0.97),
    ("NIGHTS", 16_000, "similar", 0.95),
    ("WebQA", 17_000, "wiki", 0.95),
    ("MSCOCO", 50_000, "ground", 0.95),
]
FULL_SIZE = sum(rows for _, rows, _, _ in DATASETS)  # 662,300

NUM_IMAGES = 16
IMAGES = [f"scale/img_{i:02d}.{'png' if i % 2 == 0 else 'jpg'}" for i in range(NUM_IMAGES)]
IMG = "<|image_1|>\n"
REPRESENT = IMG + "Represent the given image."

# Instructions in MMEB's style (paraphrased); {} is filled with generated words.
QUERY_TEMPLATES = {
    "cls": IMG + "Represent the given image for classification.",
    "cls_caption": IMG + "Represent the given news image with the following caption for domain "
    "classification: {}",
    "vqa": IMG + "Represent the given image with the following question: {}",
    "dialog": "Represent the given dialogue about an image, which is used for image retrieval: {}",
    "edit": IMG + "Given an image, find a similar everyday image with the following modification: {}",
    "t2i": "Find me an everyday image that matches the given caption: {}",
    "i2t": IMG + "Find an image caption describing the given everyday image.",
    "similar": IMG + "Find a day-to-day image that looks similar to the provided image.",
    "wiki": "Find a Wikipedia image that answers this question: {}",
    "ground": IMG + 'Select the portion of the image that isolates the object labeled as "{}"',
}
QUERY_WORDS = {  # (min, max) generated words in the query text
    "cls": (0, 0),
    "cls_caption": (12, 30),
    "vqa": (8, 40),
    "dialog": (50, 90),
    "edit": (5, 15),
    "t2i": (10, 20),
    "i2t": (0, 0),
    "similar": (0, 0),
    "wiki": (8, 20),
    "ground": (1, 2),
}
IMAGE_QUERY = {"cls", "cls_caption", "vqa", "edit", "i2t", "similar", "ground"}

# 4096 pseudo-words of 2-3 syllables (4-6 letters): text of realistic length, no dictionary needed.
_SYLLABLES = [c + v for c in "bdfghklmnprstvz" for v in "aeiou"]
VOCAB = [
    _SYLLABLES[i % 75] + _SYLLABLES[(i // 75) % 75] + (_SYLLABLES[(i * 7) % 75] if i % 3 == 0 else "")
    for i in range(4096)
]

BETA = 0.01  # mining.beta's default: the false-negative margin the planted scores are placed around


# ---- stable randomness --------------------------------------------------------------------------------


def digest(key: str, size: int = 64) -> bytes:
    return hashlib.blake2b(key.encode(), digest_size=size).digest()


def uniform(key: str) -> float:
    """A number in [0, 1) fixed by `key`."""
    return int.from_bytes(digest(key, 8), "little") / 2**64


def words(key: str, lo: int, hi: int) -> str:
    """lo..hi pseudo-words fixed by `key` (12 bits of hash per word)."""
    raw, more = b"", 0
    count = lo + digest(key + "#n", 1)[0] % (hi - lo + 1)
    while len(raw) < 2 * count:
        raw += digest(f"{key}#{more}")
        more += 1
    return " ".join(VOCAB[int.from_bytes(raw[2 * j : 2 * j + 2], "little") % 4096] for j in range(count))


def hash_ids(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """uint64 stable hash of every string; each distinct value is hashed once (ids repeat in the
    retrieve files: 50 candidates per query id)."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    encoded = pc.dictionary_encode(ids)
    values = [int.from_bytes(digest(s, 8), "little") for s in encoded.dictionary.to_pylist()]
    return np.asarray(values, dtype=np.uint64)[encoded.indices.to_numpy(zero_copy_only=False)]


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrap-around intended)."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def unit_of(keys: np.ndarray) -> np.ndarray:
    """[n] uint64 -> [n] float64 uniforms in (0, 1)."""
    return ((mix(keys) >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53


def gaussians(keys: np.ndarray, dim: int) -> np.ndarray:
    """[n] uint64 -> [n, dim] float32 standard normals (Box-Muller on hashed counters), / sqrt(dim) so the
    rows have norm ~1."""
    with np.errstate(over="ignore"):
        x = mix(keys[:, None] * np.uint64(0x9E3779B97F4A7C15) + np.arange(dim, dtype=np.uint64))
    u1 = ((x >> np.uint64(32)).astype(np.float64) + 0.5) / 2.0**32
    u2 = ((x & np.uint64(0xFFFFFFFF)).astype(np.float64) + 0.5) / 2.0**32
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return (z / np.sqrt(dim)).astype(np.float32)


# ---- pairs --------------------------------------------------------------------------------------------


def dataset_sizes(n: int) -> dict[str, int]:
    """The capped MMEB sizes scaled to sum to exactly `n` (largest remainder)."""
    exact = [n * rows / FULL_SIZE for _, rows, _, _ in DATASETS]
    sizes = [int(x) for x in exact]
    order = sorted(range(len(DATASETS)), key=lambda i: (sizes[i] - exact[i], i))
    for i in order[: n - sum(sizes)]:
        sizes[i] += 1
    return {name: size for (name, _, _, _), size in zip(DATASETS, sizes, strict=True)}


def class_labels(seed: int, name: str, count: int) -> list[str]:
    """`count` distinct labels of 1-3 words (at most 1000, so held in memory)."""
    labels, seen = [], set()
    for k in range(count):
        attempt = 0
        while True:
            label = words(f"{seed}/{name}/label/{k}/{attempt}", 1, 3)
            if label not in seen:
                break
            attempt += 1
        seen.add(label)
        labels.append(label)
    return labels


def pair_rows(seed: int, name: str, kind: str, pool: float, n: int) -> Iterator[dict]:
    """The `n` records of one dataset, generated one at a time."""
    labels = class_labels(seed, name, int(pool)) if kind.startswith("cls") else []
    popular = 50 + n // 100  # VQA: answers many questions share
    lo, hi = QUERY_WORDS[kind]
    for i in range(n):
        key = f"{seed}/{name}/{i}"
        u_new, u_pick, u_img = uniform(key + "/new"), uniform(key + "/pick"), uniform(key + "/img")
        filler = words(key + "/q", lo, hi) if hi else ""
        query = (
            QUERY_TEMPLATES[kind].format(filler) if "{}" in QUERY_TEMPLATES[kind] else QUERY_TEMPLATES[kind]
        )
        qry_image = IMAGES[int(u_img * NUM_IMAGES)] if kind in IMAGE_QUERY else ""
        if kind.startswith("cls"):
            pos_text, pos_image = labels[int(u_pick * len(labels))], ""
        else:
            if kind == "vqa":
                item = f"new{i}" if u_new < pool else f"pop{int(popular * u_pick**2)}"
            else:  # retrieval / grounding: mostly a new item, sometimes an earlier one again
                item = f"{i}" if u_new < pool or i == 0 else f"{int(u_pick * i)}"
            item_key = f"{seed}/{name}/item/{item}"
            if kind == "vqa":
                pos_text = words(item_key, 1, 2) if item.startswith("pop") else words(item_key, 1, 5)
                pos_image = ""
            elif kind == "i2t":
                pos_text, pos_image = words(item_key, 10, 20), ""
            else:
                tag = words(item_key + "/tag", 4, 4)
                text = words(item_key, 10, 20) if kind == "wiki" else f"(ref {tag})"
                if kind == "wiki":
                    text = f"with related text information: {text} (ref {tag})"
                pos_text = f"{REPRESENT} {text}"
                pos_image = IMAGES[int(uniform(item_key + "/img") * NUM_IMAGES)]
        yield {
            "qry": query,
            "qry_image_path": qry_image,
            "pos_text": pos_text,
            "pos_image_path": pos_image,
            "neg_text": "",
            "neg_image_path": "",
        }


def write_images(root: Path) -> None:
    """16 real 32x32 images, half PNG half JPEG, each a different colour."""
    from PIL import Image

    for i, rel in enumerate(IMAGES):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        colour = ((i * 53) % 256, (i * 97) % 256, (i * 151) % 256)
        Image.new("RGB", (32, 32), colour).save(path)


def write_pairs(n: int, out: Path, seed: int) -> dict:
    """DIR/train/<dataset>.jsonl (one per dataset) and DIR/images/; returns rows per dataset."""
    write_images(out / "images")
    train = out / "train"
    train.mkdir(parents=True, exist_ok=True)
    sizes = dataset_sizes(n)
    for name, _, kind, pool in DATASETS:
        tmp = train / f".{name}.jsonl.tmp"
        with tmp.open("w", encoding="utf-8") as f:
            for row in pair_rows(seed, name, kind, pool, sizes[name]):
                f.write(json.dumps(row) + "\n")
        tmp.rename(train / f"{name}.jsonl")
    return sizes


# ---- embeddings ---------------------------------------------------------------------------------------

ITEM_NOISE = 0.5  # concept mates at cosine ~1 / (1 + 0.25) = 0.8
QUERY_NOISE = 0.3  # a query at cosine ~1 / sqrt(1 + 0.09) = 0.96 to its positive
TOPIC_CONCEPT = 0.7  # with topics: concept mates at (1 + 0.49) / 1.74 = 0.86, topic mates at 1 / 1.74 = 0.57


def concept_counts(pool_path: Path) -> dict[str, int]:
    """Concepts per dataset: pool / 4 (so ~3 mates per item), one per item for pools under 50."""
    counts = pq.read_table(pool_path, columns=["dataset"])["dataset"].value_counts().to_pylist()
    return {c["values"]: c["counts"] if c["counts"] < 50 else max(1, round(c["counts"] / 4)) for c in counts}


def concept_of(
    ids: pa.Array, datasets: pa.Array, concepts: dict[str, int], topics: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(uint64 hash of each id, uint64 key of its concept: the dataset's hash mixed with hash mod C, and
    with `topics` > 0 the key of the concept's topic: concept index mod max(1, C // topics), else None)."""
    h = hash_ids(ids)
    per_row = np.asarray([concepts[d] for d in datasets.to_pylist()], dtype=np.uint64)
    concept, dataset = h % per_row, hash_ids(datasets)
    key = mix(dataset ^ mix(concept + np.uint64(1)))
    if not topics:
        return h, key, None
    topic = concept % np.maximum(per_row // np.uint64(topics), np.uint64(1))
    return h, key, mix(dataset ^ mix(topic + np.uint64(1)) ^ np.uint64(0x7070))


def item_vectors(
    seed: int, ids: pa.Array, datasets: pa.Array, concepts: dict[str, int], dim: int, topics: int = 0
) -> np.ndarray:
    """Unit vectors of pool items: concept centre + ITEM_NOISE x noise of the item; with `topics`, topic
    centre + TOPIC_CONCEPT x concept centre + ITEM_NOISE x noise."""
    h, concept, topic = concept_of(ids, datasets, concepts, topics)
    s = np.uint64(seed)
    v = gaussians(mix(concept ^ s), dim)
    if topic is not None:
        v = gaussians(mix(topic ^ s), dim) + TOPIC_CONCEPT * v
    v += ITEM_NOISE * gaussians(mix(h ^ s ^ np.uint64(0xA5A5)), dim)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def query_vectors(
    seed: int,
    ids: pa.Array,
    pos_ids: pa.Array,
    datasets: pa.Array,
    concepts: dict[str, int],
    dim: int,
    topics: int = 0,
) -> np.ndarray:
    """Unit vectors of queries: their positive's vector + QUERY_NOISE x noise of the query."""
    v = item_vectors(seed, pos_ids, datasets, concepts, dim, topics)
    v += QUERY_NOISE * gaussians(mix(hash_ids(ids) ^ np.uint64(seed) ^ np.uint64(0x5A5A)), dim)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _list_column(v: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1]).cast(pa.list_(pa.float32()))


def write_embeddings(
    ingest: Path, out: Path, dim: int, seed: int, shards: bool, topics: int = 0, batch: int = 4096
) -> dict:
    """One row per query id and per pool id, streamed over the ingest tables in `batch`-row slices;
    `topics` concepts per topic (0: no topic level).

    Default: one Parquet file `out` with `id`, `embedding` (the precomputed-embeddings input). `shards`:
    the old code's embed-stage output instead, EMBEDDINGS rows (`id`, `dataset`, `kind`, `embedding`) as
    `out/shard-NNNNN.parquet` files of `batch` rows (its embed_shard_rows default, 4096)."""
    concepts = concept_counts(ingest / "pool.parquet")
    writer, written, shard = None, 0, 0
    if shards:
        out.mkdir(parents=True, exist_ok=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32()))])
        writer = pq.ParquetWriter(out.with_suffix(".tmp"), schema)
    for kind, name, columns in (
        ("query", "queries.parquet", ["id", "dataset", "pos_id"]),
        ("candidate", "pool.parquet", ["id", "dataset"]),
    ):
        for rb in pq.ParquetFile(ingest / name).iter_batches(batch_size=batch, columns=columns):
            if kind == "query":
                v = query_vectors(seed, rb["id"], rb["pos_id"], rb["dataset"], concepts, dim, topics)
            else:
                v = item_vectors(seed, rb["id"], rb["dataset"], concepts, dim, topics)
            if shards:
                table = pa.table(
                    {
                        "id": rb["id"],
                        "dataset": rb["dataset"],
                        "kind": pa.array([kind] * rb.num_rows, pa.string()),
                        "embedding": _list_column(v),
                    }
                )
                pq.write_table(table, out / f"shard-{shard:05d}.parquet")
                shard += 1
            else:
                writer.write_table(pa.table({"id": rb["id"], "embedding": _list_column(v)}))
            written += rb.num_rows
    if writer is not None:
        writer.close()
        out.with_suffix(".tmp").rename(out)
    return {"rows": written, "dim": dim, "topics": topics, "files": shard or 1}


# ---- judge scores -------------------------------------------------------------------------------------

FALLBACK_EVERY = 200  # 0.5% of queries have no candidate below the positive minus beta


def positive_scores(qh: np.ndarray) -> np.ndarray:
    return 0.9 + 0.03 * (2 * unit_of(qh ^ np.uint64(0x1111)) - 1)


def write_scores(ingest: Path, retrieve: Path, out: Path, top_n: int, seed: int, batch: int = 262144) -> dict:
    """(query_id, cand_id, score) for every judge request: per query that has candidates its positive and
    each candidate; one retrieve file (dataset) at a time, streamed in `batch`-row slices."""
    concepts = concept_counts(ingest / "pool.parquet")
    schema = pa.schema([("query_id", pa.string()), ("cand_id", pa.string()), ("score", pa.float32())])
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = pq.ParquetWriter(out.with_suffix(".tmp"), schema)
    s = np.uint64(seed)
    rows = mates = fallback_queries = 0
    for path in sorted(retrieve.glob("*.parquet")):
        name = path.stem
        queries = pq.read_table(
            ingest / "queries.parquet", columns=["id", "pos_id"], filters=[("dataset", "==", name)]
        )
        asked = pc.unique(pq.read_table(path, columns=["query_id"])["query_id"])
        # The positive row of every query with candidates.
        where = pc.index_in(asked, value_set=queries["id"])
        pos_ids = queries["pos_id"].take(where)
        qh = hash_ids(asked) ^ s
        fallback = (qh % np.uint64(FALLBACK_EVERY)) == 0
        fallback_queries += int(fallback.sum())
        writer.write_table(
            pa.table(
                {"query_id": asked, "cand_id": pos_ids, "score": positive_scores(qh).astype(np.float32)},
                schema=schema,
            )
        )
        rows += len(asked)
        # Candidates: the positive's concept looked up per row through the query's pos_id.
        lookup = pa.table({"query_id": asked, "pos_id": pos_ids})
        for rb in pq.ParquetFile(path).iter_batches(
            batch_size=batch, columns=["query_id", "cand_id", "rank"]
        ):
            t = pa.Table.from_batches([rb])
            pos = lookup["pos_id"].take(pc.index_in(t["query_id"], value_set=lookup["query_id"]))
            ds = pa.array([name] * t.num_rows, pa.string())
            _, pos_concept, _ = concept_of(pos, ds, concepts)
            ch, cand_concept, _ = concept_of(t["cand_id"], ds, concepts)
            qh = hash_ids(t["query_id"]) ^ s
            s_pos = positive_scores(qh)
            noise = 2 * unit_of(qh ^ mix(ch)) - 1
            rank = t["rank"].to_numpy().astype(np.float64)
            score = 0.75 - 0.55 * rank / max(top_n - 1, 1) + 0.08 * noise
            near = (pos_concept == cand_concept) | ((qh % np.uint64(FALLBACK_EVERY)) == 0)
            # Planted false negatives: from half a beta below the positive to 0.05 above it.
            score = np.where(near, s_pos - BETA / 2 + 0.055 * (noise + 1) / 2, score)
            mates += int((pos_concept == cand_concept).sum())
            writer.write_table(
                pa.table(
                    {
                        "query_id": t["query_id"],
                        "cand_id": t["cand_id"],
                        "score": np.clip(score, 0.001, 0.999).astype(np.float32),
                    },
                    schema=schema,
                )
            )
            rows += t.num_rows
    writer.close()
    out.with_suffix(".tmp").rename(out)
    return {"rows": rows, "planted_false_negatives": mates, "fallback_queries": fallback_queries}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pairs", help="MMEB-train shaped JSONL files and images")
    a.add_argument("--n", type=int, required=True)
    a.add_argument("--out", type=Path, required=True)
    b = sub.add_parser("embeddings", help="planted embeddings for the ingest stage's ids")
    b.add_argument("--ingest", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--dim", type=int, default=256)
    b.add_argument("--shards", action="store_true", help="the old code's embed-stage output")
    b.add_argument("--topics", type=int, default=0, help="concepts per topic (0: flat, no topic level)")
    c = sub.add_parser("scores", help="planted judge scores for the retrieve stage's candidates")
    c.add_argument("--ingest", type=Path, required=True)
    c.add_argument("--retrieve", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--top-n", type=int, default=50)
    for q in (a, b, c):
        q.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.cmd == "pairs":
        result = {"datasets": write_pairs(args.n, args.out, args.seed)}
    elif args.cmd == "embeddings":
        result = write_embeddings(args.ingest, args.out, args.dim, args.seed, args.shards, args.topics)
    else:
        result = write_scores(args.ingest, args.retrieve, args.out, args.top_n, args.seed)
    result["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
