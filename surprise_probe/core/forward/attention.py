"""A HookedTransformer's attention as one fused kernel, where that is the same computation.

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

Used by the steering sweep's suffix engine (``interventions.suffix``) and by the sampler
(``surprise_probe.core.forward.sampling``); tests/test_interventions_fused_attention.py checks both against the model's
attention to 1e-5, padded and unpadded, with and without a key-value cache.

>>> from surprise_probe.testing import tiny_hooked_transformer
>>> model = tiny_hooked_transformer()
>>> with fused_attention(model, [1]) as fused:
...     fused
True
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial

import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from surprise_probe.core.models.backends import hooked_transformer_available

__all__ = ["fused_attention", "fusable"]

_OLMO_QK_NORM = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def fusable(attn) -> bool:
    """Whether the fused kernel computes exactly what ``attn.forward`` does (with its hooks)."""
    if not hooked_transformer_available():
        return False  # TransformerLens 4.x: no HookedTransformer components to fuse
    from transformer_lens.components import Attention, GroupedQueryAttention
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.utilities.activation_functions import softcap_enabled

    cfg = attn.cfg
    hooked = any(
        point._forward_hooks or point._backward_hooks or point.fwd_hooks or point.bwd_hooks
        for point in attn.modules() if isinstance(point, HookPoint)
    )
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
