"""Ingest stage: validated MMEB-train pairs -> the queries and each dataset's candidate pool.

The pool of a dataset is the set of its distinct positives (text, image), each once (the paper's
"global" candidates): MMEB repeats positives heavily (classification labels, shared captions), and
embedding and judging a duplicate twice would be waste. A candidate's id is a content hash, so it is the
same in every run; a query's `pos_id` points at its positive in the pool.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from unime_ray.config import DataConfig
from unime_ray.data.mmeb import read_folder
from unime_ray.data.schemas import POOL, QUERIES, candidate_id
from unime_ray.io import write_parquet


def run_ingest(data: DataConfig, out_dir: Path) -> dict:
    read = read_folder(
        data.train_dir,
        "pairs",
        datasets=data.datasets or None,
        image_root=data.image_root,
        check_images=data.check_images,
    )
    read.write_quarantine(out_dir / "quarantine.parquet")
    queries, pool = [], {}
    for row in read.table.to_pylist():
        pos_id = candidate_id(row["dataset"], row["pos_text"], row["pos_image"])
        pool.setdefault(
            pos_id,
            {"id": pos_id, "dataset": row["dataset"], "text": row["pos_text"], "image": row["pos_image"]},
        )
        queries.append(
            {
                "id": row["id"],
                "dataset": row["dataset"],
                "text": row["qry_text"],
                "image": row["qry_image"],
                "pos_id": pos_id,
            }
        )
    write_parquet(pa.Table.from_pylist(queries, schema=QUERIES), out_dir / "queries.parquet")
    write_parquet(
        pa.Table.from_pylist(sorted(pool.values(), key=lambda r: r["id"]), schema=POOL),
        out_dir / "pool.parquet",
    )
    datasets = sorted({q["dataset"] for q in queries})
    per_dataset = {
        d: {
            "queries": sum(q["dataset"] == d for q in queries),
            "pool": sum(c["dataset"] == d for c in pool.values()),
        }
        for d in datasets
    }
    return {"read": read.counts(), "queries": len(queries), "pool": len(pool), "datasets": per_dataset}
