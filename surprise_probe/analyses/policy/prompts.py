"""The gap's prompts and the three formats a response is sampled and read in.

Formats (the formatting control): ``assistant`` (the response is the assistant turn after the
prompt, chat template), ``user`` (prompt and response together in one user turn, chat template)
and ``plain`` (:data:`surprise_probe.core.forward.sampling.PLAIN_FORMAT`, ``Question: ...\\nAnswer:`` then the
response; no template). A model without a chat template samples and reads in ``plain`` only.
Every source of one prompt is read behind the same :func:`prefix_ids`, so the prefix never differs
between the reads being compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from surprise_probe.core.forward.sampling import PLAIN_FORMAT, chat_prompt_ids, plain_prompt_ids
from surprise_probe.core.models.loading import model_id
from surprise_probe.core.text.files import builtin_items, builtin_prompts
from surprise_probe.core.utils.jsonio import read_jsonl

__all__ = [
    "FORMATS",
    "USER_TURN_JOIN",
    "GapPrompt",
    "read_gap_prompts",
    "builtin_gap_prompts",
    "has_chat_template",
    "prefix_ids",
    "text_response_ids",
]

FORMATS = ("assistant", "user", "plain")
USER_TURN_JOIN = "\n\n"  # the user format's separator between prompt and response
_SENTINEL = "\u2063SP-RESPONSE\u2063"


@dataclass(frozen=True)
class GapPrompt:
    id: str
    prompt: str
    answer: str | None = None


def read_gap_prompts(path: str | Path) -> list[GapPrompt]:
    """Prompts from a ``.jsonl`` of ``{"prompt": str, "answer": str (optional), "id": str (optional)}``.

    Any malformed line is an error naming ``file:line``; duplicated ids too.
    """
    prompts, seen = [], {}
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object with a 'prompt' string, got {type(record).__name__}")
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r:.60}")
        answer = record.get("answer")
        if answer is not None and (not isinstance(answer, str) or not answer.strip()):
            raise ValueError(f"{where}: 'answer' must be a non-empty string when given, got {answer!r:.60}")
        pid = record.get("id", f"line-{number}")
        if not isinstance(pid, str) or not pid:
            raise ValueError(f"{where}: 'id' must be a non-empty string when given, got {pid!r:.60}")
        if pid in seen:
            raise ValueError(f"{where}: id {pid!r} already used on line {seen[pid]}")
        seen[pid] = number
        prompts.append(GapPrompt(pid, prompt, answer))
    if not prompts:
        raise ValueError(f"{path} holds no prompts; expected one {{\"prompt\": ...}} object per line")
    return prompts


def builtin_gap_prompts() -> list[GapPrompt]:
    """The built-in conversations (prompt + human answer) first, then the open prompts (no answer)."""

    prompts = []
    for item in builtin_items():
        messages = item["messages"]
        user = next(m["content"] for m in messages if m["role"] == "user")
        answer = next((m["content"] for m in messages if m["role"] == "assistant"), None)
        prompts.append(GapPrompt(str(item.get("id", len(prompts))), user, answer))
    prompts += [GapPrompt(str(p["id"]), p["prompt"], None) for p in builtin_prompts()]
    return prompts


def has_chat_template(model) -> bool:
    return bool(getattr(model.tokenizer, "chat_template", None))


def prefix_ids(model, prompt: str, fmt: str) -> list[int]:
    """The token ids in front of the response in format ``fmt`` (identical for every source)."""
    if fmt == "plain":
        return plain_prompt_ids(model, prompt)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if not has_chat_template(model):
        raise ValueError(
            f"model {model_id(model)!r} has no chat template, so it cannot read the {fmt!r} format; "
            f"use the plain format ({PLAIN_FORMAT!r})"
        )
    if fmt == "assistant":
        return chat_prompt_ids(model, prompt)
    # user: the prompt and the response in one user turn; the prefix is the rendered template up
    # to where the response starts.
    text = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt + USER_TURN_JOIN + _SENTINEL}], tokenize=False,
        add_generation_prompt=False,
    )
    head = text[: text.index(_SENTINEL)]
    return list(model.tokenizer(head, add_special_tokens=False)["input_ids"])


def text_response_ids(model, text: str, fmt: str) -> list[int]:
    """A response text as the reader's tokens (plain format: after ``Answer:`` with one space)."""
    text = text.strip()
    if not text:
        return []
    return list(model.tokenizer((" " if fmt == "plain" else "") + text, add_special_tokens=False)["input_ids"])
