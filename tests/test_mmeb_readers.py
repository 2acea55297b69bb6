import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unime_ray.data import mmeb
from unime_ray.data.mmeb import DataError, read_eval, read_folder, read_pairs
from unime_ray.data.schemas import EVAL, PAIRS, QUARANTINE


def png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2), "red").save(path)
    return path


def write(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        columns = list(dict.fromkeys(key for record in records for key in record))
        pq.write_table(pa.table({key: [record.get(key) for record in records] for key in columns}), path)
    return path


def pair(qry="a query", qry_image="", pos_text="a positive", pos_image="", **extra) -> dict:
    return {
        "qry": qry,
        "qry_image_path": qry_image,
        "pos_text": pos_text,
        "pos_image_path": pos_image,
        **extra,
    }


def pair_row(
    id, dataset="ds", qry="a query", qry_image="", pos="a positive", pos_image="", neg="", neg_image=""
):
    return {
        "id": id,
        "dataset": dataset,
        "qry_text": qry,
        "qry_image": qry_image,
        "pos_text": pos,
        "pos_image": pos_image,
        "neg_text": neg,
        "neg_image": neg_image,
    }


def target(qry="q", qry_image="", tgt_text=("right", "wrong"), tgt_image=("", ""), **extra) -> dict:
    return {
        "qry_text": qry,
        "qry_img_path": qry_image,
        "tgt_text": list(tgt_text),
        "tgt_img_path": list(tgt_image),
        **extra,
    }


def quarantined(source: Path, row: int, id: str, field: str, reason: str) -> dict:
    return {"source": str(source), "row": row, "id": id, "field": field, "reason": reason}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    png(tmp_path / "images" / "cat.png")
    png(tmp_path / "images" / "sub" / "dog.png")
    return tmp_path / "images"


PAIR_RECORDS = [
    pair("<|image_1|> what is this?", "cat.png", "a cat", "", neg_text="a dog", neg_image_path="sub/dog.png"),
    pair("find the dog", "", "", "sub/dog.png", neg_text=None, neg_image_path=None),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_pair_formats_read_the_same_table(tmp_path: Path, root: Path, suffix: str) -> None:
    path = write(tmp_path / suffix[1:] / f"ds{suffix}", PAIR_RECORDS)
    result = read_pairs(path, image_root=root)
    expected = [
        pair_row("ds/0", "ds", "<|image_1|> what is this?", "cat.png", "a cat", "", "a dog", "sub/dog.png"),
        pair_row("ds/1", qry="find the dog", pos="", pos_image="sub/dog.png"),
    ]
    assert result.table.schema == PAIRS
    assert result.table.to_pylist() == expected
    assert result.quarantine.schema == QUARANTINE and result.quarantine.num_rows == 0
    assert result.counts() == {"rows_in": 2, "rows_out": 2}


def test_ids_and_dataset_come_from_records_or_arguments(tmp_path: Path) -> None:
    records = [pair(id=7), pair(id="abc", dataset="Other"), pair(dataset="Other")]
    path = write(tmp_path / "file.jsonl", records)
    table = read_pairs(path).table
    assert table.column("id").to_pylist() == ["7", "abc", "Other/2"]
    assert table.column("dataset").to_pylist() == ["file", "Other", "Other"]
    forced = read_pairs(path, dataset="MSCOCO").table
    assert forced.column("id").to_pylist() == ["7", "abc", "MSCOCO/2"]
    assert forced.column("dataset").to_pylist() == ["MSCOCO"] * 3


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_eval_formats_read_the_same_table_keeping_target_order(
    tmp_path: Path, root: Path, suffix: str
) -> None:
    records = [
        target("<|image_1|> class?", "cat.png", ["cat", "dog", "bird"], ["", "", ""]),
        target("a dog", "", ["", "", "x"], ["sub/dog.png", "cat.png", ""], id="q9"),
    ]
    path = write(tmp_path / suffix[1:] / f"N24News{suffix}", records)
    result = read_eval(path, image_root=root)
    assert result.table.schema == EVAL
    assert result.table.to_pylist() == [
        {
            "id": "N24News/0",
            "dataset": "N24News",
            "qry_text": "<|image_1|> class?",
            "qry_image": "cat.png",
            "tgt_text": ["cat", "dog", "bird"],
            "tgt_image": ["", "", ""],
        },
        {
            "id": "q9",
            "dataset": "N24News",
            "qry_text": "a dog",
            "qry_image": "",
            "tgt_text": ["", "", "x"],
            "tgt_image": ["sub/dog.png", "cat.png", ""],
        },
    ]
    assert result.counts() == {"rows_in": 2, "rows_out": 2}


def test_pair_rows_with_bad_data_are_quarantined(tmp_path: Path, root: Path) -> None:
    png(tmp_path / "outside.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    records = [
        pair(qry_image="cat.png"),  # 0 good
        pair(qry_image="nope.png"),  # 1
        pair(pos_image="../outside.png"),  # 2
        pair(neg_image_path=str(root / "cat.png")),  # 3
        pair(qry_image="broken.png"),  # 4
        pair(qry=" \t "),  # 5
        pair(pos_text="", neg_text="only a negative"),  # 6
        pair(id="x", pos_image="sub/dog.png"),  # 7 good
        pair(id="x"),  # 8
        pair(qry="", qry_image="cat.png", neg_image_path="sub/../cat.png"),  # 9 good
    ]
    path = write(tmp_path / "ds.jsonl", records)
    result = read_pairs(path, image_root=root)

    assert result.quarantine.to_pylist() == [
        quarantined(path, 1, "ds/1", "qry_image_path", "missing_image"),
        quarantined(path, 2, "ds/2", "pos_image_path", "bad_image_path"),
        quarantined(path, 3, "ds/3", "neg_image_path", "bad_image_path"),
        quarantined(path, 4, "ds/4", "qry_image_path", "corrupt_image"),
        quarantined(path, 5, "ds/5", "qry", "empty_query"),
        quarantined(path, 6, "ds/6", "pos_text", "empty_positive"),
        quarantined(path, 8, "x", "id", "duplicate_id"),
    ]
    assert result.table.to_pylist() == [
        pair_row("ds/0", qry_image="cat.png"),
        pair_row("x", pos_image="sub/dog.png"),
        pair_row("ds/9", qry="", qry_image="cat.png", neg_image="sub/../cat.png"),
    ]
    assert result.counts() == {
        "rows_in": 10,
        "rows_out": 3,
        "missing_image": 1,
        "bad_image_path": 2,
        "corrupt_image": 1,
        "empty_query": 1,
        "empty_positive": 1,
        "duplicate_id": 1,
    }


def test_check_images_false_skips_only_the_decode_check(tmp_path: Path, root: Path) -> None:
    (root / "broken.png").write_bytes(b"garbage")
    path = write(tmp_path / "ds.json", [pair(qry_image="broken.png"), pair(qry_image="nope.png")])
    result = read_pairs(path, image_root=root, check_images=False)
    assert result.table.column("id").to_pylist() == ["ds/0"]
    assert result.quarantine.to_pylist() == [quarantined(path, 1, "ds/1", "qry_image_path", "missing_image")]


def test_each_image_is_opened_once_per_read(tmp_path: Path, root: Path, monkeypatch) -> None:
    opened = []
    real_open = mmeb.open_image

    def counting_open(path):
        opened.append(Path(path).name)
        return real_open(path)

    monkeypatch.setattr(mmeb, "open_image", counting_open)
    records = [pair(qry_image="cat.png", pos_image="sub/dog.png") for _ in range(5)]
    result = read_pairs(write(tmp_path / "ds.jsonl", records), image_root=root)
    assert result.counts() == {"rows_in": 5, "rows_out": 5}
    assert sorted(opened) == ["cat.png", "dog.png"]


def test_eval_rows_with_bad_data_are_quarantined(tmp_path: Path, root: Path) -> None:
    records = [
        target(),  # 0 good
        target(tgt_text=["a", "b", "c"], tgt_image=["", ""]),  # 1
        target(tgt_text=[], tgt_image=[]),  # 2
        target(tgt_text=["a", " ", "c"]),  # 3 (three texts, two images: lengths checked first)
        target(tgt_text=["a", " "], tgt_image=["", ""]),  # 4
        target(tgt_text=["a", "b", ""], tgt_image=["", "", "nope.png"]),  # 5
        target(qry="", qry_image=""),  # 6
        target(
            qry="", qry_image="cat.png", tgt_text=["", "b"], tgt_image=["sub/dog.png", ""], id="last"
        ),  # 7
    ]
    path = write(tmp_path / "VOC2007.parquet", records)
    result = read_eval(path, image_root=root)
    assert result.quarantine.to_pylist() == [
        quarantined(path, 1, "VOC2007/1", "tgt_text", "length_mismatch"),
        quarantined(path, 2, "VOC2007/2", "tgt_text", "length_mismatch"),
        quarantined(path, 3, "VOC2007/3", "tgt_text", "length_mismatch"),
        quarantined(path, 4, "VOC2007/4", "tgt_text[1]", "empty_positive"),
        quarantined(path, 5, "VOC2007/5", "tgt_img_path[2]", "missing_image"),
        quarantined(path, 6, "VOC2007/6", "qry_text", "empty_query"),
    ]
    assert result.table.to_pylist() == [
        {
            "id": "VOC2007/0",
            "dataset": "VOC2007",
            "qry_text": "q",
            "qry_image": "",
            "tgt_text": ["right", "wrong"],
            "tgt_image": ["", ""],
        },
        {
            "id": "last",
            "dataset": "VOC2007",
            "qry_text": "",
            "qry_image": "cat.png",
            "tgt_text": ["", "b"],
            "tgt_image": ["sub/dog.png", ""],
        },
    ]
    assert result.counts() == {
        "rows_in": 8,
        "rows_out": 2,
        "length_mismatch": 3,
        "empty_positive": 1,
        "missing_image": 1,
        "empty_query": 1,
    }


def test_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(pair()) + "\n\n" + '{"qry": "unterminated\n')
    with pytest.raises(DataError) as error:
        read_pairs(path)
    assert "broken.jsonl" in str(error.value) and "line 3" in str(error.value)
    assert "invalid JSON" in str(error.value)


@pytest.mark.parametrize(
    ("name", "records", "where", "field"),
    [
        ("missing.jsonl", [pair(), {k: v for k, v in pair().items() if k != "qry"}], "line 2", "'qry'"),
        ("typed.json", [pair(), pair(), pair(qry=3)], "row 2", "'qry'"),
        ("nulls.parquet", [pair(), pair(pos_image=None)], "row 1", "'pos_image_path'"),
        ("badid.json", [pair(id=1.5)], "row 0", "'id'"),
    ],
)
def test_bad_pair_fields_name_file_row_and_field(tmp_path: Path, name, records, where, field) -> None:
    path = write(tmp_path / name, records)
    with pytest.raises(DataError) as error:
        read_pairs(path)
    assert name in str(error.value) and where in str(error.value) and field in str(error.value)


def test_record_that_is_not_an_object_names_file_and_row(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text(json.dumps([pair(), ["not", "an", "object"]]))
    with pytest.raises(DataError, match=r"list\.json: row 1: expected a JSON object"):
        read_pairs(path)


@pytest.mark.parametrize("tgt_text", ["right", ["right", 3]])
def test_tgt_text_not_a_list_of_strings_names_file_row_and_field(tmp_path: Path, tgt_text) -> None:
    path = write(tmp_path / "eval.jsonl", [target(), target() | {"tgt_text": tgt_text}])
    with pytest.raises(DataError) as error:
        read_eval(path)
    message = str(error.value)
    assert "eval.jsonl" in message and "line 2" in message and "'tgt_text'" in message
    assert "list of strings" in message


def make_folder(folder: Path) -> None:
    write(folder / "a.jsonl", [pair("qa0"), pair("qa1")])
    write(folder / "b.json", [pair("qb0")])
    write(folder / "c.parquet", [pair("qc0")])
    (folder / "notes.txt").write_text("not data")


def test_read_folder_selects_datasets(tmp_path: Path) -> None:
    make_folder(tmp_path)
    everything = read_folder(tmp_path, "pairs")
    assert everything.table.column("id").to_pylist() == ["a/0", "a/1", "b/0", "c/0"]
    subset = read_folder(tmp_path, "pairs", datasets=["c", "a"])
    assert subset.table.column("id").to_pylist() == ["c/0", "a/0", "a/1"]
    assert subset.table.column("qry_text").to_pylist() == ["qc0", "qa0", "qa1"]
    assert subset.counts() == {"rows_in": 3, "rows_out": 3}


def test_read_folder_unknown_dataset_lists_available(tmp_path: Path) -> None:
    make_folder(tmp_path)
    with pytest.raises(DataError, match=r"\['zzz'\].*available: a, b, c"):
        read_folder(tmp_path, "pairs", datasets=["a", "zzz"])


def test_read_folder_without_data_files_fails(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("nothing here")
    with pytest.raises(DataError, match="no data files"):
        read_folder(tmp_path, "eval")


def test_read_folder_quarantines_only_explicit_duplicate_ids(tmp_path: Path) -> None:
    generated = tmp_path / "generated"
    write(generated / "a.jsonl", [pair(), pair()])
    write(generated / "b.jsonl", [pair(), pair()])
    result = read_folder(generated, "pairs")
    assert result.table.column("id").to_pylist() == ["a/0", "a/1", "b/0", "b/1"]
    assert result.quarantine.num_rows == 0

    explicit = tmp_path / "explicit"
    write(explicit / "a.jsonl", [pair(id="same"), pair(id="a-only")])
    b = write(explicit / "b.jsonl", [pair(id="b-only"), pair(id="same")])
    result = read_folder(explicit, "pairs")
    assert result.table.column("id").to_pylist() == ["same", "a-only", "b-only"]
    assert result.quarantine.to_pylist() == [quarantined(b, 1, "same", "id", "duplicate_id")]
    assert result.counts() == {"rows_in": 4, "rows_out": 3, "duplicate_id": 1}


def test_read_folder_eval_concatenates_tables_and_quarantines(tmp_path: Path) -> None:
    write(tmp_path / "x.jsonl", [target(), target(qry="")])
    y = write(tmp_path / "y.parquet", [target(tgt_text=["only one"], tgt_image=["", ""]), target()])
    result = read_folder(tmp_path, "eval")
    assert result.table.column("id").to_pylist() == ["x/0", "y/1"]
    assert result.quarantine.to_pylist() == [
        quarantined(tmp_path / "x.jsonl", 1, "x/1", "qry_text", "empty_query"),
        quarantined(y, 0, "y/0", "tgt_text", "length_mismatch"),
    ]


def test_write_quarantine_is_atomic_and_readable(tmp_path: Path) -> None:
    result = read_pairs(write(tmp_path / "ds.jsonl", [pair(), pair(qry="")]))
    out_dir = tmp_path / "out"
    written = result.write_quarantine(out_dir / "quarantine.parquet")
    assert sorted(p.name for p in out_dir.iterdir()) == ["quarantine.parquet"]
    table = pq.read_table(written)
    assert table.schema == QUARANTINE
    assert table.to_pylist() == [quarantined(tmp_path / "ds.jsonl", 1, "ds/1", "qry", "empty_query")]
