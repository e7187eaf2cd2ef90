"""The metrics run in cache-sized blocks inside each chunk of positions: every split of chunks and
blocks must give the float64 reference, -inf logits (probability exactly 0) included."""

import pytest
import torch

import surprise_probe.core.forward.metrics as metrics


def _reference(logits, tokens):
    log_probs = torch.log_softmax(logits.double(), -1)
    probs = log_probs.exp()
    entropy = -torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)).sum(-1)
    surprise = torch.full(tokens.shape, float("nan"), dtype=torch.float64)
    surprise[:, 1:] = -log_probs[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    return surprise, entropy


@pytest.mark.parametrize(("budget", "cache"), [(2**24, 2**20), (3 * 7 * 50, 50), (7 * 50, 120), (1, 1)])
def test_blocks_and_chunks_give_the_reference(monkeypatch, budget, cache):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=generator) * 4
    logits[1, 2, :10] = float("-inf")  # ten tokens with probability exactly 0
    logits[2, 5, 3] = float("-inf")
    tokens = torch.randint(10, 50, (3, 7), generator=generator)
    monkeypatch.setattr(metrics, "CACHE_ELEMENTS", cache)
    surprise, entropy = metrics.chunked_surprise_and_entropy(
        lambda start, stop: logits[:, start:stop], tokens, 50, budget=budget
    )
    ref_surprise, ref_entropy = _reference(logits, tokens)
    assert torch.isfinite(entropy).all()
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=0, atol=2e-5)
    torch.testing.assert_close(surprise.double(), ref_surprise, rtol=0, atol=2e-5, equal_nan=True)
    assert torch.isnan(surprise[:, 0]).all() and not torch.isnan(surprise[:, 1:]).any()


@pytest.mark.parametrize("cache", [2**20, 64, 1])
def test_sweep_token_metrics_blocks_give_the_reference(monkeypatch, cache):
    import surprise_probe.interventions.steered_metrics as sweep

    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 40, generator=generator) * 3
    logits[4, :7] = float("-inf")  # steered probabilities exactly 0 at seven tokens
    clean = torch.log_softmax(torch.randn(9, 40, generator=generator) * 3, -1)
    monkeypatch.setattr(sweep, "CACHE_ELEMENTS", cache)
    entropy, kl, agree, finite = sweep.steered_metrics(logits, clean)
    log_probs = torch.log_softmax(logits.double(), -1)
    probs = log_probs.exp()
    zero = torch.zeros_like(probs)
    torch.testing.assert_close(entropy.double(), -torch.where(probs > 0, probs * log_probs, zero).sum(-1),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(kl.double(), torch.where(probs > 0, probs * (log_probs - clean.double()), zero).sum(-1),
                               rtol=0, atol=1e-5)
    assert agree.tolist() == (log_probs.argmax(-1) == clean.argmax(-1)).double().tolist()
    assert finite.tolist() == [i != 4 for i in range(9)]
