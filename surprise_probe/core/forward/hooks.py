"""The one hook vocabulary: residual hook names, their layer and depth, and what a model has.

Every module that builds, checks or parses a hook name does it here (TransformerLens names:
``blocks.{L}.hook_resid_pre`` / ``hook_resid_mid`` / ``hook_resid_post``; the embedding is
``blocks.0.hook_resid_pre``).
"""


from __future__ import annotations

import re
from collections.abc import Sequence

from surprise_probe.core.models.loading import model_id

__all__ = ["EMBEDDING_HOOK", "resid_post", "resid_post_hooks", "default_hooks", "resolve_hooks", "hook_layer",
           "resid_post_layer", "hook_depth", "layer_label"]

# The residual stream before block 0: the embedding (plus positions), for the token-identity control.
EMBEDDING_HOOK = "blocks.0.hook_resid_pre"
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


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


