"""Per-token values moved between two tokenizations of one text, by character offsets.

Used to ask whose surprise the residual stream tracks: another model reads the same characters
with its own tokenizer, and its per-token surprise is carried onto this model's tokens.

**Character spans of this model's tokens** (:func:`token_char_spans`): the text is
``decode(all ids)``; token ``k`` covers ``[end(k-1), end(k))`` where ``end(k)`` is the length of
the longest common prefix of ``decode(ids[:k+1])`` and the text. A token that holds only part of
a multi-byte character (byte-level BPE splits some emoji and CJK characters) therefore gets an
empty span, and the token that completes the character gets the whole character.

**The alignment rule** (:func:`align_values`): the value of target token ``i`` is

    sum over source tokens j of  value_j * |span_i ∩ span_j| / |span_j|

so a source token inside a target token gives it all of its value (a split: several source
tokens sum into one target token), a source token over several target tokens is shared in
proportion to the characters each one covers (a merge / a straddling token), and the total over
the text is preserved (for surprise, the sum over a stretch of text is the other model's
``-log p`` of it, whichever tokenizer cut it). Two edge cases:

- a zero-width source token (e.g. a BOS, or byte-fallback pieces some tokenizers give empty
  offsets) at character ``c`` goes wholly to the target token containing character ``c - 1``
  (the one whose reading completes the text up to ``c``; character 0 for ``c = 0``); if its
  value is not finite (a BOS has no surprise) it carries nothing and is skipped;
- a target token with an empty span, or one that overlaps a source token of non-zero width whose
  value is not finite, gets NaN: it has no aligned value.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float, Int

__all__ = ["token_char_spans", "align_values"]


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low


def token_char_spans(tokenizer, token_ids) -> tuple[str, Int[np.ndarray, "n 2"]]:
    """The decoded text of ``token_ids`` and each token's ``[start, end)`` character span.

    Decoding keeps special tokens and spaces exactly (``skip_special_tokens=False``,
    ``clean_up_tokenization_spaces=False``); see the module docstring for the rule.

    >>> from surprise_probe.testing import tiny_tokenizer
    >>> tokenizer = tiny_tokenizer()
    >>> text, spans = token_char_spans(tokenizer, tokenizer("Hello world")["input_ids"])
    >>> text, spans.tolist()
    ('Hello world', [[0, 5], [5, 11]])
    """
    ids = [int(t) for t in np.asarray(token_ids).reshape(-1)]

    def decode(part):
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    text = decode(ids)
    spans = np.zeros((len(ids), 2), np.int64)
    end = 0
    for k in range(len(ids)):
        new_end = max(end, _common_prefix(decode(ids[: k + 1]), text))
        spans[k] = (end, new_end)
        end = new_end
    if len(ids):
        spans[-1, 1] = len(text)  # whatever the decoder adds at the end belongs to the last token
    return text, spans


def align_values(
    target_spans: Int[np.ndarray, "n 2"],
    source_spans: Int[np.ndarray, "m 2"],
    source_values: Float[np.ndarray, " m"],
) -> Float[np.ndarray, " n"]:
    """Carry per-token ``source_values`` onto the target tokens (see the module docstring).

    >>> target = np.array([[0, 5], [5, 11]])          # "Hello" " world"
    >>> source = np.array([[0, 3], [3, 8], [8, 11]])  # "Hel" "lo wo" "rld"
    >>> align_values(target, source, np.array([1.0, 5.0, 2.0])).tolist()
    [3.0, 5.0]
    """
    target_spans = np.asarray(target_spans, np.int64).reshape(-1, 2)
    source_spans = np.asarray(source_spans, np.int64).reshape(-1, 2)
    source_values = np.asarray(source_values, np.float64).reshape(-1)
    if len(source_spans) != len(source_values):
        raise ValueError(
            f"{len(source_spans)} source spans but {len(source_values)} source values; expected one value per span"
        )
    for name, spans in (("target", target_spans), ("source", source_spans)):
        if len(spans) and (np.any(spans[:, 1] < spans[:, 0]) or spans.min() < 0):
            i = int(np.flatnonzero((spans[:, 1] < spans[:, 0]) | (spans.min(1) < 0))[0])
            raise ValueError(f"{name} span {i} is {spans[i].tolist()}; expected 0 <= start <= end")
    out = np.zeros(len(target_spans))
    bad = target_spans[:, 1] == target_spans[:, 0]  # empty target spans have no value
    starts, ends = target_spans[:, 0], target_spans[:, 1]
    for (start, end), value in zip(source_spans, source_values, strict=True):
        if end == start:
            if not np.isfinite(value):
                continue  # e.g. a BOS: no surprise, no characters
            char = max(start - 1, 0)
            owners = np.flatnonzero((starts <= char) & (char < ends))
            weights = np.ones(len(owners))
        else:
            overlap = np.minimum(ends, end) - np.maximum(starts, start)
            owners = np.flatnonzero(overlap > 0)
            weights = overlap[owners] / (end - start)
        if not np.isfinite(value):
            bad[owners] = True
            continue
        out[owners] += value * weights
    out[bad] = np.nan
    return out
