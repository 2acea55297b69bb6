"""The MLLM judge: the paper's prompt, s = e_yes / (e_yes + e_no), and backend agreement."""

import gc
import shutil
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from unime_ray.config import JudgeConfig, MiningConfig, ModelConfig
from unime_ray.data.schemas import CANDIDATES, JUDGE_REQUEST_IDS, JUDGE_REQUESTS, POOL, QUERIES
from unime_ray.mining import judge as judge_stage
from unime_ray.mining.judge import attach_precomputed, run_judge
from unime_ray.models import processing_unime
from unime_ray.models.backbone import load_model, load_processor
from unime_ray.models.judge import TransformersJudge, VLLMJudge, remote_code_needed
from unime_ray.models.prompts import JUDGE_INSTRUCTION, judge_content, render

RED = Image.new("RGB", (56, 56), (255, 0, 0))
PAIRS = [
    ("<|image_1|>\nRepresent the given image for classification", RED, "red circle", ""),
    (
        "Find me an everyday image that matches the given caption: a red circle",
        "",
        "<|image_1|>\nRepresent.",
        RED,
    ),
    ("what is this", "", "a text only candidate", ""),
    ("what is this", "", "another, longer text only candidate", ""),
]


def _cfg(path, backend="transformers"):
    model = ModelConfig(path=str(path), dtype="float32", image_size=56, max_length=512, batch_size=3)
    return JudgeConfig(
        model=model, backend=backend, vllm_model_impl="transformers", gpu_memory_utilization=0.1
    )


def test_prompt_is_the_papers_instruction_query_first(tiny_qwen):
    tok = load_processor(tiny_qwen).tokenizer
    text = render(tok, judge_content("<|image_1|>\nWhat colour?", True, "red", False))
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"{JUDGE_INSTRUCTION}\nQuery: <|vision_start|><|image_pad|><|vision_end|>What colour?"
        "\nCandidate: red<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "'Yes'" in JUDGE_INSTRUCTION and "'No'" in JUDGE_INSTRUCTION


def test_transformers_judge_equals_a_manual_forward(tiny_qwen):
    """Independent computation: one unpadded full forward per pair, softmax over the two logits."""
    judge = TransformersJudge(_cfg(tiny_qwen).model)
    got = judge.score(PAIRS)  # batched: mixed text/image, left padded, logits_to_keep=1
    proc, model = load_processor(tiny_qwen), load_model(tiny_qwen, "float32")
    yes = proc.tokenizer.convert_tokens_to_ids("Yes")
    no = proc.tokenizer.convert_tokens_to_ids("No")
    for i, (qt, qi, ct, ci) in enumerate(PAIRS):
        prompt = render(proc.tokenizer, judge_content(qt, bool(qi), ct, bool(ci)))
        images = [im.resize((56, 56)) for im in (qi, ci) if im]
        batch = proc(text=[prompt], images=images or None, return_tensors="pt")
        with torch.no_grad():
            logits = model(**batch).logits[0, -1]
        e_yes, e_no = torch.exp(logits[yes]), torch.exp(logits[no])
        assert abs(got[i] - (e_yes / (e_yes + e_no)).item()) < 1e-5
    assert ((got > 0) & (got < 1)).all()


def test_vllm_runs_folder_code_only_for_the_installed_processor_of_tiny_folders(tiny_qwen, tmp_path):
    transformers_impl = _cfg(tiny_qwen, "vllm")
    assert (tiny_qwen / "processing_unime.py").is_file()
    assert remote_code_needed(transformers_impl)
    assert not remote_code_needed(replace(transformers_impl, vllm_model_impl="auto"))
    assert not remote_code_needed(replace(transformers_impl, vllm_model_impl="vllm"))
    # a folder without the file (a real checkpoint): never, whatever its auto_map says
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "processor_config.json").write_text('{"auto_map": {"AutoProcessor": "evil.Processor"}}')
    (plain / "evil.py").write_text("raise SystemExit('ran')\n")
    assert not remote_code_needed(_cfg(plain, "vllm"))
    # a folder whose copy was changed: refused, naming the file
    changed = tmp_path / "changed"
    shutil.copytree(tiny_qwen, changed)
    with (changed / "processing_unime.py").open("a") as f:
        f.write("import os  # anything\n")
    with pytest.raises(ValueError, match=f"^{changed / 'processing_unime.py'} differs from the installed "):
        remote_code_needed(_cfg(changed, "vllm"))
    assert (tiny_qwen / "processing_unime.py").read_bytes() == open(processing_unime.__file__, "rb").read()


@pytest.mark.slow
def test_vllm_and_transformers_agree_on_llava_ov(tiny_llava):
    """Same tiny model, same prompts, images included: vLLM (CPU build) within 0.01 of transformers
    (vLLM loads the tiny folder like a real checkpoint). Qwen2-VL's agreement, on image queries, is
    asserted by test_mine_job's vLLM mining run (the tiny config's judge): one engine start (~1-2 min on
    2 cores) per architecture."""
    reference = TransformersJudge(_cfg(tiny_llava).model).score(PAIRS)
    judge = VLLMJudge(_cfg(tiny_llava, "vllm"))
    vllm_scores = judge.score(PAIRS)
    del judge  # release the engine's reserved memory before the next one starts
    gc.collect()
    np.testing.assert_allclose(vllm_scores, reference, atol=0.01)


def _requests(tmp_path, n_queries=3, per_query=3):
    rows = [
        {
            "query_id": f"q{q}",
            "dataset": "d",
            "cand_id": f"c{c}",
            "is_positive": c == 0,
            "rank": c - 1,
            "sim": 0.5,
            "qry_text": f"query {q}",
            "qry_image": "",
            "cand_text": f"candidate {c}",
            "cand_image": "",
        }
        for q in range(n_queries)
        for c in range(per_query)
    ]
    path = tmp_path / "req" / "d-00000.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=JUDGE_REQUESTS), path)
    return [path], rows


def test_judge_stage_on_ray_matches_direct_scores(local_ray, tiny_qwen, tmp_path):
    reqs, rows = _requests(tmp_path)
    report = run_judge(reqs, tmp_path / "out", _cfg(tiny_qwen), "", MiningConfig())
    out = pq.read_table(tmp_path / "out" / "d-00000.parquet").to_pylist()
    assert report["rows"] == len(rows) and report["nan_scores"] == 0
    direct = TransformersJudge(_cfg(tiny_qwen).model).score(
        [(r["qry_text"], "", r["cand_text"], "") for r in rows]
    )
    got = {(r["query_id"], r["cand_id"]): r["score"] for r in out}
    want = {(r["query_id"], r["cand_id"]): s for r, s in zip(rows, direct)}
    assert got.keys() == want.keys()
    assert max(abs(got[k] - want[k]) for k in got) < 1e-5


def test_precomputed_scores_validated_by_id(local_ray, tmp_path):
    reqs, rows = _requests(tmp_path)
    scores = [
        {"query_id": r["query_id"], "cand_id": r["cand_id"], "score": 0.1 * i} for i, r in enumerate(rows)
    ]
    user = tmp_path / "scores.parquet"
    pq.write_table(pa.Table.from_pylist(scores + [{"query_id": "zz", "cand_id": "c0", "score": 1.0}]), user)
    report = attach_precomputed(reqs, tmp_path / "out", str(user))
    assert report == {"rows": len(rows), "user_rows_unused": 1}
    out = pq.read_table(tmp_path / "out" / "d-00000.parquet").to_pylist()
    assert [round(r["score"], 5) for r in out] == [round(0.1 * i, 5) for i in range(len(rows))]
    pq.write_table(pa.Table.from_pylist(scores[:-2]), user)  # two requests without a score
    with pytest.raises(ValueError, match=r"2 requests of d-00000.parquet lack a score"):
        attach_precomputed(reqs, tmp_path / "out2", str(user))
    pq.write_table(pa.Table.from_pylist(scores + scores[:1]), user)
    with pytest.raises(ValueError, match="duplicate"):
        attach_precomputed(reqs, tmp_path / "out3", str(user))
    pq.write_table(pa.Table.from_pylist([{"query_id": "q0", "score": 1.0}]), user)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['cand_id'\]"):
        attach_precomputed(reqs, tmp_path / "out4", str(user))


def test_precomputed_scores_over_several_buckets_and_chunks(local_ray, tmp_path, monkeypatch):
    """Request shards grouped into three buckets and a shuffled score file cut into several partitioning
    tasks, so every task's rows fall in every bucket: each request still gets its own score, in the
    requests' order, and the rows of queries no request names are counted unused."""
    from unime_ray.mining import judge

    monkeypatch.setattr(judge, "BUCKET_ROWS", 40)  # read by the driver: shards of 30 rows, one per bucket
    monkeypatch.setattr(judge, "CHUNK_ROWS", 25)  # row groups of 10: three groups per task
    reqs = []
    for shard in range(3):
        rows = [
            {"query_id": f"s{shard}q{q}", "dataset": "d", "cand_id": f"c{c}", "is_positive": c == 0}
            | {"rank": c - 1, "sim": 0.5}
            for q in range(10)
            for c in range(3)
        ]
        reqs.append(tmp_path / "req" / f"d-{shard:05d}.parquet")
        reqs[-1].parent.mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=JUDGE_REQUEST_IDS), reqs[-1])
    want = {
        (f"s{s}q{q}", f"c{c}"): s * 100 + q * 10 + c for s in range(3) for q in range(10) for c in range(3)
    }
    rows = [{"query_id": q, "cand_id": c, "score": float(v)} for (q, c), v in want.items()]
    rows += [{"query_id": "nobody", "cand_id": "c0", "score": -1.0}]
    np.random.default_rng(0).shuffle(rows)
    user = tmp_path / "scores.parquet"
    pq.write_table(pa.Table.from_pylist(rows), user, row_group_size=10)
    report = attach_precomputed(reqs, tmp_path / "out", str(user))
    assert report == {"rows": 90, "user_rows_unused": 1}
    for path in reqs:
        out = pq.read_table(tmp_path / "out" / path.name).to_pylist()
        assert [(r["query_id"], r["cand_id"]) for r in out] == [
            (r["query_id"], r["cand_id"]) for r in pq.read_table(path).to_pylist()
        ]
        assert [r["score"] for r in out] == [want[r["query_id"], r["cand_id"]] for r in out]


def test_prompt_variant_and_candidate_cap(tiny_qwen):
    """`judge.prompt` swaps the instruction only; `judge.max_candidate_tokens` cuts the candidate's text
    (MMEB's image tag removed first), never the query's; both enter the judge stage's fingerprint, and
    at their defaults leave it as it was before they existed."""
    from unime_ray.config import Config
    from unime_ray.mining.pipeline import fingerprints, stage_settings
    from unime_ray.models.judge import PromptBuilder
    from unime_ray.models.prompts import JUDGE_PROMPTS

    tok = load_processor(tiny_qwen).tokenizer
    model = _cfg(tiny_qwen).model
    long_text = "a red circle on the left and a blue square on the right"
    pair = ("what is at the top of the image", "", f"<|image_1|>\n{long_text}", "")
    paper, _ = PromptBuilder(model, "", tok).build(pair)
    short, _ = PromptBuilder(model, "", tok, prompt="short").build(pair)
    assert JUDGE_PROMPTS["short"] in short and JUDGE_INSTRUCTION not in short
    assert short.replace(JUDGE_PROMPTS["short"], JUDGE_INSTRUCTION) == paper
    capped, _ = PromptBuilder(model, "", tok, max_candidate_tokens=3).build(pair)
    kept = capped.split("\nCandidate: ")[1].split("<|im_end|>")[0]
    assert tok.encode(kept, add_special_tokens=False) == tok.encode(long_text, add_special_tokens=False)[:3]
    assert capped.split("\nCandidate: ")[0] == paper.split("\nCandidate: ")[0]  # the query is untouched
    uncapped, _ = PromptBuilder(model, "", tok, max_candidate_tokens=100).build(pair)
    assert uncapped == paper

    base = Config()
    assert set(stage_settings(base)["judge"]) == {"model", "backend", "scores_path", "shard"}
    for key, value in (("prompt", "short"), ("max_candidate_tokens", 16)):
        other = Config()
        setattr(other.judge, key, value)
        assert stage_settings(other)["judge"][key] == value
        assert fingerprints(other)["judge"] != fingerprints(base)["judge"]
        assert fingerprints(other)["retrieve"] == fingerprints(base)["retrieve"]


def _request_world(tmp_path, counts: list[int]):
    """Queries q00.. with `counts[i]` candidates each (ranks 0.., candidates c<j>), their positives p<i>:
    QUERIES, POOL and a CANDIDATES file in query-id order, as the retrieve stage writes them."""
    n = len(counts)
    queries = pa.table(
        {
            "id": [f"q{i:02d}" for i in range(n)],
            "dataset": ["D"] * n,
            "text": [f"query {i}" for i in range(n)],
            "image": [""] * n,
            "pos_id": [f"p{i}" for i in range(n)],
        },
        schema=QUERIES,
    )
    pool_ids = [f"p{i}" for i in range(n)] + [f"c{j}" for j in range(max(counts))]
    pool = pa.table(
        {"id": pool_ids, "dataset": ["D"] * len(pool_ids), "text": [f"text of {c}" for c in pool_ids],
         "image": [""] * len(pool_ids)},
        schema=POOL,
    )  # fmt: skip
    rows = [(f"q{i:02d}", "D", f"c{j}", j, 1.0 - j / 10) for i, k in enumerate(counts) for j in range(k)]
    cands = pa.table(dict(zip(CANDIDATES.names, map(list, zip(*rows)), strict=True)), schema=CANDIDATES)
    paths = [tmp_path / f"{name}.parquet" for name in ("queries", "pool", "D")]
    for table, path in zip((queries, pool, cands), paths, strict=True):
        pq.write_table(table, path)
    return paths


def test_request_shards_read_by_blocks_equal_a_hand_built_split(tmp_path, monkeypatch):
    """The candidates are read a few rows at a time (so queries straddle the reads), and the shards are
    those of the whole file: per query its positive then its candidates by rank, 2 queries a shard,
    numbered on across the reads."""
    counts = [3, 1, 4, 2, 3, 1, 2]  # 16 candidate rows; reads of 5 cut q01, q02, q05...
    queries, pool, cands = _request_world(tmp_path, counts)
    monkeypatch.setattr(judge_stage, "REQUEST_BLOCK_ROWS", 5)
    paths = judge_stage._dataset_requests(cands, str(queries), str(pool), tmp_path / "req", 2, True)
    assert [p.name for p in paths] == [f"D-{i:05d}.parquet" for i in range(4)]
    for s, path in enumerate(paths):
        expected = []
        for i in range(2 * s, min(2 * s + 2, len(counts))):
            expected.append((f"q{i:02d}", f"p{i}", True, -1, f"text of p{i}"))
            expected += [(f"q{i:02d}", f"c{j}", False, j, f"text of c{j}") for j in range(counts[i])]
        got = pq.read_table(path)
        assert got.schema == JUDGE_REQUESTS
        columns = ("query_id", "cand_id", "is_positive", "rank", "cand_text")
        assert list(zip(*(got[c].to_pylist() for c in columns), strict=True)) == expected
        assert got["qry_text"].to_pylist() == [f"query {int(q[1:])}" for q in got["query_id"].to_pylist()]


def test_request_shards_refuse_candidates_out_of_query_order(tmp_path, monkeypatch):
    queries, pool, cands = _request_world(tmp_path, [2, 2, 2])
    table = pq.read_table(cands)
    pq.write_table(pa.concat_tables([table.slice(4), table.slice(0, 4)]), cands)  # q02 first
    monkeypatch.setattr(judge_stage, "REQUEST_BLOCK_ROWS", 3)
    with pytest.raises(ValueError, match=r"D\.parquet: candidates not in query-id order"):
        judge_stage._dataset_requests(cands, str(queries), str(pool), tmp_path / "req", 1, True)
