"""The one hook vocabulary: residual hook names, their layer and depth, and what a model has.

Every module that builds, checks or parses a hook name does it here (TransformerLens names:
``blocks.{L}.hook_resid_pre`` / ``hook_resid_mid`` / ``hook_resid_post``; the embedding is
``blocks.0.hook_resid_pre``).
"""


from __future__ import annotations

import re
from collections.abc import Sequence

from surprise_probe.core.models.loading import model_id

__all__ = ["EMBEDDING_HOOK", "FINAL_NORM_SCALE", "resid_post", "resid_post_hooks", "default_hooks", "resolve_hooks",
           "hook_layer", "hook_kind", "first_block_after", "resid_post_layer", "hook_depth", "layer_label", "mlp_post", "norm_scale_hooks"]

# The residual stream before block 0: the embedding (plus positions), for the token-identity control.
EMBEDDING_HOOK = "blocks.0.hook_resid_pre"
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
# The final norm's scale (LayerNorm: the std of the centred residual; RMSNorm: its root mean square),
# the number the residual is divided by before the unembedding.
FINAL_NORM_SCALE = "ln_final.hook_scale"
# A block's norms of the residual stream and the depth of the residual each one reads: ln1 (and a
# post-attention norm) the block's input, ln2 (and a post-MLP norm) the stream after attention.
_NORM_SCALE = re.compile(r"blocks\.(\d+)\.(ln1|ln2|ln1_post|ln2_post)\.hook_scale")
_NORM_DEPTH = {"ln1": 0.0, "ln1_post": 0.0, "ln2": 0.5, "ln2_post": 0.5}


def resid_post(layer: int) -> str:
    """The residual stream after block ``layer``.

    >>> resid_post(17)
    'blocks.17.hook_resid_post'
    """
    return f"blocks.{int(layer)}.hook_resid_post"


def resid_post_hooks(model) -> list[str]:
    """Every block's ``hook_resid_post``, in order."""
    return [resid_post(layer) for layer in range(int(model.cfg.n_layers))]


def default_hooks(model) -> list[str]:
    """The embedding (``blocks.0.hook_resid_pre``) and every layer's ``hook_resid_post``."""
    return [EMBEDDING_HOOK, *resid_post_hooks(model)]


def hook_layer(hook: str) -> int | None:
    """The block index in a hook name (``blocks.3.hook_resid_post`` -> 3), else None.

    >>> hook_layer("blocks.17.hook_resid_post"), hook_layer("ln_final.hook_normalized")
    (17, None)
    """
    match = _BLOCK.fullmatch(hook)
    return int(match.group(1)) if match else None


def resid_post_layer(hook: str) -> int | None:
    """``L`` when ``hook`` is ``blocks.{L}.hook_resid_post``, else None.

    >>> resid_post_layer("blocks.4.hook_resid_post"), resid_post_layer("blocks.4.hook_resid_pre")
    (4, None)
    """
    match = _BLOCK.fullmatch(hook)
    return int(match.group(1)) if match and match.group(2) == "hook_resid_post" else None


def hook_kind(hook: str) -> str:
    """A hook name without its block (``blocks.3.hook_resid_post`` -> ``hook_resid_post``).

    >>> hook_kind("blocks.3.hook_resid_post"), hook_kind("ln_final.hook_scale")
    ('hook_resid_post', 'ln_final.hook_scale')
    """
    match = _BLOCK.fullmatch(hook)
    return match.group(2) if match else hook


def first_block_after(hook: str) -> int | None:
    """The first block an edit of the residual stream at ``hook`` changes: ``L + 1`` after
    ``blocks.{L}.hook_resid_post``, ``L`` at ``blocks.{L}.hook_resid_pre``; None for any other hook.

    >>> first_block_after("blocks.4.hook_resid_post"), first_block_after("blocks.4.hook_resid_pre")
    (5, 4)
    """
    layer, kind = hook_layer(hook), hook_kind(hook)
    if layer is None or kind not in ("hook_resid_pre", "hook_resid_post"):
        return None
    return layer + 1 if kind == "hook_resid_post" else layer


def layer_label(hook: str) -> str:
    """How tables and plots name a hook's layer, as TransformerLens users read it.

    The block index for a block's hooks; ``embed`` for the embedding (``blocks.0.hook_resid_pre``,
    the residual stream before block 0); the hook name otherwise.

    >>> layer_label("blocks.17.hook_resid_post"), layer_label("blocks.0.hook_resid_pre")
    ('17', 'embed')
    >>> layer_label("blocks.3.hook_resid_mid")
    '3 (resid_mid)'
    """
    if hook == EMBEDDING_HOOK:
        return "embed"
    layer = hook_layer(hook)
    if layer is None:
        return hook
    kind = hook.rsplit(".", 1)[-1]
    return str(layer) if kind == "hook_resid_post" else f"{layer} ({kind.removeprefix('hook_')})"


def resolve_hooks(model, hooks: Sequence[str] | None = None, layers: Sequence[int] | None = None) -> list[str]:
    """Validate hook names / layer indices against the model; layers mean ``hook_resid_post``."""
    if hooks is not None and layers is not None:
        raise ValueError("pass hooks= or layers=, not both")
    n_layers = int(model.cfg.n_layers)
    if layers is not None:
        bad = [layer for layer in layers if not (-n_layers <= int(layer) < n_layers)]
        if bad:
            raise ValueError(f"layer {bad[0]} is out of range; this model has layers 0..{n_layers - 1}")
        hooks = [resid_post(int(layer) % n_layers) for layer in layers]
    if hooks is None:
        hooks = default_hooks(model)
    hooks = list(dict.fromkeys(hooks))
    known = model.hook_dict
    for hook in hooks:
        if hook not in known:
            similar = [name for name in known if name.split(".")[-1] == hook.split(".")[-1]][:4]
            raise ValueError(
                f"unknown hook {hook!r} for {model_id(model)!r} ({n_layers} layers, blocks.0..blocks.{n_layers - 1}); "
                f"hooks of that kind: {similar or sorted(known)[:8]}"
            )
    return hooks


def hook_depth(hook: str) -> float:
    """How many blocks the residual stream has passed through at ``hook`` (the layer-sweep x axis).

    >>> hook_depth("blocks.0.hook_resid_pre"), hook_depth("blocks.3.hook_resid_post")
    (0, 4)
    >>> hook_depth("blocks.3.hook_resid_mid")
    3.5
    """
    match = _BLOCK.fullmatch(hook)
    if not match:
        return 0 if hook in ("hook_embed", "hook_pos_embed") else float("nan")
    layer, rest = int(match.group(1)), match.group(2)
    if rest == "hook_resid_pre":
        return layer
    if rest == "hook_resid_post":
        return layer + 1
    return layer + 0.5




def mlp_post(layer: int) -> str:
    """The MLP's neuron activations of block ``layer`` (what ``W_out`` reads).

    >>> mlp_post(29)
    'blocks.29.mlp.hook_post'
    """
    return f"blocks.{int(layer)}.mlp.hook_post"


def norm_scale_hooks(model, after: str | None = None) -> list[str]:
    """The ``hook_scale`` of every norm of the residual stream, in forward order, ``ln_final`` last.

    With ``after`` (a residual hook), only the norms that read the residual stream at or after it
    (an edit at ``after`` reaches them): ``blocks.{i}.ln1`` reads block i's input (depth i),
    ``ln2`` the stream after attention (i + 0.5); query/key norms inside attention are not norms of
    the residual stream and are left out. Raises when the model has no ``ln_final.hook_scale`` (no
    final norm, or a backend that does not expose its scale), naming its normalization type.

    >>> from surprise_probe.testing import tiny_model
    >>> norm_scale_hooks(tiny_model(), after="blocks.0.hook_resid_post")
    ['blocks.1.ln1.hook_scale', 'blocks.1.ln2.hook_scale', 'ln_final.hook_scale']
    """
    known = model.hook_dict
    if FINAL_NORM_SCALE not in known:
        raise ValueError(
            f"{model_id(model)!r} has no {FINAL_NORM_SCALE!r} hook (normalization_type="
            f"{getattr(model.cfg, 'normalization_type', None)!r}): it has no final norm whose scale could be frozen"
        )
    start = hook_depth(after) if after is not None else float("-inf")
    found = []
    for name in known:
        match = _NORM_SCALE.fullmatch(name)
        if match:
            depth = int(match.group(1)) + _NORM_DEPTH[match.group(2)]
            if depth >= start:
                found.append((depth, match.group(2).endswith("_post"), name))
    return [name for *_, name in sorted(set(found))] + [FINAL_NORM_SCALE]
