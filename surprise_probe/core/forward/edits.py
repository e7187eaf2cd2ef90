"""Context-managed edits of the residual stream along a direction ``d`` (the primitive every intervention and ``ProbeDirection.steer`` applies).

Each intervention is a small frozen dataclass; ``with intervention.apply(model) as touched:`` adds
its TransformerLens hooks for the duration of the block only (removed in a ``finally``, so an
exception never leaves a hook behind) and yields a :class:`Touched` record of the
(batch, position) entries every forward pass changed.

- :class:`Steer`: ``x + strength * scale * d`` (``scale`` is the std of the projection, so the
  strength is in units of the probe's own spread);
- :class:`Clamp`: set the projection ``<x, d>`` to ``value``;
- :class:`Ablate`: ``x - fraction * <x, d> d`` (fraction = 1 projects ``d`` out);
- :class:`Patch`: copy the component along ``d`` (or the whole activation) from a source run;
- :class:`Replace`: set the activation, or some of its units, to fixed values (freeze a norm's
  ``hook_scale`` at its clean value, mean-ablate MLP neurons at ``mlp.hook_post``).

``strength`` / ``fraction`` / ``value`` may be one number or one per batch row, and ``direction``
one vector or one per batch row: that is how sweeps put many strengths and directions into one
forward pass.

>>> from surprise_probe.testing import tiny_model
>>> model = tiny_model()
>>> tokens = model.to_tokens("Hello world")                         # 3 tokens
>>> d = torch.ones(model.cfg.d_model)
>>> steer = Steer(direction=d, hooks="blocks.1.hook_resid_post", strength=2.0, scale=0.5, positions=[-1])
>>> with steer.apply(model) as touched:
...     logits = model(tokens)
>>> touched.entries()                                               # (batch row, position) edited
[(0, 2)]
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from surprise_probe.core.forward.hooks import resolve_hooks

__all__ = [
    "Positions",
    "Touched",
    "Intervention",
    "Steer",
    "Clamp",
    "Ablate",
    "Patch",
    "Replace",
    "apply_all",
    "resid_hooks",
    "unit_directions",
]

# None = every position; a slice or a list of ints = those positions in every row;
# a bool mask (batch, pos) or (pos,) = exactly those entries (e.g. a Batch's ``scored`` mask).
Positions = None | slice | Sequence[int] | Bool[Tensor, "batch pos"] | Bool[Tensor, " pos"]


@dataclass
class Touched:
    """The entries an intervention wrote, one ``(hook, mask)`` per hook call (forward pass)."""

    calls: list[tuple[str, Bool[Tensor, "batch pos"]]] = field(default_factory=list)

    def mask(self, hook: str | None = None, call: int = -1) -> Bool[Tensor, "batch pos"]:
        """The mask written at ``hook`` (default: the only hook) in forward pass ``call``."""
        masks = [m for name, m in self.calls if hook is None or name == hook]
        if not masks:
            raise ValueError(f"no forward pass touched hook {hook!r}; hooks seen: {self.hooks}")
        return masks[call].cpu()

    @property
    def hooks(self) -> list[str]:
        return list(dict.fromkeys(name for name, _ in self.calls))

    def entries(self, hook: str | None = None, call: int = -1) -> list[tuple[int, int]]:
        """Sorted ``(batch_row, position)`` pairs written in one forward pass."""
        rows, cols = torch.nonzero(self.mask(hook, call), as_tuple=True)
        return list(zip(rows.tolist(), cols.tolist(), strict=False))


def resid_hooks(model, layers: Sequence[int]) -> list[str]:
    """``blocks.{L}.hook_resid_post`` for each layer, refusing layers outside the model."""

    return resolve_hooks(model, layers=list(layers))


def _check_hooks(model, hooks: tuple[str, ...]) -> None:

    resolve_hooks(model, hooks=list(hooks))


def unit_directions(direction) -> Float[Tensor, "... d_model"]:
    """One direction ``(d_model,)`` or one per row ``(rows, d_model)``, each scaled to unit norm."""
    if direction is None:
        raise ValueError("a direction is required: a (d_model,) vector or one per row (rows, d_model)")
    direction = torch.as_tensor(direction, dtype=torch.float32)
    if direction.ndim not in (1, 2) or direction.shape[-1] == 0:
        raise ValueError(
            f"direction must have shape (d_model,) or (rows, d_model), got {tuple(direction.shape)}"
        )
    norms = direction.norm(dim=-1, keepdim=True)
    if not torch.isfinite(direction).all() or (norms == 0).any():
        raise ValueError("direction must be finite and non-zero (every row), so it can be unit-normalised")
    return direction / norms


def _per_row(value, name: str) -> Tensor:
    value = torch.as_tensor(value, dtype=torch.float32)
    if value.ndim > 1:
        raise ValueError(f"{name} must be a number or one value per batch row, got shape {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        bad = value.reshape(-1)[~torch.isfinite(value.reshape(-1))][0].item()
        raise ValueError(f"{name} must be finite, got {bad}")
    return value


def _rows(value: Tensor, batch: int, name: str) -> Tensor:
    """Broadcast a scalar or per-row tensor to ``(batch, 1, 1)`` (vectors: ``(batch, 1, d)``)."""
    if value.ndim == 0 or (value.ndim == 1 and name == "direction"):
        return value.reshape(1, 1, -1) if value.ndim == 1 else value.reshape(1, 1, 1)
    if value.shape[0] != batch:
        raise ValueError(
            f"{name} has {value.shape[0]} rows but the activation batch has {batch} rows; "
            "give one value per batch row or a single value"
        )
    return value.reshape(batch, 1, -1)


def _position_mask(positions: Positions, batch: int, pos: int, device) -> Bool[Tensor, "batch pos"]:
    if positions is None:
        return torch.ones(batch, pos, dtype=torch.bool, device=device)
    if isinstance(positions, slice):
        mask = torch.zeros(batch, pos, dtype=torch.bool, device=device)
        mask[:, positions] = True
        return mask
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        mask = positions.to(device)
        if mask.ndim == 1:
            mask = mask.unsqueeze(0).expand(batch, -1)
        if tuple(mask.shape) != (batch, pos):
            raise ValueError(
                f"position mask has shape {tuple(positions.shape)} but the activation is "
                f"batch x pos = ({batch}, {pos}); pass a mask of the padded batch that is run"
            )
        return mask
    mask = torch.zeros(batch, pos, dtype=torch.bool, device=device)
    for p in [int(p) for p in positions]:
        if not -pos <= p < pos:
            raise ValueError(f"position {p} is outside the sequence of {pos} positions")
        mask[:, p] = True
    return mask


@dataclass(frozen=True, kw_only=True)
class Intervention:
    """Base class: an edit of the activation at ``hooks``, restricted to ``positions``."""

    hooks: str | Sequence[str]
    positions: Positions = None
    # > 1: the hook receives a batch of one sequence and replicates it to this many rows before
    # editing, so everything before the hook is computed once for all rows (used by sweeps).
    fan_out: int = 1

    def _hook_names(self) -> tuple[str, ...]:
        return (self.hooks,) if isinstance(self.hooks, str) else tuple(self.hooks)

    def _check_fan_out(self) -> None:
        if self.fan_out < 1 or (self.fan_out > 1 and len(self._hook_names()) != 1):
            raise ValueError(f"fan_out must be >= 1 and needs exactly one hook; got fan_out={self.fan_out} "
                             f"with hooks {self._hook_names()}")

    def edit(
        self, activation: Float[Tensor, "batch pos d_model"], mask: Bool[Tensor, "batch pos"], hook: str
    ) -> Float[Tensor, "batch pos d_model"]:
        """The edited activation (every entry; the caller keeps only the masked ones)."""
        raise NotImplementedError

    def fwd_hooks(self, model, touched: Touched) -> list[tuple[str, object]]:
        """``(hook_name, fn)`` pairs for ``model.hooks`` / ``model.run_with_hooks``."""
        hooks = self._hook_names()
        known = model.hook_dict  # a property that is rebuilt on every access on a TransformerBridge
        missing = [name for name in hooks if name not in known]
        if missing:
            _check_hooks(model, tuple(missing))  # raises, naming the hook and the model's layers
        return [(name, self._make_hook(name, known[name].name or name, touched)) for name in hooks]

    def _make_hook(self, requested: str, canonical: str, touched: Touched):
        def hook_fn(activation: Tensor, hook) -> Tensor:
            # A TransformerBridge calls a hook once per alias of the hook point (the canonical
            # name and the requested alias): edit on the canonical call only, so exactly once.
            if hook.name is not None and hook.name != canonical:
                return activation
            return self.edited(activation, requested, touched)

        return hook_fn

    def edited(self, activation: Tensor, hook: str, touched: Touched | None = None) -> Tensor:
        """``activation`` as this intervention's hook at ``hook`` leaves it (fan-out, positions,
        dtype), without a model: for engines that hold an activation themselves (the steering
        sweep's suffix engine edits the cached clean residual with it)."""
        if self.fan_out > 1:
            if activation.shape[0] != 1:
                raise ValueError(
                    f"fan_out={self.fan_out} needs a batch of one sequence at {hook}, got a batch "
                    f"of {activation.shape[0]}"
                )
            activation = activation.expand(self.fan_out, *activation.shape[1:])
        batch, pos = activation.shape[:2]
        mask = _position_mask(self.positions, batch, pos, activation.device)
        work = activation if activation.dtype == torch.float64 else activation.float()
        edited = self.edit(work, mask, hook).to(activation.dtype)
        if touched is not None:
            # Kept on the activation's device (no per-call copy or sync); Touched moves it on read.
            touched.calls.append((hook, mask.detach().clone()))
        return torch.where(mask.unsqueeze(-1), edited, activation)

    @contextmanager
    def apply(self, model) -> Iterator[Touched]:
        """Hook the model for the duration of the block; yields the :class:`Touched` record."""
        with apply_all(model, [self]) as records:
            yield records[0]


@contextmanager
def apply_all(model, interventions: Sequence[Intervention]) -> Iterator[list[Touched]]:
    """Apply several interventions at once (in order at a shared hook); one record each."""
    records = [Touched() for _ in interventions]
    fwd_hooks = [pair for iv, rec in zip(interventions, records, strict=False) for pair in iv.fwd_hooks(model, rec)]
    # model.hooks removes exactly the hooks it added (and no others) when it is exited.
    context = model.hooks(fwd_hooks=fwd_hooks)
    context.__enter__()
    try:
        yield records
    finally:
        context.__exit__(None, None, None)


def _projection(activation: Tensor, direction: Tensor) -> Tensor:
    return (activation * direction).sum(-1, keepdim=True)


@dataclass(frozen=True, kw_only=True)
class Steer(Intervention):
    """``x + strength * scale * d`` at ``positions``; ``strength`` scalar or per row, ``d`` unit."""

    direction: Tensor = None  # (d_model,) or (batch, d_model)
    strength: float | Tensor = 1.0
    scale: float = 1.0

    def __post_init__(self):
        self._check_fan_out()
        object.__setattr__(self, "direction", unit_directions(self.direction))
        object.__setattr__(self, "strength", _per_row(self.strength, "strength"))
        scale = float(self.scale)
        if not 0 < scale < float("inf"):
            raise ValueError(f"scale (the projection's std) must be a positive finite number, got {self.scale}")
        object.__setattr__(self, "scale", scale)

    def edit(self, activation, mask, hook):
        batch = activation.shape[0]
        d = _rows(self.direction.to(activation.device), batch, "direction")
        strength = _rows(self.strength.to(activation.device), batch, "strength")
        return activation + strength * self.scale * d


@dataclass(frozen=True, kw_only=True)
class Clamp(Intervention):
    """Set the projection ``<x, d>`` to ``value`` (scalar or per row) at ``positions``."""

    direction: Tensor = None
    value: float | Tensor = 0.0

    def __post_init__(self):
        self._check_fan_out()
        object.__setattr__(self, "direction", unit_directions(self.direction))
        object.__setattr__(self, "value", _per_row(self.value, "value"))

    def edit(self, activation, mask, hook):
        batch = activation.shape[0]
        d = _rows(self.direction.to(activation.device), batch, "direction")
        value = _rows(self.value.to(activation.device), batch, "value")
        return activation + (value - _projection(activation, d)) * d


@dataclass(frozen=True, kw_only=True)
class Ablate(Intervention):
    """``x - fraction * <x, d> d``: fraction = 1 (default) projects ``d`` out; it may be per row."""

    direction: Tensor = None
    fraction: float | Tensor = 1.0

    def __post_init__(self):
        self._check_fan_out()
        object.__setattr__(self, "direction", unit_directions(self.direction))
        object.__setattr__(self, "fraction", _per_row(self.fraction, "fraction"))

    def edit(self, activation, mask, hook):
        batch = activation.shape[0]
        d = _rows(self.direction.to(activation.device), batch, "direction")
        fraction = _rows(self.fraction.to(activation.device), batch, "fraction")
        return activation - fraction * _projection(activation, d) * d


@dataclass(frozen=True, kw_only=True)
class Patch(Intervention):
    """Copy from a source run into this (destination) run at one hook.

    ``source`` holds the source activations ``(batch, src_pos, d_model)`` row-aligned with the
    destination batch; ``source_index[b, p]`` is the source position patched into destination
    position ``p`` (used where ``positions`` is True). With ``direction`` set, only the component
    along it is replaced: ``x + (<s, d> - <x, d>) d``; without it, the whole activation.
    """

    source: Tensor = None
    source_index: Int[Tensor, "batch pos"] = None
    direction: Tensor | None = None

    def __post_init__(self):
        self._check_fan_out()
        if len(self._hook_names()) != 1:
            raise ValueError(f"Patch takes exactly one hook (source activations are per hook), got {self.hooks}")
        if self.direction is not None:
            object.__setattr__(self, "direction", unit_directions(self.direction))
        if not isinstance(self.positions, Tensor) or self.positions.dtype != torch.bool:
            raise ValueError("Patch needs positions as a bool mask (batch, pos) of destination entries")
        if self.source_index is None or tuple(self.source_index.shape) != tuple(self.positions.shape):
            raise ValueError(
                f"source_index must have the shape of positions {tuple(self.positions.shape)}, "
                f"got {None if self.source_index is None else tuple(self.source_index.shape)}"
            )

    def edit(self, activation, mask, hook):
        batch, _, width = activation.shape
        if self.source.shape[0] != batch or self.source.shape[-1] != width:
            raise ValueError(
                f"source activations have shape {tuple(self.source.shape)}; expected ({batch}, pos, {width})"
            )
        index = self.source_index.to(activation.device).clamp(0, self.source.shape[1] - 1)
        source = self.source.to(device=activation.device, dtype=activation.dtype)
        aligned = source.gather(1, index.unsqueeze(-1).expand(-1, -1, width))
        if self.direction is None:
            return aligned
        d = _rows(self.direction.to(activation.device), batch, "direction")
        return activation + (_projection(aligned, d) - _projection(activation, d)) * d


@dataclass(frozen=True, kw_only=True)
class Replace(Intervention):
    """Set the activation, or some of its units (last axis), to fixed values at ``positions``.

    ``value``: a tensor broadcastable to the activation ``(batch, pos, width)``, e.g. a clean run's
    ``ln_final.hook_scale`` ``(1, pos, 1)`` (freezing the norm at its clean value) or a mean
    activation per neuron ``(d_mlp,)`` (mean ablation); with several ``hooks``, a mapping hook name
    -> such a tensor. ``units``: which units of the last axis are replaced, a bool mask
    ``(width,)`` or one per batch row ``(batch, width)``; None replaces all of them. Entries outside
    ``positions`` (e.g. rows not selected by a ``(batch, pos)`` mask) keep their activation.

    >>> from surprise_probe.testing import tiny_model
    >>> model = tiny_model()
    >>> tokens = model.to_tokens("Hello world")
    >>> _, cache = model.run_with_cache(tokens, names_filter="ln_final.hook_scale")
    >>> freeze = Replace(hooks="ln_final.hook_scale", value=cache["ln_final.hook_scale"])
    >>> with freeze.apply(model):
    ...     frozen = model(tokens)
    >>> clean = model(tokens)                             # freezing at the clean value changes nothing:
    >>> exact = type(model).__name__ == "HookedTransformer"  # a bridge recomputes an edited norm (float rounding)
    >>> bool(torch.equal(frozen, clean) if exact else torch.allclose(frozen, clean, rtol=0, atol=1e-6))
    True
    """

    value: Tensor | Mapping[str, Tensor] = None
    units: Bool[Tensor, " width"] | Bool[Tensor, "batch width"] | None = None

    def __post_init__(self):
        self._check_fan_out()
        hooks = self._hook_names()
        if self.value is None:
            raise ValueError("Replace needs value=: a tensor broadcastable to the activation, or one per hook")
        if isinstance(self.value, Mapping):
            missing = [hook for hook in hooks if hook not in self.value]
            if missing:
                raise ValueError(f"Replace has no value for hook(s) {missing}; values are given for {list(self.value)}")
            values = {hook: torch.as_tensor(self.value[hook]) for hook in hooks}
        else:
            values = {hook: torch.as_tensor(self.value) for hook in hooks}
        for hook, value in values.items():
            if not torch.isfinite(value).all():
                raise ValueError(f"Replace value for {hook} must be finite")
        object.__setattr__(self, "value", values)
        if self.units is not None:
            units = torch.as_tensor(self.units)
            if units.dtype != torch.bool or units.ndim not in (1, 2):
                raise ValueError(f"units must be a bool mask (width,) or (batch, width), got {units.dtype} "
                                 f"{tuple(units.shape)}")
            object.__setattr__(self, "units", units)

    def edit(self, activation, mask, hook):
        value = self.value[hook].to(device=activation.device, dtype=activation.dtype)
        try:
            replaced = torch.broadcast_to(value, activation.shape)
        except RuntimeError as error:
            raise ValueError(f"Replace value for {hook} has shape {tuple(value.shape)}, which does not broadcast "
                             f"to the activation's {tuple(activation.shape)}") from error
        if self.units is None:
            return replaced
        units = self.units.to(activation.device)
        if units.shape[-1] != activation.shape[-1] or (units.ndim == 2 and units.shape[0] != activation.shape[0]):
            raise ValueError(f"units mask has shape {tuple(units.shape)} but the activation at {hook} is "
                             f"{tuple(activation.shape)}; give (width,) or (batch, width)")
        units = units.reshape(1, 1, -1) if units.ndim == 1 else units.unsqueeze(1)
        return torch.where(units, replaced, activation)
