"""Directions to intervene along: a probe's direction checked against the model, and controls.

A probe direction is anything with the attributes of ``probes.ProbeDirection`` (``direction``,
``std``, ``hook``, ``model_id``, ``d_model``); see docs/design.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from surprise_probe.core.forward.hooks import resolve_hooks
from surprise_probe.core.models.loading import model_id

__all__ = ["SteeringDirection", "from_probe", "random_directions", "orthogonal_direction"]


@dataclass(frozen=True)
class SteeringDirection:
    """A unit direction at one hook, with the std of the projection onto it (the unit of steering strength)."""

    direction: Float[Tensor, " d_model"]
    hook: str
    std: float
    label: str = "probe"


def from_probe(model, probe, *, hook: str | None = None) -> SteeringDirection:
    """Check ``probe`` belongs to ``model`` and return its direction, hook and projection std.

    ``probe``: a fitted ``ProbeDirection`` or a ``SteeringDirection`` (returned as it is, at
    ``hook`` when given, after the same checks): every intervention takes either through this one
    function. Refuses a probe from another model (id or d_model), a hook the model lacks, and a
    non-positive std.
    """

    d_model = int(model.cfg.d_model)
    vector = torch.as_tensor(np.asarray(probe.direction), dtype=torch.float32).reshape(-1)
    probe_d_model = int(getattr(probe, "d_model", None) or vector.numel())
    if probe_d_model != d_model or vector.numel() != d_model:
        raise ValueError(
            f"probe direction has d_model={probe_d_model} (vector of {vector.numel()}) but model "
            f"{model_id(model)!r} has d_model={d_model}; the probe was fitted on another model"
        )
    probe_model = getattr(probe, "model_id", None)
    if probe_model is not None and str(probe_model) != model_id(model):
        raise ValueError(
            f"probe was fitted on model {probe_model!r} but the loaded model is {model_id(model)!r}; "
            "load the model the probe was fitted on"
        )
    hook = hook or probe.hook
    resolve_hooks(model, hooks=[hook])
    std = float(probe.std)
    if not np.isfinite(std) or std <= 0:
        raise ValueError(f"probe projection std must be positive and finite, got {std}")
    norm = float(vector.norm())
    if not np.isfinite(norm) or norm == 0:
        raise ValueError(f"probe direction must be finite and non-zero, got norm {norm}")
    if isinstance(probe, SteeringDirection):  # already a unit direction: kept as it is, bit for bit
        return probe if hook == probe.hook else SteeringDirection(probe.direction, hook, probe.std, probe.label)
    return SteeringDirection(vector / norm, hook, std, "probe")


def random_directions(d_model: int, k: int, seed: int = 0) -> Float[Tensor, "k d_model"]:
    """``k`` seeded Gaussian directions, unit norm (same magnitude as the probe's unit ``d``).

    >>> vectors = random_directions(16, 3, seed=0)
    >>> tuple(vectors.shape), torch.allclose(vectors.norm(dim=-1), torch.ones(3))
    ((3, 16), True)
    """
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(k, d_model, generator=generator, dtype=torch.float64)
    return (vectors / vectors.norm(dim=-1, keepdim=True)).float()


def orthogonal_direction(direction: Float[Tensor, " d_model"], seed: int = 0) -> Float[Tensor, " d_model"]:
    """A seeded random unit direction with its component along ``direction`` removed.

    >>> d = torch.tensor([1.0, 0.0, 0.0, 0.0])
    >>> o = orthogonal_direction(d)
    >>> abs(float(o @ d)) < 1e-6, round(float(o.norm()), 4)
    (True, 1.0)
    """
    d = direction.double() / direction.double().norm()
    generator = torch.Generator().manual_seed(seed + 7919)
    vector = torch.randn(d.numel(), generator=generator, dtype=torch.float64)
    vector = vector - (vector @ d) * d
    return (vector / vector.norm()).float()
