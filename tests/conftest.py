"""Shared fixtures: tiny offline models on both TransformerLens backends."""

from __future__ import annotations

import warnings

import pytest
import torch

from surprise_probe.core.models.backends import (
    hooked_transformer_available,
    transformer_lens_version,
)
from surprise_probe.testing import tiny_llama_folder

warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread (and do not stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from surprise_probe.testing import tiny_tokenizer

    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def needs_hooked_transformer(what_runs: str = "the bridge variant of the test runs") -> None:
    """Skip, saying why, where this TransformerLens has no HookedTransformer (4.x); ``what_runs`` says
    what covers the same ground there (by default the test's bridge variant)."""
    if not hooked_transformer_available():
        pytest.skip(f"needs HookedTransformer, which TransformerLens {transformer_lens_version()} does not have "
                    f"(3.x only); {what_runs}")


@pytest.fixture(scope="session")
def tiny_hooked(tiny_tokenizer):
    from surprise_probe.testing import tiny_hooked_transformer

    needs_hooked_transformer()
    torch.manual_seed(0)
    return tiny_hooked_transformer(tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_bridge_model():
    from surprise_probe.testing import tiny_bridge

    return tiny_bridge()


@pytest.fixture(params=["hooked", "bridge"])
def tiny_model(request):
    """Run a test once per TransformerLens backend (the hooked one skips on TransformerLens 4.x)."""
    return request.getfixturevalue("tiny_hooked" if request.param == "hooked" else "tiny_bridge_model")


@pytest.fixture(scope="session")
def tiny_hf_folder(tmp_path_factory, tiny_tokenizer):
    """A random Llama saved as a local Hugging Face folder (what load_model reads)."""
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny-random-lm"), tiny_tokenizer, seed=1)[0]


@pytest.fixture(scope="module")
def tiny_llama(tiny_hf_folder):
    """A random Llama (RMSNorm, grouped-query attention) loaded as ``load_model`` does (HookedTransformer on 3.x)."""
    from surprise_probe.core.models.loading import load_model

    return load_model(str(tiny_hf_folder))


@pytest.fixture(params=["hooked", "bridge", "llama"])
def any_model(request):
    """Run a test on a LayerNorm HookedTransformer, a bridge and a Llama as ``load_model`` loads it
    (a HookedTransformer on TransformerLens 3.x, a bridge on 4.x)."""
    return request.getfixturevalue({"hooked": "tiny_hooked", "bridge": "tiny_bridge_model",
                                    "llama": "tiny_llama"}[request.param])


def random_steering(model, seed: int = 0, std: float = 1.5, hook: str = "blocks.0.hook_resid_post"):
    """A seeded random unit direction at ``hook`` as a SteeringDirection."""
    from surprise_probe.interventions import SteeringDirection

    d = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(seed))
    return SteeringDirection(d / d.norm(), hook, std)


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, how are you today?",
    "A cat sat on the mat.",
    "Numbers like 12, 345 and 6789 appear in text too, and rivers flow to the sea.",
    "Hi",
]

CONVERSATION = [
    {"role": "user", "content": "Hello world, how are you?"},
    {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
]


@pytest.fixture
def unchecked_shapes():
    """jaxtyping's runtime checks off for one test: for testing a function's own error message on
    input its annotations already refuse in the suite (users run without the checks)."""
    import jaxtyping

    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", before)
