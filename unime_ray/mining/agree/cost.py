"""The cost model of a judge setting: its prompts' tokens, the share vLLM's prefix cache serves, and the
GPU-hours of a full run, readable and changeable on its own (docs/mining.md explains the figures).

- `prompt_tokens` rebuilds each judge prompt as an engine sees it (the setting's tokenizer, prompt
  variant and candidate cap), each image expanded to its token count;
- `simulate_prefix_cache` replays a prefix cache of whole KV blocks over the prompts in the judge
  stage's order, and `simulate` sums the result as the judge stage's `token_report` does;
- `project` prices the computed tokens per call: 2 FLOPs per parameter per token (plus the vision
  encoder's on each computed image token) at one H100's dense bf16 prefill throughput and MFU;
- `project_setting` is the projection of one setting of `unime-ray judge-agree` at a chosen image size
  and block size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from unime_ray.config import JudgeConfig
from unime_ray.mining.judge import summarize_tokens

# Prefill throughput of one H100 as docs/mining.md's cost model takes it.
H100_TFLOPS = 989.0  # dense bf16
PREFILL_MFU = 0.40
# The judge projected by default: the paper's Qwen2.5-VL-7B, language model and vision encoder.
LLM_PARAMS_B = 7.6
VISION_PARAMS_B = 0.675
# Qwen2-VL / Qwen2.5-VL: 14 px patches merged 2x2, so one image token = 4 patches through the vision
# encoder, and a side of `px` pixels gives round(px / 28) ** 2 tokens.
PATCHES_PER_IMAGE_TOKEN = 4
PX_PER_IMAGE_TOKEN = 28
PROJECT_BLOCK = 16  # KV block size of the projected run's prefix cache: vLLM's on GPUs


def image_tokens_at(px: int) -> int:
    """Image tokens of a px x px image in Qwen2-VL / Qwen2.5-VL (672 -> 576, 448 -> 256, 336 -> 144)."""
    return round(px / PX_PER_IMAGE_TOKEN) ** 2


def simulate_prefix_cache(prompts: Iterable[Sequence], block: int) -> list[int]:
    """For each prompt in order, the tokens a prefix cache like vLLM's serves it: whole `block`-token
    blocks, each matched together with everything before it (a hash chain) against the blocks of every
    earlier prompt, stopping at the first miss and leaving at least the last token to compute. Every
    full block of a prompt is cached once it has been computed (no eviction)."""
    seen: set[int] = set()
    out = []
    for seq in prompts:
        chain, cached, hit = 0, 0, True
        limit = (len(seq) - 1) // block  # blocks that may come from the cache
        for b in range(len(seq) // block):
            chain = hash((chain, tuple(seq[b * block : (b + 1) * block])))
            if hit and b < limit and chain in seen:
                cached += block
            else:
                hit = False
            seen.add(chain)
        out.append(cached)
    return out


def prompt_tokens(requests: pa.Table, judge: JudgeConfig, image_tokens: int) -> Iterator[list]:
    """Each request's judge prompt as an engine sees it, in the order the judge stage sends them: the
    token ids of the rendered prompt (the setting's model tokenizer, prompt variant and candidate cap),
    each image's placeholder expanded to `image_tokens` tokens that stand for that image (as vLLM keys
    a block holding image tokens by the image's hash)."""
    from transformers import AutoTokenizer

    from unime_ray.models.judge import PromptBuilder

    tokenizer = AutoTokenizer.from_pretrained(judge.model.path, local_files_only=True)
    builder = PromptBuilder(judge.model, "", tokenizer, judge.prompt, judge.max_candidate_tokens)
    columns = ("qry_text", "qry_image", "cand_text", "cand_image")
    for pair in zip(*(requests[c].to_pylist() for c in columns), strict=True):
        images = iter([im for im in (pair[1], pair[3]) if im])
        seq: list = []
        for token in tokenizer(builder.text(pair), add_special_tokens=False).input_ids:
            if token == builder.image_token:
                image = next(images)
                seq += [("image", image, k) for k in range(image_tokens)]
            else:
                seq.append(token)
        yield seq


def simulate(requests: pa.Table, judge: JudgeConfig, image_tokens: int, block: int) -> dict:
    """The judge stage's token counts (as `token_report`) for `requests` with each image `image_tokens`
    tokens long, served by a prefix cache of `block`-token blocks (`simulate_prefix_cache`); also split
    by the candidate's kind (`by_candidate`: with an image, text only), the part of a call no cache shares."""
    prompts = list(prompt_tokens(requests, judge, image_tokens))
    names = ("prompt_tokens", "cached_tokens", "image_tokens", "cached_image_tokens")
    counts = np.zeros((len(prompts), len(names)), dtype=np.int64)
    for i, (seq, cached) in enumerate(zip(prompts, simulate_prefix_cache(prompts, block), strict=True)):
        is_image = [isinstance(t, tuple) for t in seq]
        counts[i] = (len(seq), cached, sum(is_image), sum(is_image[:cached]))

    def summary(rows: np.ndarray) -> dict:
        return summarize_tokens(dict(zip(names, (int(x) for x in rows.sum(axis=0)), strict=True)), len(rows))

    image = pc.not_equal(requests["cand_image"], "").to_numpy(zero_copy_only=False)
    return {
        **summary(counts),
        "by_candidate": {"image": summary(counts[image]), "text": summary(counts[~image])},
    }


@dataclass
class Assumptions:
    """What a projection takes as given: model sizes (billions of parameters), one GPU's throughput
    (TFLOP/s) and the share of it prefill reaches (MFU); hence the text tokens one GPU computes a second."""

    llm_params_b: float = LLM_PARAMS_B
    vision_params_b: float = VISION_PARAMS_B
    tflops: float = H100_TFLOPS
    mfu: float = PREFILL_MFU
    text_tokens_per_gpu_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.text_tokens_per_gpu_s = self.tflops * 1e12 * self.mfu / (2e9 * self.llm_params_b)


@dataclass
class Projection:
    """The cost of `calls` judge calls at the per-call computed tokens (and image tokens among them)."""

    calls: float
    computed_tokens_per_call: float
    computed_image_tokens_per_call: float
    tokens_computed: float
    flops: float
    gpu_hours: float
    assumptions: Assumptions


def project(
    tokens: dict,
    calls: float,
    *,
    llm_params_b: float = LLM_PARAMS_B,
    vision_params_b: float = VISION_PARAMS_B,
    tflops: float = H100_TFLOPS,
    mfu: float = PREFILL_MFU,
) -> Projection | None:
    """GPU-hours of `calls` judge calls at the computed tokens per call of `tokens` (`token_report` or
    `simulate`), at `tflops` x `mfu` per GPU: 2 FLOPs per language-model parameter per computed token,
    plus 2 per vision-encoder parameter per patch of each computed image token (Qwen2-VL: 4 patches).
    None when `tokens` counts no call."""
    n = tokens.get("calls") or 0
    if not n:
        return None
    computed = tokens["computed_tokens"] / n
    image = tokens["computed_image_tokens"] / n
    flops = 2e9 * llm_params_b * computed + 2e9 * vision_params_b * PATCHES_PER_IMAGE_TOKEN * image
    return Projection(
        calls=calls,
        computed_tokens_per_call=computed,
        computed_image_tokens_per_call=image,
        tokens_computed=calls * computed,
        flops=calls * flops,
        gpu_hours=calls * flops / (tflops * 1e12 * mfu) / 3600,
        assumptions=Assumptions(llm_params_b, vision_params_b, tflops, mfu),
    )


@dataclass
class CandidateCost:
    """The replayed calls of one kind of candidate (with an image, or text only), per call."""

    calls: int
    prompt_tokens_per_call: float | None
    computed_tokens_per_call: float | None
    computed_image_tokens_per_call: float | None


@dataclass
class SettingProjection:
    """One setting's projection: its prompts replayed with images of `image_tokens_per_image` tokens
    (`image_size` px, or None for the measured size) through a cache of `block_size`-token blocks, and
    the cost of the full run's calls at what the replay computed."""

    cost: Projection
    image_size: int | None
    image_tokens_per_image: int
    block_size: int
    prompt_tokens_per_call: float | None
    cache_hit_rate: float | None
    by_candidate: dict[str, CandidateCost]

    def to_json(self) -> dict:
        """One flat object: the cost's fields beside the replay's."""
        replay = asdict(self)
        return {**replay.pop("cost"), **replay}


def project_setting(
    requests: pa.Table,
    judge: JudgeConfig,
    image_size: int | None,
    measured_image_tokens: float,
    block: int,
    calls: float,
    *,
    llm_params_b: float = LLM_PARAMS_B,
    vision_params_b: float = VISION_PARAMS_B,
) -> SettingProjection | None:
    """The projection of `judge` on the sample's `requests` to `calls` calls, at images of `image_size`
    px (None: `measured_image_tokens` per image, as the judge counted them), with a cache of `block`-token
    blocks, for a judge of `llm_params_b` + `vision_params_b` billion parameters; None when no request
    was replayed."""
    size = image_tokens_at(image_size) if image_size else round(measured_image_tokens)
    sim = simulate(requests, judge, size, block)
    cost = project(sim, calls, llm_params_b=llm_params_b, vision_params_b=vision_params_b)
    if cost is None:
        return None
    by_candidate = {
        kind: CandidateCost(
            calls=part["calls"],
            prompt_tokens_per_call=part["prompt_tokens_per_call"],
            computed_tokens_per_call=part["computed_tokens_per_call"],
            computed_image_tokens_per_call=part["computed_image_tokens"] / part["calls"]
            if part["calls"]
            else None,
        )
        for kind, part in sim["by_candidate"].items()
    }
    return SettingProjection(
        cost, image_size, size, block, sim["prompt_tokens_per_call"], sim["cache_hit_rate"], by_candidate
    )
