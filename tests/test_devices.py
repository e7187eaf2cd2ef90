"""Models across devices: ``load_model(device_map=..., n_devices=..., max_memory=...)``.

What runs here (CPU only): a Hugging Face ``device_map`` that places every module on ``cpu``
(one ``""`` entry, one entry per module, and ``"auto"`` with a ``max_memory`` budget) loads
through the TransformerBridge, the options reach ``from_pretrained`` unchanged, and capture, the
steering sweep and patching through that model equal a plain single-device load of the same
weights (1e-5: the two backends differ only by float32 summation order). ``n_devices=1`` on the
HookedTransformer path is the plain load. Bad combinations fail before anything loads.

What needs GPUs skips with a message naming what it would check: layers split over 2 GPUs by
``n_devices=2`` and by ``device_map``/``max_memory``, and the bfloat16 chain and seeded
sampling on CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from surprise_probe.interventions import SteeringDirection, activation_patching, dose_response

from surprise_probe.core.capture.run import capture
from surprise_probe.core.models.backends import hooked_transformer_available
from surprise_probe.core.models.loading import load_model
from tests.conftest import needs_hooked_transformer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "A cat sat on the mat and looked at the moon."]
CONVERSATIONS = [
    [{"role": "user", "content": "Hello world, how are you today?"},
     {"role": "assistant", "content": "Rivers flow to the sea; mountains rise to the sky."}],
    [{"role": "user", "content": "Numbers like 12, 345 and 6789 appear in text too."},
     {"role": "assistant", "content": "A cat sat on the mat and looked at the moon."}],
]
EVERY_MODULE_ON_CPU = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                       "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def reference(tiny_hf_folder):
    """The plain single-device load on the CPU (HookedTransformer on TransformerLens 3.x, the bridge on 4.x)."""
    return load_model(tiny_hf_folder, device="cpu", progress=False)


@pytest.fixture(scope="module", params=["one entry", "every module", "auto with max_memory"])
def mapped(request, tiny_hf_folder):
    """The same weights placed by a Hugging Face device_map, every module on the CPU."""
    options = {
        "one entry": {"device_map": {"": "cpu"}},
        "every module": {"device_map": EVERY_MODULE_ON_CPU},
        "auto with max_memory": {"device_map": "auto", "max_memory": {"cpu": "2GiB"}},
    }[request.param]
    return load_model(tiny_hf_folder, progress=False, **options)


def test_device_map_loads_through_the_bridge_with_every_module_on_cpu(mapped, reference):
    assert type(mapped).__name__ == "TransformerBridge"
    assert type(reference).__name__ == ("HookedTransformer" if hooked_transformer_available() else "TransformerBridge")
    assert {p.device.type for p in mapped.parameters()} == {"cpu"}
    assert mapped.cfg.n_layers == reference.cfg.n_layers


def test_device_map_and_max_memory_reach_from_pretrained(tiny_hf_folder, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("device_map", "max_memory", "dtype")})
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_model(tiny_hf_folder, device_map=EVERY_MODULE_ON_CPU, max_memory={"cpu": "2GiB"}, dtype="bfloat16",
               progress=False)
    load_model(tiny_hf_folder, device="cpu", progress=False)
    assert seen == [
        {"device_map": EVERY_MODULE_ON_CPU, "max_memory": {"cpu": "2GiB"}, "dtype": torch.bfloat16},
        {"device_map": None, "max_memory": None, "dtype": torch.float32},
    ]


def test_capture_through_a_device_map_equals_the_single_device_load(mapped, reference):
    a, b = (capture(m, TEXTS, progress=False) for m in (reference, mapped))
    assert a.hooks == b.hooks and a.n_tokens == b.n_tokens
    for hook in a.hooks:
        np.testing.assert_allclose(b.activations(hook), a.activations(hook), atol=1e-5, rtol=0)
    for column in ("input_surprise", "output_entropy"):
        np.testing.assert_allclose(b.column(column), a.column(column), atol=1e-5, rtol=0)


def test_steering_and_patching_through_a_device_map_equal_the_single_device_load(mapped, reference):
    hook = "blocks.0.hook_resid_post"
    d = torch.randn(int(reference.cfg.d_model), generator=torch.Generator().manual_seed(0))
    direction = SteeringDirection(d / d.norm(), hook, 2.0)
    sweeps = [dose_response(m, CONVERSATIONS, direction, [-4.0, 0.0, 4.0], random_directions=1, n_boot=20,
                            progress=False) for m in (reference, mapped)]
    for key in ("entropy", "kl", "top1_agreement"):
        np.testing.assert_allclose(getattr(sweeps[1], key), getattr(sweeps[0], key), atol=1e-5, rtol=0)
    assert np.asarray(sweeps[0].kl).max() > 1e-4  # the steering did something at all
    pairs = [(CONVERSATIONS[0], CONVERSATIONS[1])]
    patched = [activation_patching(m, pairs, hooks=[hook], groups=("response",), components=("all",), n_boot=20,
                                   progress=False) for m in (reference, mapped)]
    np.testing.assert_allclose(patched[1].entropy_patched["all"], patched[0].entropy_patched["all"], atol=1e-5)
    assert abs(patched[1].entropy_destination - patched[0].entropy_destination) <= 1e-5


def test_n_devices_one_is_the_plain_hooked_load(tiny_hf_folder, reference):
    needs_hooked_transformer("n_devices= splits a HookedTransformer's layers; a bridge is placed by device_map= "
                             "(tested above)")
    model = load_model(tiny_hf_folder, device="cpu", n_devices=1, backend="hooked", progress=False)
    assert model.cfg.n_devices == 1
    tokens = torch.as_tensor([[5, 17, 42, 7, 99]])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"device_map": {"model.layers.0": "disk"}}, "device_map['model.layers.0'] = 'disk' is not supported"),
        ({"device_map": {}}, "device_map is an empty dict"),
        ({"device_map": "everywhere"}, "device_map 'everywhere' is not supported"),
        ({"max_memory": {"cpu": "1GiB"}}, "max_memory only applies with device_map="),
        ({"n_devices": 0}, "n_devices must be a whole number >= 1, got 0"),
        ({"device_map": {"": "cpu"}, "device": "cpu"}, "pass device='cpu' or device_map=, not both"),
        # TransformerLens 4.x has no HookedTransformer: backend='hooked' is refused first, as early
        ({"device_map": {"": "cpu"}, "backend": "hooked"},
         "use n_devices= for backend='hooked'" if hooked_transformer_available()
         else "backend='hooked' needs TransformerLens 3.x"),
    ],
)
def test_bad_device_options_fail_before_loading(tiny_hf_folder, options, expected, monkeypatch):
    from transformers import AutoModelForCausalLM

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", must_not_load)
    with pytest.raises(ValueError, match=expected.replace("[", r"\[").replace("(", r"\(")):
        load_model(tiny_hf_folder, progress=False, **options)


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has 2 GPUs; the GPU test runs instead")
def test_n_devices_beyond_the_visible_gpus_names_what_exists(tiny_hf_folder):
    with pytest.raises(ValueError, match=r"n_devices=2 was asked for, but only \d CUDA device\(s\) exist; devices here"):
        load_model(tiny_hf_folder, n_devices=2, progress=False)


# --- CUDA only: these run on a machine with GPUs and skip here, naming what they check -----------

def _need_gpus(n: int, checks: str) -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < n:
        pytest.skip(f"needs {n} CUDA GPU(s), found {count}: would check {checks}")


def test_cuda_n_devices_splits_the_layers_and_matches_one_device(tiny_hf_folder, reference):
    _need_gpus(2, "n_devices=2 puts block 0 on cuda:0 and block 1 on cuda:1 and capture equals the CPU load to 1e-4")
    model = load_model(tiny_hf_folder, n_devices=2, progress=False)
    devices = [next(block.parameters()).device for block in model.blocks]
    assert devices[0] == torch.device("cuda:0") and devices[-1] == torch.device("cuda:1")
    a, b = (capture(m, TEXTS, progress=False) for m in (reference, model))
    for hook in a.hooks:
        np.testing.assert_allclose(b.activations(hook), a.activations(hook), atol=1e-4, rtol=0)


def test_cuda_device_map_with_max_memory_spreads_modules(tiny_hf_folder, reference):
    _need_gpus(2, "device_map={layer 0: 0, layer 1: 1, ...} runs through the bridge across both GPUs and the "
                  "steering sweep equals the CPU load to 1e-4")
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
                  "model.norm": 1, "lm_head": 1}
    model = load_model(tiny_hf_folder, device_map=device_map, max_memory={0: "1GiB", 1: "1GiB"}, progress=False)
    assert {p.device.index for p in model.parameters()} == {0, 1}
    hook = "blocks.0.hook_resid_post"
    d = torch.randn(int(reference.cfg.d_model), generator=torch.Generator().manual_seed(0))
    direction = SteeringDirection(d / d.norm(), hook, 2.0)
    sweeps = [dose_response(m, CONVERSATIONS, direction, [-4.0, 4.0], random_directions=1, n_boot=20, progress=False)
              for m in (reference, model)]
    np.testing.assert_allclose(sweeps[1].entropy, sweeps[0].entropy, atol=1e-4, rtol=0)


def test_cuda_bfloat16_chain_and_seeded_sampling(tiny_hf_folder, reference):
    _need_gpus(1, "a bfloat16 model on cuda captures (stored float32), steers (both engines agree to 0.03 nats), "
                  "and samples the same tokens twice from one seed with generators and masks on the GPU")
    from surprise_probe.interventions.steered_generation import generate

    model = load_model(tiny_hf_folder, device="cuda", dtype="bfloat16", progress=False)
    run = capture(model, TEXTS, progress=False)
    assert run.activations(run.hooks[-1]).dtype == np.float32
    hook = "blocks.0.hook_resid_post"
    d = torch.randn(int(model.cfg.d_model), generator=torch.Generator().manual_seed(0))
    direction = SteeringDirection(d / d.norm(), hook, 2.0)
    batched, loop = (dose_response(model, CONVERSATIONS, direction, [-4.0, 4.0], random_directions=1, n_boot=20,
                                   batched=b, progress=False) for b in (True, False))
    np.testing.assert_allclose(batched.entropy, loop.entropy, atol=0.03, rtol=0)
    first, second = (generate(model, CONVERSATIONS[0][:1], max_new_tokens=6, temperature=1.0, seed=3,
                              stop_at_eos=False)[0] for _ in range(2))
    assert first.token_ids == second.token_ids
