"""Training: the reranker's supervision, the schedule, the embedder loss on real embeddings, and real
Ray Train + DeepSpeed ZeRO-2 runs (1 and 2 workers, a killed worker, a rerun, export)."""

import dataclasses
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import kill_when, registered_step
from safetensors.torch import load_file

from unime_ray.assets import synthetic_overrides
from unime_ray.config import load_config
from unime_ray.data.synthetic import oracle_truth
from unime_ray.demo import mine_with_oracle
from unime_ray.eval.job import resolve_checkpoint
from unime_ray.models.embedder import Embedder, load_image
from unime_ray.models.prompts import render
from unime_ray.models.reranker import Reranker
from unime_ray.train.embed import EmbedTask, candidates
from unime_ray.train.export import export
from unime_ray.train.loop import (
    _start_or_resume,
    accumulation_steps,
    changed_keys,
    load_state_file,
    lora_model,
    lr_lambda,
    run_inputs,
    run_training,
)
from unime_ray.train.losses import LOSSES
from unime_ray.train.rerank import RerankTask, answer_batch, examples
from unime_ray.train.rows import TrainRows, read_rows

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def mined(tmp_path_factory, local_ray):
    """The synthetic world mined with the oracle judge (the tiny random judge knows nothing)."""
    out = tmp_path_factory.mktemp("train")
    overrides = mine_with_oracle(ROOT / "jobs/configs/tiny.yaml", out)
    return out, overrides[len(synthetic_overrides(out)) :]


def _cfg(mined, *more: str, out: Path | None = None):
    base, extra = mined
    overrides = (
        synthetic_overrides(base)
        + extra
        + [
            f"train.data_path={base}/mining/sample/hard_negatives.parquet",
            f"reranker.data_path={base}/mining/sample/hard_negatives.parquet",
        ]
    )
    if out is not None:
        overrides.append(f"run.output_dir={out}")
    return load_config(ROOT / "jobs/configs/tiny.yaml", overrides + list(more))


ROW = {
    "id": "d/7",
    "qry_text": "<|image_1|>\nWhat colour is the circle?",
    "qry_image": "train/00001.png",
    "pos_text": "red",
    "pos_image": "",
    "pos_score": 0.9,
    "neg_texts": ["blue", "green", "", "blue"],
    "neg_images": ["", "", "train/00002.png", ""],
    "neg_scores": [0.2, 0.7, 0.5, 0.2],
    "neg_ids": ["a", "b", "c", "a"],
}


def test_oracle_mining_keeps_no_negative_that_is_true_of_its_query(mined):
    """The oracle scores retrieved candidates that are true of their query (another object's label, a
    caption of part of the image) 1.0 like the positive, so the false-negative filter drops them."""
    base, _ = mined
    true_of = oracle_truth(json.loads((base / "world/world.json").read_text()))
    oracle = pq.read_table(base / "oracle.parquet").to_pylist()
    queries = pq.read_table(base / "mining/ingest/queries.parquet").to_pylist()
    assert sum(r["score"] == 1.0 for r in oracle) > len(queries)  # some retrieved candidate was true
    rows = pq.read_table(base / "mining/sample/hard_negatives.parquet").to_pylist()
    assert not any(r["fallback"] for r in rows)  # the paper's random draw when nothing survives
    checked = 0
    for r in rows:
        query = {"text": r["qry_text"], "image": r["qry_image"]}
        for text, image in zip(r["neg_texts"], r["neg_images"], strict=True):
            assert not true_of(r["dataset"], query, {"text": text, "image": image}), (r["id"], text, image)
            checked += 1
    assert checked >= 8 * len(queries) * 0.9


def test_reranker_examples_hardest_negative_and_listwise_position():
    ex = examples(ROW, list_size=2, seed=0)
    assert [answer for _, _, answer in ex][:2] == ["Yes", "No"]
    texts = lambda content: [p["text"] for p in content if p["type"] == "text"]  # noqa: E731
    assert texts(ex[0][0])[-1] == "red" and texts(ex[1][0])[-1] == "green"  # hardest = highest judge score
    assert ex[0][1] == ["train/00001.png"]  # query image; the positive has none
    listwise, images, answer = ex[2]
    listed = [t for t in texts(listwise) if t in ("red", "green", "blue")]
    # top-2 negatives by score are green (0.7) and the image candidate (0.5): two texts, one image, + red
    assert sorted(listed) == ["green", "red"] and "train/00002.png" in images
    position = int(answer.removeprefix("Ans: (").removesuffix(")")) - 1
    numbered = [p["text"] for p in listwise if p["type"] == "text" and p["text"].startswith(" (")]
    assert len(numbered) == 3  # positive inserted among 2 negatives
    order = []  # the candidate that follows each " (i) " marker
    for i, part in enumerate(listwise):
        if part["type"] == "text" and part["text"].startswith(" ("):
            nxt = listwise[i + 1]
            order.append(nxt["text"] if nxt["type"] == "text" and not nxt["text"].startswith(" (") else "IMG")
    assert order[position] == "red"
    assert examples(ROW, 2, seed=0) == ex  # deterministic per (seed, query id)


def test_reranker_redraws_negatives_tied_in_judge_score_each_epoch():
    """Three negatives tie at the top score, one scores lower: each epoch's "hardest" negative is one of
    the tied three, each of them comes up over the epochs, the lower one never does (nor in a listwise
    prompt of 2), and a given (seed, query, epoch) always gives the same examples."""
    negs = {"neg_texts": ["x", "y", "z", "w"], "neg_images": [""] * 4, "neg_scores": [0.3, 0.3, 0.3, 0.1]}
    row = {**ROW, **negs}
    last = lambda content: [p["text"] for p in content if p["type"] == "text"][-1]  # noqa: E731
    hardest = [last(examples(row, 3, seed=0, epoch=e)[1][0]) for e in range(30)]
    assert set(hardest) == {"x", "y", "z"}
    listed = [examples(row, 2, seed=0, epoch=e)[2][0] for e in range(30)]
    texts = [{p["text"] for p in content if p["type"] == "text"} for content in listed]
    assert all("w" not in t and len(t & {"x", "y", "z"}) == 2 for t in texts)  # 2 of the tied 3, never w
    assert examples(row, 3, seed=0, epoch=7) == examples(row, 3, seed=0, epoch=7)


def _reranker_cfg(model: Path, world: Path, *more: str):
    """The reranker's settings on the tiny model and the synthetic world, lists of 3 negatives."""
    base = [f"reranker.model.path={model}", f"data.image_root={world}/images", "reranker.model.image_size=56"]
    return load_config(None, [*base, "reranker.list_size=3", *more])


def test_reranker_batch_reaches_texts_images_and_masks_prompts(tiny_qwen, world):
    cfg = _reranker_cfg(tiny_qwen, world, "reranker.point_negatives=1")
    task = RerankTask(cfg)
    inputs, labels, sizes = task.batch([ROW])
    assert sizes == [3]
    tok = task.processor.tokenizer
    decoded = [
        tok.decode(ids[mask.bool()]) for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])
    ]
    assert "What colour is the circle?" in decoded[0] and "Candidate: red<|im_end|>" in decoded[0]
    assert "Candidate: green<|im_end|>" in decoded[1]
    assert decoded[2].count("<|vision_start|>") == 2  # the query's image and the image candidate
    assert "(1)" in decoded[2] and "(3)" in decoded[2] and "Candidates:" in decoded[2]
    answers = [tok.decode(row[row != -100]) for row in labels]
    assert answers[:2] == ["Yes<|im_end|>", "No<|im_end|>"] and answers[2].startswith("Ans: (")
    assert all(d.endswith(a) for d, a in zip(decoded, answers))  # labels are exactly the answer span


def test_reranker_loss_sums_its_terms_computed_one_sequence_at_a_time(tiny_qwen, world):
    """The loss of one query with 2 pointwise negatives, recomputed from separate full forwards of each
    sequence: the summed answer-token cross-entropies (Yes, the mean of the two No's, the listwise
    answer) plus rank_weight x the softmax cross-entropy of logit(Yes) - logit(No) at the answer position
    over [positive, negatives]."""
    cfg = _reranker_cfg(tiny_qwen, world, "reranker.point_negatives=2", "reranker.rank_weight=0.5")
    task = RerankTask(cfg)
    task.model.eval()
    with torch.no_grad():
        loss, metrics = task.loss([ROW])
        found = examples(ROW, 3, seed=0, point_negatives=2)
        assert [answer for _, _, answer in found][:3] == ["Yes", "No", "No"] and len(found) == 4
        nll, margins = [], []
        for content, paths, answer in found:  # each sequence alone: no padding, its own images
            images = [load_image(p, f"{world}/images", 56) for p in paths]
            prompt = render(task.processor.tokenizer, content)
            one, labels = answer_batch(task.processor, [prompt], [answer], images)
            logits = task.model(**one).logits[0, :-1].float()
            target = labels[0, 1:]
            at = target != -100
            nll.append(F.cross_entropy(logits[at], target[at], reduction="sum"))
            first = int(at.int().argmax())
            margins.append(logits[first, task.yes] - logits[first, task.no])
        rank = -torch.log_softmax(torch.stack(margins[:3]), 0)[0]
        expected = nll[0] + (nll[1] + nll[2]) / 2 + 0.5 * rank + nll[3]
    assert abs(loss.item() - expected.item()) < 1e-3 * max(1.0, expected.item()), (loss, expected)
    assert metrics["rank_acc"] == float(torch.stack(margins[:3]).argmax() == 0)


def test_lr_schedule_and_batch_layout():
    cfg = load_config(None, ["train.warmup_steps=4", "train.steps=14"]).train
    f = lr_lambda(cfg)
    assert [f(s) for s in (0, 3, 4, 9, 14)] == [0.25, 1.0, 1.0, 0.5, 0.0]
    cos = lr_lambda(dataclasses.replace(cfg, schedule="cosine"))
    assert abs(cos(9) - 0.5) < 1e-12 and abs(cos(14)) < 1e-12
    assert (
        accumulation_steps(dataclasses.replace(cfg, global_batch_size=32, micro_batch_size=4, num_workers=2))
        == 4
    )
    with pytest.raises(ValueError, match="not a multiple"):
        accumulation_steps(dataclasses.replace(cfg, global_batch_size=30, micro_batch_size=4, num_workers=2))
    for bad in ("train.report_every=0", "train.checkpoint_every=0", "train.steps=-1"):
        with pytest.raises(ValueError, match=bad.split("=")[0] + " must be at least 1"):
            run_training(load_config(None, [bad]), "embed")  # before any Ray work


def test_embed_task_loss_equals_loss_of_independent_embeddings(mined):
    cfg = _cfg(mined)
    task = EmbedTask(cfg)
    task.model.eval()  # LoRA dropout off; the adapter starts as identity, so this is the base model
    rows = pq.read_table(cfg.train.data_path).slice(0, 3).to_pylist()
    loss, metrics = task.loss(rows)
    plain = Embedder(cfg.train.model, image_root=cfg.data.image_root)
    q = torch.tensor(plain.embed([{"text": r["qry_text"], "image": r["qry_image"]} for r in rows]))
    cands, scores = zip(*(candidates(r, 8) for r in rows))
    c = torch.tensor(plain.embed([x for cs in cands for x in cs])).view(3, 9, -1)
    want = LOSSES["jeffreys"](q, c, torch.tensor(scores), 0.02)
    assert abs(loss.item() - want.item()) < 1e-4 * max(1.0, want.item())
    p1 = ((c @ q.unsqueeze(-1)).squeeze(-1).argmax(1) == 0).float().mean().item()
    assert metrics["p@1"] == p1


def _finals(out: Path, kind: str = "embed") -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / f"train_{kind}").glob("final_rank*.json"))]


def _metrics(out: Path, kind: str = "embed") -> list[dict]:
    return [json.loads(line) for line in (out / f"train_{kind}/metrics.jsonl").read_text().splitlines()]


COMMON = ["train.steps=6", "train.global_batch_size=16", "train.checkpoint_every=6", "train.lora.dropout=0.0"]


@pytest.fixture(scope="module")
def one_worker(mined, tmp_path_factory) -> tuple:
    """One worker, the whole batch of 16 at once, 6 steps: the zero-2 test's reference, the export's
    adapter (a Ray Train + DeepSpeed start costs ~45 s here, so the two tests share the run)."""
    out = tmp_path_factory.mktemp("w1")
    cfg = _cfg(mined, *COMMON, "train.micro_batch_size=16", out=out)
    return cfg, out, run_training(cfg, "embed")


@pytest.mark.slow
def test_two_workers_zero2_agree_with_one_worker(mined, one_worker, tmp_path):
    _, w1, one = one_worker
    two = run_training(
        _cfg(mined, *COMMON, "train.micro_batch_size=8", "train.num_workers=2", out=tmp_path / "w2"), "embed"
    )
    finals = _finals(tmp_path / "w2")
    assert len(finals) == 2 and finals[0]["step"] == finals[1]["step"] == 6
    assert finals[0]["trainable_param_sum"] == finals[1]["trainable_param_sum"]  # ranks identical
    assert all(200 < f["peak_mem_mb"] < 24 * 1024 for f in finals)  # a torch + model process, in MB
    l1 = np.mean([m["loss"] for m in _metrics(w1)])
    l2 = np.mean([m["loss"] for m in _metrics(tmp_path / "w2")])
    assert abs(l1 - l2) < 0.25 * l1, (l1, l2)  # same global batch: same loss up to data order
    assert Path(one["weights"], "adapter_config.json").is_file() and Path(two["weights"]).is_dir()


def test_training_data_is_shuffled_across_datasets_afresh_every_epoch(mined):
    """Mining writes the rows grouped by dataset; training reads every row once per pass (but the few
    that do not fill a global batch), in a new global order each pass fixed by (seed, epoch), with the
    datasets mixed as a random order mixes them, and the ranks' micro-batches disjoint."""
    base, _ = mined
    path = str(base / "mining/sample/hard_negatives.parquet")
    dataset_of = {r["id"]: r["dataset"] for r in pq.read_table(path, columns=["id", "dataset"]).to_pylist()}
    in_file = list(dataset_of)
    rows = TrainRows(read_rows(path), path)

    def order(rows: TrainRows, seed: int, epoch: int) -> list[str]:
        return [r["id"] for batch in rows.epoch(seed, epoch, 1, 0, 1) for r in batch]

    first, second = order(rows, 0, 0), order(rows, 0, 1)
    assert sorted(first) == sorted(second) == sorted(in_file)  # each pass: every row exactly once
    assert first != second and first != order(rows, 1, 0)
    # another read gives the same order, however Ray Data made and finished the blocks
    assert order(TrainRows(read_rows(path), path), 0, 0) == first
    # 2 ranks x 3 rows: rank r takes rows [6b + 3r, 6b + 3r + 3) of the epoch's order, the rest dropped
    full = len(in_file) // 6
    assert rows.batches_per_epoch(2, 3) == full
    for r in (0, 1):
        got = [[x["id"] for x in batch] for batch in rows.epoch(0, 0, 2, r, 3)]
        assert got == [first[6 * b + 3 * r : 6 * b + 3 * r + 3] for b in range(full)]
    withheld = set(in_file[::7])  # the reranker's held-out check rows are withheld this way
    kept = TrainRows(read_rows(path, exclude=withheld), path)
    assert sorted(order(kept, 0, 0)) == sorted(set(in_file) - withheld)

    def changes(order: list[str]) -> int:
        return sum(dataset_of[a] != dataset_of[b] for a, b in zip(order, order[1:]))

    # Neighbours from different datasets in a uniformly random order of n rows, datasets of size k:
    # (n - 1) * (1 - sum k(k-1) / (n(n-1))); the file has one run per dataset.
    n, sizes = len(in_file), Counter(dataset_of.values())
    expected = (n - 1) * (1 - sum(k * (k - 1) for k in sizes.values()) / (n * (n - 1)))
    assert len(sizes) > 1 and changes(in_file) == len(sizes) - 1
    assert min(changes(first), changes(second)) > 0.7 * expected, (changes(first), expected)


def test_a_resumed_epoch_skips_exactly_the_micro_batches_done(tmp_path, local_ray):
    """A run stopped after d micro-batches continues with batch d mod per_epoch of epoch d // per_epoch:
    the stream stopped and resumed at every point is the stream never stopped. Repeated ids and too few
    rows for one step are refused, naming the file."""
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": [f"q{i:02d}" for i in range(23)], "x": list(range(23))}), path)
    rows = TrainRows(read_rows(str(path)), str(path))
    per_epoch = rows.batches_per_epoch(2, 2)
    assert per_epoch == 5  # 23 rows // (2 x 2)

    def stream(done: int, n: int) -> list[list[int]]:
        """Rank 1's next n micro-batches after `done`, as the training loop walks them."""
        out: list[list[int]] = []
        while len(out) < n:
            epoch, skip = divmod(done + len(out), per_epoch)
            out += [[r["x"] for r in batch] for batch in rows.epoch(7, epoch, 2, 1, 2, skip)]
        return out[:n]

    never_stopped = stream(0, 17)
    for d in range(17):
        assert stream(0, d) + stream(d, 17 - d) == never_stopped
    assert never_stopped[:5] != never_stopped[5:10]  # epochs differ
    pq.write_table(pa.table({"id": ["a", "b", "a"], "x": [0, 1, 2]}), path)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: id a is on more than one row"):
        TrainRows(read_rows(str(path)), str(path))
    pq.write_table(pa.table({"id": ["a", "b", "c"], "x": [0, 1, 2]}), path)
    with pytest.raises(ValueError, match=r": 3 training rows do not fill one step of .* = 2 x 2$"):
        TrainRows(read_rows(str(path)), str(path)).batches_per_epoch(2, 2)


def _copy_rows(src: Path, dst: Path, keep=lambda i: True) -> Path:
    """The mined rows whose index passes `keep`, written to `dst` (a re-mining into the same path)."""
    table = pq.read_table(src)
    pq.write_table(table.take([i for i in range(table.num_rows) if keep(i)]), dst)
    return dst


@pytest.mark.parametrize("kind, section", [("embed", "train"), ("rerank", "reranker")])
def test_a_run_resumes_only_with_its_own_inputs_the_step_budget_aside(mined, tmp_path, capsys, kind, section):
    """Both trainings: more steps (or other checkpoint / report intervals) resume; a new learning rate, or
    new hard negatives written into the same file, start a fresh run that archives the old one and names
    what changed; the same contents rewritten resume; --restart always starts afresh."""
    src = mined[0] / "mining/sample/hard_negatives.parquet"
    data = _copy_rows(src, tmp_path / "hn.parquet")
    cfg = lambda *more: _cfg(mined, f"{section}.data_path={data}", *more, out=tmp_path)  # noqa: E731
    inputs = run_inputs(cfg(), kind, str(data))
    longer = cfg(f"{section}.steps=99", f"{section}.checkpoint_every=7", f"{section}.report_every=3")
    assert run_inputs(longer, kind, str(data)) == inputs
    assert changed_keys(inputs, run_inputs(cfg(f"{section}.lr=0.5"), kind, str(data))) == [f"{section}.lr"]
    _copy_rows(src, data)  # the same rows rewritten: a new modification time, the same content
    assert run_inputs(cfg(), kind, str(data)) == inputs
    _copy_rows(src, data, keep=lambda i: i % 2 == 0)  # re-mined: other rows in the same file
    remined = run_inputs(cfg(), kind, str(data))
    assert changed_keys(inputs, remined) == ["data file.sha256"]

    name = f"train_{kind}"
    run = tmp_path / name
    _start_or_resume(tmp_path, name, inputs, restart=False)  # nothing there yet: starts, records inputs
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    _start_or_resume(tmp_path, name, inputs, restart=False)
    assert "resuming" in capsys.readouterr().out and (run / "metrics.jsonl").is_file()
    _start_or_resume(tmp_path, name, remined, restart=False)
    said = capsys.readouterr().out
    assert "a fresh run (changed: data file.sha256)" in said and not (run / "metrics.jsonl").exists()
    (archived,) = (tmp_path / "archive").iterdir()
    assert (archived / "run/metrics.jsonl").read_text() == '{"step": 1}\n'
    assert json.loads((run / "_RUN.json").read_text())["inputs"] == remined
    _start_or_resume(tmp_path, name, remined, restart=True)
    assert "a fresh run (--restart)" in capsys.readouterr().out
    assert len(list((tmp_path / "archive").iterdir())) == 2


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint_and_rerun_continues(mined, tmp_path):
    data = _copy_rows(mined[0] / "mining/sample/hard_negatives.parquet", tmp_path / "hn.parquet")
    more = ["train.steps=8", "train.checkpoint_every=2", "train.max_failures=2", f"train.data_path={data}"]
    cfg = _cfg(mined, *more, out=tmp_path)

    def checkpointed() -> int:
        """The registered checkpoint step once it is >= 2 (the workers are killed then), else 0."""
        step = registered_step(tmp_path / "ray_train/train_embed")
        return step if step >= 2 else 0

    with kill_when(checkpointed, "RayTrainWorker") as killed:
        summary = run_training(cfg, "embed")
    assert killed, "no worker was killed"
    final = _finals(tmp_path)[0]
    assert final["step"] == 8 and [m["step"] for m in _metrics(tmp_path)][-1] == 8
    # resumed after a registered checkpoint (every 2 steps, the kill came at >= 2), not from 0
    assert final["resumed_from"] >= killed[0] >= 2 and final["resumed_from"] % 2 == 0
    # The steps logged: 1..8, where the attempt killed may have logged steps past its last checkpoint
    # that the resumed attempt logs again, never step 1 again.
    steps = [m["step"] for m in _metrics(tmp_path)]
    assert steps.count(1) == 1 and sorted(set(steps)) == list(range(1, 9))
    # Killed and resumed, the run ends as a run never stopped ends: the same loss at every step (a step
    # redone after the kill: both times) and the same weights, bit for bit.
    clean = run_training(_cfg(mined, *more, out=tmp_path / "clean"), "embed")
    losses = {m["step"]: m["loss"] for m in _metrics(tmp_path / "clean")}
    assert [m["loss"] for m in _metrics(tmp_path)] == [losses[step] for step in steps]
    resumed_weights = load_file(Path(summary["weights"], "adapter_model.safetensors"))
    clean_weights = load_file(Path(clean["weights"], "adapter_model.safetensors"))
    assert clean_weights.keys() == resumed_weights.keys()
    assert all(torch.equal(clean_weights[k], resumed_weights[k]) for k in clean_weights)
    # A rerun of the same run with more steps continues from step 8, not from 0.
    longer = _cfg(
        mined, "train.steps=10", "train.checkpoint_every=2", f"train.data_path={data}", out=tmp_path
    )
    rerun = run_training(longer, "embed")
    assert [m["step"] for m in _metrics(tmp_path)][-2:] == [9, 10]
    assert _finals(tmp_path)[0]["resumed_from"] == 8
    # The same settings once more: found finished, the same summary, and no worker started at all.
    final = tmp_path / "train_embed/final_rank0.json"
    written = final.stat().st_mtime_ns
    assert run_training(longer, "embed") == rerun and final.stat().st_mtime_ns == written
    assert Path(summary["weights"], "adapter_config.json").is_file()
    # New hard negatives in the same file (a re-mining): every step trains afresh on them, from step 0;
    # the old run is archived whole, not resumed at its last step and not deleted.
    old_metrics = (tmp_path / "train_embed/metrics.jsonl").read_text()
    _copy_rows(mined[0] / "mining/sample/hard_negatives.parquet", data, keep=lambda i: i % 2 == 0)
    fresh = run_training(_cfg(mined, "train.steps=4", f"train.data_path={data}", out=tmp_path), "embed")
    assert [m["step"] for m in _metrics(tmp_path)] == list(range(1, 5))
    assert _finals(tmp_path)[0]["resumed_from"] == 0 and fresh["checkpoint"] != rerun["checkpoint"]
    (archived,) = (tmp_path / "archive").iterdir()
    assert (archived / "run/metrics.jsonl").read_text() == old_metrics
    assert (archived / "ray_train").is_dir() and not Path(rerun["checkpoint"]).exists()


class MakesADirectoryWhenUnpickled:
    """What a tampered checkpoint can carry: pickled as a call to os.mkdir, which plain unpickling runs."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


def assert_same_state(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__"):  # DeepSpeed's loss scaler, fragment addresses
        assert type(a) is type(b), where
        assert_same_state(vars(a), vars(b), f"{where}.__dict__")
    else:
        assert a == b, where


@pytest.mark.slow
def test_resume_reads_checkpoints_as_data_only(one_worker, tmp_path):
    """Every file of a real ZeRO-2 checkpoint loads through the weights-only unpickler exactly as
    DeepSpeed's own torch.load(weights_only=False) loads it; a tampered file is refused, naming it and
    the callable it carries, and nothing in it runs (plain unpickling runs it)."""
    _, out, _ = one_worker
    files = sorted(out.glob("ray_train/train_embed/checkpoint_*/state/*.pt"))
    names = {f.name for f in files}
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= names, names
    for f in files:
        assert_same_state(load_state_file(str(f)), torch.load(f, weights_only=False))

    optimizer_state = next(f for f in files if f.name.startswith("zero_pp_rank_0"))
    state = torch.load(optimizer_state, weights_only=False)
    marker = tmp_path / "code-ran"
    state["extra"] = MakesADirectoryWhenUnpickled(marker)
    tampered = tmp_path / optimizer_state.name
    torch.save(state, tampered)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tampered))}: holds posix\.mkdir, which resume"):
        load_state_file(str(tampered))
    assert not marker.exists()
    torch.load(tampered, weights_only=False)  # what DeepSpeed's loader would do
    assert marker.is_dir()


@pytest.mark.slow
def test_export_merges_adapter_into_a_standalone_model(one_worker, tmp_path):
    cfg, _, trained = one_worker
    adapter = trained["weights"]
    merged = export(adapter, tmp_path / "merged")
    records = [{"text": "a red circle on the left", "image": ""}, {"text": "x", "image": "train/00003.png"}]
    with_adapter = Embedder(dataclasses.replace(cfg.train.model, adapter=adapter), cfg.data.image_root)
    standalone = Embedder(dataclasses.replace(cfg.train.model, path=str(merged)), cfg.data.image_root)
    np.testing.assert_allclose(standalone.embed(records), with_adapter.embed(records), atol=1e-4)
    base = Embedder(cfg.train.model, cfg.data.image_root).embed(records)
    assert np.abs(base - with_adapter.embed(records)).max() > 1e-4  # training changed the model
    assert not list(tmp_path.glob(".merged*"))


def test_without_lora_the_language_model_trains_and_vision_stays_frozen(mined, tmp_path):
    cfg = _cfg(
        mined, "reranker.lora.enabled=false", "reranker.steps=3", "reranker.checkpoint_every=3", out=tmp_path
    )
    model = lora_model(cfg.reranker.model, cfg.reranker.lora, gradient_checkpointing=False)
    language = {id(p) for m in (model.model.language_model, model.lm_head) for p in m.parameters()}
    assert all(p.requires_grad == (id(p) in language) for p in model.parameters())

    summary = run_training(cfg, "rerank")
    folder = summary["weights"]
    assert Path(folder).name == "model" and resolve_checkpoint(folder) == (folder, "")  # a model folder
    base = load_file(Path(cfg.reranker.model.path) / "model.safetensors")
    trained = load_file(Path(folder) / "model.safetensors")
    assert trained.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    # Qwen2-VL's checkpoint names: language model "model.*", vision tower and merger "visual.*"
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= changed
    assert not any(k.startswith("visual.") for k in changed) and any(k.startswith("visual.") for k in base)
    # it loads on its own (processor files included) and answers as a reranker
    reranker = Reranker(dataclasses.replace(cfg.reranker.model, path=folder), cfg.data.image_root)
    image = {"text": "", "image": "train/00001.png"}
    p_yes = reranker.pointwise({"text": "a red circle", "image": ""}, [image])
    assert p_yes.shape == (1,) and 0 < p_yes[0] < 1
