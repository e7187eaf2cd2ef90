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

A TransformerBridge shares the prompt the same way: :func:`bridge_frozen_prefix` runs the
prompt once with a Hugging Face key-value cache and returns forward arguments under which a later
forward of the positions after it attends to those keys and values (expanded to however many rows
the forward has after a fan-out) and leaves them unchanged, so one cache serves every condition.
And it starts at the hook: :func:`bridge_from_layer` runs the Hugging Face decoder from block
``L`` on, with a given residual in place of the embedding (Llama, Mistral, Qwen2 and Qwen3
decoders, which hand the embedding to the first layer unchanged; :func:`bridge_start_layer` says
where it applies). The steering sweep's fan-out engine uses both, activation patching the second.

>>> from surprise_probe.testing import tiny_model
>>> model = tiny_model()
>>> layer = 1 if is_hooked_transformer(model) else None  # a bridge's is bridge_start_layer
>>> start_layer(model, "blocks.0.hook_resid_post") == layer, start_layer(model, "blocks.1.hook_attn_out")
(True, None)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

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


_EMBEDDING_FEEDS_LAYERS = frozenset({"LlamaModel", "MistralModel", "Qwen2Model", "Qwen3Model"})
"""Hugging Face decoders whose forward hands the token embedding to the first layer unchanged
(no position embedding added, no scaling), so a bridge can start at any layer by replacing it."""


def _bridge_decoder(model):
    """The Hugging Face decoder whose ``layers`` are the bridge's blocks, or None."""
    decoder = getattr(getattr(model, "original_model", None), "model", None)
    layers = getattr(decoder, "layers", None)
    if (type(decoder).__name__ not in _EMBEDDING_FEEDS_LAYERS or not isinstance(layers, nn.ModuleList)
            or len(layers) != len(model.blocks) or any(a is not b for a, b in zip(layers, model.blocks, strict=True))):
        return None
    return decoder


def bridge_can_start(model) -> bool:
    """Whether a forward of ``model`` can start at a block (``bridge_from_layer``): a TransformerBridge
    around a decoder that hands the embedding to its first layer unchanged, with full attention
    in every layer."""
    decoder = _bridge_decoder(model) if is_bridge(model) else None
    return decoder is not None and _full_attention_only(decoder.config)


def warn_whole_forwards(model, hooks, what: str) -> None:
    """Warn (once per place and model) that a bridge runs ``what`` as whole forwards at residual-stream
    ``hooks`` because ``bridge_from_layer`` does not cover its decoder: the same numbers, slower."""
    if not is_bridge(model) or bridge_can_start(model) or not any(first_block_after(h) for h in hooks):
        return
    decoder = getattr(getattr(model, "original_model", None), "model", None)
    config = getattr(decoder, "config", None)
    why = (f"{type(decoder).__name__} is not a decoder it covers ({', '.join(sorted(_EMBEDDING_FEEDS_LAYERS))})"
           if type(decoder).__name__ not in _EMBEDDING_FEEDS_LAYERS else "its layers do not all attend to the "
           f"whole past (layer types {sorted(set(getattr(config, 'layer_types', None) or []))}, sliding window "
           f"{getattr(config, 'sliding_window', None)})")
    warnings.warn(f"{what} on this TransformerBridge runs whole forwards, not from the edited block on: {why}; "
                  "the same numbers, slower (docs/interventions.md)", stacklevel=3)


def bridge_start_layer(model, hook: str) -> int | None:
    """The block a TransformerBridge forward can start at after an edit at ``hook`` (``bridge_from_layer``),
    or None where it cannot: not a bridge, not a residual-stream hook (or one before the first
    block, where there is nothing to skip), a decoder that changes the embedding before its first
    layer, or a sliding-window model. After the last block it is ``n_layers`` (the final norm and
    unembedding only)."""
    first = first_block_after(hook)
    if not first or first > int(model.cfg.n_layers) or not bridge_can_start(model):
        return None
    return first


@contextmanager
def bridge_from_layer(model, layer: int, residual: Float[Tensor, "rows pos d_model"]) -> Iterator[None]:
    """Inside, a forward of a TransformerBridge skips blocks ``< layer`` and feeds ``residual``
    (the residual stream entering block ``layer``, any number of rows) to block ``layer``;
    ``layer`` from ``bridge_start_layer``; ``layer = n_layers`` runs the final norm and unembedding
    only. The tokens passed to the forward give only the sequence's length and positions (their
    embedding is replaced).

    >>> from surprise_probe.testing import tiny_bridge
    >>> model = tiny_bridge(n_layers=3)
    >>> tokens = torch.tensor([[5, 6, 7, 8, 9]])
    >>> residual = model(tokens, stop_at_layer=2)
    >>> with bridge_from_layer(model, 2, residual.expand(4, -1, -1)):
    ...     logits = model(tokens)
    >>> logits.shape[0], bool(torch.allclose(logits[3], model(tokens)[0], atol=1e-5))
    (4, True)
    """
    decoder = _bridge_decoder(model)
    if decoder is None or not 0 < layer <= len(decoder.layers):
        raise ValueError(f"cannot start this model's forward at block {layer} (see bridge_start_layer)")
    layers = decoder.layers
    decoder.layers = nn.ModuleList(list(layers)[layer:])  # the same modules: their layer_idx (cache) stays
    try:
        with model.hooks(fwd_hooks=[("hook_embed", lambda embedding, hook: residual)]):
            yield
    finally:
        decoder.layers = layers


class _Stop(Exception):
    """Ends a forward once the residual it was run for is kept."""


@torch.no_grad()
def bridge_residual(model, tokens: Int[Tensor, "batch pos"], layer: int, **forward_kwargs) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream entering block ``layer`` of a bridge (``layer = n_layers``: after the
    last block), from a forward that stops there: what :func:`bridge_from_layer` takes.

    >>> from surprise_probe.testing import tiny_bridge
    >>> model = tiny_bridge(n_layers=2)
    >>> tokens = torch.tensor([[5, 6, 7, 8, 9]])
    >>> with bridge_from_layer(model, 2, bridge_residual(model, tokens, 2)):
    ...     logits = model(tokens)
    >>> bool(torch.allclose(logits, model(tokens), atol=1e-5))
    True
    """
    if not 0 < layer <= int(model.cfg.n_layers):
        raise ValueError(f"layer must be in 1..{int(model.cfg.n_layers)}, got {layer}")
    kept = []

    def keep(residual, hook):
        kept.append(residual)
        raise _Stop

    try:
        with model.hooks(fwd_hooks=[(f"blocks.{layer - 1}.hook_resid_post", keep)]):
            model(tokens, return_type=None, **forward_kwargs)
    except _Stop:
        pass
    if not kept:
        raise RuntimeError(f"the forward did not reach blocks.{layer - 1}.hook_resid_post")
    return kept[0]
