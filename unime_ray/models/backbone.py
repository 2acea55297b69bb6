"""Loading the MLLM backbones (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, FastVLM) from a local folder.

One loader for real checkpoints and the tiny test models alike. The processor is assembled from its
parts (tokenizer + PIL image processor + our video-less processor class) rather than through
`AutoProcessor`, because the stock processors insist on a video processor that needs torchvision,
which CPU installs lack; the parts are the same files a real checkpoint ships. FastVLM's processor is
LLaVA's, which has no video half; its timm vision tower is loaded through `fastvlm.import_timm`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

Arch = Literal["qwen2-vl", "qwen2.5-vl", "llava-ov", "fast-vlm"]

_MODEL_TYPES: dict[str, Arch] = {
    "qwen2_vl": "qwen2-vl",
    "qwen2_5_vl": "qwen2.5-vl",
    "llava_onevision": "llava-ov",
    "fast_vlm": "fast-vlm",
}

# What each backbone's text uses to mark where an image goes (MMEB texts carry Phi-3.5-V's token).
IMAGE_PLACEHOLDER: dict[Arch, str] = {
    "qwen2-vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2.5-vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "llava-ov": "<image>",
    "fast-vlm": "<image>",
}


def detect_arch(path: str | Path) -> Arch:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a local Hugging Face model folder")
    model_type = json.loads(cfg_file.read_text()).get("model_type", "")
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"{cfg_file}: model_type {model_type!r} is not one of {sorted(_MODEL_TYPES)}")
    return _MODEL_TYPES[model_type]


def _prepare(path: str | Path) -> Arch:
    """The folder's arch, after what loading it needs: FastVLM's config names a timm vision tower, and
    transformers imports timm for it (`fastvlm.import_timm` makes that work without torchvision)."""
    arch = detect_arch(path)
    if arch == "fast-vlm":
        from unime_ray.models.fastvlm import import_timm

        import_timm()
    return arch


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' is bfloat16 where CUDA is present and float32 on CPU (CPU bf16 matmuls are slow)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_processor(path: str | Path, padding_side: str = "left"):
    from transformers import AutoTokenizer

    from unime_ray.models import processing_unime

    arch = _prepare(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = padding_side
    if arch == "llava-ov":
        from transformers import LlavaOnevisionImageProcessorPil as ImageProcessor

        cls = processing_unime.UnimeLlavaOnevisionProcessor
    elif arch == "fast-vlm":
        from transformers import CLIPImageProcessorPil as ImageProcessor
        from transformers import LlavaProcessor as cls
    else:
        from transformers import Qwen2VLImageProcessorPil as ImageProcessor

        cls = (
            processing_unime.UnimeQwen2VLProcessor
            if arch == "qwen2-vl"
            else processing_unime.UnimeQwen2_5_VLProcessor
        )
    image_processor = ImageProcessor.from_pretrained(path, local_files_only=True)
    # Processor settings a checkpoint keeps in processor_config.json (LLaVA-OV: num_image_tokens, ...).
    extra_file = Path(path) / "processor_config.json"
    extra = json.loads(extra_file.read_text()) if extra_file.is_file() else {}
    extra = {k: v for k, v in extra.items() if k not in ("processor_class", "auto_map", "chat_template")}
    return cls(image_processor, tokenizer, chat_template=tokenizer.chat_template, **extra)


def load_model(path: str | Path, dtype: str = "auto", adapter: str = "", device: str | None = None):
    """The backbone as `*ForConditionalGeneration` (LM head kept: the judge and reranker need it),
    with an optional peft adapter applied on top, in eval mode."""
    from transformers import AutoModelForImageTextToText

    _prepare(path)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=resolve_dtype(dtype), local_files_only=True, use_safetensors=True
    )
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()
