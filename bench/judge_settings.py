"""Cheaper judge settings on the synthetic world, measured: tokens per call, prefix-cache hits, judge time,
and agreement with the reference setting (`unime-ray judge-agree`), with each setting's cost projected
to the paper's 33.8M calls for a 7B and a 2B judge.

    python bench/judge_settings.py                              # tiny judge (0.2M), 192 queries x top 50
    python bench/judge_settings.py --size small --queries 64    # 75M judge: times nearer compute-bound

Reference: vLLM (CPU build, Transformers modeling backend, KV blocks of 32 tokens), the judge's images at
84 px (9 image tokens: the synthetic stand-in for 672 px's 576; 56 px = 4 tokens stands for 448 px's 256,
the same 2.25 ratio), the paper's prompt, no cap. Every other setting changes one thing (the last all of
them) and is compared with the reference's scores, which are judged once; a second run of the reference
is the noise floor. The projection rescales each setting's measured image tokens to its real size.
Writes bench/results/judge_settings.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

from unime_ray.assets import prepare_synthetic, synthetic_overrides
from unime_ray.config import load_config
from unime_ray.mining.agree import judge_agree, project
from unime_ray.mining.pipeline import run_mining
from unime_ray.models.tiny import make_tiny
from unime_ray.ray_utils import init_ray

ROOT = Path(__file__).parents[1]
OUT = ROOT / "bench" / "results"
PAPER_CALLS = 662_000 * 51
JUDGES = {"7B": (7.6, 0.675), "2B": (1.5, 0.675)}  # language model, vision encoder (billions)
REFERENCE = ["judge.backend=vllm", "judge.block_size=32", "judge.model.image_size=84"]
SETTINGS = [  # name, overrides on the reference, real image size it stands for
    ("reference, judged again", [], 672),
    ("judge images 56 px (448 px)", ["judge.model.image_size=56"], 448),
    ("candidate text <= 8 tokens", ["judge.max_candidate_tokens=8"], 672),
    ("short prompt", ["judge.prompt=short"], 672),
    ("all three", ["judge.model.image_size=56", "judge.max_candidate_tokens=8", "judge.prompt=short"], 448),
]


# MMEB-train's 20 sets: 7 have image candidates (VisDial, CIRR, VisualNews_t2i, MSCOCO_t2i, NIGHTS, WebQA,
# MSCOCO grounding); with sets of similar size (an assumption), ~35% of the judge calls. The synthetic
# world has 1 of 4 (ShapesT2I).
MMEB_IMAGE_CANDIDATES = 7 / 20


def hours(projection: dict, image_share: float | None = None) -> dict:
    """H100-hours of the paper's calls at a projection's computed tokens per call, per judge size; with
    `image_share`, the per-kind figures reweighted to that share of calls with an image candidate."""
    per_call = {
        "calls": 1,
        "computed_tokens": projection["computed_tokens_per_call"],
        "computed_image_tokens": projection["computed_image_tokens_per_call"],
    }
    if image_share is not None:
        kinds = projection["by_candidate"]
        for key in per_call:
            if key != "calls":
                image, text = (kinds[k][f"{key}_per_call"] for k in ("image", "text"))
                per_call[key] = image_share * image + (1 - image_share) * text
    return {
        judge: project(per_call, PAPER_CALLS, llm_params_b=llm, vision_params_b=vision).gpu_hours
        for judge, (llm, vision) in JUDGES.items()
    } | {"computed_tokens_per_call": per_call["computed_tokens"]}


def rows_of(results: list[dict]) -> list[dict]:
    """The table's rows from the comparisons' results (agree.json), the reference first."""
    ref = results[0]["settings"]["A"]
    rows = [{"setting": "reference", **_costs(ref)}]
    for (name, extra, _), result in zip(SETTINGS, results, strict=True):
        s = result["agreement"]
        keys = ("spearman", "kendall", "false_negative_filter", "hard_negatives_jaccard", "fallback")
        rows.append(
            {
                "setting": name,
                "overrides": extra,
                **_costs(result["settings"]["B"]),
                **{k: s[k] for k in keys},
            }
        )
    return rows


def _costs(setting: dict) -> dict:
    return {
        "tokens": setting["tokens"],
        "projection": setting["projection"],
        "replayed": setting.get("simulated_as_measured"),
        "gpu_hours": hours(setting["projection"]),
        "gpu_hours_mmeb_mix": hours(setting["projection"], MMEB_IMAGE_CANDIDATES),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny", choices=["tiny", "small"], help="the judge model")
    p.add_argument("--queries", type=int, default=192, help="queries judged per setting (192 = all)")
    p.add_argument("--top-n", type=int, default=50)
    p.add_argument("--report-only", action="store_true", help="rebuild the table from the last run's results")
    a = p.parse_args()
    folders = [OUT / "judge-settings" / str(i) for i in range(len(SETTINGS))]
    if not a.report_only:
        run = OUT / "judge-settings-run"
        config = ROOT / "jobs/configs/tiny.yaml"
        common = [*synthetic_overrides(run), f"mining.top_n={a.top_n}"]
        cfg = load_config(config, common)
        prepare_synthetic(cfg)
        judge_path = run / "models" / f"judge-{a.size}"
        if not (judge_path / "config.json").is_file():
            make_tiny(judge_path, "qwen2-vl", size=a.size)
        init_ray()
        run_mining(cfg, ("retrieve",))
        base = [*common, *REFERENCE, f"judge.model.path={judge_path}"]
        # the reference's scores and token counts as judged in the first comparison, for the others
        judged = ["judge.backend=precomputed", f"judge.scores_path={folders[0] / 'A'}"]
        for i, ((_, extra, px), folder) in enumerate(zip(SETTINGS, folders, strict=True)):
            a_cfg = load_config(config, base + (judged if i else []))
            b_cfg = load_config(config, base + extra)
            judge_agree(a_cfg, b_cfg.judge, a.queries, folder, calls=PAPER_CALLS, image_sizes=(672, px))
        info = {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{os.cpu_count()} cores {platform.machine()}, load average {os.getloadavg()[0]:.1f}",
            "judge": f"Qwen2-VL {a.size} (random weights), vLLM CPU, float32",
        }
    else:
        info = {
            k: json.loads((OUT / "judge_settings.json").read_text())[k] for k in ("date", "machine", "judge")
        }
    results = [json.loads((folder / "agree.json").read_text()) for folder in folders]
    sample = results[0]["sample"]
    out = {
        **info,
        "sample": sample,
        "calls_per_query": sample["calls"] / sample["queries"],
        "rows": rows_of(results),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "judge_settings.json").write_text(json.dumps(out, indent=2))
    print(table(out))


def table(out: dict) -> str:
    head = [
        "setting",
        "prompt tok/call",
        "computed tok/call",
        "from cache",
        "replayed: from cache",
        "judge s",
        "Spearman median [IQR]",
        "FN-filter agreement (kappa)",
        "hard-neg Jaccard median",
        "paper scale: prompt tok/call",
        "from cache",
        "computed tok/call",
        "H100-h 7B",
        "H100-h 2B",
        "MMEB mix: computed tok/call",
        "H100-h 7B",
        "H100-h 2B",
    ]
    lines = [
        f"{out['date']}, {out['machine']}, {out['judge']}; {out['sample']['queries']} queries, "
        f"{out['sample']['calls']} calls ({out['calls_per_query']:.1f} per query)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in out["rows"]:
        t, p = r["tokens"], r["projection"]
        cells = [r["setting"], f"{t['prompt_tokens_per_call']:.1f}", f"{t['computed_tokens_per_call']:.1f}"]
        replayed = r.get("replayed")
        cells.append(f"{100 * t['cache_hit_rate']:.1f}%")
        cells.append(f"{100 * replayed['cache_hit_rate']:.1f}%" if replayed else "—")
        cells.append(f"{t['seconds']:.1f}")
        if "spearman" in r:
            sp, f, j = r["spearman"], r["false_negative_filter"], r["hard_negatives_jaccard"]
            kappa = "—" if f["kappa"] is None else f"{f['kappa']:.3f}"
            cells += [
                f"{sp['median']:.3f} [{sp['p25']:.3f}, {sp['p75']:.3f}]",
                f"{f['agreement']:.3f} ({kappa})",
            ]
            cells.append(f"{j['median']:.3f}")
        else:
            cells += ["—", "—", "—"]
        cells += [f"{p['prompt_tokens_per_call']:.0f}", f"{100 * p['cache_hit_rate']:.1f}%"]
        cells += [f"{p['computed_tokens_per_call']:.0f}", f"{r['gpu_hours']['7B']:.0f}"]
        cells.append(f"{r['gpu_hours']['2B']:.0f}")
        mix = r["gpu_hours_mmeb_mix"]
        cells += [f"{mix['computed_tokens_per_call']:.0f}", f"{mix['7B']:.0f}", f"{mix['2B']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
