"""A model's attention as one fused kernel, where that is the same computation.

TransformerLens' attention materialises the (batch x heads x query x key) scores in float32,
masks them, softmaxes them, zeroes the NaN of fully masked rows and runs two hook points on
them: four passes over a tensor that grows with the square of the context, plus a per-op cost
that dominates a one-token decoding step. :func:`fused_attention` swaps in
``torch.nn.functional.scaled_dot_product_attention`` computed from the block's own Q/K/V
projections, rotary embedding (with its left-padding positions) and TransformerLens' own
causal or local-window mask combined with the padding mask. It applies only where that is the
same computation: not with soft-capped scores, ALiBi or relative positions, attention sinks,
log-n scaling, OLMo's QK norm or QKV clipping, split or per-head inputs, 4-bit weights, or any
hook on the attention's hook points (those run the model's own attention, so the hooks fire).

A ``TransformerBridge`` (TransformerLens 3.9 and 4.x) re-implements the Hugging Face attention
step by step for the same two hook points, so it pays the same passes. :func:`fuse_bridge_attention`
gives its rotary attention (Llama, Mistral, Qwen2, SmolLM2, ...) the fused kernel: the bridge's own
Q/K/V projections, ``hook_cos``/``hook_sin``, rotary embedding, key-value cache update and mask
(``_apply_reconstruct_attention_mask``, so padding, causal and sliding-window masks are the
bridge's), then ``scaled_dot_product_attention`` and the bridge's output projection; every hook
point fires except ``hook_attn_scores`` and ``hook_pattern``, which do not exist in a fused kernel.
It checks **at every call** whether either of those two has a hook (``run_with_cache`` of a
pattern, a pattern patch, a gradient hook) or the call asks for attention weights; if so that call
runs the bridge's own attention. Architectures it does not cover (Q/K norms, soft-capping, sinks,
partial or interleaved rotary, split inputs, gated queries) are never patched:
:func:`fuse_bridge_attention` returns how many layers it fused, and ``load_model`` records it.

Two more bridge shortcuts live here because they follow the same rule (the same outputs, and the
bridge's own code whenever a hook could see a difference): :func:`fuse_bridge_norms` skips the
norms' observation-only second pass, :func:`memoize_bridge_block_kwargs` the blocks' per-call
``inspect.signature``. ``load_model`` applies all three to every bridge.

Used by the steering sweep's suffix engine (``interventions.suffix``) and by the sampler
(``surprise_probe.core.forward.sampling``); tests/test_interventions_fused_attention.py checks both against the model's
attention to 1e-5, padded and unpadded, with and without a key-value cache.

>>> from surprise_probe.core.models.backends import is_hooked_transformer
>>> from surprise_probe.testing import tiny_model
>>> model = tiny_model()
>>> if is_hooked_transformer(model):  # TransformerLens 3.x: fused for the block
...     with fused_attention(model, [1]) as fused:
...         pass
... else:  # a TransformerBridge (3.9 and 4.x): fused in place, every layer
...     fused = fuse_bridge_attention(model) == model.cfg.n_layers
>>> fused
True
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from surprise_probe.core.models.backends import hooked_transformer_available

__all__ = ["fused_attention", "fusable", "fuse_bridge_attention", "bridge_fusable", "bridge_fused_layers",
           "fuse_bridge_norms", "bridge_norm_fusable", "memoize_bridge_block_kwargs"]

_OLMO_QK_NORM = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def _has_hooks(point) -> bool:
    """Whether a hook point has any hook (PyTorch's or TransformerLens' own lists)."""
    return bool(point._forward_hooks or point._forward_pre_hooks or point._backward_hooks
                or getattr(point, "fwd_hooks", None) or getattr(point, "bwd_hooks", None))


def fusable(attn) -> bool:
    """Whether the fused kernel computes exactly what ``attn.forward`` does (with its hooks)."""
    if not hooked_transformer_available():
        return False  # TransformerLens 4.x: no HookedTransformer components to fuse
    from transformer_lens.components import Attention, GroupedQueryAttention
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.utilities.activation_functions import softcap_enabled

    if type(attn) not in (Attention, GroupedQueryAttention):
        return False  # e.g. a TransformerBridge's attention (fuse_bridge_attention covers those)
    cfg = attn.cfg
    hooked = any(_has_hooks(point) for point in attn.modules() if isinstance(point, HookPoint))
    return (
        type(attn) in (Attention, GroupedQueryAttention)
        and "forward" not in vars(attn)  # not already replaced by someone else
        and callable(getattr(attn, "_make_causal_mask", None))  # TransformerLens' mask, reused as is
        and not hooked
        and cfg.positional_embedding_type in ("standard", "rotary")
        and (getattr(attn, "_attention_dir_override", None) or cfg.attention_dir) == "causal"
        and not softcap_enabled(cfg.attn_scores_soft_cap)
        and not getattr(cfg, "use_attention_sinks", False)
        and not getattr(cfg, "use_logn_attn", False)
        and getattr(cfg, "clip_qkv", None) is None
        and cfg.original_architecture not in _OLMO_QK_NORM
        and not (cfg.use_attn_result or cfg.use_split_qkv_input or cfg.use_attn_in or cfg.load_in_4bit)
    )


def _fused_forward(
    attn,
    query_input: Float[Tensor, "batch pos d_model"],
    key_input: Float[Tensor, "batch pos d_model"],
    value_input: Float[Tensor, "batch pos d_model"],
    past_kv_cache_entry=None,
    attention_mask: Int[Tensor, "batch kv_pos"] | None = None,
    **_,
) -> Float[Tensor, "batch pos d_model"]:
    """``attn.forward`` with the scores never materialised."""
    q, k, v = attn.calculate_qkv_matrices(query_input, key_input, value_input)  # (batch, pos, heads, d_head)
    offset = 0
    if past_kv_cache_entry is not None:
        offset = past_kv_cache_entry.past_keys.size(1)
        k, v = past_kv_cache_entry.append(k, v)
    # A mask is applied as given, all ones or not (checking would cost a device sync per layer).
    mask = attention_mask
    if attn.cfg.positional_embedding_type == "rotary":
        # With left padding TransformerLens counts positions from each row's first real token.
        q = attn.hook_rot_q(attn.apply_rotary(q, offset, mask))
        k = attn.hook_rot_k(attn.apply_rotary(k, 0, mask))
    # TransformerLens' own mask (causal, and the window of local layers) at these positions.
    allowed = attn._make_causal_mask(q.shape[1], k.shape[1], offset, q.device)[0, 0]  # (pos, kv_pos)
    if mask is not None:
        allowed = allowed & mask.to(q.device).bool()[:, None, None, :]  # (batch, 1, pos, kv_pos)
    z = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.to(q.dtype).transpose(1, 2),
        attn_mask=allowed, scale=1.0 / float(attn.attn_scale), enable_gqa=k.shape[2] != q.shape[2],
    )  # (batch, heads, pos, d_head)
    if mask is not None:
        # A query that may attend to nothing (a pad position) gets zeros, as TransformerLens'
        # NaN-zeroing gives it (kernels differ there: the CPU kernel gives zeros, others NaN).
        z = z.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    z = attn.hook_z(z.transpose(1, 2))  # (batch, pos, heads, d_head)
    z = z.reshape(*z.shape[:2], -1)
    w_o = attn.W_O.permute(2, 0, 1)  # (d_model, heads, d_head)
    if w_o.is_contiguous():  # stored as TransformerLens' forward asks (sampling.decoding_layout)
        return F.linear(z.to(w_o.dtype), w_o.reshape(w_o.shape[0], -1), attn.b_O)
    return z.to(attn.W_O.dtype) @ attn.W_O.reshape(-1, attn.W_O.shape[-1]) + attn.b_O


@contextmanager
def fused_attention(model, layers: Iterable[int]) -> Iterator[bool]:
    """Within the block, the attention of ``layers`` runs as one fused kernel, if every one of
    them can (``yield``s whether it does; otherwise nothing changes). Hooks added to the
    attention inside the block would not fire: enter it after adding them."""
    attns = [model.blocks[i].attn for i in layers]
    if not attns or not all(fusable(attn) for attn in attns):
        yield False
        return
    for attn in attns:
        attn.forward = partial(_fused_forward, attn)  # the instance attribute shadows the method
    try:
        yield True
    finally:
        for attn in attns:
            del attn.forward


# -- TransformerBridge ---------------------------------------------------------------------------


def bridge_fusable(attn) -> bool:
    """Whether :func:`fuse_bridge_attention` covers this bridge attention component exactly."""
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge as Rotary,
    )

    hf = getattr(attn, "original_component", None)
    cfg = getattr(attn, "config", None)
    flag = lambda name: bool(getattr(cfg, name, False))  # noqa: E731 - local shorthand
    gate = getattr(attn, "_modules", {}).get("gate")
    return (
        isinstance(attn, Rotary)
        and type(attn).forward is Rotary.forward  # not an architecture's own forward
        and type(attn)._pre_output_projection is Rotary._pre_output_projection
        and "forward" not in vars(attn)
        and hf is not None and isinstance(getattr(hf, "head_dim", None), int)
        and all(hasattr(attn, name) for name in ("q", "k", "v", "o", "hook_in", "hook_out",
                                                 "hook_attn_scores", "hook_pattern"))
        and "q_norm" not in attn.submodules and "k_norm" not in attn.submodules
        and not any(flag(name) for name in ("use_split_qkv_input", "use_attn_in", "gated_q_proj",
                                            "use_attn_result", "rotary_adjacent_pairs",
                                            "rotary_interleaved_cos_sin", "qk_norm_after_rope"))
        and getattr(hf, "key_multiplier", None) is None
        and getattr(hf, "attn_logit_softcapping", None) is None
        and getattr(hf, "sinks", None) is None
        and getattr(getattr(hf, "config", None), "clip_qkv", None) is None
        and not (isinstance(rope := getattr(getattr(hf, "config", None), "rope_parameters", None), dict)
                 and rope.get("llama_4_scaling_beta") is not None)
        and (gate is None or gate.original_component is None)
        and getattr(cfg, "positional_embedding_type", "rotary") == "rotary"
    )


def _bridge_fused_forward(attn, *args, **kwargs):
    """The bridge attention's forward with the scores never materialised (see the module docstring)."""
    own = type(attn).forward
    hf = attn.original_component
    head_dim = hf.head_dim
    position_embeddings = kwargs.get("position_embeddings")
    if (
        _has_hooks(attn.hook_attn_scores) or _has_hooks(attn.hook_pattern)
        or kwargs.get("output_attentions") or (attn.training and getattr(hf, "attention_dropout", 0.0))
        or not isinstance(position_embeddings, tuple) or position_embeddings[0].shape[-1] != head_dim
        or not (args and isinstance(args[0], Tensor) or "hidden_states" in kwargs)
    ):
        return own(attn, *args, **kwargs)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    kwargs = dict(kwargs)
    hidden_states = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
    kwargs.pop("position_embeddings")
    attention_mask = kwargs.pop("attention_mask", None)
    hidden_states = attn.hook_in(hidden_states)
    input_shape = hidden_states.shape[:-1]
    shape = (*input_shape, -1, head_dim)
    q = attn.q(hidden_states).view(shape).transpose(1, 2)  # (batch, heads, pos, d_head)
    k = attn.k(hidden_states).view(shape).transpose(1, 2)
    v = attn.v(hidden_states).view(shape).transpose(1, 2)
    cos, sin = attn._apply_position_embedding_hooks(position_embeddings)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if hasattr(attn, "hook_rot_q"):
        q = attn.hook_rot_q(q)
    if hasattr(attn, "hook_rot_k"):
        k = attn.hook_rot_k(k)
    k, v = attn._update_kv_cache(k, v, **kwargs)
    # The bridge's own mask (padding, causal, window), added to zero scores: one row per query,
    # shared by the heads.
    mask = attn._apply_reconstruct_attention_mask(
        attn_scores=q.new_zeros(q.shape[0], 1, q.shape[2], k.shape[2]), attention_mask=attention_mask,
        seq_len=k.shape[2], q_seq_len=q.shape[2],
    )
    dead = torch.isneginf(mask).all(-1, keepdim=True) if attn.compatibility_mode else None
    if dead is not None:
        # A query that may attend to nothing (a left pad) gets zeros, as the bridge's NaN scrub
        # gives it; it attends to everything first, so no kernel's forward or backward sees a NaN.
        mask = mask.masked_fill(dead, 0.0)
    z = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=float(getattr(hf, "scaling", head_dim**-0.5)),
        enable_gqa=k.shape[1] != q.shape[1],
    )  # (batch, heads, pos, d_head)
    if dead is not None:
        z = z.masked_fill(dead, 0.0)
    z = z.transpose(1, 2).reshape(*input_shape, -1)
    weight = getattr(getattr(attn.o, "original_component", None), "weight", None)
    if isinstance(weight, Tensor) and weight.dtype.is_floating_point and z.dtype != weight.dtype:
        z = z.to(weight.dtype)
    return attn.hook_out(attn.o(z)), None


def _is_fused(attn) -> bool:
    forward = getattr(attn, "__dict__", {}).get("forward")
    return isinstance(forward, partial) and forward.func is _bridge_fused_forward


def bridge_fused_layers(model) -> list[int]:
    """The layers whose attention :func:`fuse_bridge_attention` has fused."""
    return [i for i, block in enumerate(getattr(model, "blocks", ())) if _is_fused(getattr(block, "attn", None))]


def fuse_bridge_attention(model, enable: bool = True) -> int:
    """Give a ``TransformerBridge``'s rotary attention the fused kernel (``enable=False`` undoes it);
    returns the number of layers fused. Anything else (a HookedTransformer, another architecture)
    is left as is and gives 0.

    >>> from surprise_probe.testing import tiny_bridge
    >>> model = tiny_bridge()
    >>> fuse_bridge_attention(model), fuse_bridge_attention(model, enable=False)
    (2, 0)
    """
    fused = 0
    for block in getattr(model, "blocks", ()):
        attn = getattr(block, "attn", None)
        if attn is None:
            continue
        own = vars(attn)  # the bridge forwards attribute writes to the wrapped module: write its dict
        if _is_fused(attn):
            del own["forward"]
        if enable and type(model).__name__ == "TransformerBridge" and bridge_fusable(attn):
            own["forward"] = partial(_bridge_fused_forward, attn)  # the instance attribute shadows the method
            fused += 1
    return fused


def _bridge_norm_class():
    from transformer_lens.model_bridge.generalized_components.normalization import (
        NormalizationBridge,
    )

    return NormalizationBridge


def bridge_norm_fusable(norm) -> bool:
    """Whether :func:`fuse_bridge_norms` may give ``norm`` its direct path: a ``NormalizationBridge``
    (or a subclass that overrides neither of the two methods involved) around a real norm module."""
    cls = _bridge_norm_class()
    return (
        isinstance(norm, cls)
        and type(norm).forward is cls.forward
        and type(norm)._hf_autograd_forward_with_hooks is cls._hf_autograd_forward_with_hooks
        and isinstance(getattr(norm, "original_component", None), torch.nn.Module)
        and not isinstance(norm.original_component, torch.nn.Identity)
        and "forward" not in vars(norm)
    )


def _bridge_norm_forward(norm, hidden_states: Tensor, **kwargs) -> Tensor:
    """The bridge norm's forward without its observation-only recomputation (see fuse_bridge_norms)."""
    native = norm.use_native_layernorm_autograd or getattr(norm.config, "layer_norm_folding", False)
    if kwargs or not native or _has_hooks(norm.hook_scale) or _has_hooks(norm.hook_normalized):
        return _bridge_norm_class().forward(norm, hidden_states, **kwargs)
    hidden_states = norm.hook_in(hidden_states)
    result = norm.original_component(hidden_states)
    if result.dtype != hidden_states.dtype:
        result = result.to(hidden_states.dtype)
    return norm.hook_out(result)


def _is_fused_norm(norm) -> bool:
    forward = getattr(norm, "__dict__", {}).get("forward")
    return isinstance(forward, partial) and forward.func is _bridge_norm_forward


def fuse_bridge_norms(model, enable: bool = True) -> int:
    """Skip a ``TransformerBridge`` norm's observation-only recomputation when nothing observes it;
    returns the number of norms given the direct path (``enable=False`` undoes it).

    The bridge's norm (TransformerLens 3.9 and 4.x, ``_hf_autograd_forward_with_hooks``) computes
    the scale and the normalized input a second time, beside the Hugging Face norm, only to pass
    them to ``hook_scale`` and ``hook_normalized``; without a hook on either it then returns the
    Hugging Face norm's own output. The direct path returns that output without the second
    computation (about 5% of a one-token decoding step on SmolLM2). It checks at every call: a hook
    on either point (``run_with_cache``, an edit, a gradient hook) runs the bridge's own forward.

    >>> from surprise_probe.testing import tiny_bridge
    >>> model = tiny_bridge()
    >>> fuse_bridge_norms(model), fuse_bridge_norms(model, enable=False)
    (5, 0)
    """
    if type(model).__name__ != "TransformerBridge":
        return 0
    fused = 0
    for module in model.modules():
        if _is_fused_norm(module):
            del vars(module)["forward"]
        if enable and bridge_norm_fusable(module):
            vars(module)["forward"] = partial(_bridge_norm_forward, module)  # shadows the method
            fused += 1
    return fused


def _memoized_kwargs_filter(block, kwargs: dict, num_positional_args: int = 0) -> dict:
    """``BlockBridge._filter_kwargs_for_forward`` with its decision remembered per set of names."""
    forward = block.original_component.forward
    key = (getattr(forward, "__func__", forward), tuple(kwargs), num_positional_args)
    memo = vars(block).setdefault("_sp_kwargs_memo", {})
    kept = memo.get(key)
    if kept is None:
        filtered = type(block)._filter_kwargs_for_forward(block, kwargs, num_positional_args)
        kept = memo[key] = True if filtered is kwargs else tuple(filtered)
        return filtered
    return kwargs if kept is True else {name: kwargs[name] for name in kept}


def memoize_bridge_block_kwargs(model, enable: bool = True) -> int:
    """Remember, per block, which keyword arguments the Hugging Face layer accepts; returns the
    number of blocks changed (``enable=False`` undoes it).

    A ``TransformerBridge`` block (TransformerLens 3.9 and 4.x) filters the keyword arguments it
    passes to the Hugging Face layer by ``inspect.signature`` of the layer's forward, at every call:
    3% of a one-token decoding step on SmolLM2. The filter depends only on the arguments' names
    (and how many are positional) and on that forward, so its answer is kept per such key.

    >>> from surprise_probe.testing import tiny_bridge
    >>> memoize_bridge_block_kwargs(tiny_bridge())
    2
    """
    if type(model).__name__ != "TransformerBridge":
        return 0
    changed = 0
    for block in getattr(model, "blocks", ()):
        own = vars(block)
        own.pop("_sp_kwargs_memo", None)
        forward = own.get("_filter_kwargs_for_forward")
        if isinstance(forward, partial) and forward.func is _memoized_kwargs_filter:
            del own["_filter_kwargs_for_forward"]
        if (enable and callable(getattr(type(block), "_filter_kwargs_for_forward", None))
                and "_filter_kwargs_for_forward" not in own and getattr(block, "original_component", None) is not None):
            own["_filter_kwargs_for_forward"] = partial(_memoized_kwargs_filter, block)
            changed += 1
    return changed
