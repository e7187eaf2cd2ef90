"""Attribution patching: first-order (gradient) estimates of patching along a direction.

Exact activation patching (:func:`surprise_probe.interventions.activation_patching`) needs one
forward pass per layer x position group x pair. Attribution patching estimates every layer and
position at once from one forward and one backward pass, by the first-order Taylor expansion of
the measured quantity around the unpatched run (Nanda 2023, "Attribution patching"):

**Pairs** (:func:`attribution_patching`). For a pair (source, destination), hook ``h``, unit
direction ``d`` and aligned positions ``p`` (destination) <- ``q`` (source)::

    estimate[h, p] = ((s_q - x_p) . d) * (d . dM/dx_p)

where ``x_p`` and ``s_q`` are the destination and source activations at ``h``, and ``M`` is the
destination's mean output entropy over the measured span (the first ``m`` response tokens, exactly
as in activation patching). Patching only the component along ``d`` moves ``x_p`` by
``((s_q - x_p) . d) d``, so ``estimate`` is the first-order change of ``M``; summing it over a
position group's positions estimates the exact patch of that group, ``M_patched - M_destination``.
The gradient at each hook is the total derivative (through every later layer), from one backward
pass on the destination.

**One run** (:func:`direction_attribution`). The attribution of token ``t``'s output entropy to
the component along ``d`` at hook ``h``::

    attribution[h, t] = sum_{p <= t} (x_p . d) * (d . dH_t/dx_p)

the gradient times the activation along ``d``: the first-order estimate of
``H_t(clean) - H_t(d projected out at h at every position)``. Positive: the direction's component
raises that token's entropy. It is the derivative of ``H_t`` along the tangent ``(x_p . d) d`` at
every position ``p`` of hook ``h``, so on a HookedTransformer whose hooks are all ``hook_resid_post``
one forward-mode pass per hook (from the clean residual after that block) gives it for every token
``t`` at once; a TransformerBridge does the same where it can start at a block
(``interventions.suffix.bridge_can_start``). Otherwise (other hooks or bridges) every token's own gradient is taken: the
sequence is replicated, one row per target token cut after it, and row ``t`` back-propagates ``H_t``
alone (one forward and one backward pass per chunk of rows).

Both are exact for a model that is linear in the activation (tested); how well they track exact
patching on a real model is measured by :func:`validate_attribution` (Pearson r and a scatter).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from surprise_probe.interventions.patched_runs import patched_entropies, resid_post_layers
from surprise_probe.interventions.patching import align_positions, parse_group
from surprise_probe.interventions.suffix import bridge_from_layer
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from surprise_probe.core.forward.directions import from_probe
from surprise_probe.core.forward.edits import Ablate, apply_all, unit_directions
from surprise_probe.core.forward.hooks import resid_post_hooks, resolve_hooks
from surprise_probe.core.forward.metrics import chunk_positions, output_entropy
from surprise_probe.core.forward.passes import (
    final_residual,
    forward,
    forward_metrics,
    output_entropy_at,
    unembed,
)
from surprise_probe.core.models.backends import is_hooked_transformer
from surprise_probe.core.models.devices import model_device
from surprise_probe.core.text.encoding import Encoded, encode, pad_batch, pad_id
from surprise_probe.core.utils.jsonio import software_versions, write_json
from surprise_probe.core.utils.notebook import NotebookView, ci_text, number_text
from surprise_probe.core.utils.plots import write_html
from surprise_probe.core.utils.progress import tqdm

__all__ = [
    "AttributionPatching",
    "attribution_patching",
    "direction_attribution",
    "exact_direction_ablation",
    "validate_attribution",
    "attribution_scatter_figure",
]


def _unit_vector(model, direction) -> Float[Tensor, " d_model"]:
    """A probe / SteeringDirection (checked against the model) or a raw vector, unit norm."""
    if hasattr(direction, "hook") and hasattr(direction, "direction"):
        return from_probe(model, direction).direction.float()
    return unit_directions(direction).reshape(-1)


def _gradient_forward(model, tokens, attention_mask, hooks: Sequence[str],
                      positions: Int[Tensor, "batch k"]):
    """Forward pass keeping the activations at ``hooks`` as graph nodes (for ``autograd.grad``);
    returns the logits at ``positions[b]`` of each row ``b`` only, ``(batch, k, vocab)``.

    On a HookedTransformer the pass stops at the final residual and the final norm and
    unembedding run at those positions only; otherwise (a TransformerBridge) the full logits are
    gathered. The first hook to fire becomes a leaf that requires grad when the model's parameters
    do not (frozen models), so a graph always exists; later hooks are functions of it.
    """
    known = model.hook_dict
    stored: dict[str, Tensor] = {}

    def keeper(name: str, canonical: str):
        def hook_fn(activation, hook):
            # A TransformerBridge calls a hook once per alias; keep the canonical call only.
            if hook.name is not None and hook.name != canonical:
                return activation
            if not activation.requires_grad:
                activation = activation.detach().requires_grad_(True)
            stored[name] = activation
            return activation

        return hook_fn

    fwd_hooks = [(name, keeper(name, known[name].name or name)) for name in hooks]
    rows = torch.arange(tokens.shape[0]).unsqueeze(1)
    residual_only = is_hooked_transformer(model) and not any(
        h.startswith(("ln_final", "unembed")) for h in hooks)
    with torch.enable_grad(), model.hooks(fwd_hooks=fwd_hooks):
        if residual_only:
            residual = model(tokens, attention_mask=attention_mask, stop_at_layer=int(model.cfg.n_layers))
            logits = unembed(model, residual[rows, positions])
        else:
            logits = model(tokens, attention_mask=attention_mask, return_type="logits")[rows, positions]
    return logits, stored


@torch.no_grad()
def _logits_at(model, batch, hooks: Sequence[str], positions) -> tuple[Tensor, dict[str, Tensor]]:
    """The logits at ``positions`` (every row) and the ``hooks``' activations; on a
    HookedTransformer only those positions are normed and unembedded."""
    out = final_residual(model, batch, hooks)
    if out is None:
        logits, acts = forward(model, batch, hooks)
        return logits[:, positions], acts
    residual, acts = out
    return unembed(model, residual[:, positions]), acts


@dataclass(repr=False)
class AttributionPatching(NotebookView):
    """First-order estimates of patching the component along ``d``, source -> destination.

    ``estimate[pair][hook][group]``: estimated change of the destination's mean measured entropy
    (nats) when that group is patched at that hook. ``per_position[pair][hook]``: the estimate at
    each aligned response position (first ``m`` response tokens, destination order).
    ``exact`` (filled by :func:`validate_attribution`): the same grid measured by patching.
    """

    hooks: list[str]
    groups: list[str]
    direction_hook: str | None
    estimate: list[list[list[float]]]
    per_position: list[list[list[float]]]
    entropy_destination: list[float]
    entropy_source: list[float]
    n_pairs: int
    n_measured_tokens: int
    exact: list[list[list[float]]] | None = None
    pearson_r: float | None = None
    pearson_r_ci: tuple[float, float] | None = None
    n_points: int | None = None
    level: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, folder: str | Path) -> dict[str, Path]:
        """Write ``attribution.json`` (results, sizes, versions) and, when validated, the scatter
        ``attribution.html`` into ``folder``."""

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        if self.exact is not None:
            paths["html"] = write_html(attribution_scatter_figure(self), folder / "attribution.html")
        paths["json"] = write_json(folder / "attribution.json",
                                   {**self.to_dict(), "software_versions": software_versions()})
        return paths

    def _view(self) -> tuple[str, list[tuple[str, str]]]:
        grid = np.asarray(self.estimate, float).mean(axis=0) if self.n_pairs else np.zeros((0, 0))
        rows = [("sample", f"{self.n_pairs} pairs, {self.n_measured_tokens} measured tokens"),
                ("estimated", f"{len(self.hooks)} hooks x groups {', '.join(self.groups)}")]
        if grid.size:
            h, g = np.unravel_index(int(np.abs(grid).argmax()), grid.shape)
            rows.append(("largest mean estimate", f"{number_text(grid[h, g], 4)} nats at {self.hooks[h]}, {self.groups[g]}"))
        if self.pearson_r is None:
            check = "not validated (validate_attribution measures the exact patching)"
        else:
            check = f"r {ci_text(self.pearson_r, *(self.pearson_r_ci or (None, None)))} over {self.n_points} points"
        rows.append(("estimate vs exact patching", check))
        return f"{self.n_pairs} pairs, {len(self.hooks)} hooks, {check.split(' (')[0]}", rows

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """``(estimate, exact)`` flattened over pairs x hooks x groups (needs ``exact``)."""
        if self.exact is None:
            raise ValueError("no exact patching values; run validate_attribution to measure them")
        return np.asarray(self.estimate, float).ravel(), np.asarray(self.exact, float).ravel()


def _encode_pairs(model, pairs) -> list[tuple[Encoded, Encoded]]:
    if not pairs:
        raise ValueError("no pairs given; expected at least one (source, destination) pair")

    def enc(item, where):
        return item if isinstance(item, Encoded) else encode(model, item, index=where)

    return [(enc(s, f"pair {i} source"), enc(d, f"pair {i} destination")) for i, (s, d) in enumerate(pairs)]


def attribution_patching(
    model,
    pairs: Sequence[tuple],
    *,
    direction,
    hooks: Sequence[str] | None = None,
    groups: Sequence[str] = ("response", "first4"),
    progress: bool = True,
) -> AttributionPatching:
    """Estimate patching along ``direction`` at every hook and position group (module doc).

    One forward pass on each source and one forward plus one backward pass on each destination.
    ``hooks`` default to every layer's ``hook_resid_post``; ``direction`` is a probe direction,
    a ``SteeringDirection`` or a ``(d_model,)`` vector.

    >>> from surprise_probe.testing import tiny_model
    >>> model = tiny_model()
    >>> src = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello world."}]
    >>> dst = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A cat sat."}]
    >>> result = attribution_patching(model, [(src, dst)], direction=torch.ones(64), progress=False)
    >>> len(result.estimate[0]), len(result.estimate[0][0])   # hooks x groups for pair 0
    (2, 2)
    """
    hooks = resolve_hooks(model, hooks=list(hooks) if hooks is not None else resid_post_hooks(model))
    for group in groups:
        parse_group(group)
    d = _unit_vector(model, direction)
    direction_hook = getattr(direction, "hook", None)
    encoded = _encode_pairs(model, pairs)
    pad = pad_id(model)
    estimate, per_position, h_dst, h_src = [], [], [], []
    n_measured = 0
    for i, (src, dst) in enumerate(tqdm(encoded, desc="attribution patching", unit="pair", disable=not progress)):
        measured_dst, measured_src = align_positions(src, dst, "response", i)
        n_measured += len(measured_dst)
        source_batch, destination_batch = pad_batch([src], pad), pad_batch([dst], pad)
        source_logits, source_acts = _logits_at(model, source_batch, hooks, torch.as_tensor(measured_src))
        logits, acts = _gradient_forward(model, destination_batch.tokens, destination_batch.attention_mask, hooks,
                                         torch.as_tensor(measured_dst).unsqueeze(0))
        with torch.enable_grad():
            measured = output_entropy(logits).mean()
            grads = torch.autograd.grad(measured, [acts[h] for h in hooks], allow_unused=True)
        h_dst.append(float(measured.detach()))
        h_src.append(float(output_entropy(source_logits).mean()))
        pair_estimate, pair_positions = [], []
        for hook, grad in zip(hooks, grads, strict=True):
            x = acts[hook].detach()[0].double()
            s = source_acts[hook][0].double()
            dd = d.to(x.device).double()
            g_along = (grad[0].double() @ dd) if grad is not None else torch.zeros(x.shape[0], dtype=torch.float64)
            row = []
            for group in groups:
                dst_pos, src_pos = align_positions(src, dst, group, i)
                dst_pos = torch.as_tensor(dst_pos, dtype=torch.long)
                src_pos = torch.as_tensor(src_pos, dtype=torch.long)
                moved = (s[src_pos] - x[dst_pos]) @ dd
                row.append(float((moved * g_along[dst_pos]).sum()))
            pair_estimate.append(row)
            moved = (s[torch.as_tensor(measured_src)] - x[torch.as_tensor(measured_dst)]) @ dd
            pair_positions.append((moved * g_along[torch.as_tensor(measured_dst)]).tolist())
        estimate.append(pair_estimate)
        per_position.append(pair_positions)
    return AttributionPatching(
        hooks=list(hooks), groups=list(groups), direction_hook=direction_hook, estimate=estimate,
        per_position=per_position, entropy_destination=h_dst, entropy_source=h_src,
        n_pairs=len(encoded), n_measured_tokens=n_measured,
    )


def _exact_patching(model, encoded, result: AttributionPatching, d: Tensor, batch_size: int,
                    progress: bool) -> list[list[list[float]]]:
    """``M_patched - M_destination`` per pair x hook x group, patching the component along ``d``
    (:func:`surprise_probe.interventions.patched_runs.patched_entropies`, as activation patching does)."""
    hooks, groups = result.hooks, result.groups
    alignments = {}
    for i, (src, dst) in enumerate(encoded):
        for group in groups:
            alignments[i, group] = align_positions(src, dst, group, i)
        alignments[i, "measured"] = align_positions(src, dst, "response", i)
    conditions = [("direction", hook, group) for hook in hooks for group in groups]
    bar = tqdm(total=len(encoded) * len(conditions), desc="exact patching", unit="run", disable=not progress)
    _, h_destination, h_patched = patched_entropies(model, encoded, alignments, conditions, {"direction": d},
                                                    range(len(encoded)), batch_size=batch_size, bar=bar)
    bar.close()
    moved = h_patched - h_destination  # (conditions, pairs)
    return [[[float(moved[h * len(groups) + g, i]) for g in range(len(groups))] for h in range(len(hooks))]
            for i in range(len(encoded))]


def _pearson_with_ci(x: np.ndarray, y: np.ndarray, level: float) -> tuple[float, tuple[float, float]]:
    """Pearson r with a Fisher-z interval (treats points as independent: an approximation)."""
    from statistics import NormalDist

    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return float("nan"), (float("nan"), float("nan"))
    r = float(np.corrcoef(x, y)[0, 1])
    z = np.arctanh(np.clip(r, -0.999999, 0.999999))
    half = NormalDist().inv_cdf(0.5 + level / 2) / np.sqrt(max(len(x) - 3, 1))
    return r, (float(np.tanh(z - half)), float(np.tanh(z + half)))


def validate_attribution(
    model,
    pairs: Sequence[tuple],
    *,
    direction,
    hooks: Sequence[str] | None = None,
    groups: Sequence[str] = ("response", "first4"),
    batch_size: int = 16,
    level: float = 0.95,
    progress: bool = True,
    exact: Sequence | Float[np.ndarray, "pairs hooks groups"] | None = None,
) -> AttributionPatching:
    """:func:`attribution_patching` plus the exact patch of every pair x hook x group, and their
    Pearson r over those points (with an approximate Fisher-z CI at ``level``).

    The exact values are what :func:`activation_patching` measures for the ``"direction"``
    component (its ``per_pair_moved["direction"]``, ``entropy_patched - entropy_destination`` per
    pair). ``exact``: those values ``[pair][hook][group]`` when they were measured already (the
    same pairs, hooks, groups and direction), so they are not patched again.
    """
    result = attribution_patching(model, pairs, direction=direction, hooks=hooks, groups=groups, progress=progress)
    if exact is not None:
        shape = (result.n_pairs, len(result.hooks), len(result.groups))
        given = np.asarray(exact, dtype=float)
        if given.shape != shape:
            raise ValueError(f"exact has shape {given.shape}; expected pairs x hooks x groups = {shape}")
        result.exact = given.tolist()
    else:
        encoded = _encode_pairs(model, pairs)
        d = _unit_vector(model, direction)
        result.exact = _exact_patching(model, encoded, result, d, batch_size, progress)
    x, y = result.points()
    result.pearson_r, result.pearson_r_ci = _pearson_with_ci(x, y, level)
    result.n_points = int(np.isfinite(x).sum())
    result.level = level
    return result


def direction_attribution(
    model,
    item,
    direction,
    *,
    hooks: Sequence[str] | None = None,
    targets: Sequence[int] | None = None,
    chunk_size: int = 8,
) -> Float[np.ndarray, "hooks pos"]:
    """``attribution[h, t]`` for one text or conversation (module doc), NaN where not computed.

    ``targets``: the token positions whose entropy is attributed (default: every position).
    ``chunk_size``: rows (target tokens) of the longest length per forward/backward pass (shorter
    rows go more to a pass, at the same number of tokens); memory grows with it.

    >>> from surprise_probe.testing import tiny_model
    >>> model = tiny_model()
    >>> a = direction_attribution(model, "The quick brown fox.", torch.ones(64))
    >>> a.shape[0], bool(np.isfinite(a).all())
    (2, True)
    """
    hooks = resolve_hooks(model, hooks=list(hooks) if hooks is not None else resid_post_hooks(model))
    d = _unit_vector(model, direction).double()
    encoded = item if isinstance(item, Encoded) else encode(model, item)
    n = len(encoded)
    targets = list(range(n)) if targets is None else [int(t) for t in targets]
    bad = [t for t in targets if not 0 <= t < n]
    if bad:
        raise ValueError(f"target position {bad[0]} is outside the sequence of {n} tokens")
    out = np.full((len(hooks), n), np.nan)
    pad = pad_id(model)
    # forward mode from the block after each hook on: a HookedTransformer, or a bridge that can start
    # at a block (bridge_from_layer); any other model runs one backward pass per chunk of targets below
    layers = resid_post_layers(model, hooks)
    if layers is not None and targets:
        try:
            _forward_mode_attribution(model, encoded, d, hooks, layers, sorted(set(targets)), out)
            return out
        except NotImplementedError:  # an operation without a forward-mode formula: backward below
            out[:] = np.nan
    # causal: row t needs tokens 0..t only. Targets run longest first, each chunk cut to its own
    # longest row, with up to chunk_size x (longest target + 1) tokens per chunk (the memory of
    # chunk_size full rows), so short rows go many to a pass.
    order = sorted(dict.fromkeys(targets), reverse=True)
    budget = max(1, chunk_size) * (order[0] + 1) if order else 0
    start = 0
    while start < len(order):
        width = order[start] + 1
        rows = order[start : start + max(1, budget // width)]
        start += len(rows)
        cut = dataclasses.replace(encoded, token_ids=encoded.token_ids[:width], scored=encoded.scored[:width])
        batch = pad_batch([cut] * len(rows), pad)
        logits, acts = _gradient_forward(model, batch.tokens, batch.attention_mask, hooks,
                                         torch.as_tensor(rows).unsqueeze(1))
        with torch.enable_grad():
            # row r back-propagates the entropy at its own target position only
            picked = output_entropy(logits).sum()
            grads = torch.autograd.grad(picked, [acts[h] for h in hooks], allow_unused=True)
        for k, (hook, grad) in enumerate(zip(hooks, grads, strict=True)):
            if grad is None:
                out[k, rows] = 0.0
                continue
            x_along = acts[hook].detach().double() @ d.to(grad.device)  # (rows, pos)
            g_along = grad.double() @ d.to(grad.device)
            out[k, rows] = (x_along * g_along).sum(-1).cpu().numpy()  # positions > t have zero gradient
    return out


@torch.no_grad()
def _forward_mode_attribution(model, encoded: Encoded, d: Tensor, hooks: Sequence[str], layers: dict[str, int],
                              targets: list[int], out: np.ndarray) -> None:
    """``attribution[h, t]`` for every target at once, one hook at a time, by forward-mode
    differentiation: ``sum_p (x_p . d)(d . dH_t/dx_p)`` is the derivative of ``H_t`` along the
    tangent ``(x_p . d) d`` at every position of hook ``h``, so one forward pass with that
    tangent, from the clean residual after block ``L`` through blocks ``L + 1 ...``, gives it for
    every ``t`` (hooks all ``hook_resid_post``; a HookedTransformer starts at the block with
    ``start_at_layer``, a TransformerBridge with ``bridge_from_layer``)."""
    import torch.autograd.forward_ad as fwAD

    keep = max(targets) + 1  # causal: later tokens change nothing
    cut = dataclasses.replace(encoded, token_ids=encoded.token_ids[:keep], scored=encoded.scored[:keep])
    batch = pad_batch([cut], pad_id(model))
    device = model_device(model)
    mask = batch.attention_mask.to(device)
    hooked = is_hooked_transformer(model)
    acts = final_residual(model, batch, hooks)[1] if hooked else forward_metrics(model, batch, hooks)[2]
    positions = torch.as_tensor(targets, device=device)
    step = chunk_positions(1, int(model.cfg.d_vocab_out))
    for k, hook in enumerate(hooks):
        x = acts[hook]
        direction = d.to(device=x.device, dtype=x.dtype)
        with fwAD.dual_level():
            dual = fwAD.make_dual(x, (x @ direction).unsqueeze(-1) * direction)
            if hooked:
                residual = model(dual, start_at_layer=layers[hook] + 1, stop_at_layer=int(model.cfg.n_layers),
                                 attention_mask=mask)
                entropy = torch.cat([output_entropy(unembed(model, residual[:, positions[a : a + step]]))[0]
                                     for a in range(0, len(targets), step)])
            else:
                # the fused attention's CPU kernel has no forward-mode formula; the math kernel does
                with bridge_from_layer(model, layers[hook] + 1, dual), sdpa_kernel([SDPBackend.MATH]):
                    entropy = output_entropy_at(model, batch, targets)[0]
            out[k, targets] = fwAD.unpack_dual(entropy).tangent.double().cpu().numpy()


@torch.no_grad()
def exact_direction_ablation(
    model, item, direction, *, hooks: Sequence[str] | None = None
) -> Float[np.ndarray, "hooks pos"]:
    """``H_t(clean) - H_t(d projected out at hook h, every position)``: what
    :func:`direction_attribution` estimates, measured with one ``Ablate`` forward per hook."""
    hooks = resolve_hooks(model, hooks=list(hooks) if hooks is not None else resid_post_hooks(model))
    d = _unit_vector(model, direction)
    encoded = item if isinstance(item, Encoded) else encode(model, item)
    batch = pad_batch([encoded], pad_id(model))
    clean = output_entropy(model(batch.tokens, attention_mask=batch.attention_mask, return_type="logits"))[0]
    out = np.zeros((len(hooks), len(encoded)))
    for k, hook in enumerate(hooks):
        with apply_all(model, [Ablate(hooks=hook, direction=d)]):
            ablated = output_entropy(model(batch.tokens, attention_mask=batch.attention_mask, return_type="logits"))[0]
        out[k] = (clean.double() - ablated.double()).cpu().numpy()
    return out


def attribution_scatter_figure(result: AttributionPatching | Mapping) -> go.Figure:
    """Estimated vs exact patching effect, one point per pair x hook x group; y = x line.

    Points on the diagonal mean the first-order estimate is trustworthy at that layer; the title
    gives Pearson r with its CI and the number of points.
    """
    data = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    estimate, exact = np.asarray(data["estimate"], float), np.asarray(data["exact"], float)
    fig = go.Figure()
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    symbols = ["circle", "diamond", "square", "x"]
    hooks = data["hooks"]
    for g, group in enumerate(data["groups"]):
        labels = [[f"pair {i}<br>{hook}" for hook in hooks] for i in range(estimate.shape[0])]
        fig.add_trace(go.Scatter(
            x=exact[:, :, g].ravel(), y=estimate[:, :, g].ravel(), mode="markers", name=f"group {group}",
            marker={"color": palette[g % len(palette)], "symbol": symbols[g % len(symbols)], "size": 7,
                    "opacity": 0.75},
            text=np.asarray(labels).ravel(),
            hovertemplate="%{text}<br>exact %{x:.4g} nats<br>estimate %{y:.4g} nats<extra>" + group + "</extra>",
        ))
    finite = np.concatenate([estimate[np.isfinite(estimate)], exact[np.isfinite(exact)]])
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
    fig.add_trace(go.Scatter(x=[low, high], y=[low, high], mode="lines", name="estimate = exact",
                             line={"color": "gray", "dash": "dash"}, hoverinfo="skip"))
    r, ci = data.get("pearson_r"), data.get("pearson_r_ci")
    defined = r is not None and ci is not None and all(v is not None and np.isfinite(v) for v in (r, *ci))
    summary = f"Pearson r = {r:.3f} [{ci[0]:.3f}, {ci[1]:.3f}], " if defined else "Pearson r undefined, "
    fig.update_layout(
        title=(f"Attribution patching vs exact patching along d<br><sup>{summary}{data.get('n_points') or 0} "
               f"points ({data['n_pairs']} pairs x {len(hooks)} hooks x {len(data['groups'])} groups)</sup>"),
        xaxis_title="exact: patched - destination mean entropy (nats)",
        yaxis_title="first-order estimate (nats)", template="plotly_white", height=480,
        legend={"orientation": "h", "y": -0.2},
    )
    return fig
