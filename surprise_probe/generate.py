"""Sample responses from a model and keep the sampled token ids (for on-policy reads).

Re-tokenizing sampled text is not the identity (MODELS.md: 9 of 32 SmolLM2 responses changed), so
every response is stored as the exact ids of prompt + sampled tokens, with the scored mask on the
sampled tokens. Reading that item back is an on-policy read.

Sampling itself is the toolkit's one sampler, :func:`surprise_probe.sampling.sample`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from surprise_probe.sampling import chat_prompt_ids, sample

__all__ = ["sample_responses", "generate_to_jsonl"]


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
    """Sample one response per prompt; return ``{"token_ids", "scored", "prompt_len", "text", "ended"}`` items.

    ``prompts`` are user messages (strings) or full conversations; with ``chat=True`` they are
    rendered with the chat template plus the assistant header. Generation stops at the model's
    end-of-turn token, which is kept in the ids but not scored. Sampling is
    :func:`surprise_probe.sampling.sample` (batched, KV-cached, seeded per prompt).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    encoded = []
    for i, prompt in enumerate(prompts):
        if chat:
            encoded.append(chat_prompt_ids(model, prompt))
        else:
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt {i} must be non-empty text, got {prompt!r:.60}")
            encoded.append(list(model.tokenizer(prompt)["input_ids"]))
    sampled = sample(model, encoded, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                     batch_size=max(1, len(encoded)), progress=progress)
    return [
        {
            "token_ids": item.token_ids,
            "scored": item.scored,
            "prompt_len": len(item.prompt_ids),
            "text": item.text(model.tokenizer),
            "ended": item.ended,
        }
        for item in sampled
    ]


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
