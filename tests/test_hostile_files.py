"""Hostile input files: image paths that leave the image root, truncated or corrupted Parquet files
(brought by the user, or a stage's own output found on resume), JSONL lines that are not UTF-8 or are
100 MB long, and duplicate ids in a corpus to index. Each case is checked against what the file was
built to contain, not against what the code happens to return."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unime_ray.config import Config, IndexConfig, load_config
from unime_ray.data import mmeb
from unime_ray.data.mmeb import DataError, read_folder, read_pairs
from unime_ray.io import finished_parquet
from unime_ray.mining.embed import import_embeddings
from unime_ray.mining.judge import _check_user_scores, _user_batches
from unime_ray.serve.corpus import read_corpus
from unime_ray.serve.index import create_index

ROOT = Path(__file__).resolve().parents[1]


def png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2), "red").save(path)
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pair(i: int, qry_image: str = "", pos_text: str = "a positive") -> dict:
    return {
        "id": f"r{i}",
        "qry": "q",
        "qry_image_path": qry_image,
        "pos_text": pos_text,
        "pos_image_path": "",
    }


@pytest.fixture
def escape(tmp_path, monkeypatch) -> tuple[Path, Path, list[str]]:
    """An image root with one good image, a secret image outside it, a symlink to the secret and a
    symlinked folder leading out; and a spy on every image the readers open."""
    root, outside = tmp_path / "images", tmp_path / "private"
    png(root / "ok.png")
    secret = png(outside / "secret.png")
    (root / "link.png").symlink_to(secret)
    (root / "door").symlink_to(outside, target_is_directory=True)
    opened: list[str] = []
    real = mmeb.open_image
    monkeypatch.setattr(mmeb, "open_image", lambda p: opened.append(str(p)) or real(p))
    return root, secret, opened


def test_image_paths_leaving_the_root_are_quarantined_unopened(escape, tmp_path):
    root, secret, opened = escape
    paths = ["ok.png", "../private/secret.png", "a/../../private/secret.png", str(secret), "link.png"]
    paths += ["door/secret.png"]
    data = jsonl(tmp_path / "train" / "ds.jsonl", [pair(i, p) for i, p in enumerate(paths)])
    read = read_folder(data.parent, "pairs", image_root=root, check_images=True)
    expected = ["bad_image_path", "bad_image_path", "bad_image_path", "image_outside_root"]
    expected += ["image_outside_root"]
    assert read.table["id"].to_pylist() == ["r0"]
    assert read.quarantine.to_pylist() == [
        {"source": str(data), "row": i, "id": f"r{i}", "field": "qry_image_path", "reason": reason}
        for i, reason in enumerate(expected, start=1)
    ]
    assert opened == [str(root / "ok.png")]  # the secret was never opened, through any of the paths
    written = read.write_quarantine(tmp_path / "quarantine.parquet")
    assert pq.read_table(written)["reason"].to_pylist() == expected


def test_absolute_image_paths_only_when_allowed(escape, tmp_path):
    root, secret, opened = escape
    data = jsonl(tmp_path / "train" / "ds.jsonl", [pair(0, str(secret)), pair(1, "link.png")])
    assert Config().data.allow_absolute_images is False
    cfg = load_config(ROOT / "jobs/configs/tiny.yaml", ["data.allow_absolute_images=true"])
    read = read_folder(
        data.parent, "pairs", image_root=root, allow_absolute_images=cfg.data.allow_absolute_images
    )
    assert read.table["id"].to_pylist() == ["r0"]  # the absolute path is taken as the user asked
    assert read.quarantine["reason"].to_pylist() == [
        "image_outside_root"
    ]  # a relative one still may not leave
    assert opened == [str(secret)]


def _truncated(path: Path, table: pa.Table) -> Path:
    pq.write_table(table, path, row_group_size=100)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a copy cut short: no footer
    return path


def _garbled(path: Path, table: pa.Table) -> Path:
    pq.write_table(table, path, row_group_size=100)
    data = bytearray(path.read_bytes())
    for i in range(64, len(data) // 2, 5):  # the data pages; the footer stays readable
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


EMBEDDINGS = pa.table(
    {"id": [f"x{i}" for i in range(1000)], "embedding": [[1.0, float(i)] for i in range(1000)]}
)
SCORES = pa.table(
    {"query_id": [f"q{i}" for i in range(1000)], "cand_id": ["c"] * 1000, "score": [0.5] * 1000}
)


@pytest.mark.parametrize("damage", [_truncated, _garbled])
def test_damaged_embeddings_file_is_named(tmp_path, damage):
    items = pa.table({"id": ["x0"], "dataset": ["d"]})
    pq.write_table(items, tmp_path / "q.parquet")
    pq.write_table(items.slice(0, 0), tmp_path / "p.parquet")
    path = damage(tmp_path / "mine.parquet", EMBEDDINGS)
    with pytest.raises(DataError, match=f"^{path}: unreadable Parquet, truncated or corrupted"):
        import_embeddings(str(path), tmp_path / "q.parquet", tmp_path / "p.parquet", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_damaged_scores_file_is_named(tmp_path):
    truncated = _truncated(tmp_path / "t.parquet", SCORES)
    with pytest.raises(DataError, match=f"^{truncated}: unreadable Parquet"):
        _check_user_scores(str(truncated))
    garbled = _garbled(tmp_path / "g.parquet", SCORES)
    chunks = _check_user_scores(str(garbled))  # the footer reads: found when the rows are read
    with pytest.raises(ValueError, match=f"^{garbled}: "):
        for rgs in chunks:
            list(_user_batches(str(garbled), rgs))


def test_damaged_stage_output_on_resume_is_redone(tmp_path, capsys):
    good = tmp_path / "shard-00000.parquet"
    pq.write_table(SCORES, good)
    cut = _truncated(tmp_path / "shard-00001.parquet", SCORES)
    assert finished_parquet(good) and good.exists()
    assert not finished_parquet(cut) and not cut.exists()  # removed: the stage writes it again
    assert f"{cut}: unreadable" in capsys.readouterr().err
    assert not finished_parquet(tmp_path / "shard-00002.parquet")


def test_jsonl_line_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "ds.jsonl"
    path.write_bytes(json.dumps(pair(0)).encode() + b"\n" + b'{"qry": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(DataError, match=f"^{path}: line 2: not UTF-8 text"):
        read_pairs(path)


def test_jsonl_100mb_line_is_refused_in_bounded_memory(tmp_path):
    path = tmp_path / "ds.jsonl"
    with path.open("wb") as f:
        f.write(json.dumps(pair(0)).encode() + b"\n" + b'{"qry": "' + b"a" * (100 << 20) + b'"}\n')
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=f"^{path}: line 2: longer than {mmeb.MAX_LINE_BYTES} bytes"):
            read_pairs(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * mmeb.MAX_LINE_BYTES + (4 << 20) < 100 << 20  # never the whole line


def test_duplicate_ids_in_a_corpus_to_index(tmp_path):
    """Index ids are content hashes: equal records (in a file, or repeated) are one record; an explicit
    MMEB id repeated within a file quarantines the later row; the index itself refuses repeated ids."""
    rows = [
        pair(0, pos_text="alpha"),
        pair(1, pos_text="beta"),
        pair(2, pos_text="alpha"),
        pair(1, pos_text="gamma"),
    ]
    a = jsonl(tmp_path / "corpus" / "a.jsonl", rows)
    jsonl(tmp_path / "corpus" / "b.jsonl", [pair(1, pos_text="alpha")])  # id r1 again, another file
    read = read_corpus(a.parent, tmp_path, IndexConfig())
    expected = [("a", "alpha"), ("a", "beta"), ("b", "alpha")]  # (source, text), distinct, first-seen order
    assert (
        list(zip(read.table["source"].to_pylist(), read.table["text"].to_pylist(), strict=True)) == expected
    )
    assert len(set(read.table["id"].to_pylist())) == read.table.num_rows == 3
    assert read.quarantine.to_pylist() == [
        {"source": str(a), "row": 3, "id": "r1", "field": "id", "reason": "duplicate_id"}
    ]
    twice = pa.concat_tables([read.table, read.table.slice(0, 1)])
    vectors = np.eye(4, 8, dtype=np.float32)
    model = {"dim": 8}
    with pytest.raises(
        ValueError, match=f"record id {read.table['id'][0].as_py()!r} is already in the index or twice"
    ):
        create_index(tmp_path / "index", twice, vectors, model=model, cfg=IndexConfig(), image_root=tmp_path)
    assert not (tmp_path / "index" / "meta.json").exists()


@pytest.mark.parametrize("suite", ["retrieval", "compositional"])
def test_eval_files_refuse_image_paths_leaving_the_root_unopened(escape, tmp_path, suite):
    """The retrieval and compositional eval files, read whole, refuse a row whose image path leaves the
    root (the MMEB rows' check and reasons), naming the row; the eval job passes the absolute-path switch."""
    from unime_ray.eval.job import load_collections

    root, secret, opened = escape
    record = {
        "retrieval": lambda p: {"image": p, "captions": ["c"]},
        "compositional": lambda p: {"image": p, "pos": "p", "neg": "n"},
    }[suite]
    leaves = "leaves the image root ('..'; or absolute, allowed by data.allow_absolute_images=true)"
    reasons = {
        "../private/secret.png": leaves,
        str(secret): leaves,
        "link.png": "a symlink on its way leads out of the image root",
        "door/secret.png": "a symlink on its way leads out of the image root",
        "nowhere.png": "no such file",
    }
    data = tmp_path / f"{suite}.jsonl"

    def collections(path: str, absolute: bool) -> list:
        jsonl(data, [record("ok.png"), record(path)])
        sets = [f"eval.{suite}=[{data}]", f"eval.suites=[{suite}]", f"eval.image_root={root}"]
        cfg = load_config(ROOT / "jobs/configs/tiny.yaml", [*sets, f"data.allow_absolute_images={absolute}"])
        return load_collections(cfg, tmp_path / "eval")[0]

    for path, reason in reasons.items():
        expected = f"{data}: line 2: field 'image': {path!r} under {root}: {reason}"
        with pytest.raises(DataError) as info:
            collections(path, absolute=False)
        assert str(info.value) == expected
    assert opened == []  # no image opened while reading, the secret least of all
    (taken,) = collections(str(secret), absolute=True)  # taken as the user asked
    assert [image for _, image in taken.items if image] == [str(root / "ok.png"), str(secret)]
    with pytest.raises(DataError, match="line 2: field 'image': 'link.png' under .*: a symlink"):
        collections("link.png", absolute=True)  # a relative path still may not leave


def test_align_reads_absolute_image_paths_only_when_allowed_and_keys_on_it(escape, tmp_path):
    from unime_ray.train.align import AlignSettings, align_inputs, caption_pairs

    root, secret, opened = escape
    rows = [pair(0, "ok.png", "a square"), pair(1, str(secret), "a secret")]
    train = jsonl(tmp_path / "world" / "train" / "ds.jsonl", rows)
    evals = {"qry_text": "", "qry_img_path": str(secret), "tgt_text": ["a secret"], "tgt_img_path": [""]}
    jsonl(tmp_path / "world" / "eval" / "ds.jsonl", [evals])
    model = tmp_path / "model"
    model.mkdir()

    def cfg(absolute: bool) -> Config:
        sets = [f"data.train_dir={train.parent}", f"data.eval_dir={tmp_path / 'world/eval'}"]
        sets += [
            f"data.image_root={root}",
            f"train.model.path={model}",
            f"data.allow_absolute_images={absolute}",
        ]
        return load_config(None, sets)

    def pairs(c: Config, folder: str, kind: str) -> list:
        return caption_pairs(folder, root, kind, allow_absolute_images=c.data.allow_absolute_images)

    refused, allowed = cfg(False), cfg(True)
    assert pairs(refused, str(train.parent), "pairs") == [("ok.png", "a square")]
    assert pairs(allowed, str(train.parent), "pairs") == [("ok.png", "a square"), (str(secret), "a secret")]
    with pytest.raises(SystemExit, match="no rows with an image query"):  # its only row refused
        pairs(refused, str(tmp_path / "world/eval"), "eval")
    assert pairs(allowed, str(tmp_path / "world/eval"), "eval") == [(str(secret), "a secret")]
    assert opened == []  # align's reads check paths, not images
    # The resume key: changed by the switch; without it, the key of a run made before the switch existed.
    settings = AlignSettings()
    key_refused, key_allowed = align_inputs(refused, settings), align_inputs(allowed, settings)
    assert key_allowed == {**key_refused, "allow_absolute_images": True}
    assert "allow_absolute_images" not in key_refused
