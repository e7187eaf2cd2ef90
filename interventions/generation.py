"""Steered generation: sample text with interventions active, so you can read what the model says.

Sampling re-runs the whole sequence each step (no KV cache), so an intervention's ``positions``
are absolute positions of the growing sequence on both backends. ``steer="response"`` restricts
every intervention to the positions whose outputs are sampled (from the last prompt token on);
``steer="all"`` also edits the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from surprise_probe.interventions.hooks import Intervention, apply_all

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
    from surprise_probe.chat import encode_conversation
    from surprise_probe.inputs import encode

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
    eos = getattr(model.tokenizer, "eos_token_id", None) if stop_at_eos else None
    generator = torch.Generator().manual_seed(seed)
    tokens = ids.unsqueeze(0).repeat(n_samples, 1)
    done = torch.zeros(n_samples, dtype=torch.bool)
    with torch.no_grad(), apply_all(model, interventions):
        for _ in range(max_new_tokens):
            logits = model(tokens, return_type="logits")[:, -1].float()
            if not torch.isfinite(logits).all():
                raise ValueError("the steered model produced non-finite logits while sampling; use a smaller alpha")
            if temperature == 0:
                next_ids = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / temperature, -1)
                next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            if eos is not None:
                next_ids = torch.where(done, torch.full_like(next_ids, eos), next_ids)
                done |= next_ids == eos
            tokens = torch.cat([tokens, next_ids.unsqueeze(-1)], dim=1)
            if done.all():
                break
    prompt_text = model.tokenizer.decode(ids.tolist())
    samples = []
    for row in tokens[:, n_prompt:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        samples.append(Sample(prompt_text, model.tokenizer.decode(row), row, seed))
    return samples
