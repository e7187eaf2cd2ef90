"""The sweep's fused metrics (one softmax per cache block, top-1 agreement from two maxima, clean
rows read in place) against an independent float64 computation: ties, -inf / +inf / NaN logits,
segments that cross chunk and block boundaries, and identical logits giving a KL of exactly 0."""

import pytest
import surprise_probe.interventions.steered_metrics as sweep
import torch


def _reference(logits, clean_logits):
    """Per token, in float64: entropy, KL(steered || clean), first-index argmax agreement."""
    log_probs = torch.log_softmax(logits.double(), -1)
    clean = torch.log_softmax(clean_logits.double(), -1)
    probs = log_probs.exp()
    zero = torch.zeros_like(probs)
    entropy = -torch.where(probs > 0, probs * log_probs, zero).sum(-1)
    kl = torch.where(probs > 0, probs * (log_probs - clean), zero).sum(-1)
    agree = (log_probs.argmax(-1) == clean.argmax(-1)).double()
    return entropy, kl, agree


def test_top1_agreement_follows_argmax_through_ties():
    # Rows: clean top-1 (index 5) is the unique max; ties with an earlier index (argmax takes
    # the earlier one: disagree); ties with a later index (agree); not a max; a three-way tie.
    clean = torch.zeros(5, 12)
    clean[:, 5] = 3.0
    logits = torch.zeros(5, 12)
    logits[0, 5] = 2.0
    logits[1, [2, 5]] = 2.0
    logits[2, [5, 9]] = 2.0
    logits[3, 7] = 2.0
    logits[4, [0, 5, 11]] = 2.0
    _, _, agree, finite = sweep.steered_metrics(logits, torch.log_softmax(clean, -1))
    assert agree.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert agree.tolist() == _reference(logits, clean)[2].tolist()
    assert finite.all()


@pytest.mark.parametrize("cache", [2**20, 40, 1])
def test_token_metrics_match_float64_with_given_clean_top1(monkeypatch, cache):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(11, 40, generator=generator) * 4
    clean_logits = logits + torch.randn(11, 40, generator=generator) * 0.5
    logits[6, :5] = float("-inf")  # probability exactly 0: entropy/KL terms are 0, row not finite
    monkeypatch.setattr(sweep, "CACHE_ELEMENTS", cache)
    clean_log_probs, clean_top1, clean_entropy = sweep.clean_distribution(clean_logits)
    entropy, kl, agree, finite = sweep.steered_metrics(logits, clean_log_probs, clean_top1)
    ref_entropy, ref_kl, ref_agree = _reference(logits, clean_logits)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=0, atol=1e-5)
    torch.testing.assert_close(kl.double(), ref_kl, rtol=0, atol=1e-5)
    assert agree.tolist() == ref_agree.tolist()
    assert finite.tolist() == [i != 6 for i in range(11)]
    torch.testing.assert_close(clean_log_probs.double(), torch.log_softmax(clean_logits.double(), -1), rtol=0, atol=1e-5)
    torch.testing.assert_close(clean_entropy.double(), _reference(clean_logits, clean_logits)[0], rtol=0, atol=1e-5)
    assert clean_top1.tolist() == clean_logits.argmax(-1).tolist()


def test_identical_logits_give_kl_exactly_zero_and_full_agreement():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(30, 64, generator=generator) * 5
    clean_log_probs, clean_top1, clean_entropy = sweep.clean_distribution(logits)
    entropy, kl, agree, finite = sweep.steered_metrics(logits.clone(), clean_log_probs, clean_top1)
    assert kl.tolist() == [0.0] * 30
    assert agree.tolist() == [1.0] * 30
    assert entropy.tolist() == clean_entropy.tolist()
    assert finite.all()


@pytest.mark.parametrize(("chunk", "cache"), [(2**24, 2**20), (5 * 48, 2 * 48), (48, 48), (7 * 48, 3 * 48)])
def test_row_metrics_sums_per_row_across_chunks(monkeypatch, chunk, cache):
    """Rows with different numbers of scored tokens, chunk and block edges falling inside rows:
    per-row sums equal the float64 per-token values summed by hand."""
    generator = torch.Generator().manual_seed(5)
    vocab, n_rows, n_pos = 48, 4, 9
    logits = torch.randn(n_rows, n_pos, vocab, generator=generator) * 3
    scored = torch.rand(n_rows, n_pos, generator=generator) > 0.3
    scored[2] = False
    scored[2, 4] = True  # a row with a single scored token
    clean_logits = torch.randn(int(scored.sum()), vocab, generator=generator) * 3
    logits[3, int(torch.nonzero(scored[3])[0])] = float("inf")  # row 3 is not finite
    monkeypatch.setattr(sweep, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(sweep, "CACHE_ELEMENTS", cache)
    entropy, kl, agree, finite = sweep.row_metrics(logits, scored, torch.log_softmax(clean_logits, -1))
    ref = _reference(logits[scored], clean_logits)
    rows = torch.nonzero(scored)[:, 0]
    for row in range(3):
        mine = rows == row
        for got, want in zip((entropy, kl, agree), ref):
            assert float(got[row]) == pytest.approx(float(want[mine].sum()), abs=1e-4)
    assert finite.tolist() == [True, True, True, False]


def test_nan_logit_marks_the_row_not_finite():
    logits = torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(6))
    logits[1, 1, 7] = float("nan")
    scored = torch.ones(3, 2, dtype=torch.bool)
    clean = torch.log_softmax(torch.randn(6, 16, generator=torch.Generator().manual_seed(7)), -1)
    *_, finite = sweep.row_metrics(logits, scored, clean)
    assert finite.tolist() == [True, False, True]
