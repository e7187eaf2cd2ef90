import numpy as np
import pytest
import torch

from surprise_probe.core.forward.metrics import (
    bootstrap_mean,
    input_surprise,
    output_entropy,
    surprise_and_entropy,
)


def reference(logits: np.ndarray, tokens: np.ndarray):
    """Independent float64 computation straight from the definitions (no log_softmax)."""
    shifted = logits - logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(-1, keepdims=True))
    log_p = shifted - log_z
    p = np.exp(log_p)
    entropy = -(p * np.where(p > 0, log_p, 0.0)).sum(-1)
    surprise = np.full(tokens.shape, np.nan)
    for b in range(tokens.shape[0]):
        for t in range(1, tokens.shape[1]):
            surprise[b, t] = -log_p[b, t - 1, tokens[b, t]]
    return surprise, entropy


def test_matches_independent_computation():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=gen) * 4
    tokens = torch.randint(0, 50, (3, 7), generator=gen)
    surprise, entropy = surprise_and_entropy(logits, tokens)
    ref_s, ref_h = reference(logits.double().numpy(), tokens.numpy())
    assert np.isnan(surprise[:, 0]).all()
    np.testing.assert_allclose(surprise[:, 1:].numpy(), ref_s[:, 1:], atol=1e-5)
    np.testing.assert_allclose(entropy.numpy(), ref_h, atol=1e-5)
    # The single-metric functions take the log_softmax path; both agree to float32 rounding.
    np.testing.assert_allclose(input_surprise(logits, tokens)[:, 1:], surprise[:, 1:], atol=1e-5)
    np.testing.assert_allclose(output_entropy(logits), entropy, atol=1e-5)


def test_uniform_and_one_hot():
    tokens = torch.tensor([[0, 1, 2]])
    np.testing.assert_allclose(output_entropy(torch.zeros(1, 3, 8)), np.log(8), rtol=1e-6)
    np.testing.assert_allclose(input_surprise(torch.zeros(1, 3, 8), tokens)[0, 1:], np.log(8), rtol=1e-6)
    peaked = torch.full((1, 3, 8), -1e4)
    peaked[..., 1] = 1e4
    entropy = output_entropy(peaked)
    assert torch.isfinite(entropy).all() and entropy.abs().max() < 1e-6


def test_half_precision_logits_are_promoted():
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(1, 5, 300, generator=gen) * 8).half()
    tokens = torch.randint(0, 300, (1, 5), generator=gen)
    surprise, entropy = surprise_and_entropy(logits, tokens)
    assert surprise.dtype == torch.float32 and entropy.dtype == torch.float32
    ref_s, ref_h = reference(logits.double().numpy(), tokens.numpy())
    np.testing.assert_allclose(entropy.numpy(), ref_h, atol=1e-4)


def test_shape_mismatch_is_an_error(unchecked_shapes):
    with pytest.raises(ValueError, match="batch x pos"):
        input_surprise(torch.zeros(1, 3, 4), torch.zeros(1, 4, dtype=torch.long))


def test_bootstrap_resamples_groups():
    values = np.array([1.0, 1.0, 1.0, 5.0, np.nan])
    groups = np.array([0, 0, 0, 1, 1])
    ci = bootstrap_mean(values, groups, n_boot=500)
    assert ci.mean == pytest.approx(2.0)
    assert (ci.n_units, ci.n_tokens) == (2, 4)
    # Resampling the two sequences gives means 1 (both seq 0), 5 (both seq 1) or 2.
    assert ci.low == pytest.approx(1.0) and ci.high == pytest.approx(5.0)
    with pytest.raises(ValueError, match="no finite"):
        bootstrap_mean(np.array([np.nan]))


def test_left_padding_mask_makes_first_real_token_nan():
    logits = torch.zeros(1, 4, 8)
    tokens = torch.tensor([[0, 0, 3, 4]])
    surprise, _ = surprise_and_entropy(logits, tokens, torch.tensor([[0, 0, 1, 1]]))
    assert torch.isnan(surprise[0, :3]).all() and torch.isfinite(surprise[0, 3])


def test_masked_vocabulary_falls_back_safely():
    logits = torch.zeros(1, 3, 6)
    logits[..., 4:] = float("-inf")  # two tokens can never be produced
    surprise, entropy = surprise_and_entropy(logits, torch.tensor([[0, 1, 2]]))
    np.testing.assert_allclose(entropy.numpy(), np.log(4), rtol=1e-6)
    np.testing.assert_allclose(surprise[0, 1:].numpy(), np.log(4), rtol=1e-6)


def test_huge_vocabulary_stays_within_1e4_of_float64():
    """Gemma-sized vocabularies (262k) are computed in float64; float32 drifted by ~2e-4 nats there."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 3, 262_144, generator=gen) * 6
    tokens = torch.randint(0, 262_144, (1, 3), generator=gen)
    ref_s, ref_h = reference(logits.double().numpy(), tokens.numpy())
    surprise, entropy = surprise_and_entropy(logits, tokens)
    assert np.abs(entropy.numpy() - ref_h).max() < 1e-6
    assert np.nanmax(np.abs(surprise.numpy() - ref_s)) < 1e-6
