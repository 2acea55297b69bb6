"""`unime-ray judge-agree`: how far two judge settings agree, and what each costs, measured on a seeded
sample of mined queries in minutes, before paying for a full mining run with either.

    unime-ray judge-agree --config A.yaml --against B.yaml --queries 200
    unime-ray judge-agree --config A.yaml --against-set judge.model.image_size=448 --queries 200
    unime-ray judge-agree --config A.yaml --against runs/x/mining/judge/results   # a run's own scores
    unime-ray judge-agree --config A.yaml --against scores.parquet                # anyone's score file

A *setting* is a `judge` config section (model, image size, prompt, candidate cap, backend: vllm or
transformers) or precomputed scores: a file of `query_id, cand_id, score` rows (Parquet or JSONL) or a
folder of judge score files (a run's `mining/judge/results`). Setting A is `--config` with `--set`;
setting B is `--against` (a config file, whose `judge` section is used, or a score file or folder) with
`--against-set` on top, or A's config with `--against-set` alone.

The queries come from A's run (`run.output_dir`): its retrieve stage (run first when missing). A seeded
random sample of `--queries` of its queries, each with its positive and its retrieved candidates, is
written as judge request shards exactly as the judge stage writes them, and each setting judges them
through the judge stage's own code (`run_judge`: a Ray Data actor pool of vLLM or transformers judges,
or the precomputed-score join). Written to `--out` (default `<run.output_dir>/judge_agree`):
`agree.json`, `agree.md` and `scatter.png` (B's score against A's for every judged pair). Reported:

- rank agreement per query: Spearman and Kendall (tau-b) between the two settings' scores of the query's
  judged pairs (its positive and its candidates); median, interquartile range and mean over queries
  (a query whose scores are constant under one setting has no rank correlation and is counted apart);
- the false-negative filter (`s > s_pos - beta`, `sample.survives`): each candidate dropped by both
  settings, by A only, by B only or by neither; their agreement and Cohen's kappa;
- the hard negatives `sample.sample_negatives` picks from each setting's scores (the run's beta, interval,
  counts and seed): their Jaccard overlap per query (distinct ids); the fallback decision of each query;
- per setting, from the token counts the backends record (`token_report`): prompt, computed and image
  tokens per call, the share served from vLLM's prefix cache, the judge's busy seconds;
- per setting, the projected GPU-hours of the full run (the run's judge calls, or `--calls`): each call's
  prompt is rebuilt with the setting's tokenizer, prompt variant and cap, its images expanded to their
  token count at `--project-image-size` (Qwen2-VL's (px/28)^2; default: the measured size), and the
  prefix cache replayed over the calls in the judge stage's order (`simulate_prefix_cache`, KV blocks of
  `--project-block-size`); the computed tokens per call then cost 2 FLOPs per parameter per token (plus
  the vision encoder's on each computed image token) at the prefill throughput docs/mining.md documents
  (989 TFLOP/s dense bf16 per H100 at 40% MFU). Where vLLM measured the cache (a set `judge.block_size`),
  the same replay at the measured size is reported next to it, as a check of the replay.

One module per concern, each readable alone:

- `stats`: the agreement statistics (rank correlations, overlap, kappa, AUC, spreads);
- `replay`: the sampling rules replayed on both settings' scores (`compare`);
- `cost`: the cost model: prompt tokens, the prefix-cache replay, FLOPs and GPU-hours (`project`);
- `sample`: the seeded sample of queries as judge request shards (`write_sample`);
- `settings`: judging the sample with one setting and measuring it (`run_setting`, `measure_setting`);
- `report`: the typed result (`AgreeResult`), agree.json, agree.md and scatter.png;
- `run`: `judge_agree`, the steps in order; `cli`: the command line (`main`).
"""

from unime_ray.mining.agree.cli import main
from unime_ray.mining.agree.cost import project, simulate, simulate_prefix_cache
from unime_ray.mining.agree.replay import Rules, compare
from unime_ray.mining.agree.run import judge_agree
from unime_ray.mining.agree.sample import sample_query_ids, write_sample
from unime_ray.mining.agree.stats import (
    auc,
    average_ranks,
    jaccard,
    kendall_tau_b,
    spearman,
    spread,
    two_way,
)

__all__ = [
    "Rules",
    "auc",
    "average_ranks",
    "compare",
    "jaccard",
    "judge_agree",
    "kendall_tau_b",
    "main",
    "project",
    "sample_query_ids",
    "simulate",
    "simulate_prefix_cache",
    "spearman",
    "spread",
    "two_way",
    "write_sample",
]
