"""MLLM-as-a-judge: s = e_yes / (e_yes + e_no) from the logits of "Yes" and "No" at the first generated
position, for (query, candidate) pairs. Two backends behind one `score(pairs)`:

- `TransformersJudge`: the reference; one batched forward, `logits_to_keep=1`, left padding so the
  last column is the answer position.
- `VLLMJudge`: production; `allowed_token_ids=[Yes, No]` with one logprob step, prefix caching on (the
  instruction + query prefix is shared by the ~51 prompts of a query, which arrive together).

A pair is `(query_text, query_image, cand_text, cand_image)`, images as paths relative to image_root
("" for none) or PIL images.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from unime_ray.config import JudgeConfig, ModelConfig
from unime_ray.models.backbone import load_model, load_processor, resolve_dtype
from unime_ray.models.embedder import load_image
from unime_ray.models.prompts import answer_token_ids, judge_content, render

Pair = tuple[str, object, str, object]


class _PromptBuilder:
    def __init__(self, model: ModelConfig, image_root: str | Path, tokenizer):
        self.model_cfg, self.image_root, self.tokenizer = model, image_root, tokenizer
        self.yes, self.no = answer_token_ids(tokenizer)

    def build(self, pair: Pair) -> tuple[str, list]:
        q_text, q_image, c_text, c_image = pair
        images = [
            load_image(im, self.image_root, self.model_cfg.image_size) for im in (q_image, c_image) if im
        ]
        return render(self.tokenizer, judge_content(q_text, bool(q_image), c_text, bool(c_image))), images


class TransformersJudge(_PromptBuilder):
    """Also the reranker's pointwise scorer: pass its (fine-tuned) `model` to reuse one in memory."""

    def __init__(self, cfg: ModelConfig, image_root: str | Path = "", model=None):
        self.processor = load_processor(cfg.path, padding_side="left")
        self.model = model if model is not None else load_model(cfg.path, cfg.dtype, cfg.adapter)
        super().__init__(cfg, image_root, self.processor.tokenizer)

    @torch.no_grad()
    def score(self, pairs: Sequence[Pair]) -> np.ndarray:
        out = []
        bs = self.model_cfg.batch_size
        for start in range(0, len(pairs), bs):
            prompts, images = zip(*(self.build(p) for p in pairs[start : start + bs]), strict=True)
            flat = [im for ims in images for im in ims]
            batch = self.processor(text=list(prompts), images=flat or None, return_tensors="pt", padding=True)
            batch = {k: v.to(self.model.device) for k, v in batch.items()}
            logits = self.model(**batch, logits_to_keep=1).logits[:, -1, [self.yes, self.no]].float()
            out.append(torch.softmax(logits, dim=-1)[:, 0].cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


class VLLMJudge(_PromptBuilder):
    def __init__(self, cfg: JudgeConfig, image_root: str | Path = ""):
        from transformers import AutoTokenizer
        from vllm import LLM, SamplingParams

        # The engine lives in this actor, on one node: its processes talk over loopback. Unset, vLLM takes
        # the machine's outward address for its internal message queue, which then listens beyond it.
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, local_files_only=True)
        super().__init__(cfg.model, image_root, tokenizer)
        impl = {} if cfg.vllm_model_impl == "auto" else {"model_impl": cfg.vllm_model_impl}
        if cfg.block_size:
            impl["block_size"] = cfg.block_size
        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
        self.llm = LLM(
            model=cfg.model.path,
            # the model folder's processor class (auto_map) is loaded only with remote code allowed
            trust_remote_code=cfg.vllm_model_impl == "transformers",
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
        requests = []
        for pair in pairs:
            prompt, images = self.build(pair)
            requests.append({"prompt": prompt, "multi_modal_data": {"image": images}} if images else prompt)
        outs = self.llm.generate(requests, self.params, use_tqdm=False)
        scores = []
        for o in outs:
            lp = o.outputs[0].logprobs[0]
            yes, no = math.exp(lp[self.yes].logprob), math.exp(lp[self.no].logprob)
            scores.append(yes / (yes + no))
        return np.asarray(scores, dtype=np.float32)


def make_judge(cfg: JudgeConfig, image_root: str | Path = ""):
    if cfg.backend == "vllm":
        return VLLMJudge(cfg, image_root)
    if cfg.backend == "transformers":
        return TransformersJudge(cfg.model, image_root)
    raise ValueError(f"judge.backend={cfg.backend!r} has no model to load (precomputed scores are read)")
