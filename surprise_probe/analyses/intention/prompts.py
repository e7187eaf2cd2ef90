"""Open-ended prompts with topic lexicons: reading a prompt file, the built-in set, and the token
ids a model sees (chat or plain format).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from surprise_probe.analyses.intention.topics import validate_lexicon
from surprise_probe.core.forward.sampling import chat_prompt_ids, plain_prompt_ids
from surprise_probe.core.models.loading import EMBEDDED_MODELS, model_id
from surprise_probe.core.utils.jsonio import read_jsonl

__all__ = ["IntentionPrompt", "read_intention_prompts", "builtin_intention_prompts"]


@dataclass(frozen=True)
class IntentionPrompt:
    """One phrasing of an open-ended prompt; phrasings of one prompt share ``group``."""

    id: str
    group: str
    prompt: str
    topics: dict[str, tuple[str, ...]]

    def to_dict(self) -> dict:
        return {"id": self.id, "group": self.group, "prompt": self.prompt,
                "topics": {k: list(v) for k, v in self.topics.items()}}


def read_intention_prompts(path: str | Path) -> list[IntentionPrompt]:
    """Read ``{"prompt", "topics", "group"?, "id"?}`` lines; ``"builtin"`` gives the built-in set.

    Errors name ``file:line``: a line that is not an object, an empty prompt, missing or malformed
    ``topics``, a duplicate ``id``. Without ``group`` a line is its own prompt group; without
    ``id`` its id is ``line<N>``.
    """
    if str(path) == "builtin":
        path = Path(str(resources.files("surprise_probe") / "data" / "intention.jsonl"))
    path = Path(path)
    prompts, seen = [], set()
    for number, value in read_jsonl(path):
        where = f"{path}:{number}"
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object with 'prompt' and 'topics', got {type(value).__name__}")
        prompt = value.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r:.60}")
        if "topics" not in value:
            raise ValueError(f"{where}: prompt has no 'topics' (expected {{topic: [lowercase stems]}})")
        topics = validate_lexicon(value["topics"], where=where)
        ident = value.get("id", f"line{number}")
        group = value.get("group", ident)
        for key, item in (("id", ident), ("group", group)):
            if not isinstance(item, (str, int)) or isinstance(item, bool) or not str(item).strip():
                raise ValueError(f"{where}: '{key}' must be a non-empty string, got {item!r}")
        if str(ident) in seen:
            raise ValueError(f"{where}: duplicate id {ident!r}")
        seen.add(str(ident))
        prompts.append(IntentionPrompt(str(ident), str(group), prompt, topics))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def builtin_intention_prompts() -> list[IntentionPrompt]:
    """The built-in set: 16 open-ended prompts x 3 phrasings over 6 shared topic lexicons."""
    return read_intention_prompts("builtin")


# ---------------------------------------------------------------------------------------------
# a prompt as a model sees it


def _resolve_format(model, requested: str) -> str:
    if requested != "auto":
        if requested == "chat" and not getattr(model.tokenizer, "chat_template", None):
            raise ValueError(f"model {model_id(model)!r} has no chat template; use prompt_format='plain'")
        return requested
    spec = EMBEDDED_MODELS.get(model_id(model))
    if spec is not None and not spec.post_trained:
        return "plain"
    return "chat" if getattr(model.tokenizer, "chat_template", None) else "plain"


def _prompt_ids(model, prompt: str, prompt_format: str) -> list[int]:
    if prompt_format == "chat":
        return [int(t) for t in chat_prompt_ids(model, prompt)]
    return [int(t) for t in plain_prompt_ids(model, prompt)]


def _text_ids(model, text: str) -> list[int]:
    return [int(t) for t in model.tokenizer(text, add_special_tokens=False)["input_ids"]]
