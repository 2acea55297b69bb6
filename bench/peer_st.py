"""The peer: sentence-transformers' `util.mine_hard_negatives` on the same planted vectors as
`bench/scale.py`, so that a user with one machine can compare the two miners side by side.

    python bench/scale.py --n 662000 --out /tmp/s          # writes the run folder this script reads
    python bench/peer_st.py --run /tmp/s/new-n662000 --out /tmp/peer-662k

Fairness rules (issue "ahead of the peer"):

- The same vectors: the harness's planted embeddings (`<run>/inputs/embeddings.parquet`, one unit vector
  per query id and per pool id), handed to the peer through a model object whose `encode_query` /
  `encode_document` look the vectors up by id, so the peer's encoding costs ~0 (a NumPy gather) and its
  time is retrieval, filtering, sampling and writing, as ours is.
- Per-dataset pools: one `mine_hard_negatives` call per dataset, over that dataset's pool
  (`<run>/mining/ingest/pool.parquet`), as our retrieve stage searches each dataset's pool.
- Top-50 and 10 negatives: `range_max=50`, `num_negatives=10`, `sampling_strategy="top"`, FAISS exact
  inner product (`use_faiss=True`), the filter its documentation recommends (`relative_margin=0.05`,
  NV-Retriever's TopK-PercPos), and its scores written with the negatives (`output_scores=True`).
- Anchors, positives and corpus entries are ids, not texts: queries of multimodal datasets share texts
  (the peer would merge them), ids never repeat. So the peer's output holds ids and similarity scores,
  no texts or images (ours is self-contained); its size is reported next to its time.

Prints one JSON line: seconds per phase (read: the inputs; inputs: the harness's per-dataset id lists
and vector gathers; mine: `mine_hard_negatives`; write: its `to_parquet`), rows, bytes written and the
process's peak RSS. Nothing here is timed by hand against ours: run both back to back from outside.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from datasets import Dataset
from sentence_transformers.util import mine_hard_negatives, pairwise_cos_sim

TOP_N = 50
NUM_NEGATIVES = 10
RELATIVE_MARGIN = 0.05


class PlantedModel:
    """What `mine_hard_negatives` asks of its model, answered from precomputed vectors: `encode_*` looks
    each id up (KeyError for an id without a vector), similarity is the cosine of sentence-transformers'
    own `pairwise_cos_sim`, as a SentenceTransformer with cosine similarity computes it."""

    device = torch.device("cpu")

    class model_card_data:  # noqa: N801 - the attribute name the peer reads
        base_model = "planted"

    def __init__(self, ids: list[str], vectors: np.ndarray) -> None:
        self.row = {key: i for i, key in enumerate(ids)}
        self.vectors = vectors

    def _encode(self, keys: list[str], **_: object) -> np.ndarray:
        return self.vectors[[self.row[k] for k in keys]]

    encode_query = encode_document = _encode

    def get_embedding_dimension(self) -> int:
        return self.vectors.shape[1]

    def similarity_pairwise(self, a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> torch.Tensor:
        return pairwise_cos_sim(torch.as_tensor(a), torch.as_tensor(b))


def read_inputs(run: Path) -> tuple[pa.Table, pa.Table, pa.Table]:
    """QUERIES (id, dataset, pos_id), POOL (id, dataset) and the embeddings (id, embedding) of a
    `bench/scale.py` run folder."""
    ingest = run / "mining" / "ingest"
    queries = pq.read_table(ingest / "queries.parquet", columns=["id", "dataset", "pos_id"])
    pool = pq.read_table(ingest / "pool.parquet", columns=["id", "dataset"])
    vectors = pq.read_table(run / "inputs" / "embeddings.parquet")
    return queries, pool, vectors


def vector_matrix(embeddings: pa.Table) -> np.ndarray:
    """All vectors as one float32 matrix, row i for `embeddings["id"][i]` (read once: per-dataset
    gathers from it cost the peer nothing worth measuring)."""
    flat = embeddings["embedding"].combine_chunks().flatten()
    return flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(embeddings.num_rows, -1)


def vectors_of(ids: pa.Array, embeddings: pa.Table, matrix: np.ndarray) -> np.ndarray:
    """The vectors of `ids`, in their order; ValueError naming an id without one."""
    rows = pc.index_in(ids, value_set=embeddings["id"])
    if rows.null_count:
        missing = pc.filter(ids, pc.is_null(rows))[0].as_py()
        raise ValueError(f"embeddings.parquet: no vector for id {missing!r}")
    return matrix[rows.to_numpy()]


def dataset_inputs(
    name: str, queries: pa.Table, pool: pa.Table, embeddings: pa.Table, matrix: np.ndarray
) -> tuple[Dataset, PlantedModel, list[str]]:
    """Dataset `name` as the peer takes it: (anchor, positive) id pairs, a model holding the vectors of
    its queries and pool, and its pool's ids as the corpus."""
    q = queries.filter(pc.equal(queries["dataset"], name))
    corpus = pool.filter(pc.equal(pool["dataset"], name))["id"].combine_chunks()
    ids = pa.concat_arrays([q["id"].combine_chunks(), corpus])
    model = PlantedModel(ids.to_pylist(), vectors_of(ids, embeddings, matrix))
    pairs = Dataset.from_dict({"anchor": q["id"].to_pylist(), "positive": q["pos_id"].to_pylist()})
    return pairs, model, corpus.to_pylist()


def mine_dataset(pairs: Dataset, model: PlantedModel, corpus: list[str]) -> Dataset:
    """One `mine_hard_negatives` call under the fairness rules of the module docstring."""
    return mine_hard_negatives(
        pairs,
        model,
        corpus=corpus,
        range_max=TOP_N,
        num_negatives=NUM_NEGATIVES,
        relative_margin=RELATIVE_MARGIN,
        sampling_strategy="top",
        output_format="n-tuple",
        output_scores=True,
        use_faiss=True,
        verbose=False,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a bench/scale.py run folder (after its ingest)")
    p.add_argument("--out", type=Path, required=True, help="folder for one Parquet file per dataset")
    args = p.parse_args()
    t0 = time.perf_counter()
    queries, pool, embeddings = read_inputs(args.run)
    matrix = vector_matrix(embeddings)
    seconds = {"read": time.perf_counter() - t0, "inputs": 0.0, "mine": 0.0, "write": 0.0}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = written = 0
    for name in sorted(pc.unique(queries["dataset"]).to_pylist()):
        t = time.perf_counter()
        inputs = dataset_inputs(name, queries, pool, embeddings, matrix)
        seconds["inputs"] += time.perf_counter() - t
        t = time.perf_counter()
        mined = mine_dataset(*inputs)
        seconds["mine"] += time.perf_counter() - t
        t = time.perf_counter()
        path = args.out / f"{name}.parquet"
        mined.to_parquet(str(path))
        seconds["write"] += time.perf_counter() - t
        rows += len(mined)
        written += path.stat().st_size
    result = {
        "queries": queries.num_rows,
        "pool": pool.num_rows,
        "rows_out": rows,
        "bytes_written": written,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "total_seconds": round(time.perf_counter() - t0, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
