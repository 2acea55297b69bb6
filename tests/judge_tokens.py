"""Prompt token counts of judge calls made with the tokenizer alone, to check the counts the judge backends
record (tests/test_judge_agree.py for transformers, tests/test_mine_job.py for vLLM). The prompt is
written out here as the tiny Qwen2-VL chat template renders it, not built with unime_ray's prompt code;
each image's one `<|image_pad|>` becomes `tokens_per_image` tokens in the processed prompt."""

from __future__ import annotations

from unime_ray.models.prompts import JUDGE_INSTRUCTION

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def _side(text: str, image: str | None) -> str:
    return (IMAGE if image else "") + text.replace("<|image_1|>", "").strip()


def tokenizer_counts(rows: list[dict], tokenizer, tokens_per_image: int) -> list[tuple[int, int]]:
    """(prompt tokens, image tokens) of each JUDGE_REQUESTS row's judge call (the paper's prompt, no cap)."""
    out = []
    for r in rows:
        text = (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"{JUDGE_INSTRUCTION}\nQuery: {_side(r['qry_text'], r['qry_image'])}"
            f"\nCandidate: {_side(r['cand_text'], r['cand_image'])}<|im_end|>\n<|im_start|>assistant\n"
        )
        images = bool(r["qry_image"]) + bool(r["cand_image"])
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert ids.count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == images
        out.append((len(ids) + images * (tokens_per_image - 1), images * tokens_per_image))
    return out
