"""The mining inspector: what the judge did to a seeded sample of queries, as one static HTML page.

    unime-ray inspect runs/tiny --config jobs/configs/tiny.yaml      # -> runs/tiny/inspect.html
    unime-ray inspect RUN_DIR --image-root DIR [--queries 5] [--top 20] [--seed 0] [--query ID ...]

Before paying for training on mined hard negatives, look at them: for each sampled query the page shows
the query (text and image) and its positive with the positive's judge score, then its top-N retrieved
candidates in retrieval order, each with its cosine, its judge score, whether the false-negative filter
dropped it (s > s_pos - beta, the rule of `unime_ray.mining.sample`), and whether, and at which cyclic
position, it became a hard negative. A query where no candidate survived shows its fallback picks. Per
dataset: histograms of positive, candidate and selected-negative scores and of survivors per query,
and the fallback rate.

The page is self-contained: inline CSS, inline SVG histograms, images as small base64 thumbnails
(Pillow), no script, nothing fetched from a network, so it can be mailed or attached to an issue. The
markup is the Jinja2 template `unime_ray/templates/inspector.html`, rendered with autoescaping, so every
text of the run (which a data file controls) is escaped. The Serve app shows the same page under
/inspect when `serve.inspect_run` names a run.

What it reads (the mining run's own outputs, `unime_ray.mining.pipeline`): `sample/hard_negatives.parquet`
and `sample/report.json` (beta), `judge/results/*.parquet` (scores), `retrieve/*.parquet` (retrieval
order and cosines), `ingest/{queries,pool}.parquet` (texts and image paths). Only the sampled queries'
rows are materialised; the histograms stream the score files a batch at a time, so a run of 662k
queries x 51 judge calls is inspected in bounded memory.

Which queries: per dataset, `queries` drawn at random with a generator seeded by (seed, dataset name),
so the same run and seed always show the same queries. Fallbacks are rare (< 1% in the paper) and are
what a user most needs to see, so when the draw holds none and the dataset has some, its last slot
goes to a random fallback query (marked on the page). `--query ID` adds queries by id.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import json
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unime_ray.data.images import thumbnail
from unime_ray.keyed import key_rng

SCORE_BINS = 20  # judge scores live in [0, 1]: 0.05-wide bins
THUMB_PX = 96
READ_ROWS = 1 << 16  # rows per batch when streaming the score files


@dataclass
class Candidate:
    """One retrieved candidate of a query, as the mining run saw it."""

    id: str
    rank: int  # retrieval rank, 0 = most similar
    sim: float  # cosine of query and candidate embeddings
    score: float | None  # judge score; None: the judge has no score for this pair
    text: str
    image: str
    dropped: bool  # the false-negative filter removed it: score > pos_score - beta
    positions: list[int]  # its positions in the stored hard-negative list (cyclic order; repeats = padding)
    beyond_top: bool = False  # shown only because it was picked: its rank is past the top-N shown


@dataclass
class QueryView:
    id: str
    dataset: str
    text: str
    image: str
    pos_id: str
    pos_text: str
    pos_image: str
    pos_score: float
    threshold: float  # pos_score - beta: a candidate scoring above it is a likely false negative
    num_survivors: int
    fallback: bool
    neg_ids: list[str]
    neg_scores: list[float]
    candidates: list[Candidate]
    why: str  # "random", "fallback example" or "asked for"


@dataclass
class DatasetView:
    name: str
    queries: int  # queries with hard negatives
    fallbacks: int
    pos_hist: np.ndarray  # counts over SCORE_BINS bins of [0, 1] (out-of-range values in the end bins)
    cand_hist: np.ndarray
    neg_hist: np.ndarray  # selected negatives as stored: with padding repeats and fallback 1.0s
    out_of_range: int  # judge scores outside [0, 1] (scores brought from elsewhere may be)
    survivors: np.ndarray  # survivors[k] = queries with k candidates left by the filter
    shown: list[QueryView] = field(default_factory=list)

    @property
    def fallback_rate(self) -> float:
        return self.fallbacks / self.queries if self.queries else 0.0


@dataclass
class Report:
    run: str
    beta: float
    interval: int
    num_negatives: int
    top: int
    seed: int
    datasets: list[DatasetView]


def mining_dir(run_dir: str | Path) -> Path:
    """The `mining/` folder of a run (`run.output_dir`); the mining folder itself is accepted too."""
    run_dir = Path(run_dir)
    mining = run_dir / "mining" if (run_dir / "mining").is_dir() else run_dir
    needed = [
        mining / "sample" / "hard_negatives.parquet",
        mining / "sample" / "report.json",
        mining / "ingest" / "queries.parquet",
        mining / "ingest" / "pool.parquet",
    ]
    missing = [str(p) for p in needed if not p.is_file()]
    for sub in ("judge/results", "retrieve"):
        if not sorted((mining / sub).glob("*.parquet")):
            missing.append(str(mining / sub / "*.parquet"))
    if missing:
        raise FileNotFoundError(
            f"{run_dir}: not a finished mining run ({', '.join(missing)} missing); run "
            "`unime-ray mine` to its sample stage first"
        )
    return mining


def choose_queries(
    hard_negatives: pa.Table, per_dataset: int, seed: int, extra: list[str] | tuple[str, ...] = ()
) -> dict[str, list[tuple[str, str]]]:
    """{dataset: [(query id, why shown), ...]} from a table with `id, dataset, fallback` columns (see the
    module docstring for the rule)."""
    out: dict[str, list[tuple[str, str]]] = {}
    wanted = set(extra)
    for name in sorted(pc.unique(hard_negatives["dataset"]).to_pylist()):
        rows = hard_negatives.filter(pc.equal(hard_negatives["dataset"], name)).sort_by("id")
        ids = rows["id"].to_pylist()
        fallback = rows["fallback"].to_numpy(zero_copy_only=False)
        rng = key_rng(seed, name)
        picks = [int(i) for i in rng.choice(len(ids), size=min(per_dataset, len(ids)), replace=False)]
        chosen = [(ids[i], "random") for i in sorted(picks)]
        falls = np.flatnonzero(fallback)
        if chosen and len(falls) and not fallback[picks].any():
            chosen[-1] = (ids[int(rng.choice(falls))], "fallback example")
        seen = {qid for qid, _ in chosen}
        chosen += [(qid, "asked for") for qid in ids if qid in wanted and qid not in seen]
        out[name] = chosen
    return out


def _histogram(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Counts of `values` over SCORE_BINS bins of [0, 1], out-of-range values clipped into the end bins;
    and how many were out of range (NaN is neither: the sample stage quarantines it)."""
    values = values[~np.isnan(values)]
    outside = int(((values < 0) | (values > 1)).sum())
    bins = np.clip((np.clip(values, 0, 1) * SCORE_BINS).astype(np.int64), 0, SCORE_BINS - 1)
    return np.bincount(bins, minlength=SCORE_BINS), outside


def _score_histograms(files: list[Path]) -> dict[str, dict[str, np.ndarray | int]]:
    """Per dataset: histograms of positive and candidate judge scores, streamed a batch at a time."""
    out: dict[str, dict[str, np.ndarray | int]] = {}
    for path in files:
        reader = pq.ParquetFile(path)
        for batch in reader.iter_batches(batch_size=READ_ROWS, columns=["dataset", "is_positive", "score"]):
            datasets = batch.column("dataset")
            positive = batch.column("is_positive").to_numpy(zero_copy_only=False)
            scores = batch.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
            for name in pc.unique(datasets).to_pylist():
                mine = pc.equal(datasets, name).to_numpy(zero_copy_only=False)
                acc = out.setdefault(
                    name,
                    {"pos": np.zeros(SCORE_BINS, np.int64), "cand": np.zeros(SCORE_BINS, np.int64), "out": 0},
                )
                for key, rows in (("pos", mine & positive), ("cand", mine & ~positive)):
                    counts, outside = _histogram(scores[rows])
                    acc[key] += counts
                    acc["out"] += outside
    return out


def _rows(
    paths: list[Path] | Path, column: str, ids: list[str], columns: list[str] | None = None
) -> pa.Table:
    """Rows whose `column` is in `ids`, from one or several Parquet files, read one row group at a time.
    A row group whose min/max statistics leave out every id is not read, so the run's id-sorted files
    (the hard negatives) cost a few row groups, and memory holds one row group, never a whole file
    (Arrow's filtered `read_table` decoded the whole file, texts and all, to keep a hundred rows)."""
    paths = [paths] if isinstance(paths, Path) else paths
    wanted = sorted(set(ids))
    value_set = pa.array(wanted, pa.string())
    tables = []
    for path in paths:
        f = pq.ParquetFile(path)
        tables.append(f.schema_arrow.empty_table().select(columns or f.schema_arrow.names))
        for rg in _row_groups_with(f, column, wanted):
            table = f.read_row_group(rg, columns=columns)
            tables.append(table.filter(pc.is_in(table[column], value_set=value_set)))
    return pa.concat_tables(tables, promote_options="permissive")


def _row_groups_with(f: pq.ParquetFile, column: str, wanted: list[str]) -> list[int]:
    """The row groups of `f` whose `column` statistics do not rule out all of the sorted `wanted` ids
    (every row group where a group has no statistics)."""
    meta = f.metadata
    leaf = meta.schema.names.index(column)
    out = []
    for rg in range(meta.num_row_groups):
        stats = meta.row_group(rg).column(leaf).statistics
        if stats is not None and stats.has_min_max:
            first = bisect.bisect_left(wanted, stats.min)
            if first == len(wanted) or wanted[first] > stats.max:
                continue
        out.append(rg)
    return out


def collect(
    run_dir: str | Path,
    *,
    queries: int = 5,
    top: int = 20,
    seed: int = 0,
    extra: list[str] | tuple[str, ...] = (),
) -> Report:
    """What the report shows, read from a finished mining run (see the module docstring)."""
    mining = mining_dir(run_dir)
    settings = json.loads((mining / "sample" / "report.json").read_text())
    beta = float(settings["beta"])
    hn_path = mining / "sample" / "hard_negatives.parquet"
    summary = pq.read_table(hn_path, columns=["id", "dataset", "num_survivors", "fallback", "neg_scores"])
    chosen = choose_queries(summary, queries, seed, extra)
    ids = sorted({qid for picks in chosen.values() for qid, _ in picks})

    hn = {r["id"]: r for r in _rows(hn_path, "id", ids).to_pylist()}
    qrows = {r["id"]: r for r in _rows(mining / "ingest" / "queries.parquet", "id", ids).to_pylist()}
    retrieved = _rows(
        sorted((mining / "retrieve").glob("*.parquet")),
        "query_id",
        ids,
        ["query_id", "cand_id", "rank", "sim"],
    ).to_pylist()
    judged = _rows(
        sorted((mining / "judge" / "results").glob("*.parquet")),
        "query_id",
        ids,
        ["query_id", "cand_id", "is_positive", "score"],
    ).to_pylist()
    scores = {(r["query_id"], r["cand_id"]): r["score"] for r in judged if not r["is_positive"]}
    by_query: dict[str, list[dict]] = {}
    for r in retrieved:
        by_query.setdefault(r["query_id"], []).append(r)
    needed = sorted({r["cand_id"] for r in retrieved})
    pool = {r["id"]: r for r in _rows(mining / "ingest" / "pool.parquet", "id", needed).to_pylist()}

    hists = _score_histograms(sorted((mining / "judge" / "results").glob("*.parquet")))
    datasets = []
    for name, picks in chosen.items():
        mine = summary.filter(pc.equal(summary["dataset"], name))
        negs = pc.list_flatten(mine["neg_scores"]).to_numpy(zero_copy_only=False).astype(np.float64)
        h = hists.get(
            name, {"pos": np.zeros(SCORE_BINS, np.int64), "cand": np.zeros(SCORE_BINS, np.int64), "out": 0}
        )
        view = DatasetView(
            name=name,
            queries=mine.num_rows,
            fallbacks=int(pc.sum(mine["fallback"]).as_py() or 0),
            pos_hist=h["pos"],
            cand_hist=h["cand"],
            neg_hist=_histogram(negs)[0],
            out_of_range=int(h["out"]),
            survivors=np.bincount(mine["num_survivors"].to_numpy(zero_copy_only=False)),
        )
        for qid, why in picks:
            view.shown.append(
                _query_view(hn[qid], qrows.get(qid, {}), by_query.get(qid, []), scores, pool, beta, top, why)
            )
        datasets.append(view)
    return Report(
        run=str(Path(run_dir)),
        beta=beta,
        interval=int(settings.get("interval", 0)),
        num_negatives=int(settings.get("num_negatives", 0)),
        top=top,
        seed=seed,
        datasets=datasets,
    )


def _query_view(
    hn: dict, query: dict, retrieved: list[dict], scores: dict, pool: dict, beta: float, top: int, why: str
) -> QueryView:
    # The filter exactly as the sample stage applies it: float64 on the stored float32 values, strict.
    pos_score = float(np.float32(hn["pos_score"]))
    threshold = pos_score - beta
    positions: dict[str, list[int]] = {}
    for pos, cid in enumerate(hn["neg_ids"]):
        positions.setdefault(cid, []).append(pos)
    candidates = []
    for r in sorted(retrieved, key=lambda r: r["rank"]):
        if r["rank"] >= top and r["cand_id"] not in positions:
            continue
        score = scores.get((hn["id"], r["cand_id"]))
        record = pool.get(r["cand_id"], {})
        candidates.append(
            Candidate(
                id=r["cand_id"],
                rank=int(r["rank"]),
                sim=float(r["sim"]),
                score=None if score is None else float(np.float32(score)),
                text=record.get("text") or "",
                image=record.get("image") or "",
                dropped=score is not None and float(np.float32(score)) > threshold,
                positions=positions.get(r["cand_id"], []),
                beyond_top=r["rank"] >= top,
            )
        )
    return QueryView(
        id=hn["id"],
        dataset=hn["dataset"],
        text=query.get("text", hn["qry_text"]) or "",
        image=query.get("image", hn["qry_image"]) or "",
        pos_id=hn["pos_id"],
        pos_text=hn["pos_text"] or "",
        pos_image=hn["pos_image"] or "",
        pos_score=pos_score,
        threshold=threshold,
        num_survivors=int(hn["num_survivors"]),
        fallback=bool(hn["fallback"]),
        neg_ids=list(hn["neg_ids"]),
        neg_scores=[float(s) for s in hn["neg_scores"]],
        candidates=candidates,
        why=why,
    )


# ---- rendering ----------------------------------------------------------------------------------------


class Thumbnails:
    """Images under `root` as small base64 data URIs, each file encoded once per report. A path that
    resolves outside `root` is refused (a data file must not make the report embed any file it names)."""

    def __init__(self, root: str | Path | None, size: int = THUMB_PX):
        self.root = Path(root).resolve() if root else None
        self.size = size
        self.cache: dict[str, str | None] = {}

    def __call__(self, rel: str) -> str | None:
        if not rel or self.root is None:
            return None
        if rel not in self.cache:
            self.cache[rel] = self._encode(rel)
        return self.cache[rel]

    def _encode(self, rel: str) -> str | None:
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            return None
        jpeg = thumbnail(path, self.size, "JPEG", quality=85)  # None: the page says "unreadable"
        return None if jpeg is None else "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


SHOWN_WHY = {"fallback example": " (shown as a fallback example)", "asked for": " (asked for)"}
HIST_WIDTH, HIST_HEIGHT, HIST_PAD = 320, 130, 18  # px of one inline SVG histogram


def histogram(counts: np.ndarray, labels: tuple[str, str], title: str, color: str) -> dict:
    """One SVG histogram's geometry for the page: bars of `counts` scaled to the tallest, `labels` at
    the x axis ends; each bar's count becomes its tooltip."""
    width, height, pad = HIST_WIDTH, HIST_HEIGHT, HIST_PAD
    top = max(int(np.max(counts)) if len(counts) else 0, 1)
    step = (width - 2 * pad) / max(len(counts), 1)
    bars = []
    for i, c in enumerate(counts):
        h = (height - 2 * pad) * int(c) / top
        bars.append(
            {
                "x": pad + i * step,
                "y": height - pad - h,
                "width": max(step - 1, 1),
                "height": h,
                "count": int(c),
            }
        )
    return {
        "title": title,
        "labels": labels,
        "color": color,
        "top": top,
        "bars": bars,
        "width": width,
        "height": height,
        "pad": pad,
    }


def _histograms(d: DatasetView) -> list[dict]:
    edges = ("0", "1")
    return [
        histogram(d.pos_hist, edges, f"positive scores (n={int(d.pos_hist.sum())})", "#43a047"),
        histogram(d.cand_hist, edges, f"candidate scores (n={int(d.cand_hist.sum())})", "#757575"),
        histogram(
            d.neg_hist,
            edges,
            f"selected negative scores (n={int(d.neg_hist.sum())}, with repeats)",
            "#e53935",
        ),
        histogram(
            d.survivors, ("0", str(max(len(d.survivors) - 1, 0))), "survivors per query (queries)", "#1e88e5"
        ),
    ]


def _outcome(c: Candidate, q: QueryView) -> tuple[str, str]:
    """(row class, outcome text) of a candidate: picked as a hard negative (at which positions), dropped
    as a false negative, a fallback pick, or kept and not picked."""
    if c.positions and q.fallback:  # dropped like every candidate of the query, then drawn at random
        where = ", ".join(f"#{p}" for p in c.positions)
        return "fallback", ("dropped, then " if c.dropped else "") + "fallback pick at " + where
    if c.positions:
        return "negative", "hard negative at " + ", ".join(f"#{p}" for p in c.positions)
    if c.dropped:
        return "dropped", "dropped: false negative"
    return "kept", "not judged" if c.score is None else "kept, not picked"


def _missing_negatives(q: QueryView) -> list[str]:
    """Stored hard negatives absent from the retrieved list shown (a run assembled by hand)."""
    listed = {c.id for c in q.candidates}
    return [cid for cid in dict.fromkeys(q.neg_ids) if cid not in listed]


def render(report: Report, image_root: str | Path | None) -> str:
    """The report as one self-contained HTML document (no script, no external resource), from the
    template `templates/inspector.html`, every value escaped by Jinja2's autoescaping."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("unime_ray", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template("inspector.html").render(
        report=report,
        thumbs=Thumbnails(image_root),
        histograms=_histograms,
        outcome=_outcome,
        missing_negatives=_missing_negatives,
        shown_why=SHOWN_WHY,
    )


def build_report(
    run_dir: str | Path,
    image_root: str | Path | None,
    *,
    queries: int = 5,
    top: int = 20,
    seed: int = 0,
    extra: list[str] | tuple[str, ...] = (),
) -> str:
    """`collect` then `render`: the HTML page of a mining run."""
    return render(collect(run_dir, queries=queries, top=top, seed=seed, extra=extra), image_root)


def main(argv: list[str] | None = None) -> None:
    from unime_ray.config import add_config_args, config_from_args
    from unime_ray.io import atomic_path

    p = argparse.ArgumentParser(
        prog="unime-ray inspect",
        description="Write a self-contained HTML page showing what the judge did to a sample of queries "
        "(see unime_ray/inspector.py).",
    )
    p.add_argument("run_dir", help="the mining run (run.output_dir, or its mining/ folder)")
    p.add_argument("--image-root", help="folder the run's image paths are relative to (else data.image_root)")
    p.add_argument("--out", help="the HTML file to write (default RUN_DIR/inspect.html)")
    p.add_argument("--queries", type=int, default=5, help="queries shown per dataset (default 5)")
    p.add_argument("--top", type=int, default=20, help="retrieved candidates shown per query (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the query draw (default 0)")
    p.add_argument(
        "--query", action="append", default=[], metavar="ID", help="also show this query (repeatable)"
    )
    add_config_args(p)
    args = p.parse_args(argv)
    if args.queries < 0 or args.top < 1:
        p.error("--queries must be >= 0 and --top >= 1")
    try:
        run_dir = mining_dir(args.run_dir).parent
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    # without --config, the run's own recorded config (its run.json) says where its images are
    image_root = args.image_root or config_from_args(args, recorded_in=run_dir).data.image_root
    if not image_root:
        p.error(f"{run_dir} records no data.image_root: give --image-root DIR, or --config FILE with it")
    report = collect(args.run_dir, queries=args.queries, top=args.top, seed=args.seed, extra=args.query)
    shown = {q.id for d in report.datasets for q in d.shown}
    for qid in args.query:
        if qid not in shown:
            print(f"note: query {qid!r} has no hard negatives in this run; not shown")
    page = render(report, image_root)
    out = Path(args.out or Path(args.run_dir) / "inspect.html")
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    print(f"wrote {out} ({len(page) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
