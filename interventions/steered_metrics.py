"""A steered run against the clean run, per token: output entropy, KL(steered || clean), top-1
agreement and finiteness, fused into one softmax per cache-sized block of tokens.

The sweep (:mod:`interventions.steering_sweep`) and the norm controls score every condition with these;
:func:`segment_sums` sums them per row over the flat scored tokens of many rows at once, a chunk
of ``metrics.CHUNK_ELEMENTS`` logits at a time, reading each clean row in place.
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from surprise_probe.core.forward.metrics import CACHE_ELEMENTS, CHUNK_ELEMENTS

__all__ = ["steered_metrics", "clean_distribution", "row_metrics", "segment_sums"]


def steered_metrics(
    logits: Float[Tensor, "tokens vocab"],
    clean_log_probs: Float[Tensor, "tokens vocab"],
    clean_top1: Int[Tensor, " tokens"] | None = None,
) -> tuple[Float[Tensor, " tokens"], Float[Tensor, " tokens"], Float[Tensor, " tokens"], Bool[Tensor, " tokens"]]:
    """Per token: output entropy, KL(steered || clean), top-1 agreement with clean, and whether
    every logit is finite; float32 (float64 stays float64) whatever the model's dtype.

    ``clean_top1``: the clean top-1 tokens (default: ``clean_log_probs.argmax(-1)``); a caller
    that scores many conditions against the same clean run passes them once. Runs over
    cache-sized blocks of tokens (``metrics.CACHE_ELEMENTS``), so each logit leaves memory once;
    per block one softmax, three maxima, two subtractions and two dot products (no exp or argmax
    pass, no copy of the clean rows); the finiteness check touches only rows whose entropy came
    out NaN (exactly the rows with a non-finite logit).
    """
    if clean_top1 is None:
        clean_top1 = clean_log_probs.argmax(-1)
    block = max(1, CACHE_ELEMENTS // max(1, int(logits.shape[-1])))
    if len(logits) > block:
        parts = [steered_metrics(logits[a : a + block], clean_log_probs[a : a + block], clean_top1[a : a + block])
                 for a in range(0, len(logits), block)]
        return tuple(torch.cat(values) for values in zip(*parts))
    probs, log_probs, top = _distribution(logits)
    clean = clean_log_probs.to(device=log_probs.device, dtype=log_probs.dtype)
    agree = _top1_agrees(probs, top, clean_top1.to(probs.device)).to(probs.dtype)
    entropy = torch.linalg.vecdot(probs, log_probs).neg_()
    kl = torch.linalg.vecdot(probs, log_probs - clean)
    finite = torch.ones(len(logits), dtype=torch.bool, device=probs.device)
    # A NaN entropy means a non-finite logit: +inf or NaN make every probability NaN, -inf gives a
    # probability of exactly 0 and 0 * -inf = NaN. Those terms are 0; only such rows (rare) take
    # the extra passes, including the finiteness check.
    bad = torch.isnan(entropy)
    if bad.any():
        finite[bad] = torch.isfinite(logits[bad]).all(-1).to(finite.device)
    for values, other, sign in ((entropy, None, -1.0), (kl, clean, 1.0)):
        bad = torch.isnan(values)
        if bad.any():
            terms = log_probs[bad] if other is None else log_probs[bad] - other[bad]
            values[bad] = sign * torch.nan_to_num(probs[bad] * terms, nan=0.0).sum(-1)
    return entropy, kl, agree, finite


def _distribution(
    logits: Float[Tensor, "tokens vocab"],
) -> tuple[Float[Tensor, "tokens vocab"], Float[Tensor, "tokens vocab"], Float[Tensor, "tokens 1"]]:
    """Probabilities, log-probabilities and the largest probability, float32 (float64 stays).

    One softmax gives the probabilities; the log-normaliser follows from the largest one
    (``log Z = max logit - log max p``, as ``max p = 1 / sum exp(logit - max logit)``), so the
    log-probabilities are one subtraction instead of a second pass of exponentials.
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(dtype)
    probs = torch.softmax(x, -1)
    top = probs.amax(-1, keepdim=True)
    log_probs = x - (x.amax(-1, keepdim=True) - top.log())
    return probs, log_probs, top


def _top1_agrees(
    probs: Float[Tensor, "tokens vocab"], top: Float[Tensor, "tokens 1"], clean_top1: Int[Tensor, " tokens"]
) -> Bool[Tensor, " tokens"]:
    """Whether ``probs.argmax(-1) == clean_top1`` (the first index among ties, as argmax), from
    two maxima instead of an argmax pass: the clean top-1 holds the maximum and nothing else does.
    ``probs`` is changed at one entry per row and restored."""
    at = clean_top1.unsqueeze(-1)
    value = probs.gather(-1, at)
    probs.scatter_(-1, at, -1.0)
    second = probs.amax(-1, keepdim=True)
    probs.scatter_(-1, at, value)
    holds = (value == top).squeeze(-1)
    tie = holds & (second == top).squeeze(-1)
    agree = holds & ~tie
    if tie.any():  # another token has the same largest probability: argmax takes the first index
        agree[tie] = probs[tie].argmax(-1) == clean_top1[tie]
    return agree


def clean_distribution(
    logits: Float[Tensor, "tokens vocab"],
) -> tuple[Float[Tensor, "tokens vocab"], Int[Tensor, " tokens"], Float[Tensor, " tokens"]]:
    """The clean run's log-probabilities, top-1 tokens and entropy, computed as ``steered_metrics``
    computes the steered ones (so identical logits give a KL of exactly 0), a cache-sized block
    of tokens at a time."""
    block = max(1, CACHE_ELEMENTS // max(1, int(logits.shape[-1])))
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    log_probs = torch.empty(logits.shape, dtype=dtype, device=logits.device)
    top1 = torch.empty(len(logits), dtype=torch.long, device=logits.device)
    entropy = torch.empty(len(logits), dtype=dtype, device=logits.device)
    for a in range(0, len(logits), block):
        probs, log_probs[a : a + block], _ = _distribution(logits[a : a + block])
        top1[a : a + block] = probs.argmax(-1)
        terms = probs * log_probs[a : a + block]
        entropy[a : a + block] = -torch.nan_to_num(terms, nan=0.0).sum(-1)
    return log_probs, top1, entropy


def row_metrics(
    logits: Float[Tensor, "batch pos vocab"],
    scored: Bool[Tensor, "batch pos"],
    clean_log_probs: Float[Tensor, "tokens vocab"],
    clean_top1: Int[Tensor, " tokens"] | None = None,
) -> tuple[Float[Tensor, " batch"], Float[Tensor, " batch"], Float[Tensor, " batch"], Bool[Tensor, " batch"]]:
    """Per-row sums over scored tokens of entropy, KL(steered || clean), top-1 agreement; and
    whether every scored logit of the row is finite. ``clean_log_probs`` (and ``clean_top1``,
    default their argmax) follow ``scored`` order. Tokens are processed in chunks, so the
    temporaries stay bounded."""
    scored = scored.to(logits.device)
    if clean_top1 is None:
        clean_top1 = clean_log_probs.argmax(-1)
    counts = scored.sum(-1).tolist()
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    segments = [(row, clean_log_probs[offsets[row] : offsets[row + 1]], clean_top1[offsets[row] : offsets[row + 1]])
                for row in range(len(counts)) if counts[row]]
    flat = logits[scored]
    return segment_sums(lambda a, b: flat[a:b], segments, int(logits.shape[-1]), scored.shape[0])


def segment_sums(logits_at, segments: list, vocab: int, n_rows: int):
    """Sum token metrics per row. The flat tokens are the concatenation of ``segments``, each
    ``(row, clean_log_probs, clean_top1)`` for that many consecutive tokens of ``row``;
    ``logits_at(a, b)`` gives the logits of flat tokens [a, b), a chunk of ``metrics.CHUNK_ELEMENTS``
    logits at a time. The clean rows are read in place (views), never gathered per condition."""
    sums = torch.zeros(3, n_rows, dtype=torch.float64)
    finite = torch.ones(n_rows, dtype=torch.bool)
    starts = np.concatenate([[0], np.cumsum([len(lp) for _, lp, _ in segments])]).astype(int)
    n_tokens = int(starts[-1])
    step = max(1, CHUNK_ELEMENTS // max(1, vocab))
    pieces: list[tuple[int, Tensor]] = []
    oks: list[tuple[int, Tensor]] = []
    k = 0  # first segment that may overlap the chunk
    for a in range(0, n_tokens, step):
        b = min(n_tokens, a + step)
        logits = logits_at(a, b)
        while starts[k + 1] <= a:
            k += 1
        for i in range(k, len(segments)):
            lo, hi = max(a, int(starts[i])), min(b, int(starts[i + 1]))
            if lo >= b:
                break
            if hi <= lo:
                continue
            row, clean, top1 = segments[i]
            offset = int(starts[i])
            entropy, kl, agree, ok = steered_metrics(
                logits[lo - a : hi - a], clean[lo - offset : hi - offset], top1[lo - offset : hi - offset]
            )
            pieces.append((row, torch.stack([entropy, kl, agree]).double().sum(-1)))
            oks.append((row, ok.all()))
        del logits
    if pieces:
        rows = torch.tensor([row for row, _ in pieces])
        sums.index_add_(1, rows, torch.stack([values for _, values in pieces]).cpu().T)
        bad = ~torch.stack([ok for _, ok in oks]).cpu()
        finite[rows[bad]] = False
    return sums[0], sums[1], sums[2], finite
