"""The evaluation job end to end on the synthetic world with the tiny model, on a local Ray: tables,
plots, the embedding cache (a rerun embeds nothing; adding the reranker embeds nothing), reranking."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from unime_ray.config import load_config
from unime_ray.eval.job import main, resolve_checkpoint, run_eval

ROOT = Path(__file__).parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
CHANCE = 100 / 8  # the world's MMEB-style rows have 8 candidates


def _overrides(world: Path, model: Path, out: Path) -> list[str]:
    return [
        f"run.output_dir={out}",
        f"data.eval_dir={world}/eval",
        f"data.image_root={world}/images",
        "data.synthetic=false",
        f"embedder.path={model}",
        f"reranker.model.path={model}",
    ]


@pytest.fixture(scope="module")
def first_run(local_ray, tiny_qwen, world, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    overrides = _overrides(world, tiny_qwen, out)
    return overrides, run_eval(load_config(ROOT / "jobs/configs/tiny.yaml", overrides)), out


@pytest.mark.slow
def test_embedder_only_writes_tables_and_plots_near_chance(first_run):
    _, results, out = first_run
    folder = out / "eval"
    assert json.loads((folder / "results.json").read_text()) == json.loads(json.dumps(results))
    for png in ("mmeb.png", "recall.png"):
        assert (folder / png).read_bytes()[:8] == PNG
    md = (folder / "results.md").read_text()
    assert "| Method | Classification (1) | VQA (1) | Retrieval (2) | Overall (4) |" in md
    assert "| Method | captions i→t | captions t→i | Replace | Swap | Add |" in md
    assert "| Method | MMEB_Other | R_Other | R_Compos |" in md
    assert "Table 1" not in md  # none of the 36: no paper averages to print
    assert results["methods"] == ["embedding"]
    assert set(results["mmeb"]["datasets"]) == {"ShapesCLS", "ShapesVQA", "ShapesI2T", "ShapesT2I"}
    assert results["read"]["mmeb"] == {"rows_in": 96, "rows_out": 96}
    retrieval = results["retrieval"]["captions"]
    assert (retrieval["images"], retrieval["captions"], retrieval["t2i"]["queries"]) == (24, 72, 72)
    assert set(results["compositional"]["subsets"]) == {"replace", "swap", "add"}
    # an untrained random model is near chance: 12.5% on MMEB-style rows, 50% on caption pairs
    table3 = results["table3"]["embedding"]
    assert abs(table3["MMEB_Other"] - CHANCE) < 15
    assert abs(table3["R_Compos"] - 50) < 25
    assert retrieval["i2t"]["scores"]["embedding"]["R@1"] < 30
    assert results["work"]["items_embedded"] > 400 and results["work"]["items_cached"] == 0


@pytest.mark.slow
def test_rerun_embeds_nothing_and_gives_the_same_numbers(first_run):
    overrides, first, _ = first_run
    again = run_eval(load_config(ROOT / "jobs/configs/tiny.yaml", overrides))
    assert again["work"]["items_embedded"] == 0
    assert again["work"]["items_cached"] == first["work"]["items_embedded"]
    assert again["table3"] == first["table3"] and again["retrieval"] == first["retrieval"]


@pytest.mark.slow
def test_reranker_adds_columns_without_reembedding(first_run, tiny_qwen):
    overrides, first, out = first_run
    argv = ["--config", str(ROOT / "jobs/configs/tiny.yaml")]
    for item in overrides + [
        "eval.top_k=3",
        "data.datasets=[ShapesCLS]",
        "eval.suites=[mmeb, compositional]",
    ]:
        argv += ["--set", item]
    argv += ["--reranker", str(tiny_qwen), "--out", str(out / "reranked")]
    results = main(argv)
    assert results["methods"] == ["embedding", "listwise", "pointwise"]
    assert results["work"]["items_embedded"] == 0  # every vector came from the first run's cache
    assert results["work"]["rerank_requests_computed"] == 2 * (24 + 3 * 24)  # 2 modes x queries
    cls = results["mmeb"]["datasets"]["ShapesCLS"]
    assert cls["scores"]["embedding"] == first["mmeb"]["datasets"]["ShapesCLS"]["scores"]["embedding"]
    assert 0 <= cls["unparsed"] <= 24 and set(cls["scores"]) == {"embedding", "listwise", "pointwise"}
    assert (out / "reranked" / "mmeb.png").read_bytes()[:8] == PNG
    md = (out / "reranked" / "results.md").read_text()
    assert "| Method | MMEB_Other | R_Compos |" in md
    assert re.search(r"^\| pointwise \| \d+\.\d \|", md, re.M)  # a row of numbers per rerank mode
    assert "Listwise answers naming no valid candidate" in md
    # the same command again: nothing embedded, nothing reranked, the same numbers
    again = main(argv)
    assert again["work"]["items_embedded"] == again["work"]["rerank_requests_computed"] == 0
    assert again["table3"] == results["table3"]


def test_checkpoint_resolution(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "/base"})
    )
    assert resolve_checkpoint(str(tmp_path / "model")) == (str(tmp_path / "model"), "")
    assert resolve_checkpoint(str(tmp_path / "adapter")) == ("/base", str(tmp_path / "adapter"))
    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        resolve_checkpoint(str(tmp_path))


@pytest.mark.parametrize("command", ["eval", "compare"])
def test_commands_have_help(command):
    res = subprocess.run(
        [sys.executable, "-m", "unime_ray.cli", command, "--help"], capture_output=True, text=True
    )
    assert res.returncode == 0 and "usage:" in res.stdout
