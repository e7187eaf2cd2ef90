"""A probe direction: the unit vector in activation space that a probe reads, with its metadata.

Saved as two files next to each other, the convention of SAELens and Hugging Face (weights in
safetensors, configuration in JSON): ``<path>.safetensors`` (one float64 tensor ``direction``,
shape ``(d_model,)``) and ``<path>.json`` (model id, hook, layer, target, data hash, metrics,
projection statistics, software versions, the model's fingerprint -- TransformerLens weight
processing as loaded and a sha256 of the weights, see :mod:`surprise_probe.core.models.basis` -- and hashes of
the direction and of the whole artifact, so an edited field or a mismatched pair is caught).
Loading with ``model=`` refuses a model whose id, ``d_model``, weight processing or weights differ
from the one the probe was fitted on. Directions saved in the earlier format (``<path>.npz`` +
``<path>.json``, format 1) still load.

Use outside this toolkit: :meth:`ProbeDirection.to_sklearn` gives a fitted ``RidgeProbe``;
:meth:`ProbeDirection.export_vector` gives the plain vector (a torch tensor) with the layer it
belongs to, for steering-vectors or nnsight (see docs/probes.md, "Using a probe elsewhere").
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from safetensors.numpy import load_file
from surprise_probe.probes.ridge import RidgeProbe
from surprise_probe.probes.scoring import probe_caveats

from surprise_probe.core.forward.directions import from_probe
from surprise_probe.core.forward.edits import Steer
from surprise_probe.core.models.basis import model_fingerprint
from surprise_probe.core.models.loading import model_id as model_id_of
from surprise_probe.core.utils.jsonio import software_versions, to_json
from surprise_probe.core.utils.notebook import NotebookView, estimate_text, number_text
from surprise_probe.core.utils.storage import write_atomic

__all__ = ["ProbeDirection"]

FORMAT_VERSION = 2  # safetensors + JSON; format 1 (.npz + JSON) still loads
_SUFFIXES = (".safetensors", ".npz", ".json")


def _model_identity(model) -> tuple[str, int]:
    return model_id_of(model), int(model.cfg.d_model)


def _stem(path: str | Path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in _SUFFIXES else path


def _sibling(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)


def _float(value) -> float:
    return float("nan") if value is None else float(value)


def _digest(direction: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(direction, dtype=np.float64).tobytes()).hexdigest()


def _safetensors_bytes(direction: np.ndarray, metadata: dict[str, str]) -> bytes:
    """The safetensors file of one float64 tensor ``direction``, laid out canonically.

    ``safetensors.save_file`` writes the metadata in hash-map order, which changes from run to
    run; here the header's keys are sorted and its JSON compact, padded to 8 bytes as safetensors
    pads it, so the same probe always gives the same bytes (``load_file`` reads it as usual).
    """
    data = np.ascontiguousarray(direction, dtype="<f8").tobytes()
    header = {"__metadata__": metadata,
              "direction": {"dtype": "F64", "shape": [len(direction)], "data_offsets": [0, len(data)]}}
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def _artifact_digest(direction: np.ndarray, info: dict) -> str:
    """sha256 over the direction and every metadata field (all but this hash): an edited
    ``std``, ``hook`` or any other field no longer matches."""
    fields = {key: value for key, value in info.items() if key != "artifact_sha256"}
    digest = hashlib.sha256(np.ascontiguousarray(direction, dtype=np.float64).tobytes())
    digest.update(to_json(fields).encode())
    return digest.hexdigest()


@dataclass(repr=False)
class ProbeDirection(NotebookView):
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
    model: dict = field(default_factory=dict)  # surprise_probe.core.models.basis.model_fingerprint ({} if unknown)

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

    def steer(self, model, strength: float = 1.0, *, positions=None, hook: str | None = None):
        """Context manager adding ``strength`` stds of this direction at its hook (steering-vectors style).

        Inside the ``with`` block every forward pass of ``model`` is steered: ``x + strength * std
        * d`` at ``hook`` (default: the probe's), at ``positions`` (default every position; a list
        of ints, a slice, or a bool mask as in ``interventions.Steer``); the hook is removed on
        exit, even after an error. Input is whatever ``model`` takes, e.g. ``model.to_tokens``
        output. The direction is checked against ``model`` first (id, ``d_model``). Yields the
        :class:`~surprise_probe.core.forward.edits.Touched` record of the entries edited.

        >>> import torch
        >>> from surprise_probe.testing import tiny_model
        >>> model = tiny_model()
        >>> d = ProbeDirection(np.ones(model.cfg.d_model) / np.sqrt(model.cfg.d_model), mean=0.0, std=2.0,
        ...                    hook="blocks.1.hook_resid_post", layer=1, model_id=model.cfg.model_name,
        ...                    d_model=model.cfg.d_model, target="surprise")
        >>> tokens = model.to_tokens("Hello world")
        >>> with d.steer(model, 4.0):
        ...     steered = model(tokens)
        >>> bool((steered != model(tokens)).any())
        True
        """

        checked = from_probe(model, self, hook=hook)
        return Steer(direction=checked.direction, hooks=checked.hook, strength=strength, scale=checked.std,
                     positions=positions).apply(model)

    def caveats(self) -> list[str]:
        """Why this probe may not be worth steering with (see :func:`probes.scoring.probe_caveats`)."""
        return probe_caveats(self.metrics, self.hook)

    def _view(self) -> tuple[str, list[tuple[str, str]]]:
        sample = self.metrics.get("n_sequences"), self.metrics.get("n_tokens")
        r2 = estimate_text(self.metrics.get("r2"))
        rows = [("model", self.model_id), ("target", self.target),
                ("hook", f"{self.hook} (d_model {self.d_model})"),
                ("projection", f"mean {number_text(self.mean)}, std {number_text(self.std)} (steering unit)"),
                ("held-out R^2", r2),
                ("R^2 beyond token-type mean", estimate_text(self.metrics.get("residual_r2"))),
                ("fitted on", "n/a" if sample[0] is None else f"{sample[0]} sequences, {sample[1]} tokens")]
        rows += [("caveat", note) for note in self.caveats()[:2]]
        return (f"target={self.target!r} at {self.hook}, R^2 {r2}, std {number_text(self.std)}, "
                f"{sample[0] if sample[0] is not None else '?'} sequences"), rows

    def check_model(self, model) -> None:
        """Raise unless ``model`` is the model this direction was fitted on.

        Always compared: model id and ``d_model``. When the probe records the model's fingerprint
        (probes fitted from a capture since format 2): the weight processing as measured on the
        weights (another processing is another basis) and the weights' sha256. A weights mismatch
        at another dtype or backend (e.g. a bfloat16 load of the same checkpoint) only warns, since
        its weights differ by rounding or naming; at the same dtype and backend it is refused.
        """
        other_id, other_d = _model_identity(model)
        if other_id != self.model_id or other_d != self.d_model:
            raise ValueError(
                f"probe direction at {self.hook!r} was fitted on model {self.model_id!r} "
                f"(d_model {self.d_model}) but the given model is {other_id!r} (d_model {other_d}); "
                "use it with the model it was fitted on, or refit with `surprise-probe fit`"
            )
        if not self.model.get("weights_sha256"):
            return
        other = model_fingerprint(model)
        mine_processing, other_processing = self.model.get("weight_processing", {}), other["weight_processing"]
        for key in ("normalization_type", "writing_weights_centered", "unembed_centered"):
            if key in mine_processing and mine_processing[key] != other_processing.get(key):
                fitted_dtype = self.model.get("dtype")
                how = ("load the model as it was loaded for the fit, or refit" if fitted_dtype in (None, other["dtype"])
                       else f"the probe was fitted on a {fitted_dtype} load and this model is {other['dtype']} (its "
                            f"rounded weights measure differently): load it with dtype={fitted_dtype!r} "
                            f"(CLI: --dtype {fitted_dtype}) as for the fit, or refit the probe at {other['dtype']}")
                raise ValueError(
                    f"probe direction at {self.hook!r} was fitted in a basis with {key}="
                    f"{mine_processing[key]!r} but the given model {other_id!r} has {key}="
                    f"{other_processing.get(key)!r} (another TransformerLens weight processing); {how}"
                )
        if other["weights_sha256"] != self.model["weights_sha256"]:
            same_form = (other["dtype"], other["backend"]) == (self.model.get("dtype"), self.model.get("backend"))
            message = (
                f"probe direction at {self.hook!r} was fitted on {self.model_id!r} with weights sha256 "
                f"{self.model['weights_sha256'][:12]}... ({self.model.get('dtype')}, {self.model.get('backend')}) "
                f"but the given model's weights hash to {other['weights_sha256'][:12]}... "
                f"({other['dtype']}, {other['backend']})"
            )
            if same_form:
                raise ValueError(message + "; same name, other weights: refit the probe on this model")
            warnings.warn(message + "; the dtype or backend differs, so the basis is the same only up to "
                          "rounding", stacklevel=2)

    def to_sklearn(self) -> RidgeProbe:
        """A fitted :class:`~surprise_probe.probes.ridge.RidgeProbe` that predicts what this probe does.

        ``coef_ = coef_norm * direction`` and ``intercept_`` act on raw activations; ``alpha`` is the
        penalty chosen by cross-validation (from ``metrics``), recorded for reference only (the
        estimator is already fitted). Refitting it (``.fit``) trains a new probe.

        >>> d = ProbeDirection(np.array([0.6, 0.8]), mean=0.0, std=1.0, hook="blocks.0.hook_resid_post",
        ...                    layer=0, model_id="m", d_model=2, target="surprise", coef_norm=2.0, intercept=1.0)
        >>> d.to_sklearn().predict(np.array([[1.0, 1.0]])).tolist()
        [3.8]
        """
        if not np.isfinite(self.coef_norm) or not np.isfinite(self.intercept):
            raise ValueError("this direction was saved without the probe's scale and intercept; "
                             "it cannot become a predicting RidgeProbe")
        probe = RidgeProbe(alpha=float(self.metrics.get("alpha") or 1.0))
        probe.coef_ = self.coef_norm * self.direction
        probe.intercept_ = float(self.intercept)
        probe.n_features_in_ = self.d_model
        return probe

    def export_vector(self, scale: str | float = "unit", *, basis: str = "transformer_lens") -> dict:
        """The plain vector for other tools (steering-vectors, nnsight, raw PyTorch hooks).

        Returns ``{"vector": float32 tensor (d_model,), "hook": ..., "layer": ..., "scale": ...,
        "basis": ...}``. ``scale``: ``"unit"`` (norm 1), ``"std"`` (one standard deviation of the
        projection over the training tokens, a natural steering step) or a number. ``basis``:
        ``"transformer_lens"`` (the residual stream this toolkit hooks) or ``"hf"`` (the Hugging
        Face model's hidden states). They differ only when TransformerLens centred the writing
        weights (LayerNorm models): its residual is the HF one minus its mean over ``d_model``, so
        the HF-basis vector is the direction minus its mean, which reads the same projection and,
        added before a LayerNorm, steers the same. ``blocks.L.hook_resid_post`` is the output of
        HF decoder layer ``L`` (``hidden_states[L + 1]``; steering-vectors ``layer=L``,
        ``layer_type="decoder_block"``).

        >>> d = ProbeDirection(np.array([0.6, 0.8]), mean=0.0, std=2.0, hook="blocks.0.hook_resid_post",
        ...                    layer=0, model_id="m", d_model=2, target="surprise")
        >>> d.export_vector("std")["vector"].tolist()
        [1.2000000476837158, 1.600000023841858]
        """
        if basis not in ("transformer_lens", "hf"):
            raise ValueError(f"basis must be 'transformer_lens' or 'hf', got {basis!r}")
        if isinstance(scale, str):
            if scale not in ("unit", "std"):
                raise ValueError(f"scale must be 'unit', 'std' or a number, got {scale!r}")
            factor = 1.0 if scale == "unit" else float(self.std)
        else:
            factor = float(scale)
        if not np.isfinite(factor):
            raise ValueError(f"scale must be finite, got {factor}")
        vector = self.direction.copy()
        centred = bool(self.model.get("weight_processing", {}).get("writing_weights_centered"))
        if basis == "hf" and centred:
            vector = vector - vector.mean()
        return {
            "vector": torch.tensor(factor * vector, dtype=torch.float32),
            "hook": self.hook,
            "layer": self.layer,
            "scale": scale,
            "basis": basis,
            "centred_for_hf": basis == "hf" and centred,
        }

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
            "model": self.model,
            "direction_sha256": _digest(self.direction),
        }

    def _metadata_with_hash(self) -> dict:
        info = json.loads(to_json(self.metadata()))  # as it will read back (NaN -> null)
        info["artifact_sha256"] = _artifact_digest(self.direction, info)
        return info

    def save(self, path: str | Path) -> Path:
        """Write ``path.safetensors`` and ``path.json`` (each atomically); return the JSON path.

        Both files are canonical (sorted keys, fixed layout): the same probe gives the same bytes,
        so identical runs record identical file hashes.
        """
        stem = _stem(path)
        stem.parent.mkdir(parents=True, exist_ok=True)
        weights, meta = _sibling(stem, ".safetensors"), _sibling(stem, ".json")
        info = self._metadata_with_hash()
        info["weights_file"] = weights.name
        info["artifact_sha256"] = _artifact_digest(self.direction, info)
        write_atomic(weights, _safetensors_bytes(self.direction, {
            "kind": "probe_direction", "config": meta.name, "hook": self.hook, "model_id": self.model_id,
            "artifact_sha256": info["artifact_sha256"]}), "the probe direction")
        write_atomic(meta, to_json(info), "the probe direction's metadata")
        return meta

    @classmethod
    def load(cls, path: str | Path, model=None, *, allow_unverified: bool = False) -> ProbeDirection:
        """Read ``path.json`` and its weights (``path.safetensors``, or ``path.npz`` for format 1).

        The artifact hash must be there and match (an edited field is refused); a file without one
        (written before the hash existed, or with it removed) is refused unless
        ``allow_unverified=True``. With ``model``, refuse another model (see :meth:`check_model`).
        """
        stem = _stem(path)
        meta = _sibling(stem, ".json")
        if not meta.exists():
            raise FileNotFoundError(
                f"probe direction file {meta} does not exist (expected {meta} with "
                f"{_sibling(stem, '.safetensors').name}, or {_sibling(stem, '.npz').name} for format 1)"
            )
        try:
            info = json.loads(meta.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{meta} is not a readable probe direction JSON ({error})") from None
        version = info.get("format_version") if isinstance(info, dict) else None
        if not isinstance(info, dict) or info.get("kind") != "probe_direction" or version not in (1, FORMAT_VERSION):
            raise ValueError(
                f"{meta} is not a probe direction of format 1 or {FORMAT_VERSION} "
                f"(kind {info.get('kind') if isinstance(info, dict) else None!r}, format {version!r})"
            )
        weights = _sibling(stem, ".safetensors" if version == FORMAT_VERSION else ".npz")
        if not weights.exists():
            raise FileNotFoundError(
                f"probe direction file {weights} does not exist (expected next to {meta}, format {version})"
            )
        try:
            if version == FORMAT_VERSION:
                direction = load_file(str(weights))["direction"]
            else:
                with np.load(weights) as data:
                    direction = data["direction"]
        except Exception as error:  # noqa: BLE001 - truncated file, bad header, missing key: all "damaged"
            raise ValueError(
                f"{weights} cannot be read ({type(error).__name__}: {error}); the probe file is damaged"
            ) from None
        if _digest(direction) != info.get("direction_sha256"):
            raise ValueError(
                f"{weights} does not match the direction hash in {meta}; the pair was mixed up"
            )
        if "artifact_sha256" not in info and not allow_unverified:
            raise ValueError(
                f"{meta} has no artifact hash (artifact_sha256), so an edited field (std, hook, model_id, ...) "
                "cannot be detected; refit the probe, or use it knowingly with allow_unverified=True "
                "(CLI: steer / patch --allow-unverified-probe)"
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
            model=info.get("model") or {},
        )
        if model is not None:
            loaded.check_model(model)
        return loaded

    @staticmethod
    def files(path: str | Path) -> list[Path]:
        """The files of the artifact at ``path`` that exist (JSON first, then the weights)."""
        stem = _stem(path)
        return [file for file in (_sibling(stem, s) for s in (".json", ".safetensors", ".npz")) if file.exists()]
