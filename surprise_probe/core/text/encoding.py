"""Turn user inputs (texts, conversations, token ids) into token ids and scored-span masks,
and pad them into batches.

An input item is one of:

- ``str``: plain text, tokenized as the model's tokenizer does (its BOS included when the model
  prepends one); every position is scored;
- a conversation: a list of ``{"role", "content"}`` messages, or ``{"messages": [...]}``;
  rendered with the chat template; by default only the assistant turns' content tokens are scored;
- ``{"text": ...}``;
- ``{"token_ids": [...], "scored": [...]}``: exact ids (e.g. sampled ids, so an on-policy read
  stays on-policy; re-tokenizing sampled text is not the identity), with an optional scored mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from surprise_probe.core.text.chat import encode_conversation

__all__ = ["Encoded", "Batch", "InputTooLong", "encode", "encode_all", "pad_batch", "context_length"]


class InputTooLong(ValueError):
    """An input longer than the limit, where truncation was not asked for (``where``, ``n_tokens``, ``limit``)."""

    def __init__(self, message: str, where: str, n_tokens: int, limit: int):
        super().__init__(message)
        self.where, self.n_tokens, self.limit = where, n_tokens, limit


@dataclass(frozen=True)
class Encoded:
    """One tokenized input: ids, the scored-span mask, and how it was made."""

    token_ids: np.ndarray  # int64 (n,)
    scored: np.ndarray  # bool (n,)
    kind: str  # "text" | "conversation" | "token_ids"
    truncated_from: int | None = None  # original length when truncation was asked for
    spans: tuple = field(default=())

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass
class Batch:
    """Padded batch. ``attention_mask`` marks real tokens; ``scored`` is False on padding.

    Built with :func:`encode` (one item: a text, a conversation or ``{"token_ids": ...}``) and
    :func:`pad_batch`; ``scored`` is the mask interventions take as ``positions=`` to edit only
    the scored span (the assistant's content in a conversation, every token of a plain text).

    >>> from surprise_probe.testing import tiny_model
    >>> model = tiny_model()
    >>> chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    >>> batch = pad_batch([encode(model, chat), encode(model, "Plain text.", index=1)], pad_id(model))
    >>> batch.tokens.shape == batch.scored.shape, batch.lengths[0] > batch.lengths[1]
    (True, True)
    >>> logits = model(batch.tokens, attention_mask=batch.attention_mask)
    >>> model.tokenizer.decode(batch.tokens[0][batch.scored[0]])  # the scored span: the answer
    'Hello there'
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    scored: Bool[Tensor, "batch pos"]
    lengths: list[int]
    padding_side: str


def context_length(model) -> int:
    """The longest sequence the model accepts (TransformerLens ``cfg.n_ctx``)."""
    return int(model.cfg.n_ctx)


def _tokenizer(model):
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("this model has no tokenizer; pass {'token_ids': [...]} items instead of text")
    return tokenizer


def _text_ids(model, text: str) -> np.ndarray:
    tokenizer = _tokenizer(model)
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    if getattr(model.cfg, "default_prepend_bos", False) and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return np.asarray(ids, dtype=np.int64)


def encode(
    model,
    item,
    *,
    index: int | str = 0,
    max_tokens: int | None = None,
    truncate: bool = False,
    score_prompt: bool = False,
) -> Encoded:
    """Tokenize one input item and build its scored-span mask.

    ``max_tokens`` defaults to the model's context; a longer input is an error unless
    ``truncate=True`` (then it is cut and the original length is recorded, never silently).
    ``score_prompt=True`` scores every token of a conversation, not just the assistant turns.
    """
    where = f"input {index}"
    spans: tuple = ()
    if isinstance(item, dict):
        if "token_ids" in item:
            ids = np.asarray(item["token_ids"], dtype=np.int64).reshape(-1)
            if "scored" in item:
                scored = np.asarray(item["scored"], dtype=bool).reshape(-1)
                if scored.shape != ids.shape:
                    raise ValueError(
                        f"{where}: 'scored' has {scored.size} entries but 'token_ids' has {ids.size}"
                    )
            else:
                scored = np.ones(len(ids), dtype=bool)
            kind = "token_ids"
            vocab = int(model.cfg.d_vocab)
            if len(ids) and (ids.min() < 0 or ids.max() >= vocab):
                bad = int(ids[(ids < 0) | (ids >= vocab)][0])
                raise ValueError(f"{where}: token id {bad} is outside the vocabulary [0, {vocab})")
        elif "messages" in item:
            return encode(model, item["messages"], index=index, max_tokens=max_tokens,
                          truncate=truncate, score_prompt=score_prompt)
        elif "text" in item:
            return encode(model, item["text"], index=index, max_tokens=max_tokens,
                          truncate=truncate, score_prompt=score_prompt)
        else:
            raise ValueError(
                f"{where}: a dict input needs a 'text', 'messages' or 'token_ids' key; got keys {sorted(item)}"
            )
    elif isinstance(item, str):
        if not item.strip():
            raise ValueError(f"{where} is empty text; expected at least one non-whitespace character")
        ids = _text_ids(model, item)
        scored = np.ones(len(ids), dtype=bool)
        kind = "text"
    elif isinstance(item, Sequence):
        conversation = encode_conversation(_tokenizer(model), item)
        ids, spans = conversation.token_ids, conversation.spans
        scored = np.ones(len(ids), bool) if score_prompt else conversation.role_mask("assistant")
        kind = "conversation"
    else:
        raise TypeError(
            f"{where}: expected text, a list of messages, or a dict; got {type(item).__name__}"
        )
    if len(ids) == 0:
        raise ValueError(f"{where} has no tokens")
    limit = context_length(model) if max_tokens is None else int(max_tokens)
    truncated_from = None
    if len(ids) > limit:
        if not truncate:
            raise InputTooLong(
                f"{where} has {len(ids)} tokens, more than the limit of {limit} "
                f"({'max_tokens' if max_tokens is not None else 'the model context n_ctx'}); "
                "shorten it or pass truncate=True (CLI: --truncate) to cut it explicitly",
                where, len(ids), limit,
            )
        truncated_from = len(ids)
        ids, scored = ids[:limit], scored[:limit]
    return Encoded(ids, scored, kind, truncated_from, spans)


def encode_all(model, items, **kwargs) -> list[Encoded]:
    """``encode`` every item, naming the failing index in any error."""
    if isinstance(items, (str, dict)):
        raise TypeError("expected a list of inputs; wrap a single text or conversation in a list")
    return [encode(model, item, index=i, **kwargs) for i, item in enumerate(items)]


def pad_id(model) -> int:
    tokenizer = getattr(model, "tokenizer", None)
    for candidate in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        getattr(tokenizer, "bos_token_id", None),
    ):
        if candidate is not None:
            return int(candidate)
    return 0


def pad_batch(encoded: Sequence[Encoded], pad_token_id: int, padding_side: str = "right") -> Batch:
    """Pad to a rectangle; pads are never scored and never attended to."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    lengths = [len(e) for e in encoded]
    width = max(lengths)
    tokens = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    scored = torch.zeros((len(encoded), width), dtype=torch.bool)
    for row, (item, n) in enumerate(zip(encoded, lengths, strict=False)):
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        tokens[row, cols] = torch.from_numpy(item.token_ids)
        attention[row, cols] = 1
        scored[row, cols] = torch.from_numpy(item.scored)
    return Batch(tokens, attention, scored, lengths, padding_side)
