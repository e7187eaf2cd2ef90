"""Zero-shot detectors in the policy gap: per-token quantities against raw logits, answers known by
construction (a reader's own greedy text vs the same tokens shuffled), Binoculars' availability."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from surprise_probe.analyses.policy.gap import policy_gap
from surprise_probe.analyses.policy.plots import all_figures
from surprise_probe.analyses.policy.prompts import GapPrompt, prefix_ids, text_response_ids
from surprise_probe.analyses.policy.reading import Reading, read_responses
from surprise_probe.analyses.policy.statistics import DETECTORS, response_statistics, summarize
from surprise_probe.analyses.policy.writers import sample_writer
from surprise_probe.core.forward import passes
from surprise_probe.core.forward.metrics import cross_entropy, next_token_statistics
from surprise_probe.core.text.encoding import Encoded, pad_batch, pad_id
from surprise_probe.testing import TINY_CORPUS, tiny_hooked_transformer
from surprise_probe.testing import tiny_tokenizer as tiny_tokenizer_of
from tests.conftest import needs_hooked_transformer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [GapPrompt(f"p{i}", text) for i, text in enumerate(TINY_CORPUS)]
NEW_KEYS = ("auroc_log_likelihood", "auroc_log_rank", "auroc_fast_detectgpt", "auroc_binoculars")


def _reference(log_probs: np.ndarray, target: int) -> tuple[float, float, float, float, float]:
    """(log p(x), log rank, entropy, mu, var) of one float64 row of log-probs, computed independently:
    rank from a stable sort, the variance as E[(log p)^2] - mu^2."""
    order = np.argsort(-log_probs, kind="stable")
    rank = int(np.flatnonzero(order == target)[0]) + 1
    kept = np.isfinite(log_probs)  # tokens of probability 0 (a -inf logit) add nothing
    p, log_p = np.exp(log_probs[kept]), log_probs[kept]
    mu = float((p * log_p).sum())
    return float(log_probs[target]), float(np.log(rank)), -mu, mu, float((p * log_p**2).sum() - mu**2)


def test_next_token_statistics_match_a_computation_from_raw_logits():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(40, 300, generator=generator)
    logits[3, 10:50] = float("-inf")  # masked tokens: probability 0, no NaN anywhere
    targets = torch.randint(0, 300, (40,), generator=generator)
    targets[3] = 7
    stats = next_token_statistics(logits, targets, block=7)  # blocks that do not divide the rows
    raw = logits.double()
    log_probs = (raw - torch.logsumexp(raw, -1, keepdim=True)).numpy()
    for row in range(40):
        expected = _reference(log_probs[row], int(targets[row]))
        got = [float(getattr(stats, name)[row]) for name in stats._fields]
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # rank 1 exactly for the argmax: log-rank 0
    top = next_token_statistics(logits, logits.argmax(-1))
    assert torch.all(top.log_rank == 0)
    observer = torch.randn(40, 300, generator=generator)
    expected = -(torch.softmax(observer.double(), -1) * torch.log_softmax(raw, -1)).sum(-1)
    got = cross_entropy(observer, logits, block=9)
    # Row 3: the observer gives mass to tokens the performer rules out, so the cross-entropy is +inf.
    assert torch.isposinf(got[3]) and torch.isposinf(expected[3])
    keep = torch.arange(40) != 3
    np.testing.assert_allclose(got[keep].numpy(), expected[keep].numpy(), atol=1e-5, rtol=0)


def _batch(model, lengths: list[tuple[int, int]], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    encoded = []
    for n, n_scored in lengths:
        ids = torch.randint(0, int(model.cfg.d_vocab), (n,), generator=generator).numpy()
        scored = np.zeros(n, bool)
        scored[n - n_scored :] = True
        encoded.append(Encoded(ids, scored, "token_ids"))
    return encoded, pad_batch(encoded, pad_id(model), "right")


def test_scored_metrics_match_a_full_forward_at_the_scored_positions_only(tiny_model, monkeypatch):
    unembedded = []
    real_unembed = passes.unembed
    monkeypatch.setattr(passes, "unembed", lambda model, residual: unembedded.append(residual.shape[0])
                        or real_unembed(model, residual))
    encoded, batch = _batch(tiny_model, [(12, 5), (9, 3), (15, 7)])
    metrics, _ = passes.scored_metrics(tiny_model, batch)
    n_scored = int(batch.scored.sum())
    assert metrics.n_unembedded == n_scored + len(encoded)  # each span plus the position before it
    if unembedded:  # HookedTransformer: only those rows of the final residual went through the unembedding
        assert sum(unembedded) == metrics.n_unembedded < batch.tokens.numel()
    with torch.no_grad():
        logits = tiny_model(batch.tokens, attention_mask=batch.attention_mask).double()
    log_probs = torch.log_softmax(logits, -1).numpy()
    for row, item in enumerate(encoded):
        for t in np.flatnonzero(item.scored):
            ll, log_rank, _, mu, var = _reference(log_probs[row, t - 1], int(item.token_ids[t]))
            entropy = -float((np.exp(log_probs[row, t]) * log_probs[row, t]).sum())
            got = [metrics.output_entropy[row, t], metrics.log_likelihood[row, t], metrics.log_rank[row, t],
                   metrics.expected_log_likelihood[row, t], metrics.log_likelihood_variance[row, t]]
            np.testing.assert_allclose([float(g) for g in got], [entropy, ll, log_rank, mu, var], atol=1e-5)
    outside = ~batch.scored
    for name in ("output_entropy", "log_likelihood", "log_rank", "expected_log_likelihood",
                 "log_likelihood_variance"):
        assert torch.isnan(getattr(metrics, name)[outside]).all()
    assert metrics.cross_entropy is None


def test_the_entropy_of_a_read_is_unchanged_by_the_detector_pass(tiny_hooked):
    encoded, batch = _batch(tiny_hooked, [(10, 4), (14, 6)], seed=3)
    with torch.no_grad():
        _, entropy, _ = passes.forward_metrics(tiny_hooked, batch)
    metrics, _ = passes.scored_metrics(tiny_hooked, batch)
    scored = batch.scored
    np.testing.assert_allclose(metrics.output_entropy[scored].numpy(), entropy[scored].numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def pair(tiny_tokenizer):
    """Two random readers sharing one tokenizer, and their gap over six prompts (Binoculars available)."""
    needs_hooked_transformer()
    reader = tiny_hooked_transformer(tokenizer=tiny_tokenizer, n_ctx=96, seed=1)
    observer = tiny_hooked_transformer(tokenizer=tiny_tokenizer, n_ctx=96, seed=7)
    prompts = [GapPrompt(p.id, p.prompt, "The cat sat on the mat." if i % 2 else None) for i, p in enumerate(PROMPTS)]
    result = policy_gap({"a": reader, "b": observer}, prompts, formats=["assistant"], max_new_tokens=8, n_boot=50,
                        progress=False)
    return reader, observer, prompts, result


def test_fast_detectgpt_and_binoculars_of_a_response_against_raw_logits(pair):
    reader, observer, prompts, result = pair
    reading = next(r for r in result.readings if (r.reader, r.source) == ("a", "writer:b") and len(r.entropy) > 2)
    assert reading.observer == "b"
    prefix = prefix_ids(reader, prompts[reading.prompt_index].prompt, "assistant")
    response = next(w for w in result.responses["b"] if w.prompt_index == reading.prompt_index)
    ids = text_response_ids(reader, response.text, "assistant")
    tokens = torch.tensor([prefix + ids])
    with torch.no_grad():
        p = torch.log_softmax(reader(tokens)[0].double(), -1)[len(prefix) - 1 : -1]
        q = torch.softmax(observer(tokens)[0].double(), -1)[len(prefix) - 1 : -1]
    target = torch.tensor(ids)
    ll = p.gather(-1, target[:, None])[:, 0]
    mu = (p.exp() * p).sum(-1)
    var = (p.exp() * p**2).sum(-1) - mu**2
    fast = float((ll - mu).sum() / var.sum().sqrt())
    binoculars = float(-ll.mean() / (-(q * p).sum(-1)).mean())
    stats = response_statistics(reading)
    assert stats["fast_detectgpt"] == pytest.approx(fast, abs=1e-5)
    assert stats["binoculars"] == pytest.approx(binoculars, abs=1e-5)
    assert stats["mean_log_likelihood"] == pytest.approx(float(ll.mean()), abs=1e-5)
    rank = 1 + (p > ll[:, None]).sum(-1)
    assert stats["mean_log_rank"] == pytest.approx(float(torch.log(rank.double()).mean()), abs=1e-5)


def test_every_detector_has_a_key_an_orientation_a_figure_and_a_line(pair, tmp_path):
    _, _, _, result = pair
    detectors = result.summary["detectors"]
    assert set(detectors) == set(DETECTORS) and all(d["on_policy"] and d["sign"] in (1, -1) for d in detectors.values())
    assert detectors["binoculars"]["available"] and detectors["binoculars"]["readers"]["a"]["observer"] == "b"
    row = result.comparison("a", "assistant", "writer:b")
    for key in NEW_KEYS:
        assert row[key]["available"] and 0 <= row[key]["auroc"] <= 1 and row[key]["n_pos"] == 6
    assert result.detector_aurocs("a", "assistant", "writer:b")["binoculars"]["observer"] == "b"
    paths = result.save(tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert all(key in saved["summary"]["comparisons"][0] for key in NEW_KEYS)
    first = saved["per_response"][0]
    assert {"mean_log_likelihood", "mean_log_rank", "fast_detectgpt", "binoculars", "observer"} <= set(first)
    assert "detector_aurocs" in all_figures(result) and "temperature_curve" not in all_figures(result)
    assert "Zero-shot detectors of model-written text" in paths["html"].read_text()
    assert "Fast-DetectGPT" in result.report() and "Binoculars for a: observer b" in result.report()
    assert "detector AUROCs a (assistant)" in result._repr_html_()


def test_own_greedy_text_beats_the_same_tokens_shuffled(tiny_tokenizer):
    """Greedy tokens are the reader's top choice at every step (log-rank exactly 0); shuffling the same
    tokens keeps the bag of tokens and breaks that, so the likelihood detectors separate them."""
    needs_hooked_transformer()
    model = tiny_hooked_transformer(tokenizer=tiny_tokenizer, n_ctx=96, seed=4)
    prompts = [GapPrompt(f"q{i}", f"{text} ({i})") for i, text in enumerate(TINY_CORPUS * 2)]
    greedy = sample_writer(model, "m", prompts, fmt="assistant", max_new_tokens=12, temperature=0.0, progress=False)
    rng = np.random.default_rng(0)
    shuffled = [dataclasses.replace(r, content_ids=[int(t) for t in rng.permutation(r.content_ids)])
                for r in greedy]
    assert all(len(set(r.content_ids)) > 1 for r in greedy)  # else a shuffle could be the same text
    own = [r for r in read_responses(model, "m", prompts, {"m": greedy}, ["assistant"], progress=False)
           if r.source == "own"]
    other = [dataclasses.replace(r, source="shuffled") for r in
             read_responses(model, "m", prompts, {"m": shuffled}, ["assistant"], progress=False) if r.source == "own"]
    assert all(np.all(r.log_rank == 0) for r in own)
    row = next(c for c in summarize(own + other, n_boot=50)["comparisons"] if c["source"] == "shuffled")
    assert row["auroc_log_rank"]["auroc"] == 1.0
    assert row["auroc_log_likelihood"]["auroc"] > 0.95
    assert row["auroc_fast_detectgpt"]["auroc"] > 0.9
    assert row["auroc_binoculars"] == {"available": False, "reason": "no observer model read these texts"}


def test_binoculars_is_unavailable_with_one_reader_or_two_tokenizers(tiny_tokenizer, tmp_path):
    needs_hooked_transformer()
    model = tiny_hooked_transformer(tokenizer=tiny_tokenizer, n_ctx=96, seed=1)
    alone = policy_gap({"a": model}, PROMPTS[:3], formats=["assistant"], max_new_tokens=4, n_boot=20, progress=False)
    row = alone.comparison("a", "assistant", "own_other_prompt")["auroc_binoculars"]
    assert row["available"] is False and row["reason"].startswith("one reader")
    assert alone.summary["detectors"]["binoculars"]["available"] is False
    assert all(r.observer is None and not len(r.cross_entropy) for r in alone.readings)
    assert "not available (one reader" in alone.report()
    stranger = tiny_hooked_transformer(tokenizer=tiny_tokenizer_of(tmp_path / "tok300", vocab_size=300), n_ctx=96,
                                       seed=2)
    mixed = policy_gap({"a": model, "z": stranger}, PROMPTS[:3], formats=["assistant"], max_new_tokens=4, n_boot=20,
                       progress=False)
    for reader, source in (("a", "writer:z"), ("z", "writer:a")):
        row = mixed.comparison(reader, "assistant", source)["auroc_binoculars"]
        assert row["available"] is False and "no other reader shares" in row["reason"]
    off = policy_gap({"a": model, "b": tiny_hooked_transformer(tokenizer=tiny_tokenizer, n_ctx=96, seed=3)},
                     PROMPTS[:2], formats=["assistant"], max_new_tokens=3, n_boot=20, progress=False, binoculars=False)
    assert off.summary["detectors"]["binoculars"]["readers"]["a"]["reason"].startswith("turned off")


def test_an_empty_response_has_no_detector_score():
    empty = Reading("m", "assistant", "own", 0, 0, True, np.zeros(0))
    assert all(np.isnan(v) for v in response_statistics(empty).values())


def test_fast_detectgpt_of_own_samples_at_temperature_one_is_standard_normal(tiny_tokenizer):
    """By construction: for tokens drawn from the reader's own distribution, each log p(x_t) - mu_t has
    mean 0 and variance var_t, so the criterion has mean 0 and variance 1 over the reader's samples."""
    needs_hooked_transformer()
    model = tiny_hooked_transformer(tokenizer=tiny_tokenizer, n_ctx=96, seed=5)
    drawn = sample_writer(model, "m", PROMPTS, fmt="assistant", n_samples=12, max_new_tokens=12, temperature=1.0,
                          progress=False)
    own = [r for r in read_responses(model, "m", PROMPTS, {"m": drawn}, ["assistant"], progress=False)
           if r.source == "own" and len(r.entropy)]
    criterion = np.array([response_statistics(r)["fast_detectgpt"] for r in own])
    assert len(criterion) == 72
    assert abs(criterion.mean()) < 3 / np.sqrt(len(criterion))  # 3 standard errors
    assert 0.75 < criterion.std(ddof=1) < 1.25
