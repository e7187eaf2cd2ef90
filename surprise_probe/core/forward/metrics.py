"""Per-token input surprise and output entropy, and their aggregates.

Definitions (docs/concepts.md): for tokens ``x_0..x_T`` and ``p_t = softmax(logits[t])``,
the model's distribution over ``x_{t+1}``:

- input surprise ``s_t = -log p_{t-1}(x_t)`` for ``t >= 1``; ``s_0`` is NaN (nothing predicted it);
- output entropy ``H_t = -sum_v p_t(v) log p_t(v)``.

Both in nats, computed in float32 or better from ``log_softmax`` so that nothing underflows.

For zero-shot detectors of model-written text (docs/policy-gap.md), :func:`next_token_statistics`
gives, from the distribution ``p`` that predicted a token ``x`` (one row of logits), the token's
log-likelihood ``log p(x)``, its log-rank ``log(1 + #{v: p(v) > p(x)})`` (rank 1 = the top token),
the distribution's entropy, and the mean ``mu = sum_v p(v) log p(v)`` and variance
``sum_v p(v) (log p(v) - mu)^2`` of the log-likelihood of a token drawn from ``p`` (Fast-DetectGPT's
analytic reference); :func:`cross_entropy` gives ``-sum_v q(v) log p(v)`` between two models'
distributions (Binoculars' cross-perplexity). Callers pass only the rows of logits they score.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

# The bootstrap lives in surprise_probe.core.utils.stats; re-exported here, where users first met it.
from surprise_probe.core.utils.stats import MeanWithCI, bootstrap_mean

__all__ = [
    "input_surprise",
    "output_entropy",
    "surprise_and_entropy",
    "chunked_surprise_and_entropy",
    "chunk_positions",
    "NextTokenStatistics",
    "next_token_statistics",
    "cross_entropy",
    "MeanWithCI",
    "bootstrap_mean",
]


# Above this vocabulary size the float32 sums over the vocabulary drift by more than 1e-4 nats
# (measured on gemma-3-270m, 262k tokens: 1.8e-4 in entropy), so the metrics run in float64.
FLOAT64_ABOVE_VOCAB = 131_072


def _log_probs(logits: Float[Tensor, "... vocab"]) -> Float[Tensor, "... vocab"]:
    # float64 stays float64; narrower logits are promoted to float32, or float64 for huge vocabularies.
    wide = logits.dtype == torch.float64 or logits.shape[-1] > FLOAT64_ABOVE_VOCAB
    return torch.log_softmax(logits.to(torch.float64 if wide else torch.float32), dim=-1)


def input_surprise(
    logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos"]:
    """``s_t = -log p_{t-1}(x_t)`` in nats; position 0 is NaN.

    >>> logits = torch.zeros(1, 3, 4)                      # uniform over 4 tokens
    >>> input_surprise(logits, torch.tensor([[0, 1, 2]]))  # doctest: +ELLIPSIS
    tensor([[   nan, 1.3863, 1.3863]]...)
    """
    return _surprise_from_log_probs(_log_probs(logits), tokens)


def output_entropy(logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, "batch pos"]:
    """``H_t = -sum_v p_t(v) log p_t(v)`` in nats, from ``log_softmax``.

    >>> output_entropy(torch.zeros(1, 2, 4))  # doctest: +ELLIPSIS
    tensor([[1.3863, 1.3863]]...)
    """
    return _entropy_from_log_probs(_log_probs(logits))


# Positions per chunk are chosen so that one chunk's (rows x positions x vocab) temporaries hold
# about this many elements (2**24: 64 MB in float32), whatever the batch, context and vocabulary.
CHUNK_ELEMENTS = 2**24
# Within a chunk, the metrics' passes (log_softmax, exp, product, sum, gather) run over blocks of
# about this many logits (4 MB in float32), which stay in the CPU's cache between passes: each
# logit is read from memory once instead of once per pass (about 4x faster on a 49k vocabulary).
CACHE_ELEMENTS = 2**20


def chunk_positions(rows: int, vocab: int, budget: int = CHUNK_ELEMENTS) -> int:
    """How many positions of ``rows`` rows fit one metrics chunk of ``budget`` logits."""
    return max(1, budget // max(1, rows * vocab))


def surprise_and_entropy(
    logits: Float[Tensor, "batch pos vocab"],
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> tuple[Float[Tensor, "batch pos"], Float[Tensor, "batch pos"]]:
    """Both metrics from one ``log_softmax`` per chunk of positions (the capture hot path).

    Positions are processed in chunks of about ``CHUNK_ELEMENTS`` logits, so the float32 (or
    float64) temporaries stay bounded whatever the batch, context, vocabulary or model dtype.
    With an ``attention_mask``, surprise is NaN wherever the previous position is padding (the
    first real token of a left-padded row has no prediction, like position 0).
    """
    if logits.shape[:2] != tokens.shape:
        raise ValueError(
            f"logits have batch x pos {tuple(logits.shape[:2])} but tokens have {tuple(tokens.shape)}"
        )
    return chunked_surprise_and_entropy(
        lambda start, stop: logits[:, start:stop], tokens, int(logits.shape[-1]), attention_mask
    )


def chunked_surprise_and_entropy(
    logits_at,
    tokens: Int[Tensor, "batch pos"],
    vocab: int,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    budget: int = CHUNK_ELEMENTS,
) -> tuple[Float[Tensor, "batch pos"], Float[Tensor, "batch pos"]]:
    """Surprise and entropy from ``logits_at(start, stop)`` -> logits of positions ``[start, stop)``.

    Only one chunk of logits exists at a time, so a caller that unembeds the final residual
    inside ``logits_at`` never holds the full (batch x pos x vocab) logits.
    """
    batch, n_pos = tokens.shape
    step = chunk_positions(batch, vocab, budget)
    block = max(1, CACHE_ELEMENTS // max(1, vocab))  # positions of one row per in-cache block
    surprise = entropy = None
    for start in range(0, n_pos, step):
        stop = min(n_pos, start + step)
        logits = logits_at(start, stop)
        # Position p predicts token p + 1: this chunk's predictions are the surprise of the next.
        targets = tokens[:, start + 1 : stop + 1].to(logits.device)
        for row in range(batch):
            for a in range(0, stop - start, block):
                b = min(stop - start, a + block)
                log_probs = _log_probs(logits[row, a:b])
                if surprise is None:
                    kw = {"dtype": log_probs.dtype, "device": log_probs.device}
                    surprise = torch.full((batch, n_pos), float("nan"), **kw)
                    entropy = torch.empty((batch, n_pos), **kw)
                entropy[row, start + a : start + b] = _entropy_from_log_probs(log_probs)
                width = min(b, targets.shape[1]) - a
                if width > 0:
                    surprise[row, start + 1 + a : start + 1 + a + width] = -log_probs[:width].gather(
                        -1, targets[row, a : a + width].unsqueeze(-1)
                    ).squeeze(-1)
        del logits
    if attention_mask is not None:
        previous_is_real = torch.zeros_like(attention_mask, dtype=torch.bool)
        previous_is_real[:, 1:] = attention_mask[:, :-1].bool()
        surprise = surprise.masked_fill(~previous_is_real.to(surprise.device), float("nan"))
    return surprise, entropy


def _surprise_from_log_probs(
    log_probs: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos"]:
    if log_probs.shape[:2] != tokens.shape:
        raise ValueError(
            f"logits have batch x pos {tuple(log_probs.shape[:2])} but tokens have {tuple(tokens.shape)}"
        )
    surprise = torch.full(tokens.shape, float("nan"), dtype=log_probs.dtype, device=log_probs.device)
    if tokens.shape[1] > 1:
        read = tokens[:, 1:].unsqueeze(-1).to(log_probs.device)
        surprise[:, 1:] = -log_probs[:, :-1].gather(-1, read).squeeze(-1)
    return surprise


def _entropy_from_log_probs(log_probs: Float[Tensor, "*batch vocab"]) -> Float[Tensor, "*batch"]:
    terms = torch.exp(log_probs)
    # in place only without autograd: exp's output is saved for its backward (attribution patching)
    product = (terms * log_probs) if log_probs.requires_grad else terms.mul_(log_probs)
    entropy = product.sum(-1).neg_()
    # exp(log p) * log p is 0 * -inf = nan where a logit is -inf (p exactly 0); those terms are 0.
    # Such rows are rare (masked logits), so only they take the extra pass.
    bad = torch.isnan(entropy)
    if bad.any():
        entropy[bad] = -torch.nan_to_num(torch.exp(log_probs[bad]) * log_probs[bad], nan=0.0).sum(-1)
    return entropy


class NextTokenStatistics(NamedTuple):
    """Per row of logits: what the distribution ``p = softmax(logits)`` says about the token that came.

    ``log_likelihood = log p(x)``; ``log_rank = log(1 + #{v: p(v) > p(x)})`` (ties share the best
    rank); ``entropy = -sum_v p(v) log p(v)``; ``expected_log_likelihood = sum_v p(v) log p(v)``
    (= -entropy: the mean log-likelihood of a token drawn from ``p``);
    ``log_likelihood_variance = sum_v p(v) (log p(v) - expected_log_likelihood)^2``.
    """

    log_likelihood: Float[Tensor, " n"]
    log_rank: Float[Tensor, " n"]
    entropy: Float[Tensor, " n"]
    expected_log_likelihood: Float[Tensor, " n"]
    log_likelihood_variance: Float[Tensor, " n"]


def next_token_statistics(
    logits: Float[Tensor, "n vocab"], targets: Int[Tensor, " n"], block: int | None = None
) -> NextTokenStatistics:
    """:class:`NextTokenStatistics` of each row's ``targets`` token, in float32 (float64 above a 131k
    vocabulary), over blocks of ``block`` rows (default: about ``CACHE_ELEMENTS`` logits) so the
    temporaries stay in the CPU's cache and bounded.

    >>> stats = next_token_statistics(torch.tensor([[2.0, 0.0, 0.0, 0.0]]), torch.tensor([1]))
    >>> round(float(stats.log_rank[0].exp()), 6), round(float(stats.expected_log_likelihood[0] + stats.entropy[0]), 6)
    (2.0, 0.0)
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (n, vocab) and targets (n,), got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    n, vocab = logits.shape
    block = block or max(1, CACHE_ELEMENTS // max(1, vocab))
    parts = []
    for start in range(0, n, block):
        log_probs = _log_probs(logits[start : start + block])
        picked = targets[start : start + block].to(log_probs.device).unsqueeze(-1)
        likelihood = log_probs.gather(-1, picked)
        # Strictly more probable tokens: ties share the best rank, so a flat distribution gives rank 1.
        rank = (log_probs > likelihood).sum(-1).to(log_probs.dtype) + 1
        entropy = _entropy_from_log_probs(log_probs)
        expected = -entropy
        # Centred (not E[(log p)^2] - mu^2, which cancels badly when the variance is small);
        # p = 0 tokens contribute 0 (their log p is -inf).
        probs = torch.exp(log_probs)
        spread = torch.where(probs > 0, probs * (log_probs - expected.unsqueeze(-1)).square(), 0.0).sum(-1)
        parts.append((likelihood.squeeze(-1), torch.log(rank), entropy, expected, spread))
    if not parts:
        empty = torch.zeros(0, dtype=torch.float32, device=logits.device)
        return NextTokenStatistics(empty, empty, empty, empty, empty)
    return NextTokenStatistics(*(torch.cat(column) for column in zip(*parts, strict=True)))


def cross_entropy(
    observer_logits: Float[Tensor, "n vocab"], performer_logits: Float[Tensor, "n vocab"], block: int | None = None
) -> Float[Tensor, " n"]:
    """``-sum_v q(v) log p(v)`` per row, ``q = softmax(observer_logits)``, ``p = softmax(performer_logits)``.

    Binoculars' per-token cross-perplexity term (observer's probabilities weighting the
    performer's log-probabilities, as in the authors' code). Blocks as in :func:`next_token_statistics`.

    >>> float(cross_entropy(torch.zeros(1, 4), torch.zeros(1, 4))[0])  # doctest: +ELLIPSIS
    1.386...
    """
    if observer_logits.shape != performer_logits.shape or observer_logits.dim() != 2:
        raise ValueError(f"expected two (n, vocab) logits of one shape, got {tuple(observer_logits.shape)} and "
                         f"{tuple(performer_logits.shape)}")
    n, vocab = performer_logits.shape
    block = block or max(1, CACHE_ELEMENTS // max(1, vocab))
    parts = []
    for start in range(0, n, block):
        performer = _log_probs(performer_logits[start : start + block])
        observer = _log_probs(observer_logits[start : start + block].to(performer.device)).to(performer.dtype)
        weights = torch.exp(observer)
        parts.append(-torch.where(weights > 0, weights * performer, 0.0).sum(-1))
    if not parts:
        return torch.zeros(0, dtype=torch.float32, device=performer_logits.device)
    return torch.cat(parts)
