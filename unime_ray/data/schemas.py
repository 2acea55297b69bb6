"""Arrow schemas of every table that passes between stages. Defined here once; readers, writers and
tests import them from here.

Conventions: an image is a path relative to the configured image root, "" when the side has no image;
a text is "" when the side has no text. Ids are strings, stable across re-runs of the same input
(the source's own `id` column when it has one, else `<dataset>/<row number>`).
"""

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


class DataError(ValueError):
    """A file that cannot be read: the message names the file, the row and the field."""


# One MMEB-train style pair: a query, its positive, and an optional given negative.
PAIRS = pa.schema(
    [
        ("id", pa.string()),
        ("dataset", pa.string()),
        ("qry_text", pa.string()),
        ("qry_image", pa.string()),
        ("pos_text", pa.string()),
        ("pos_image", pa.string()),
        ("neg_text", pa.string()),
        ("neg_image", pa.string()),
    ]
)

# One MMEB-eval style query with its own candidate list; the correct target is at index 0.
EVAL = pa.schema(
    [
        ("id", pa.string()),
        ("dataset", pa.string()),
        ("qry_text", pa.string()),
        ("qry_image", pa.string()),
        ("tgt_text", pa.list_(pa.string())),
        ("tgt_image", pa.list_(pa.string())),
    ]
)

# A row that was set aside instead of read: where it came from and why. Never dropped silently.
QUARANTINE = pa.schema(
    [
        ("source", pa.string()),
        ("row", pa.int64()),
        ("id", pa.string()),
        ("field", pa.string()),
        ("reason", pa.string()),
    ]
)

# ---- mining: pairs -> candidates -> judge scores -> hard negatives ----------------------------------

# A query of the mining run (one per kept pair) with the id of its positive in the candidate pool.
QUERIES = pa.schema(
    [
        ("id", pa.string()),
        ("dataset", pa.string()),
        ("text", pa.string()),
        ("image", pa.string()),
        ("pos_id", pa.string()),
    ]
)

# The candidate pool: every distinct positive (text, image) of a dataset, once. Ids are content hashes
# ("<dataset>/c<hex>"), so the same candidate gets the same id in every run.
POOL = pa.schema(
    [
        ("id", pa.string()),
        ("dataset", pa.string()),
        ("text", pa.string()),
        ("image", pa.string()),
    ]
)


def candidate_id(dataset: str, text: str, image: str) -> str:
    """The content id of a pool candidate (or an index record, with its source as `dataset`)."""
    digest = hashlib.sha1(f"{text}\0{image}".encode()).hexdigest()[:16]
    return f"{dataset}/c{digest}"


# One embedded query or candidate (`kind` = "query" | "candidate"); unit vectors.
EMBEDDINGS = pa.schema(
    [
        ("id", pa.string()),
        ("dataset", pa.string()),
        ("kind", pa.string()),
        ("embedding", pa.list_(pa.float32())),
    ]
)

# Potential hard negatives (paper eq. 1): per query the top-N of its dataset's pool by cosine, its own
# positive and every candidate with cosine >= delta excluded; rank 0 is the most similar.
CANDIDATES = pa.schema(
    [
        ("query_id", pa.string()),
        ("dataset", pa.string()),
        ("cand_id", pa.string()),
        ("rank", pa.int32()),
        ("sim", pa.float32()),
    ]
)

# One judge call: the query with its positive (is_positive, rank -1) or with one potential negative.
JUDGE_REQUESTS = pa.schema(
    [
        ("query_id", pa.string()),
        ("dataset", pa.string()),
        ("cand_id", pa.string()),
        ("is_positive", pa.bool_()),
        ("rank", pa.int32()),
        ("sim", pa.float32()),
        ("qry_text", pa.string()),
        ("qry_image", pa.string()),
        ("cand_text", pa.string()),
        ("cand_image", pa.string()),
    ]
)

# A judged pair: s = e_yes / (e_yes + e_no) at the first generated position.
JUDGE_SCORES = pa.schema(
    [
        ("query_id", pa.string()),
        ("dataset", pa.string()),
        ("cand_id", pa.string()),
        ("is_positive", pa.bool_()),
        ("rank", pa.int32()),
        ("sim", pa.float32()),
        ("score", pa.float32()),
    ]
)

# A judge request's columns in JUDGE_SCORES (all but the score): what every backend keeps of a request, and
# all the request files of bring-your-own scores hold (only a model judge reads the texts).
JUDGE_REQUEST_IDS = pa.schema([field for field in JUDGE_SCORES if field.name != "score"])

# What the model backends (vllm, transformers) add to each JUDGE_SCORES row: the call's prompt tokens, how
# many of them vLLM served from its prefix cache (0 in transformers), the image tokens among each, and the
# call's share of the wall time of the batch it was judged in (model loading excluded). Computed tokens =
# prompt - cached. Null when the call failed; absent in precomputed scores.
JUDGE_COSTS = pa.schema(
    [
        ("prompt_tokens", pa.int32()),
        ("cached_tokens", pa.int32()),
        ("image_tokens", pa.int32()),
        ("cached_image_tokens", pa.int32()),
        ("seconds", pa.float32()),
    ]
)

# The mining output, one row per query: like the official release (query, positive, its score, the
# negatives with their scores) plus ids and provenance. `fallback` marks queries where no candidate
# survived the false-negative filter and 10 random pool candidates were taken with score 1.0.
HARD_NEGATIVES = pa.schema(
    [
        ("id", pa.string()),
        ("dataset", pa.string()),
        ("qry_text", pa.string()),
        ("qry_image", pa.string()),
        ("pos_id", pa.string()),
        ("pos_text", pa.string()),
        ("pos_image", pa.string()),
        ("pos_score", pa.float32()),
        ("neg_ids", pa.list_(pa.string())),
        ("neg_texts", pa.list_(pa.string())),
        ("neg_images", pa.list_(pa.string())),
        ("neg_scores", pa.list_(pa.float32())),
        ("neg_ranks", pa.list_(pa.int32())),
        ("num_survivors", pa.int32()),
        ("fallback", pa.bool_()),
    ]
)

# ---- bring your own: the columns read from a user's file, as their readers cast them -------------------

# embedder.backend=precomputed: one vector per query and pool id (mining/embed.py).
USER_EMBEDDINGS = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32()))])
# judge.backend=precomputed: one score per judge request (mining/judge.py).
USER_SCORES = pa.schema([("query_id", pa.string()), ("cand_id", pa.string()), ("score", pa.float32())])


def type_kind(t: pa.DataType) -> str:
    """The kind of values a column holds, as the readers of user files accept them: "string" (of any
    width, dictionary-encoded too), "number" (any integer or float: cast to the schema's float),
    "list of numbers" (any list layout), else Arrow's own name of the type."""
    if pa.types.is_dictionary(t):
        return type_kind(t.value_type)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return "number"
    is_list = (
        pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or pa.types.is_fixed_size_list(t)
        or pa.types.is_list_view(t)
        or pa.types.is_large_list_view(t)
    )
    if is_list and type_kind(t.value_type) == "number":
        return "list of numbers"
    return str(t)


@contextlib.contextmanager
def parquet_errors(path: str | Path) -> Iterator[None]:
    """Re-raise what Arrow says about an unreadable Parquet file (a truncated copy: "magic bytes not
    found in footer"; corrupt pages: "Corrupt snappy compressed data"), neither of which names the file,
    as a DataError that does."""
    try:
        yield
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: unreadable Parquet, truncated or corrupted? ({e})") from e


def check_parquet_types(path: str | Path, expected: pa.Schema) -> None:
    """Raise DataError naming the file, the column, its type and the expected kind (`type_kind`) for the
    first column of `expected` whose values in the Parquet file at `path` are of another kind. Reads the
    footer only, so a wrong type is found before any work, not as an Arrow error deep in a task.
    Columns absent from the file are left to the caller."""
    with parquet_errors(path):
        found = pq.read_schema(path)
    for field in expected:
        if field.name not in found.names:
            continue
        have = found.field(field.name).type
        if type_kind(have) != type_kind(field.type):
            raise DataError(
                f"{path}: column {field.name!r} holds {have}, expected {type_kind(field.type)} "
                f"(read as {field.type})"
            )


# ---- serving ----------------------------------------------------------------------------------------

# One record of a search index (`unime_ray.serve.index`), in FAISS row order: what was embedded (text and
# image path, MMEB conventions), the corpus file it came from (its stem), and its unit vector. Ids are
# content hashes, like the mining pool's, so re-adding the same corpus adds nothing.
INDEX_RECORDS = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("text", pa.string()),
        ("image", pa.string()),
        ("embedding", pa.list_(pa.float32())),
    ]
)
