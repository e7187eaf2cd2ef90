"""Settings of one intention analysis (:class:`IntentionConfig`): sizes, seeds, the prompt format.

Recorded with the results, and the resume key of the sampling cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["IntentionConfig", "DEFAULT_KS", "PROMPT_FORMATS"]

DEFAULT_KS = (0, 1, 2, 4, 8, 16)
PROMPT_FORMATS = ("auto", "chat", "plain")


@dataclass(frozen=True)
class IntentionConfig:
    """Sizes and settings of one analysis (recorded with the results; the resume key)."""

    n_samples: int = 8
    max_new_tokens: int = 24
    temperature: float = 1.0
    ks: tuple[int, ...] = DEFAULT_KS
    followup_phrasings: int | None = 1
    prefill_tokens: int = 8
    prefill_samples: int = 4
    n_folds: int = 5
    n_shuffles: int = 5
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0
    batch_size: int = 32
    prompt_format: str = "auto"

    def __post_init__(self):
        checks = [
            (self.n_samples >= 2, f"n_samples must be >= 2 (an entropy needs several samples), got {self.n_samples}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (np.isfinite(self.temperature) and self.temperature > 0,
             f"temperature must be > 0 (a topic distribution needs sampling), got {self.temperature}"),
            (len(self.ks) >= 1 and all(int(k) == k and k >= 0 for k in self.ks) and list(self.ks) == sorted(set(self.ks)),
             f"ks must be distinct non-negative integers in increasing order, got {list(self.ks)}"),
            (max(self.ks) < self.max_new_tokens,
             f"the largest k ({max(self.ks)}) must be below max_new_tokens ({self.max_new_tokens})"),
            (self.followup_phrasings is None or self.followup_phrasings >= 1,
             f"followup_phrasings must be >= 1 or None (all), got {self.followup_phrasings}"),
            (self.prefill_tokens >= 1, f"prefill_tokens must be >= 1, got {self.prefill_tokens}"),
            (self.prefill_samples >= 1, f"prefill_samples must be >= 1, got {self.prefill_samples}"),
            (self.n_folds >= 2, f"n_folds must be >= 2, got {self.n_folds}"),
            (self.n_shuffles >= 1, f"n_shuffles must be >= 1, got {self.n_shuffles}"),
            (self.n_boot >= 1, f"n_boot must be >= 1, got {self.n_boot}"),
            (0 < self.level < 1, f"level must be in (0, 1), got {self.level}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.prompt_format in PROMPT_FORMATS,
             f"prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))

    def to_dict(self) -> dict:
        return asdict(self)
