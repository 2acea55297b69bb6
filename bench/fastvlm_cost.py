"""What the pretrained FastVLM (EfficientNet-Lite0 + SmolLM2-135M, models/fastvlm.py) costs on this machine
per image size, against the random ~3M "mid" Qwen2-VL: seconds per embedder training micro-step (forward
+ backward of `EmbedTask.loss`, LoRA on the language model), seconds per embedded image record and per
embedded text record (`Embedder.embed`), and each process's peak RSS. Each time is given as wall time
and as the process's CPU time (user + system, both cores): on a machine shared with other jobs the
wall time varies with their load (recorded as the 1-minute load average), the CPU time much less.

    python bench/fastvlm_cost.py                          # mid, fast-vlm at 224 / 160 / 96 px
    python bench/fastvlm_cost.py --sizes 224 128 --steps 3

A micro-step is the real one of the training job without Ray or DeepSpeed: 8 queries of the synthetic
world's train files (2 from each of its 4 datasets, image and text queries mixed), each with its positive
and 8 negatives (other rows' positives of its dataset), so 80 records in one forward. One FastVLM
folder is built (or `--base` reused); each size is a copy of it with that size's processor files.
Each model runs in a fresh process (its peak RSS is its own); the first step and the first embedding
batch are warm-up and not timed. Writes bench/results/fastvlm_cost.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from queue import Empty

import torch

from unime_ray.config import load_config
from unime_ray.data.synthetic import make_world
from unime_ray.models.embedder import Embedder
from unime_ray.models.fastvlm import TOWER_STRIDE, sized_copy
from unime_ray.models.tiny import make_tiny
from unime_ray.train.embed import EmbedTask

ROOT = Path(__file__).parents[1]
OUT = ROOT / "bench" / "results"
WORK = OUT / "fastvlm_cost"
ROWS_PER_DATASET, NEGATIVES = 2, 8


def mined_rows(world: Path) -> list[dict]:
    """Rows in the mined-file shape `EmbedTask.loss` reads, from the world's train pairs."""
    rows = []
    for path in sorted((world / "train").glob("*.jsonl")):
        pairs = [json.loads(line) for line in path.read_text().splitlines()][: ROWS_PER_DATASET + NEGATIVES]
        for i, p in enumerate(pairs[:ROWS_PER_DATASET]):
            negs = [q for j, q in enumerate(pairs) if j != i][:NEGATIVES]
            rows.append(
                dict(
                    id=f"{path.stem}-{i}",
                    qry_text=p["qry"],
                    qry_image=p["qry_image_path"],
                    pos_text=p["pos_text"],
                    pos_image=p["pos_image_path"],
                    pos_score=1.0,
                    neg_ids=[str(j) for j in range(NEGATIVES)],
                    neg_texts=[q["pos_text"] for q in negs],
                    neg_images=[q["pos_image_path"] for q in negs],
                    neg_scores=[0.3] * NEGATIVES,
                )
            )
    return rows


def measure(overrides: list[str], world: Path, steps: int, queue) -> None:
    torch.manual_seed(0)
    cfg = load_config(ROOT / "jobs/configs/tiny.yaml", [*overrides, f"data.image_root={world / 'images'}"])
    rows = mined_rows(world)
    task = EmbedTask(cfg)
    times, cpu = [], []
    for step in range(steps + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        loss, _ = task.loss(rows)
        loss.backward()
        task.model.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    del task
    embedder = Embedder(cfg.embedder, image_root=world / "images")
    records = [{"text": r["qry_text"], "image": r["qry_image"]} for r in rows]
    image_records = [r for r in records if r["image"]] * 4
    text_records = [{"text": r["pos_text"], "image": ""} for r in rows if not r["pos_image"]] * 4
    per_item = {}
    for name, recs in (("image", image_records), ("text", text_records)):
        embedder.embed(recs[: cfg.embedder.batch_size])  # warm-up
        start, start_cpu = time.perf_counter(), time.process_time()
        embedder.embed(recs)
        per_item[name] = (time.perf_counter() - start) / len(recs)
        per_item[name + "_cpu"] = (time.process_time() - start_cpu) / len(recs)
    queue.put(
        dict(
            step_s=statistics.median(times),
            step_cpu_s=statistics.median(cpu),
            records_per_step=len(rows) * (2 + NEGATIVES),
            embed_image_s=per_item["image"],
            embed_image_cpu_s=per_item["image_cpu"],
            embed_text_s=per_item["text"],
            embed_text_cpu_s=per_item["text_cpu"],
            load_average=os.getloadavg()[0],
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        )
    )


def run(name: str, overrides: list[str], world: Path, steps: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(overrides, world, steps, queue))
    proc.start()
    while proc.is_alive() or not queue.empty():
        try:
            result = queue.get(timeout=5)
            break
        except Empty:
            continue
    else:
        raise RuntimeError(f"{name}: the measuring process died (exit code {proc.exitcode})")
    proc.join()
    print(name, result, flush=True)
    return result


def model_overrides(path: Path, image_size: int, lora: tuple[int, int]) -> list[str]:
    out = [f"{s}.path={path}" for s in ("embedder", "train.model")]
    out += [f"{s}.image_size={image_size}" for s in ("embedder", "train.model")]
    return out + [f"train.lora.rank={lora[0]}", f"train.lora.alpha={lora[1]}", "train.micro_batch_size=8"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 160, 96])
    p.add_argument("--steps", type=int, default=3, help="timed micro-steps per model (after one warm-up)")
    p.add_argument("--base", default="", help="an existing `make-tiny --arch fast-vlm` folder to reuse")
    a = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    world = WORK / "world"
    if not world.is_dir():
        make_world(world, seed=0)
    results = {}
    mid = make_tiny(WORK / "mid", "qwen2-vl", "mid")
    results["mid qwen2-vl, 56 px"] = run("mid", model_overrides(mid, 56, (8, 16)), world, a.steps)
    base = Path(a.base) if a.base else WORK / "fast-vlm"
    if not (base / "config.json").is_file():
        make_tiny(base, "fast-vlm", text_model="smollm2")
    for size in a.sizes:
        path = sized_copy(base, size, WORK / f"fast-vlm-{size}")
        tokens = (size // TOWER_STRIDE) ** 2
        name = f"fast-vlm, {size} px ({tokens} image tokens)"
        results[name] = run(name, model_overrides(path, size, (16, 32)), world, a.steps)
    info = dict(
        date=datetime.datetime.now().isoformat(timespec="minutes"),
        machine=f"{platform.machine()}, {multiprocessing.cpu_count()} cores, torch {torch.__version__}",
        results=results,
    )
    OUT.mkdir(exist_ok=True)
    (OUT / "fastvlm_cost.json").write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
