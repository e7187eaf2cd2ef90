"""Character-offset alignment of per-token values on hand-made offsets: splits, merges, unicode."""

import numpy as np
import pytest

from surprise_probe.core.text.alignment import align_values, token_char_spans


def test_split_source_tokens_sum_into_one_target_token():
    # target: "Hello" | " world"; source: "He" "llo" " wor" "ld"
    target = np.array([[0, 5], [5, 11]])
    source = np.array([[0, 2], [2, 5], [5, 9], [9, 11]])
    assert align_values(target, source, np.array([1.0, 2.0, 3.0, 4.0])).tolist() == [3.0, 7.0]


def test_merged_source_token_is_shared_by_characters():
    # target: "Hel" | "lo"; source: "Hello" with value 5
    out = align_values(np.array([[0, 3], [3, 5]]), np.array([[0, 5]]), np.array([5.0]))
    assert out.tolist() == pytest.approx([3.0, 2.0])


def test_straddling_tokens_and_total_is_preserved():
    rng = np.random.default_rng(0)
    cuts_target = np.r_[0, np.sort(rng.choice(np.arange(1, 100), 20, replace=False)), 100]
    cuts_source = np.r_[0, np.sort(rng.choice(np.arange(1, 100), 33, replace=False)), 100]
    target = np.stack([cuts_target[:-1], cuts_target[1:]], 1)
    source = np.stack([cuts_source[:-1], cuts_source[1:]], 1)
    values = rng.uniform(0, 5, len(source))
    out = align_values(target, source, values)
    assert out.sum() == pytest.approx(values.sum())
    # independent reference: spread each source value evenly over its characters, then sum per target
    per_char = np.zeros(100)
    for (start, end), value in zip(source, values, strict=True):
        per_char[start:end] += value / (end - start)
    expected = [per_char[start:end].sum() for start, end in target]
    assert out == pytest.approx(expected)


def test_zero_width_and_missing_values():
    target = np.array([[0, 3], [3, 3], [3, 6]])  # the middle token holds part of a character: empty span
    # a BOS with no value at 0 (skipped), a zero-width token at 4 (goes to the token holding char 3)
    source = np.array([[0, 0], [4, 4], [0, 4], [4, 6]])
    out = align_values(target, source, np.array([np.nan, 1.5, 4.0, 2.0]))
    assert out[0] == pytest.approx(4.0 * 3 / 4)
    assert np.isnan(out[1])  # empty span
    assert out[2] == pytest.approx(1.5 + 4.0 * 1 / 4 + 2.0)
    assert align_values(target, source, np.array([0.5, 1.5, 4.0, 2.0]))[0] == pytest.approx(0.5 + 3.0)  # BOS: char 0
    # a missing value on a token with characters makes every target token it touches missing
    missing = align_values(target, source, np.array([0.5, 1.5, np.nan, 2.0]))
    assert np.isnan(missing[0]) and np.isnan(missing[2])


def test_bad_spans_are_refused(unchecked_shapes):
    with pytest.raises(ValueError, match="one value per span"):
        align_values(np.array([[0, 1]]), np.array([[0, 1], [1, 2]]), np.array([1.0]))
    with pytest.raises(ValueError, match=r"source span 0 is \[3, 1\]"):
        align_values(np.array([[0, 4]]), np.array([[3, 1]]), np.array([1.0]))


def test_char_spans_of_a_byte_level_tokenizer_on_unicode(tiny_tokenizer):
    text = "The café 😀 is open."
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded, spans = token_char_spans(tiny_tokenizer, ids)
    assert decoded == text
    assert "".join(decoded[start:end] for start, end in spans) == text
    assert np.all(spans[1:, 0] == spans[:-1, 1])
    # the emoji (4 UTF-8 bytes, unseen in training) is split into byte tokens: only the last has a span
    emoji = text.index("😀")
    holders = [k for k, (start, end) in enumerate(spans) if start <= emoji < end]
    assert len(holders) == 1
    k = holders[0]
    assert spans[k - 1, 0] == spans[k - 1, 1]  # the byte before it completes no character
    # independent check of every span: the UTF-8 bytes of each token, decoded cumulatively
    pieces = [tiny_tokenizer.convert_ids_to_tokens(i) for i in ids]
    byte_decoder = {v: k for k, v in _bytes_to_unicode().items()}
    raw = [bytes(byte_decoder[c] for c in piece) for piece in pieces]
    ends = [len(b"".join(raw[: k + 1]).decode("utf-8", errors="ignore")) for k in range(len(raw))]
    assert spans[:, 1].tolist() == ends


def test_char_spans_keep_special_tokens(tiny_tokenizer):
    text = "<|im_start|>user\nHello<|im_end|>"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    decoded, spans = token_char_spans(tiny_tokenizer, ids)
    assert decoded == text
    assert tuple(spans[0]) == (0, len("<|im_start|>"))
    assert tuple(spans[-1]) == (len(text) - len("<|im_end|>"), len(text))


def _bytes_to_unicode():
    """GPT-2's byte <-> printable-character table (reference for the byte-level BPE pieces)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))
