"""Chat-template helpers: a conversation to token ids, plus the token span of every turn.

The span of a turn is the tokens of its *content* (not the role header, not the end-of-turn
marker), found by locating each message's content in the rendered template string and mapping
characters to tokens with the tokenizer's offsets. This works for any template that copies the
content verbatim, which all common ones do; a template that rewrites content is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["TurnSpan", "EncodedConversation", "encode_conversation", "validate_messages"]

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class TurnSpan:
    """Token span ``[start, end)`` of one message's content."""

    role: str
    start: int
    end: int


@dataclass(frozen=True)
class EncodedConversation:
    token_ids: np.ndarray  # int64, (n_tokens,)
    spans: tuple[TurnSpan, ...]
    text: str

    def role_mask(self, role: str = "assistant") -> np.ndarray:
        """Boolean mask over tokens: True inside the content of every turn of ``role``."""
        mask = np.zeros(len(self.token_ids), dtype=bool)
        for span in self.spans:
            if span.role == role:
                mask[span.start : span.end] = True
        return mask


def validate_messages(messages: object, where: str = "conversation") -> list[dict]:
    """Check a conversation is a non-empty list of ``{"role", "content"}`` dicts."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages, got {messages!r:.80}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(
                f"{where}: message {i} must be a dict with 'role' and 'content', got {message!r:.80}"
            )
        if message["role"] not in ROLES:
            raise ValueError(
                f"{where}: message {i} has role {message['role']!r}; expected one of {ROLES}"
            )
        if not isinstance(message["content"], str) or not message["content"].strip():
            raise ValueError(f"{where}: message {i} ({message['role']}) has empty content")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def encode_conversation(
    tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool = False
) -> EncodedConversation:
    """Render ``messages`` with the tokenizer's chat template and find each turn's token span.

    >>> enc = encode_conversation(tok, [{"role": "user", "content": "Hi"},
    ...                                 {"role": "assistant", "content": "Hello there"}])  # doctest: +SKIP
    >>> tok.decode(enc.token_ids[enc.role_mask("assistant")])  # doctest: +SKIP
    'Hello there'
    """
    messages = validate_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
            "pass plain text instead of a conversation"
        )
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    # The template already writes every special token (BOS included); adding more would double them.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoding["input_ids"], dtype=np.int64)
    offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        content = message["content"]
        char_start = text.find(content, cursor)
        if char_start < 0:
            raise ValueError(
                f"the chat template of {getattr(tokenizer, 'name_or_path', '?')!r} does not copy "
                f"message {i} verbatim, so its token span cannot be located"
            )
        char_end = char_start + len(content)
        cursor = char_end
        # A token belongs to the turn if its characters lie inside the content. Tokens that
        # straddle the boundary (e.g. a merged leading space) count as content if they start in it.
        inside = (offsets[:, 0] >= char_start) & (offsets[:, 0] < char_end) & (offsets[:, 1] > offsets[:, 0])
        idx = np.flatnonzero(inside)
        start, end = (int(idx[0]), int(idx[-1]) + 1) if len(idx) else (0, 0)
        spans.append(TurnSpan(message["role"], start, end))
    return EncodedConversation(token_ids=ids, spans=tuple(spans), text=text)
