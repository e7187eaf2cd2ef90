import json

import numpy as np
import pytest

from surprise_probe.core.text.encoding import encode, encode_all, pad_batch
from surprise_probe.core.text.files import read_inputs


def test_empty_text_is_an_error(tiny_hooked):
    with pytest.raises(ValueError, match="input 1 is empty text"):
        encode_all(tiny_hooked, ["fine", "   "])


def test_too_long_is_an_error_unless_truncation_is_asked(tiny_hooked):
    long_text = "the quick brown fox " * 40  # far more than n_ctx=64 tokens
    with pytest.raises(ValueError, match=r"more than the limit of 64 \(the model context n_ctx\)"):
        encode(tiny_hooked, long_text)
    cut = encode(tiny_hooked, long_text, truncate=True)
    assert len(cut) == 64 and cut.truncated_from > 64
    with pytest.raises(ValueError, match="limit of 10 \\(max_tokens\\)"):
        encode(tiny_hooked, long_text, max_tokens=10)


def test_token_ids_inputs(tiny_hooked):
    enc = encode(tiny_hooked, {"token_ids": [1, 2, 3], "scored": [False, True, True]})
    assert enc.token_ids.tolist() == [1, 2, 3] and enc.scored.tolist() == [False, True, True]
    with pytest.raises(ValueError, match="token id 99999 is outside the vocabulary"):
        encode(tiny_hooked, {"token_ids": [1, 99999]})
    with pytest.raises(ValueError, match="'scored' has 1 entries but 'token_ids' has 2"):
        encode(tiny_hooked, {"token_ids": [1, 2], "scored": [True]})
    with pytest.raises(ValueError, match="needs a 'text', 'messages' or 'token_ids' key"):
        encode(tiny_hooked, {"body": "x"})
    with pytest.raises(TypeError, match="wrap a single text"):
        encode_all(tiny_hooked, "just one string")


def test_plain_text_gets_exactly_one_bos(tiny_hooked):
    bos = tiny_hooked.tokenizer.bos_token_id
    ids = encode(tiny_hooked, "hello world").token_ids
    assert ids[0] == bos and (ids == bos).sum() == 1


def test_pad_batch_both_sides(tiny_hooked):
    items = encode_all(tiny_hooked, ["a cat", "the quick brown fox jumps"])
    right, left = pad_batch(items, 0, "right"), pad_batch(items, 0, "left")
    assert right.attention_mask.sum(1).tolist() == [len(items[0]), len(items[1])]
    assert right.attention_mask[0, 0] == 1 and left.attention_mask[0, 0] == 0
    assert not (right.scored & ~right.attention_mask.bool()).any()
    with pytest.raises(ValueError, match="padding_side must be"):
        pad_batch(items, 0, "middle")


def test_read_txt_modes(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("first text\nsecond text\n")
    assert read_inputs(lines) == ["first text", "second text"]
    blocks = tmp_path / "blocks.txt"
    blocks.write_text("para one\ncontinues\n\npara two\n")
    assert read_inputs(blocks) == ["para one\ncontinues", "para two"]


def test_read_jsonl_and_malformed_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"text": "a"}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "q"}], "id": "x"}) + "\n"
        + json.dumps([{"role": "user", "content": "q2"}]) + "\n"
        + json.dumps({"token_ids": [1, 2]}) + "\n"
    )
    items = read_inputs(good)
    assert items[0] == {"text": "a"} and "id" not in items[1] and items[3] == {"token_ids": [1, 2]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a"}) + "\n{not json}\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_inputs(bad)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"body": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"wrong.jsonl:1: expected a 'text', 'messages' or 'token_ids' key"):
        read_inputs(wrong)
    with pytest.raises(ValueError, match="must end in .txt or .jsonl"):
        read_inputs(tmp_path / "x.csv") if (tmp_path / "x.csv").write_text("a") else None


def test_builtin_data_loads():
    from surprise_probe.core.text.files import builtin_items, builtin_prompts

    items, prompts = builtin_items(), builtin_prompts()
    assert len(items) >= 50 and all(item["messages"][-1]["role"] == "assistant" for item in items)
    assert len(prompts) >= 100 and {"id", "topic", "prompt"} <= set(prompts[0])
    assert np.unique([p["topic"] for p in prompts]).size == 10
