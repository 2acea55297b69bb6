"""The embedder: prompt formatting, last-token pooling, and batch invariance."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from unime_ray.config import ModelConfig
from unime_ray.models.embedder import Embedder, format_text, last_token_pool

QWEN_PH = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.mark.parametrize(
    "text, has_image, expected",
    [
        ("<|image_1|>\nRepresent the given image.", True, f"{QWEN_PH}\nRepresent the given image."),
        ("Represent the given image.", True, f"{QWEN_PH}\nRepresent the given image."),
        ("", True, QWEN_PH),
        ("a red circle", False, "a red circle"),
        ("<|image_1|> stray token", False, "stray token"),
    ],
)
def test_format_text(text, has_image, expected):
    assert format_text(text, has_image, QWEN_PH) == expected


def test_last_token_pool_every_padding_pattern():
    torch.manual_seed(0)
    hidden = torch.randn(4, 5, 3)
    mask = torch.tensor(
        [
            [1, 1, 1, 1, 1],  # no padding -> position 4
            [0, 0, 1, 1, 1],  # left padding -> 4
            [1, 1, 1, 0, 0],  # right padding -> 2
            [0, 1, 1, 0, 0],  # both sides -> 2
        ]
    )
    expected = torch.stack([hidden[0, 4], hidden[1, 4], hidden[2, 2], hidden[3, 2]])
    assert torch.equal(last_token_pool(hidden, mask), expected)


def _records():
    red = Image.new("RGB", (64, 64), (255, 0, 0))
    blue = Image.new("RGB", (40, 80), (0, 0, 255))
    return [
        {"text": "<|image_1|>\nRepresent the given image for classification", "image": red},
        {"text": "a much longer text only record about a green triangle at the top", "image": None},
        {"text": "short", "image": ""},
        {"text": "", "image": blue},
        {"text": "Find me an everyday image that matches the given caption: a red circle", "image": None},
    ]


@pytest.fixture(params=["qwen2-vl", "llava-ov"])
def embedder(request, tiny_qwen, tiny_llava):
    path = {"qwen2-vl": tiny_qwen, "llava-ov": tiny_llava}[request.param]
    return Embedder(ModelConfig(path=str(path), image_size=56, batch_size=8))


def test_mixed_batch_equals_one_at_a_time(embedder):
    records = _records()
    together = embedder.embed(records)
    alone = np.stack([embedder.embed([r])[0] for r in records])
    assert together.dtype == np.float32 and together.shape == (len(records), embedder.dim)
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    # Small batches that split the records differently give the same vectors too.
    np.testing.assert_allclose(embedder.embed(records, batch_size=2), together, atol=1e-5)


def test_embedding_is_last_token_hidden_state(embedder):
    """Independent computation: an unpadded single forward, hidden state of the final position."""
    records = _records()
    got = embedder.embed(records)
    for i, record in enumerate(records):
        batch = embedder.collate([record])
        assert batch["attention_mask"].all()  # a single record has no padding
        with torch.no_grad():
            hidden = embedder.model(**batch, output_hidden_states=True).hidden_states[-1]
        want = F.normalize(hidden[0, -1], dim=-1).numpy()
        np.testing.assert_allclose(got[i], want, atol=1e-5)


def test_right_padding_gives_the_same_vectors(embedder):
    records = _records()
    left = embedder.embed(records)
    embedder.processor.tokenizer.padding_side = "right"
    try:
        right = embedder.embed(records)
    finally:
        embedder.processor.tokenizer.padding_side = "left"
    batch = embedder.collate(records)  # left padding puts every last real token in the final column
    assert batch["attention_mask"][:, -1].all()
    np.testing.assert_allclose(left, right, atol=1e-4)


def test_distinct_inputs_give_distinct_vectors(embedder):
    vecs = embedder.embed(_records())
    sims = vecs @ vecs.T
    assert (sims[~np.eye(len(vecs), dtype=bool)] < 0.999).all()


def test_images_load_from_root(embedder, tmp_path):
    Image.new("RGB", (30, 30), (0, 255, 0)).save(tmp_path / "g.png")
    embedder.image_root = tmp_path
    from_path = embedder.embed([{"text": "x", "image": "g.png"}])
    from_pil = embedder.embed([{"text": "x", "image": Image.open(tmp_path / "g.png")}])
    np.testing.assert_allclose(from_path, from_pil, atol=1e-6)
