import numpy as np
import pytest

from surprise_probe.core.text.chat import encode_conversation
from surprise_probe.core.text.encoding import encode


def test_assistant_mask_is_exactly_the_assistant_content(tiny_tokenizer):
    messages = [
        {"role": "user", "content": "Hello world, how are you?"},
        {"role": "assistant", "content": "The quick brown fox."},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "A cat sat on the mat."},
    ]
    enc = encode_conversation(tiny_tokenizer, messages)
    mask = enc.role_mask("assistant")
    spans = [s for s in enc.spans if s.role == "assistant"]
    assert [tiny_tokenizer.decode(enc.token_ids[s.start : s.end]) for s in spans] == [
        "The quick brown fox.", "A cat sat on the mat."
    ]
    assert mask.sum() == sum(s.end - s.start for s in spans)
    # Everything outside the spans (headers, end-of-turn markers, system prompt) is unmasked.
    outside = tiny_tokenizer.decode(enc.token_ids[~mask])
    assert "<|im_end|>" in outside and "fox" not in outside and "mat" not in outside
    # The template's default system message is kept, as the model would see it.
    assert enc.spans[0].role == "user" and "You are a tiny test model." in enc.text


def test_score_prompt_scores_everything(tiny_hooked):
    conversation = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]
    assert encode(tiny_hooked, conversation, score_prompt=True).scored.all()
    assert 0 < encode(tiny_hooked, conversation).scored.sum() < len(encode(tiny_hooked, conversation))


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty list"),
        ([{"role": "robot", "content": "x"}], "role 'robot'"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([{"role": "user", "content": "  "}], "empty content"),
    ],
)
def test_bad_conversations(tiny_tokenizer, messages, match):
    with pytest.raises(ValueError, match=match):
        encode_conversation(tiny_tokenizer, messages)


def test_tokenizer_without_template(tiny_tokenizer):
    import copy

    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        encode_conversation(plain, [{"role": "user", "content": "hi"}])
    assert np.array_equal(
        encode_conversation(tiny_tokenizer, [{"role": "user", "content": "hi"}]).role_mask("assistant"),
        np.zeros(len(encode_conversation(tiny_tokenizer, [{"role": "user", "content": "hi"}]).token_ids), bool),
    )
