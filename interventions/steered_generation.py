"""Steered generation: sample text with interventions active, so you can read what the model says.

Sampling is the toolkit's one sampler (:func:`surprise_probe.core.forward.sampling.sample`, KV-cached): the
prompt is read in one forward, then one position per new token. An intervention's ``positions``
are absolute positions of the growing sequence on both backends: the prompt pass edits the
prompt positions they name, and each one-token pass edits its token only if its absolute position
is among them. ``steer="response"`` restricts every intervention to the positions whose outputs
are sampled (from the last prompt token on); ``steer="all"`` also edits the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch

from surprise_probe.core.forward.edits import Intervention, apply_all
from surprise_probe.core.forward.sampling import sample
from surprise_probe.core.text.chat import encode_conversation
from surprise_probe.core.text.encoding import encode

__all__ = ["Sample", "generate", "prompt_ids"]


@dataclass(frozen=True)
class Sample:
    prompt: str
    text: str  # the sampled continuation, decoded
    token_ids: list[int]  # the sampled ids (kept: re-tokenizing text is not the identity)
    seed: int


def prompt_ids(model, item) -> np.ndarray:
    """Token ids to continue: a text as the tokenizer reads it, or a conversation up to (not
    including) its last assistant turn, with the generation prompt."""

    messages = item.get("messages") if isinstance(item, dict) else item
    if isinstance(messages, list):
        while messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        if not messages:
            raise ValueError("the conversation has no turn before the assistant's; nothing to prompt with")
        return encode_conversation(model.tokenizer, messages, add_generation_prompt=True).token_ids
    return encode(model, item).token_ids


def generate(
    model,
    prompt,
    interventions: Intervention | Sequence[Intervention] = (),
    *,
    max_new_tokens: int = 40,
    n_samples: int = 1,
    temperature: float = 1.0,
    seed: int = 0,
    steer: str = "response",
    stop_at_eos: bool = True,
) -> list[Sample]:
    """Sample ``n_samples`` continuations of ``prompt`` (text, conversation or token-id dict).

    Seeded: the same seed, prompt and interventions give the same samples. ``temperature=0``
    is greedy.
    """
    if steer not in ("response", "all"):
        raise ValueError(f"steer must be 'response' or 'all', got {steer!r}")
    if max_new_tokens < 1 or n_samples < 1:
        raise ValueError(f"max_new_tokens and n_samples must be >= 1, got {max_new_tokens}, {n_samples}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    ids = torch.as_tensor(prompt_ids(model, prompt), dtype=torch.long)
    n_prompt = len(ids)
    if n_prompt + max_new_tokens > int(model.cfg.n_ctx):
        raise ValueError(
            f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model context "
            f"of {model.cfg.n_ctx} tokens"
        )
    if steer == "response":
        interventions = [replace(iv, positions=slice(n_prompt - 1, None)) for iv in interventions]
    step = {"length": n_prompt}

    @contextmanager
    def intervened(phase: str):
        if phase == "prefill":
            active = list(interventions)
        else:
            # The one new token sits at absolute position ``length``; position 0 of this pass.
            active = [replace(iv, positions=None) for iv in interventions
                      if _covers(iv.positions, step["length"], step["length"] + 1)]
            step["length"] += 1
        with apply_all(model, active):
            yield

    sampled = sample(
        model, [ids.tolist()], n_samples=n_samples, max_new_tokens=max_new_tokens, temperature=temperature,
        seed=seed, stop_ids=None if stop_at_eos else (), batch_size=n_samples, forward_context=intervened,
    )
    prompt_text = model.tokenizer.decode(ids.tolist())
    return [Sample(prompt_text, item.text(model.tokenizer), item.content_ids, seed) for item in sampled]


def _covers(positions, position: int, length: int) -> bool:
    """Whether ``positions`` (None, a slice, ints or a bool mask) include ``position`` of ``length``."""
    if positions is None:
        return True
    if isinstance(positions, slice):
        return position in range(length)[positions]
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        if positions.ndim != 1 and not (positions.ndim == 2 and positions.shape[0] == 1):
            raise ValueError("steered generation takes a (pos,) position mask, one for every sample")
        flat = positions.reshape(-1)
        return position < len(flat) and bool(flat[position])
    return any(int(p) % length == position for p in positions if -length <= int(p) < length)
