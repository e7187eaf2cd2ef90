"""Sample responses from a model and keep the sampled token ids (for on-policy reads).

Re-tokenizing sampled text is not the identity (MODELS.md: 9 of 32 SmolLM2 responses changed), so
every response is stored as the exact ids of prompt + sampled tokens, with the scored mask on the
sampled tokens. Reading that item back is an on-policy read.

HookedTransformer models sample with TransformerLens' key-value cache (left-padded batches);
other models fall back to a full forward per new token (correct, slower).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from surprise_probe.chat import encode_conversation
from surprise_probe.inputs import pad_id

__all__ = ["sample_responses", "generate_to_jsonl"]


def _stop_ids(model) -> set[int]:
    tokenizer = model.tokenizer
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return {i for i in ids if i is not None}


def _sample(logits: Float[Tensor, "batch vocab"], temperature: float, generator: torch.Generator) -> Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def sample_responses(
    model,
    prompts: Sequence,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    seed: int = 0,
    chat: bool = True,
    progress: bool = False,
) -> list[dict]:
    """Sample one response per prompt; return ``{"token_ids", "scored", "prompt_len", "text"}`` items.

    ``prompts`` are user messages (strings) or full conversations; with ``chat=True`` they are
    rendered with the chat template plus the assistant header. Generation stops at the model's
    end-of-turn token, which is kept in the ids but not scored.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    encoded = []
    for i, prompt in enumerate(prompts):
        if chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            encoded.append(encode_conversation(model.tokenizer, messages, add_generation_prompt=True).token_ids)
        else:
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt {i} must be non-empty text, got {prompt!r:.60}")
            encoded.append(np.asarray(model.tokenizer(prompt)["input_ids"], dtype=np.int64))
    generator = torch.Generator().manual_seed(seed)
    stop = _stop_ids(model)
    batch, width = len(encoded), max(len(e) for e in encoded)
    if width + max_new_tokens > model.cfg.n_ctx:
        raise ValueError(f"prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) exceeds n_ctx {model.cfg.n_ctx}")
    tokens = torch.full((batch, width), pad_id(model), dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        tokens[row, width - len(ids) :] = torch.from_numpy(ids)
        mask[row, width - len(ids) :] = 1
    new_tokens = _generate(model, tokens, mask, max_new_tokens, temperature, generator, stop, progress)
    items = []
    for row, ids in enumerate(encoded):
        sampled = new_tokens[row].tolist()
        for j, token in enumerate(sampled):
            if token in stop:
                sampled = sampled[: j + 1]
                break
        ended = bool(sampled) and sampled[-1] in stop
        scored = [False] * len(ids) + [True] * (len(sampled) - int(ended)) + [False] * int(ended)
        items.append(
            {
                "token_ids": ids.tolist() + sampled,
                "scored": scored,
                "prompt_len": len(ids),
                "text": model.tokenizer.decode(sampled[: len(sampled) - int(ended)]),
                "ended": ended,
            }
        )
    return items


def _generate(model, tokens, mask, max_new_tokens, temperature, generator, stop, progress=False) -> Tensor:
    done = torch.zeros(tokens.shape[0], dtype=torch.bool)
    out = []
    steps = tqdm(total=max_new_tokens, desc="  tokens", unit="tok", leave=False, disable=not progress)
    if type(model).__name__ == "HookedTransformer":
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, tokens.shape[0])
        logits = model(tokens, attention_mask=mask, past_kv_cache=cache, padding_side="left")[:, -1]
        for _ in range(max_new_tokens):
            next_token = _sample(logits, temperature, generator)
            out.append(next_token)
            steps.update(1)
            done |= torch.isin(next_token, torch.tensor(sorted(stop)))
            if done.all():
                break
            logits = model(next_token[:, None], past_kv_cache=cache, padding_side="left")[:, -1]
    else:
        for _ in range(max_new_tokens):
            logits = model(tokens, attention_mask=mask)[:, -1]
            next_token = _sample(logits, temperature, generator)
            out.append(next_token)
            steps.update(1)
            tokens = torch.cat([tokens, next_token[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            done |= torch.isin(next_token, torch.tensor(sorted(stop)))
            if done.all():
                break
    steps.close()
    return torch.stack(out, 1)


def generate_to_jsonl(
    model,
    prompts: Sequence[dict],
    out_file: str | Path,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    batch_size: int = 16,
    seed: int = 0,
) -> Path:
    """Sample a response per ``{"id", "prompt", ...}`` and append each batch to ``out_file``.

    Each line keeps the prompt's fields plus ``token_ids``/``scored`` (the on-policy ids) and
    ``messages`` (the decoded text, for reading by other models). Rerunning skips ids already
    written, so an interrupted run resumes without duplicates (a line cut by a kill is dropped
    and redone). Each batch's seed derives from ``seed`` and its first id.
    """
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out_file.exists():
        lines = out_file.read_text().splitlines()
        good = []
        for line in lines:
            try:
                done.add(json.loads(line)["id"])
                good.append(line)
            except (json.JSONDecodeError, KeyError):
                break  # a line cut by a kill: drop it and everything after
        out_file.write_text("".join(f"{line}\n" for line in good))
    todo = [p for p in prompts if p["id"] not in done]
    with open(out_file, "a") as handle, tqdm(total=len(prompts), initial=len(done), desc="generate", unit="resp") as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            batch_seed = seed * 1_000_003 + sum(map(ord, chunk[0]["id"]))
            items = sample_responses(
                model, [p["prompt"] for p in chunk], max_new_tokens=max_new_tokens,
                temperature=temperature, seed=batch_seed, progress=True,
            )
            lines = []
            for prompt, item in zip(chunk, items, strict=False):
                record = {
                    **prompt,
                    **item,
                    "model_id": str(model.cfg.model_name),
                    "temperature": temperature,
                    "messages": [
                        {"role": "user", "content": prompt["prompt"]},
                        {"role": "assistant", "content": item["text"] or "(empty)"},
                    ],
                }
                lines.append(json.dumps(record) + "\n")
            handle.write("".join(lines))
            handle.flush()
            bar.update(len(chunk))
    return out_file
