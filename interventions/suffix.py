"""Run a HookedTransformer from a residual hook onwards, sharing the clean prompt's key-value cache.

A sweep that edits the residual stream at one hook, only at positions ``>= start``, leaves every
activation before the hook, and every activation at positions ``< start`` in every layer,
identical to the clean run. So the clean run is computed once per sequence:

1. the prompt (positions ``< start``) through every layer, keeping each layer's keys and values;
2. the rest of the sequence up to the hook (the residual that conditions edit);

and each condition then runs only the blocks after the hook, only at positions ``>= start``,
attending to the cached prompt keys and values, and is unembedded only where it is scored. That
is at or below the compute floor of a sweep (one clean forward up to the hook plus one forward
per condition from the hook to the scored logits). Numbers equal the full forward's to float
rounding (tested against the one-condition loop).

The blocks after the hook compute attention as one fused kernel
(``torch.nn.functional.scaled_dot_product_attention``, with the block's own projections, rotary
embedding and causal or local mask) where that is the same computation
(``surprise_probe.core.models.attention.fused_attention``):
TransformerLens materialises the (rows x heads x query x key) scores in float32 and makes four
passes over them, which on SmolLM2 was a fifth of a sweep's time and grows with the square of
the context. Where it is not the same computation (soft-capped scores, ALiBi, attention sinks,
hooks on the attention, ...), or with ``FUSE_ATTENTION = False``, the model's own attention runs.

A TransformerBridge cannot be run from a hook onwards, but it shares the prompt the same way:
:func:`bridge_frozen_prefix` runs the prompt once with a Hugging Face key-value cache and returns
forward arguments under which a later forward of the positions after it attends to those keys
and values (expanded to however many rows the forward has after a fan-out) and leaves them
unchanged, so one cache serves every condition. The steering sweep's fan-out engine uses it.

>>> from surprise_probe.testing import tiny_hooked_transformer
>>> model = tiny_hooked_transformer()
>>> start_layer(model, "blocks.0.hook_resid_post"), start_layer(model, "blocks.1.hook_attn_out")
(1, None)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from surprise_probe.core.forward.hooks import first_block_after
from surprise_probe.core.forward.sampling import bridge_cache_argument, bridge_cache_shim
from surprise_probe.core.models.attention import fused_attention
from surprise_probe.core.models.backends import is_bridge, is_hooked_transformer

__all__ = ["start_layer", "SharedPrefix", "clean_prefix", "run_from_hook", "bridge_frozen_prefix",
           "FUSE_ATTENTION"]

FUSE_ATTENTION = True
"""Whether ``run_from_hook`` fuses attention where that is the same computation (a switch for
benchmarks and debugging: ``False`` runs the model's own attention everywhere)."""



def start_layer(model, hook: str) -> int | None:
    """The first block to run after an edit at ``hook``, or None when the shortcut does not apply
    (not a HookedTransformer, not a residual-stream hook, or shortformer position embeddings)."""
    first = first_block_after(hook)
    if not is_hooked_transformer(model) or first is None:
        return None
    if model.cfg.positional_embedding_type == "shortformer":
        return None
    return first


@dataclass
class SharedPrefix:
    """One sequence's clean run up to the hook; ``cache`` holds positions ``< start``."""

    start: int
    layer: int  # first block after the hook
    residual: Float[Tensor, "1 suffix d_model"]  # clean residual at the hook, positions >= start
    cache: object | None  # TransformerLensKeyValueCache (frozen) or None when start == 0


@torch.no_grad()
def clean_prefix(model, tokens: Int[Tensor, "1 pos"], layer: int, start: int) -> SharedPrefix:
    """Run the clean sequence: positions ``< start`` through every layer (keys and values kept),
    positions ``>= start`` up to block ``layer`` (exclusive)."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    if tokens.shape[0] != 1 or not 0 <= start < tokens.shape[1]:
        raise ValueError(f"expected one sequence and 0 <= start < {tokens.shape[1]}, got {tuple(tokens.shape)}, {start}")
    if start == 0:
        residual = model(tokens, stop_at_layer=layer)
        return SharedPrefix(0, layer, residual, None)
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 1)
    # Explicit all-ones masks: with a cache TransformerLens would otherwise derive the mask from
    # pad tokens, which can be real tokens of the sequence (e.g. a pad id equal to end-of-turn).
    ones = torch.ones_like(tokens)
    model(tokens[:, :start], attention_mask=ones[:, :start], past_kv_cache=cache, return_type=None)
    cache.freeze()
    residual = model(tokens[:, start:], attention_mask=ones[:, start:], past_kv_cache=cache, stop_at_layer=layer)
    return SharedPrefix(start, layer, residual, cache)


@torch.no_grad()
def run_from_hook(model, prefix: SharedPrefix, residual: Float[Tensor, "rows suffix d_model"]) -> Float[Tensor, "rows suffix d_model"]:
    """The final residual (before the final norm) of ``rows`` edited copies of the suffix."""
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
    from transformer_lens.utilities.multi_gpu import get_device_for_block_index

    rows, suffix = residual.shape[:2]
    layers = range(prefix.layer, int(model.cfg.n_layers))
    with fused_attention(model, layers if FUSE_ATTENTION else ()) as fused:
        mask = None
        if prefix.cache is not None and not fused:
            # Every position is real here; the model's attention needs the mask only because it
            # would otherwise guess padding from the pad id (see clean_prefix).
            mask = torch.ones(rows, prefix.start + suffix, dtype=torch.long, device=residual.device)
        for i in layers:
            device = get_device_for_block_index(i, model.cfg)
            residual = residual.to(device)
            entry = None
            if prefix.cache is not None:
                cached = prefix.cache[i]
                # A view per row (no copy); attention concatenates it with the suffix's own keys.
                entry = TransformerLensKeyValueCacheEntry(
                    cached.past_keys.expand(rows, -1, -1, -1), cached.past_values.expand(rows, -1, -1, -1), frozen=True
                )
                mask = None if mask is None else mask.to(device)
            residual = model.blocks[i](residual, past_kv_cache_entry=entry, attention_mask=mask)
    return residual


def _full_attention_only(config) -> bool:
    """Whether every layer attends to the whole past (no sliding window, whose cache is cropped)."""
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return layer_types == {"full_attention"} and not window


@contextmanager
def bridge_frozen_prefix(model, tokens: Int[Tensor, "1 prefix"]) -> Iterator[dict | None]:
    """Run a bridge on ``tokens`` once; inside, the keyword arguments under which a forward of the
    tokens that follow them attends to their keys and values, or None where that does not apply
    (not a TransformerBridge, a sliding-window model, a model that does not use the cache).

    Each forward's keys and values are appended to the prefix's (expanded to its rows) and not
    stored, so the same arguments serve any number of forwards, with any number of rows. The
    forwards must run inside the ``with`` (TransformerLens 3.9's bridge attention reads the cache
    only under the name ``bridge_cache_shim`` gives it).

    >>> from surprise_probe.testing import tiny_bridge
    >>> model = tiny_bridge()
    >>> tokens = torch.tensor([[5, 6, 7, 8, 9]])
    >>> full = model(tokens)[:, 3:]
    >>> with bridge_frozen_prefix(model, tokens[:, :3]) as frozen:
    ...     after = model(tokens[:, 3:], **frozen)
    >>> bool(torch.allclose(after, full, atol=1e-4, rtol=1e-4))
    True
    """
    hf_model = getattr(model, "original_model", None)
    if not is_bridge(model) or hf_model is None or not _full_attention_only(hf_model.config) or tokens.shape[1] == 0:
        yield None
        return
    with bridge_cache_shim(model), torch.no_grad():
        yield _frozen_prefix_arguments(model, hf_model, tokens)


def _frozen_prefix_arguments(model, hf_model, tokens: Tensor) -> dict | None:
    from transformers import DynamicCache

    cache = DynamicCache(config=hf_model.config)
    prefix: dict[int, tuple[Tensor, Tensor]] = {}
    update = cache.update

    def recording(key_states, value_states, layer_idx, *args, **kwargs):
        prefix[layer_idx] = update(key_states, value_states, layer_idx, *args, **kwargs)
        return prefix[layer_idx]

    def frozen(key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = prefix[layer_idx]
        rows = key_states.shape[0]
        return (torch.cat([keys.expand(rows, -1, -1, -1), key_states], dim=-2),
                torch.cat([values.expand(rows, -1, -1, -1), value_states], dim=-2))

    name = bridge_cache_argument(model)
    cache.update = recording
    model(tokens, return_type=None, use_cache=True, logits_to_keep=1, **{name: cache})
    if sorted(prefix) != list(range(int(model.cfg.n_layers))):
        return None  # some layer did not go through the cache: it would not see the prefix
    cache.update = frozen
    return {"use_cache": True, name: cache}
