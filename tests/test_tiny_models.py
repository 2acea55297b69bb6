"""The tiny models are real Qwen2-VL / LLaVA-OneVision checkpoints in miniature."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoTokenizer

from unime_ray.models.backbone import IMAGE_PLACEHOLDER, detect_arch, load_processor
from unime_ray.models.tiny import make_tiny


@pytest.fixture(params=["qwen2-vl", "llava-ov"])
def tiny(request, tiny_qwen, tiny_llava):
    return request.param, {"qwen2-vl": tiny_qwen, "llava-ov": tiny_llava}[request.param]


def test_loads_from_folder_like_a_real_checkpoint(tiny):
    arch, path = tiny
    assert detect_arch(path) == arch
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    expected = {
        "qwen2-vl": "Qwen2VLForConditionalGeneration",
        "llava-ov": "LlavaOnevisionForConditionalGeneration",
    }
    assert type(model).__name__ == expected[arch]
    text = model.config.text_config
    assert text.hidden_size // text.num_attention_heads >= 32  # vLLM CPU attention has no head size 16
    if arch == "qwen2-vl":
        assert sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads // 2


def test_tokenizer_yes_no_single_tokens_and_chat_template(tiny):
    arch, path = tiny
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    yes, no = tok.encode("Yes", add_special_tokens=False), tok.encode("No", add_special_tokens=False)
    assert len(yes) == 1 and len(no) == 1 and yes != no
    assert tok.decode(yes) == "Yes" and tok.decode(no) == "No"
    text = "Query: a red circle on the left"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # byte-level BPE round-trips
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert f"<|im_start|>user\n{IMAGE_PLACEHOLDER[arch]}" in rendered
    for special in ("<|im_start|>", "<|im_end|>", IMAGE_PLACEHOLDER[arch].split(">")[0] + ">"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1


def test_processor_expands_image_tokens_and_model_runs(tiny):
    arch, path = tiny
    proc = load_processor(path)
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    img = Image.new("RGB", (56, 56), (255, 0, 0))
    batch = proc(text=[IMAGE_PLACEHOLDER[arch] + "a red square"], images=[img], return_tensors="pt")
    image_token = model.config.image_token_id if arch == "qwen2-vl" else model.config.image_token_index
    assert (batch["input_ids"] == image_token).sum() > 1  # the one placeholder became several tokens
    logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(proc.tokenizer))
    assert torch.isfinite(logits).all()


def test_build_is_deterministic_by_seed(tmp_path):
    a = load_file(make_tiny(tmp_path / "a", "qwen2-vl", seed=3) / "model.safetensors")
    b = load_file(make_tiny(tmp_path / "b", "qwen2-vl", seed=3) / "model.safetensors")
    c = load_file(make_tiny(tmp_path / "c", "qwen2-vl", seed=4) / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_folder_registers_videoless_processor_for_vllm(tiny):
    _, path = tiny
    cfg = json.loads((path / "processor_config.json").read_text())
    module, cls = cfg["auto_map"]["AutoProcessor"].split(".")
    assert (path / f"{module}.py").is_file() and cls in (path / f"{module}.py").read_text()


def test_answer_spread_scales_only_the_lm_head_25x(tmp_path):
    spread = load_file(make_tiny(tmp_path / "a", "qwen2-vl", seed=3) / "model.safetensors")
    usual_dir = make_tiny(tmp_path / "b", "qwen2-vl", seed=3, spread_answers=False)
    usual = load_file(usual_dir / "model.safetensors")
    assert torch.allclose(spread["lm_head.weight"], 25 * usual["lm_head.weight"])
    assert all(torch.equal(spread[k], usual[k]) for k in spread if k != "lm_head.weight")
    assert usual["lm_head.weight"].std() < 0.05  # the usual init (std 0.02), not the spread one
