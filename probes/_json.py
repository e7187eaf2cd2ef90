"""Strict JSON for results that hold numpy scalars, arrays, paths and NaN."""

from __future__ import annotations

import json

import numpy as np

from surprise_probe.store import json_default as _json_default

__all__ = ["to_json"]


def _finite_or_none(value):
    """Strict JSON has no NaN/inf: they become null."""
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    if isinstance(value, np.ndarray):
        return _finite_or_none(value.tolist())
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def to_json(payload: dict) -> str:
    """Strict JSON (NaN -> null) of a payload holding numpy scalars, arrays and paths."""
    return json.dumps(_finite_or_none(payload), indent=2, default=_json_default, allow_nan=False)

