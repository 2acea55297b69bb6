"""Prompt templates of the judge and the reranker (paper's instructions, official wording).

Prompts are built as chat `content` parts (text and image) and rendered with the backbone's own chat
template, so the same prompt reaches transformers and vLLM, and Qwen2-VL and LLaVA-OV alike.
MMEB's image token `<|image_1|>` is removed from texts: the image goes in as its own part.
"""

from __future__ import annotations

import re

from unime_ray.models.embedder import PHI3_IMAGE_TOKEN

JUDGE_INSTRUCTION = (
    "I will provide you with a query and a candidate. Please evaluate whether the candidate meets the "
    "requirements of the query. If it does, respond with 'Yes'; if it doesn't, respond with 'No'."
)


def _side(text: str, has_image: bool) -> list[dict]:
    parts: list[dict] = [{"type": "image"}] if has_image else []
    text = text.replace(PHI3_IMAGE_TOKEN, "").strip()
    return parts + ([{"type": "text", "text": text}] if text else [])


# `judge.prompt`: the instruction each variant puts before the query. Both keep the query-first layout
# and the Yes/No answer; "short" is ours, for measuring how much the wording moves the scores.
JUDGE_PROMPTS = {
    "paper": JUDGE_INSTRUCTION,
    "short": "Does the candidate meet the requirements of the query? Answer 'Yes' or 'No'.",
}


def judge_content(
    q_text: str, q_has_image: bool, c_text: str, c_has_image: bool, prompt: str = "paper"
) -> list[dict]:
    """Instruction, then the query, then the candidate: everything before the candidate is shared by the
    ~51 prompts of one query, which is what vLLM's prefix cache reuses. `prompt` names the instruction
    (`JUDGE_PROMPTS`)."""
    return (
        [{"type": "text", "text": f"{JUDGE_PROMPTS[prompt]}\nQuery: "}]
        + _side(q_text, q_has_image)
        + [{"type": "text", "text": "\nCandidate: "}]
        + _side(c_text, c_has_image)
    )


def render(tokenizer, content: list[dict]) -> str:
    """One user turn through the model's chat template, ending where the assistant's answer starts."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def answer_token_ids(tokenizer, words: tuple[str, ...] = ("Yes", "No")) -> list[int]:
    """Token ids of single-token answers; a tokenizer that splits one of them is an error."""
    ids = []
    for word in words:
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"{word!r} is {len(encoded)} tokens in this tokenizer; the judge needs one")
        ids.append(encoded[0])
    return ids


LIST_INSTRUCTION = (
    "I will provide you with a query followed by multiple candidates in the format: (1) cand1 (2) cand2, "
    "etc. Each candidate is independent of the others. Evaluate each candidate against the query, and "
    "respond with the number corresponding to the candidate that best meets the requirements of the query."
)


def listwise_content(q_text: str, q_has_image: bool, cands: list[tuple[str, bool]]) -> list[dict]:
    """The reranker's listwise prompt: the query, then the candidates numbered from 1. The answer it is
    trained to give is `listwise_answer(position)`."""
    parts = [{"type": "text", "text": f"{LIST_INSTRUCTION}\nQuery: "}] + _side(q_text, q_has_image)
    parts.append({"type": "text", "text": "\nCandidates:"})
    for i, (text, has_image) in enumerate(cands, start=1):
        parts.append({"type": "text", "text": f" ({i}) "})
        parts += _side(text, has_image)
    return parts


def listwise_answer(position: int) -> str:
    """Answer text for the candidate at 0-based `position`."""
    return f"Ans: ({position + 1})"


def parse_listwise_answer(text: str, n: int) -> int | None:
    """0-based position named by a generated answer ('Ans: (3)' -> 2), or None when there is no valid one."""
    match = _ANSWER.search(text)
    if match is None:
        return None
    position = int(match.group(1)) - 1
    return position if 0 <= position < n else None


_ANSWER = re.compile(r"\((\d+)\)")
