"""A probe direction: the unit vector in activation space that a probe reads, with its metadata.

Saved as two files next to each other: ``<path>.npz`` (the direction) and ``<path>.json`` (model id,
hook, layer, target, data hash, metrics, projection statistics, software versions, and the sha256
of the direction so a mismatched pair is caught). Loading with ``model=`` refuses a model whose id
or ``d_model`` differs from the one the probe was fitted on.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from jaxtyping import Float

from surprise_probe.jsonio import software_versions, to_json
from surprise_probe.models import model_id as model_id_of

__all__ = ["ProbeDirection"]

FORMAT_VERSION = 1


def _model_identity(model) -> tuple[str, int]:
    return model_id_of(model), int(model.cfg.d_model)


def _stem(path: str | Path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".npz", ".json") else path


def _float(value) -> float:
    return float("nan") if value is None else float(value)


def _digest(direction: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(direction, dtype=np.float64).tobytes()).hexdigest()


def _artifact_digest(direction: np.ndarray, info: dict) -> str:
    """sha256 over the direction and every metadata field (all but this hash): an edited
    ``std``, ``hook`` or any other field no longer matches."""
    fields = {key: value for key, value in info.items() if key != "artifact_sha256"}
    digest = hashlib.sha256(np.ascontiguousarray(direction, dtype=np.float64).tobytes())
    digest.update(to_json(fields).encode())
    return digest.hexdigest()


@dataclass
class ProbeDirection:
    """Unit direction in activation space at ``hook``, plus the projection's statistics.

    ``direction`` is the probe weight mapped back to activation space (standardisation undone) and
    unit-normalised; it points towards higher target values. ``mean`` and ``std`` are those of
    ``activation @ direction`` over the training tokens. ``coef_norm`` and ``intercept`` recover the
    probe's prediction: ``coef_norm * (activation @ direction) + intercept``.

    >>> d = ProbeDirection(np.array([3.0, 4.0]) / 5, mean=0.5, std=2.0, hook="blocks.0.hook_resid_post",
    ...                    layer=0, model_id="m", d_model=2, target="surprise")
    >>> d.project(np.array([[5.0, 0.0]])).tolist()
    [3.0]
    """

    direction: Float[np.ndarray, " d_model"]
    mean: float
    std: float
    hook: str
    layer: int | None
    model_id: str
    d_model: int
    target: str
    metrics: dict = field(default_factory=dict)
    data_hash: str = ""
    coef_norm: float = float("nan")
    intercept: float = float("nan")
    versions: dict = field(default_factory=software_versions)

    def __post_init__(self):
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(-1)
        if self.direction.shape != (self.d_model,):
            raise ValueError(
                f"direction has shape {self.direction.shape} but d_model is {self.d_model}"
            )
        norm = np.linalg.norm(self.direction)
        if not np.isfinite(norm) or abs(norm - 1) > 1e-6:
            raise ValueError(f"direction must be finite with unit norm, got norm {norm}")

    def project(
        self, activations: Float[np.ndarray, "*batch d_model"]
    ) -> Float[np.ndarray, "*batch"]:
        """``activation @ direction`` (in activation units)."""
        return np.asarray(activations, dtype=np.float64) @ self.direction

    def predict(
        self, activations: Float[np.ndarray, "*batch d_model"]
    ) -> Float[np.ndarray, "*batch"]:
        """The probe's prediction of the target (e.g. input surprise in nats)."""
        if not np.isfinite(self.coef_norm):
            raise ValueError(
                "this direction was saved without the probe's scale; it can project but not predict"
            )
        return self.coef_norm * self.project(activations) + self.intercept

    def check_model(self, model) -> None:
        """Raise unless ``model`` has this direction's model id and ``d_model``."""
        other_id, other_d = _model_identity(model)
        if other_id != self.model_id or other_d != self.d_model:
            raise ValueError(
                f"probe direction at {self.hook!r} was fitted on model {self.model_id!r} "
                f"(d_model {self.d_model}) but the given model is {other_id!r} (d_model {other_d}); "
                "use it with the model it was fitted on, or refit with `surprise-probe fit`"
            )

    def metadata(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "kind": "probe_direction",
            "model_id": self.model_id,
            "d_model": self.d_model,
            "hook": self.hook,
            "layer": self.layer,
            "target": self.target,
            "mean": self.mean,
            "std": self.std,
            "coef_norm": self.coef_norm,
            "intercept": self.intercept,
            "data_hash": self.data_hash,
            "metrics": self.metrics,
            "versions": self.versions,
            "direction_sha256": _digest(self.direction),
        }

    def _metadata_with_hash(self) -> dict:
        info = json.loads(to_json(self.metadata()))  # as it will read back (NaN -> null)
        info["artifact_sha256"] = _artifact_digest(self.direction, info)
        return info

    def save(self, path: str | Path) -> Path:
        """Write ``path.npz`` and ``path.json`` (each atomically); return the JSON path."""
        stem = _stem(path)
        stem.parent.mkdir(parents=True, exist_ok=True)
        npz, meta = stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".json")
        tmp_npz = npz.with_name(f".{npz.name}.tmp.npz")
        np.savez(tmp_npz, direction=self.direction)
        os.replace(tmp_npz, npz)
        tmp_meta = meta.with_name(f".{meta.name}.tmp")

        tmp_meta.write_text(to_json(self._metadata_with_hash()))
        os.replace(tmp_meta, meta)
        return meta

    @classmethod
    def load(cls, path: str | Path, model=None) -> ProbeDirection:
        """Read ``path.npz`` + ``path.json``; with ``model``, refuse another model id or d_model."""
        stem = _stem(path)
        npz, meta = stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".json")
        for file in (npz, meta):
            if not file.exists():
                raise FileNotFoundError(
                    f"probe direction file {file} does not exist (expected {npz} and {meta})"
                )
        try:
            info = json.loads(meta.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{meta} is not a readable probe direction JSON ({error})") from None
        if not isinstance(info, dict) or info.get("kind") != "probe_direction" or info.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta} is not a probe direction of format {FORMAT_VERSION} "
                f"(kind {info.get('kind')!r}, format {info.get('format_version')!r})"
            )
        try:
            with np.load(npz) as data:
                direction = data["direction"]
        except Exception as error:  # noqa: BLE001 - truncated zip, bad pickle, missing key: all "damaged"
            raise ValueError(f"{npz} cannot be read ({type(error).__name__}: {error}); the probe file is damaged") from None
        if _digest(direction) != info.get("direction_sha256"):
            raise ValueError(
                f"{npz} does not match the direction hash in {meta}; the pair was mixed up"
            )
        if "artifact_sha256" in info and _artifact_digest(direction, info) != info["artifact_sha256"]:
            raise ValueError(
                f"{meta} does not match its artifact hash: a field (e.g. std, hook, model_id) was edited "
                "after the probe was saved; refit it or restore the file"
            )
        loaded = cls(
            direction=direction,
            mean=info["mean"],
            std=info["std"],
            hook=info["hook"],
            layer=info["layer"],
            model_id=info["model_id"],
            d_model=info["d_model"],
            target=info["target"],
            metrics=info["metrics"],
            data_hash=info["data_hash"],
            coef_norm=_float(info["coef_norm"]),
            intercept=_float(info["intercept"]),
            versions=info["versions"],
        )
        if model is not None:
            loaded.check_model(model)
        return loaded
