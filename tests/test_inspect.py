"""The mining inspector (`unime_ray.inspector`) on a real mining run (`tests/mined.py`): each shown
query's dropped / kept flags and cyclic positions equal the sampling rules recomputed from the judge
scores and beta; fallbacks are shown; the histograms count every score; the page is self-contained and
deterministic; `unime-ray inspect` writes it."""

import os
import re
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from mined import BETA, DATASETS, expected_outcomes

from unime_ray.cli import main as cli
from unime_ray.inspector import (
    SCORE_BINS,
    Thumbnails,
    _row_groups_with,
    _rows,
    build_report,
    choose_queries,
    collect,
    mining_dir,
)


class Page(HTMLParser):
    """The inspector page's data attributes: query sections and their candidate rows, in page order."""

    def __init__(self, text: str):
        super().__init__()
        self.queries: list[dict] = []
        self.datasets: list[str] = []
        self.sources: list[str] = []
        self.tags: set[str] = set()
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if "src" in a:
            self.sources.append(a["src"])
        if "href" in a:
            self.sources.append(a["href"])
        if tag == "section" and "data-dataset" in a:
            self.datasets.append(a["data-dataset"])
        if tag == "section" and "data-query-id" in a:
            self.queries.append({**a, "rows": []})
        if tag == "tr" and "data-cand-id" in a:
            self.queries[-1]["rows"].append(a)


@pytest.fixture(scope="module")
def truth(mined_run):
    return expected_outcomes(mined_run)


@pytest.fixture(scope="module")
def report(mined_run):
    return collect(mined_run, queries=4, top=12, seed=3)


def test_flags_and_positions_follow_the_sampling_rules(report, truth, mined_run):
    assert report.beta == BETA and [d.name for d in report.datasets] == list(DATASETS)
    stored = {
        r["id"]: r for r in pq.read_table(mined_run / "mining/sample/hard_negatives.parquet").to_pylist()
    }
    shown = [q for d in report.datasets for q in d.shown]
    assert len(shown) == 2 * 4
    outcomes = set()
    for q in shown:
        want = truth[q.id]
        assert q.pos_score == want["pos_score"] and q.threshold == want["pos_score"] - BETA
        assert q.num_survivors == want["survivors"] and q.fallback == want["fallback"]
        # the top 12 by retrieval rank, in that order, plus any picked negative ranked below them
        ranks = [c.rank for c in q.candidates]
        assert ranks == sorted(ranks) and ranks[:12] == list(range(12))
        assert all(c.beyond_top == (c.rank >= 12) for c in q.candidates)
        assert {c.id for c in q.candidates if c.beyond_top} <= set(stored[q.id]["neg_ids"])
        for c in q.candidates:
            judged = want["candidates"][c.id]
            assert (c.score, c.sim, c.rank) == (judged["score"], pytest.approx(judged["sim"]), judged["rank"])
            assert c.dropped == (c.id in want["dropped"]), (q.id, c.id, c.score, q.pos_score)
            # positions: where the recomputed cyclic order puts it (on a fallback: where the stored
            # random draw put it, and then every pick was also dropped)
            order = stored[q.id]["neg_ids"] if q.fallback else want["neg_ids"]
            assert c.positions == [i for i, cid in enumerate(order) if cid == c.id]
            outcomes.add("negative" if c.positions else "dropped" if c.dropped else "kept")
        if q.fallback:
            assert all(c.dropped for c in q.candidates)
            assert q.neg_scores == [1.0] * 10 and len(set(q.neg_ids)) == 10
        else:
            assert q.neg_ids == want["neg_ids"]
    assert outcomes == {"negative", "dropped", "kept"}
    assert any(q.fallback for q in shown) and any(q.why == "fallback example" for q in shown)


def test_page_shows_the_same_flags_and_is_self_contained(report, truth, mined_run, world):
    page = build_report(mined_run, world / "images", queries=4, top=12, seed=3)
    parsed = Page(page)
    assert parsed.datasets == list(DATASETS)
    assert [q["data-query-id"] for q in parsed.queries] == [q.id for d in report.datasets for q in d.shown]
    for q in parsed.queries:
        want = truth[q["data-query-id"]]
        assert float(q["data-pos-score"]) == want["pos_score"]
        assert q["data-fallback"] == str(int(want["fallback"]))
        for row in q["rows"]:
            assert row["data-dropped"] == str(int(row["data-cand-id"] in want["dropped"]))
    # nothing fetched: every image is an embedded thumbnail, links stay in the page, no script
    assert parsed.sources and all(s.startswith(("data:image/jpeg;base64,", "#")) for s in parsed.sources)
    assert not parsed.tags & {"script", "link", "iframe"} and "http" not in page.replace("http-equiv", "")
    images = [s for s in parsed.sources if s.startswith("data:")]
    # ShapesI2T queries and ShapesT2I candidates have images: 4 + (12 or more) x 4 of them at least
    assert len(images) >= 4 + 12 * 4
    # fallback rates as stored
    hn = pq.read_table(mined_run / "mining/sample/hard_negatives.parquet", columns=["dataset", "fallback"])
    for name in DATASETS:
        rows = hn.filter(pc.equal(hn["dataset"], name))
        rate = 100 * pc.sum(rows["fallback"]).as_py() / rows.num_rows
        assert re.search(rf'id="ds-{name}".*?fallback rate <b class="fallback-rate">{rate:.2f}%', page, re.S)
    assert page == build_report(mined_run, world / "images", queries=4, top=12, seed=3)  # deterministic


def test_histograms_count_every_score(report, mined_run):
    judged = pq.read_table(mined_run / "mining/judge/results")
    hn = pq.read_table(mined_run / "mining/sample/hard_negatives.parquet")
    edges = np.linspace(0, 1, SCORE_BINS + 1)
    for d in report.datasets:
        mine = judged.filter(pc.equal(judged["dataset"], d.name))
        pos = mine.filter(mine["is_positive"])["score"].to_numpy()
        cand = mine.filter(pc.invert(mine["is_positive"]))["score"].to_numpy()
        np.testing.assert_array_equal(d.pos_hist, np.histogram(pos, edges)[0])
        np.testing.assert_array_equal(d.cand_hist, np.histogram(cand, edges)[0])
        rows = hn.filter(pc.equal(hn["dataset"], d.name))
        negs = pc.list_flatten(rows["neg_scores"]).to_numpy()
        np.testing.assert_array_equal(d.neg_hist, np.histogram(negs, edges)[0])
        np.testing.assert_array_equal(d.survivors, np.bincount(rows["num_survivors"].to_numpy()))
        assert (d.queries, d.fallbacks, d.out_of_range) == (rows.num_rows, 2, 0)


def test_query_draw_is_seeded_per_dataset(mined_run):
    hn = pq.read_table(
        mined_run / "mining/sample/hard_negatives.parquet", columns=["id", "dataset", "fallback"]
    )
    first = choose_queries(hn, 5, seed=11)
    assert first == choose_queries(hn, 5, seed=11)
    assert first != choose_queries(hn, 5, seed=12)
    # a dataset's draw does not depend on the other datasets in the run
    alone = hn.filter(pc.equal(hn["dataset"], DATASETS[1]))
    assert choose_queries(alone, 5, seed=11) == {DATASETS[1]: first[DATASETS[1]]}
    # asked-for queries come after the draw
    extra = choose_queries(hn, 1, seed=11, extra=["ShapesT2I/40"])
    assert extra["ShapesT2I"][-1] == ("ShapesT2I/40", "asked for")


def test_cli_writes_the_page(mined_run, world, tmp_path, capsys):
    out = tmp_path / "inspect.html"
    args = ["inspect", str(mined_run), "--image-root", str(world / "images"), "--out", str(out)]
    cli([*args, "--queries", "2"])
    assert "wrote" in capsys.readouterr().out
    assert out.read_text() == build_report(mined_run, world / "images", queries=2)
    # only the queries asked for, and a note for an id the run does not have
    cli([*args, "--queries", "0", "--query", "ShapesT2I/40", "--query", "ShapesT2I/nope"])
    assert "'ShapesT2I/nope' has no hard negatives" in capsys.readouterr().out
    assert [q["data-query-id"] for q in Page(out.read_text()).queries] == ["ShapesT2I/40"]
    with pytest.raises(FileNotFoundError, match="not a finished mining run.*hard_negatives.parquet"):
        mining_dir(tmp_path)


def test_thumbnails_stay_under_the_image_root(world, tmp_path):
    thumbs = Thumbnails(world / "images")
    assert thumbs("eval/00003.png").startswith("data:image/jpeg;base64,")
    outside = tmp_path / "secret.png"  # a readable image, but not under the root
    outside.write_bytes((world / "images" / "eval" / "00003.png").read_bytes())
    rel = os.path.relpath(outside, world / "images")
    assert rel.startswith("..") and (world / "images" / rel).resolve() == outside.resolve()
    assert thumbs(rel) is None and thumbs(str(outside)) is None and thumbs("missing.png") is None


def test_rows_reads_only_the_row_groups_that_can_hold_the_ids(tmp_path):
    # ids q00..q11 sorted, in row groups of 4: [q00-q03], [q04-q07], [q08-q11]; a list column before `id`
    # (the hard negatives' layout), so the statistics' leaf index is not the field index
    ids = [f"q{i:02d}" for i in range(12)]
    table = pa.table({"neg": [[i, i + 1] for i in range(12)], "id": ids, "x": list(range(12))})
    sorted_file, shuffled_file = tmp_path / "sorted.parquet", tmp_path / "shuffled.parquet"
    pq.write_table(table, sorted_file, row_group_size=4)
    pq.write_table(table.take([11, 0, 5, 6, 1, 10, 2, 9, 3, 4, 7, 8]), shuffled_file, row_group_size=4)
    wanted = ["q01", "q02", "q09", "zz"]  # "zz" is in no file
    assert _row_groups_with(pq.ParquetFile(sorted_file), "id", sorted(wanted)) == [0, 2]
    # shuffled groups span q00-q11, q01-q10 and q03-q08: only the last one holds none of the ids' range
    assert _row_groups_with(pq.ParquetFile(shuffled_file), "id", sorted(wanted)) == [0, 1]
    for path in (sorted_file, shuffled_file):
        got = _rows(path, "id", wanted).sort_by("id")
        assert got.to_pydict() == table.take([1, 2, 9]).to_pydict()
    both = _rows([sorted_file, shuffled_file], "id", ["q05"], ["id", "x"])
    assert both.to_pydict() == {"id": ["q05", "q05"], "x": [5, 5]}
    assert _rows(sorted_file, "id", []).num_rows == 0  # no id: an empty table of the file's columns
