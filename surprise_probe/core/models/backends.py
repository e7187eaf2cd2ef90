"""Which TransformerLens model a model is, and what this TransformerLens offers: one place for it.

TransformerLens 3.x has ``HookedTransformer`` and ``TransformerBridge``; 4.x has only the bridge,
and importing (even ``hasattr``-probing) a removed name raises ``ImportError``. So the toolkit
never imports ``HookedTransformer`` to test a model: it asks here, by class name.

>>> from surprise_probe.testing import tiny_model
>>> model = tiny_model()
>>> backend_name(model) in ("HookedTransformer", "TransformerBridge")
True
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util

__all__ = ["is_hooked_transformer", "is_bridge", "backend_name", "hooked_transformer_available",
           "transformer_lens_version"]


def is_hooked_transformer(model) -> bool:
    """A TransformerLens 3.x ``HookedTransformer`` (its fast paths: fused attention, suffix engine, TL KV cache)."""
    return type(model).__name__ == "HookedTransformer"


def is_bridge(model) -> bool:
    """A TransformerLens ``TransformerBridge`` (wraps the Hugging Face model; 3.9 and 4.x)."""
    return type(model).__name__ == "TransformerBridge"


def backend_name(model) -> str:
    """``"HookedTransformer"``, ``"TransformerBridge"``, or the class name of anything else."""
    return type(model).__name__


@functools.cache
def hooked_transformer_available() -> bool:
    """Whether this TransformerLens has ``HookedTransformer`` (3.x yes, 4.x no)."""
    # A module probe, not an import: on 4.x importing the removed name raises.
    return importlib.util.find_spec("transformer_lens.HookedTransformer") is not None


def transformer_lens_version() -> str:
    """The installed TransformerLens version, e.g. ``"3.9.0"`` or ``"4.3.0"``."""
    return importlib.metadata.version("transformer-lens")
