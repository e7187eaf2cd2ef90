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
def hf_smollm():
    from transformers import AutoModelForCausalLM

    from surprise_probe.models import embedded_folder

    return AutoModelForCausalLM.from_pretrained(embedded_folder("smollm2-135m-instruct"), dtype=torch.float32).eval()


def _hf_metrics(hf_model, ids: np.ndarray):
    with torch.no_grad():
        logits = hf_model(torch.tensor(ids)[None]).logits.double().numpy()
    return reference(logits, ids[None])


def test_matches_hugging_face_transformers(smollm, hf_smollm):
    items = [*TEXTS, CONVERSATION]
    run = sp.capture(smollm, items, batch_size=4, layers=[0], progress=False)
    worst = 0.0
    for i, item in enumerate(items):
        ids = sp.encode(smollm, item).token_ids
        ref_s, ref_h = _hf_metrics(hf_smollm, ids)
        rows = run.column("sequence_ids") == i
        np.testing.assert_array_equal(run.column("token_ids")[rows], ids)
        worst = max(worst, np.nanmax(np.abs(run.column("input_surprise")[rows] - ref_s[0])))
        worst = max(worst, np.max(np.abs(run.column("output_entropy")[rows] - ref_h[0])))
    assert worst <= 1e-4, f"max |ours - HF| = {worst:.2e} nats"


def test_no_extra_bos_and_conversation_span(smollm):
    ids = sp.encode(smollm, TEXTS[0]).token_ids
    assert ids.tolist() == smollm.tokenizer(TEXTS[0])["input_ids"]  # no BOS prepended by TL
    enc = sp.encode(smollm, CONVERSATION)
    assert smollm.tokenizer.decode(enc.token_ids[enc.scored]) == CONVERSATION[1]["content"]
    # SmolLM2's template adds its default system message; we keep it (identically for every source).
    assert "You are a helpful AI assistant named SmolLM" in smollm.tokenizer.decode(enc.token_ids)


def test_bridge_backend_agrees(smollm, hf_smollm):
    bridge = sp.load_model("smollm2-135m-instruct", backend="bridge", progress=False)
    assert type(bridge).__name__ == "TransformerBridge"
    a = sp.token_metrics(smollm, TEXTS[1])
    b = sp.token_metrics(bridge, TEXTS[1])
    np.testing.assert_allclose(a.output_entropy, b.output_entropy, atol=1e-4)
    np.testing.assert_allclose(a.input_surprise, b.input_surprise, atol=1e-4, equal_nan=True)
