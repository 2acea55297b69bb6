"""MLLM-as-a-judge: s = e_yes / (e_yes + e_no) from the logits of "Yes" and "No" at the first generated
position, for (query, candidate) pairs. Two backends behind one `score(pairs)`:

- `TransformersJudge`: the reference; one batched forward, `logits_to_keep=1`, left padding so the
  last column is the answer position.
- `VLLMJudge`: production; `allowed_token_ids=[Yes, No]` with one logprob step, prefix caching on (the
  instruction + query prefix is shared by the ~51 prompts of a query, which arrive together).

A pair is `(query_text, query_image, cand_text, cand_image)`, images as paths relative to image_root
("" for none) or PIL images.

Both also count each call's tokens (`score_tokens`): its prompt tokens, those served from vLLM's prefix
cache (none in transformers), and the image tokens among each, read from what the backend computed
(vLLM's `RequestOutput.prompt_token_ids` / `num_cached_tokens`, the processor's `input_ids`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from unime_ray.config import JudgeConfig, ModelConfig
from unime_ray.data.schemas import JUDGE_COSTS
from unime_ray.models import processing_unime
from unime_ray.models.backbone import detect_arch, load_model, load_processor, resolve_dtype
from unime_ray.models.embedder import PHI3_IMAGE_TOKEN, load_image
from unime_ray.models.prompts import answer_token_ids, judge_content, render

Pair = tuple[str, object, str, object]


# The per-call token counts `score_tokens` returns, in this column order.
TOKEN_COLUMNS = tuple(n for n in JUDGE_COSTS.names if n.endswith("_tokens"))
# The placeholder a processor repeats once per image token: Qwen2-VL / Qwen2.5-VL, LLaVA-OneVision.
IMAGE_PLACEHOLDERS = ("<|image_pad|>", "<image>")


# Backbones the vLLM backend refuses, and why. FastVLM: vLLM (0.32) has no FastVLM model of its own, and
# its transformers backend would need timm, hence torchvision, importable in every engine process it
# spawns, which CPU machines lack (`fastvlm.import_timm` works only inside our own processes).
VLLM_UNSUPPORTED = {
    "fast-vlm": "vLLM has no FastVLM implementation, and its transformers backend cannot import the timm "
    "vision tower in its engine processes",
}


def check_vllm_backbone(path: str | Path) -> None:
    """Raise a ValueError naming the architecture and the alternative when vLLM cannot serve `path`."""
    arch = detect_arch(path)
    if arch in VLLM_UNSUPPORTED:
        raise ValueError(
            f"judge.backend=vllm: {path} is a {arch} model; {VLLM_UNSUPPORTED[arch]}. "
            "Use judge.backend=transformers for it"
        )


def image_token_id(tokenizer) -> int | None:
    """Id of the token that stands for one image token in a processed prompt (None: a text-only model)."""
    vocab = tokenizer.get_vocab()
    return next((vocab[t] for t in IMAGE_PLACEHOLDERS if t in vocab), None)


class PromptBuilder:
    """A judge's prompts as its engine receives them: the rendered text of a (query, candidate) pair in
    the setting's prompt variant with the candidate's text capped, its images, and its token counts.
    Shared by the judges and by `mining.agree.cost`, which replays the prompts without a model."""

    def __init__(
        self,
        model: ModelConfig,
        image_root: str | Path,
        tokenizer,
        prompt: str = "paper",
        max_candidate_tokens: int = 0,
    ):
        self.model_cfg, self.image_root, self.tokenizer = model, image_root, tokenizer
        self.prompt, self.max_candidate_tokens = prompt, max_candidate_tokens
        self.yes, self.no = answer_token_ids(tokenizer)
        self.image_token = image_token_id(tokenizer)

    def cap(self, text: str) -> str:
        """The candidate's text cut to `max_candidate_tokens` tokens of this tokenizer (MMEB's image tag
        removed first, as the prompt does); unchanged when shorter or without a cap."""
        if self.max_candidate_tokens <= 0:
            return text
        ids = self.tokenizer.encode(text.replace(PHI3_IMAGE_TOKEN, "").strip(), add_special_tokens=False)
        if len(ids) <= self.max_candidate_tokens:
            return text
        return self.tokenizer.decode(ids[: self.max_candidate_tokens])

    def text(self, pair: Pair) -> str:
        """The rendered prompt of a pair (one image placeholder per image, as the processor receives it)."""
        q_text, q_image, c_text, c_image = pair
        content = judge_content(q_text, bool(q_image), self.cap(c_text), bool(c_image), self.prompt)
        return render(self.tokenizer, content)

    def build(self, pair: Pair) -> tuple[str, list]:
        images = [
            load_image(im, self.image_root, self.model_cfg.image_size) for im in (pair[1], pair[3]) if im
        ]
        return self.text(pair), images

    def count(self, ids: Sequence[int], cached: int) -> tuple[int, int, int, int]:
        """TOKEN_COLUMNS of one call from its prompt token ids, of which the first `cached` came from the
        prefix cache (a cache hit is always a prefix of the prompt)."""
        ids = np.asarray(ids)
        is_image = ids == self.image_token if self.image_token is not None else np.zeros(len(ids), bool)
        return len(ids), cached, int(is_image.sum()), int(is_image[:cached].sum())


class TransformersJudge(PromptBuilder):
    """Also the reranker's pointwise scorer: pass its (fine-tuned) `model` to reuse one in memory."""

    def __init__(
        self,
        cfg: ModelConfig,
        image_root: str | Path = "",
        model=None,
        prompt: str = "paper",
        max_candidate_tokens: int = 0,
    ):
        self.processor = load_processor(cfg.path, padding_side="left")
        self.model = model if model is not None else load_model(cfg.path, cfg.dtype, cfg.adapter)
        super().__init__(cfg, image_root, self.processor.tokenizer, prompt, max_candidate_tokens)

    def score(self, pairs: Sequence[Pair]) -> np.ndarray:
        return self.score_tokens(pairs)[0]

    @torch.no_grad()
    def score_tokens(self, pairs: Sequence[Pair]) -> tuple[np.ndarray, np.ndarray]:
        """Scores and, per pair, its TOKEN_COLUMNS (no prefix cache here: nothing is cached)."""
        out, tokens = [], []
        bs = self.model_cfg.batch_size
        for start in range(0, len(pairs), bs):
            prompts, images = zip(*(self.build(p) for p in pairs[start : start + bs]), strict=True)
            flat = [im for ims in images for im in ims]
            batch = self.processor(text=list(prompts), images=flat or None, return_tensors="pt", padding=True)
            batch = {k: v.to(self.model.device) for k, v in batch.items()}
            logits = self.model(**batch, logits_to_keep=1).logits[:, -1, [self.yes, self.no]].float()
            out.append(torch.softmax(logits, dim=-1)[:, 0].cpu().numpy())
            ids, mask = batch["input_ids"].cpu().numpy(), batch["attention_mask"].cpu().numpy().astype(bool)
            tokens += [self.count(row[keep], 0) for row, keep in zip(ids, mask, strict=True)]
        if not out:
            return np.zeros(0, np.float32), np.zeros((0, len(TOKEN_COLUMNS)), np.int64)
        return np.concatenate(out).astype(np.float32), np.asarray(tokens, np.int64)


def remote_code_needed(cfg: JudgeConfig) -> bool:
    """Whether vLLM must be let run code from the model folder (`trust_remote_code`): only with its
    transformers backend (`vllm_model_impl=transformers`) over a folder that carries this package's
    `processing_unime.py` (the processor without a video half that `make-tiny` folders name in their
    `auto_map`, for machines without torchvision), and only when that file is byte for byte the
    installed one, so what vLLM runs is code already installed here. Every other folder loads without
    remote code. Raises ValueError for a folder whose copy differs (stale, or changed by someone)."""
    if cfg.vllm_model_impl != "transformers":
        return False
    own = Path(processing_unime.__file__)
    copy = Path(cfg.model.path) / own.name
    if not copy.is_file():
        return False
    if copy.read_bytes() != own.read_bytes():
        raise ValueError(
            f"{copy} differs from the installed {own}: vLLM would run it as remote code; copy the "
            "installed file over it (or rebuild the folder with make-tiny)"
        )
    return True


class VLLMJudge(PromptBuilder):
    def __init__(self, cfg: JudgeConfig, image_root: str | Path = ""):
        from transformers import AutoTokenizer

        check_vllm_backbone(cfg.model.path)
        from vllm import LLM, SamplingParams

        # The engine lives in this actor, on one node: its processes talk over loopback. Unset, vLLM takes
        # the machine's outward address for its internal message queue, which then listens beyond it.
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, local_files_only=True)
        super().__init__(cfg.model, image_root, tokenizer, cfg.prompt, cfg.max_candidate_tokens)
        impl = {} if cfg.vllm_model_impl == "auto" else {"model_impl": cfg.vllm_model_impl}
        if cfg.block_size:
            impl["block_size"] = cfg.block_size
        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
        self.llm = LLM(
            model=cfg.model.path,
            # a make-tiny folder's processor class (auto_map) loads only with remote code allowed
            trust_remote_code=remote_code_needed(cfg),
            dtype=dtype[resolve_dtype(cfg.model.dtype)],
            max_model_len=cfg.model.max_length,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enable_prefix_caching=cfg.prefix_caching,
            logprobs_mode="processed_logprobs",
            limit_mm_per_prompt={"image": 2},
            seed=0,
            **impl,
        )
        self.params = SamplingParams(
            max_tokens=1, temperature=0.0, logprobs=2, allowed_token_ids=[self.yes, self.no]
        )

    def score(self, pairs: Sequence[Pair]) -> np.ndarray:
        return self.score_tokens(pairs)[0]

    def score_tokens(self, pairs: Sequence[Pair]) -> tuple[np.ndarray, np.ndarray]:
        """Scores and, per pair, its TOKEN_COLUMNS as the engine reports them: the prompt it processed and
        the number of those tokens it served from its prefix cache (`RequestOutput.num_cached_tokens`).
        The pairs go to the engine in one `generate` call, in order, so a query's calls share its prefix."""
        requests = []
        for pair in pairs:
            prompt, images = self.build(pair)
            requests.append({"prompt": prompt, "multi_modal_data": {"image": images}} if images else prompt)
        outs = self.llm.generate(requests, self.params, use_tqdm=False)
        scores, tokens = [], []
        for o in outs:
            lp = o.outputs[0].logprobs[0]
            yes, no = math.exp(lp[self.yes].logprob), math.exp(lp[self.no].logprob)
            scores.append(yes / (yes + no))
            tokens.append(self.count(o.prompt_token_ids or [], o.num_cached_tokens or 0))
        return np.asarray(scores, dtype=np.float32), np.asarray(tokens, np.int64).reshape(
            -1, len(TOKEN_COLUMNS)
        )


def make_judge(cfg: JudgeConfig, image_root: str | Path = ""):
    if cfg.backend == "vllm":
        return VLLMJudge(cfg, image_root)
    if cfg.backend == "transformers":
        return TransformersJudge(
            cfg.model, image_root, prompt=cfg.prompt, max_candidate_tokens=cfg.max_candidate_tokens
        )
    raise ValueError(f"judge.backend={cfg.backend!r} has no model to load (precomputed scores are read)")
