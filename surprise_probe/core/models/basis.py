"""What defines the activation basis of a loaded model: its identity, weight processing and weights hash.

A probe direction only means something in the basis it was fitted in. TransformerLens rewrites
weights at load time (``fold_ln``, ``center_writing_weights``, ``center_unembed``,
``fold_value_biases``), and a checkpoint can change under an unchanged name, so a saved direction
records :func:`model_fingerprint`: the model id, backend, dtype, the weight processing *as loaded*
(measured on the weights, not assumed from the loader's arguments) and a sha256 of every weight.

>>> from surprise_probe.core.models.backends import hooked_transformer_available
>>> from surprise_probe.testing import tiny_model
>>> print_ = model_fingerprint(tiny_model())  # a LayerNorm HookedTransformer on 3.x, a Llama bridge on 4.x
>>> expected = ("HookedTransformer", "LN") if hooked_transformer_available() else ("TransformerBridge", "RMS")
>>> (print_["backend"], print_["weight_processing"]["normalization_type"]) == expected, len(print_["weights_sha256"])
(True, 64)
"""

from __future__ import annotations

import hashlib
import weakref

import torch

from surprise_probe.core.models.loading import model_id

__all__ = ["model_fingerprint", "weights_sha256", "weight_processing", "CENTERED_TOLERANCE"]

# A weight counts as centred when the largest |mean| over the centred axis is below this fraction
# of the weight's root mean square (float32 centring leaves ~1e-8, bfloat16 ~1e-4; an uncentred
# trained or random matrix is ~1/sqrt(d) or more).
CENTERED_TOLERANCE = 1e-3

_HASHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CENTERING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _parameters(model) -> list[tuple[str, torch.Tensor]]:
    return sorted(model.named_parameters(), key=lambda item: item[0])


def weights_sha256(model) -> str:
    """sha256 over every parameter of ``model`` (sorted by name: name, dtype, shape, raw bytes).

    Cached per model object until a parameter is replaced or changed in place.
    """
    parameters = _parameters(model)
    key = tuple((name, p.data_ptr(), p._version) for name, p in parameters)
    cached = _HASHES.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in parameters:
            tensor = parameter.detach().cpu().contiguous()
            digest.update(f"{name}|{str(tensor.dtype)}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    _HASHES[model] = (key, digest.hexdigest())
    return digest.hexdigest()


def _centered(weight, dim: int) -> bool | None:
    if weight is None or not isinstance(weight, torch.Tensor) or weight.numel() == 0:
        return None
    weight = weight.detach().float()
    rms = float(weight.pow(2).mean().sqrt())
    if rms == 0:
        return True
    return float(weight.mean(dim).abs().max()) <= CENTERED_TOLERANCE * rms


def _get(obj, *path):
    for name in path:
        try:
            obj = getattr(obj, name)
        except Exception:  # noqa: BLE001 - a backend without this weight (bridge properties raise variously)
            return None
    return obj


def weight_processing(model) -> dict:
    """The weight processing that defines the residual basis, as measured on the loaded weights.

    ``normalization_type`` is TransformerLens' (``LNPre``/``RMSPre`` mean ``fold_ln`` was applied
    by a HookedTransformer). ``writing_weights_centered``: the embedding and every block's attention
    and MLP output weights have zero mean over ``d_model`` (``center_writing_weights``; TransformerLens
    skips it for RMSNorm models). ``unembed_centered``: ``W_U`` has zero mean over the vocabulary
    (``center_unembed``). ``loader`` is what :func:`surprise_probe.load_model` asked TransformerLens
    for, when the model was loaded by it (``None`` otherwise).
    """
    writing, unembed = _centering(model)
    return {
        "backend": type(model).__name__,
        "normalization_type": getattr(model.cfg, "normalization_type", None),
        "compatibility_mode": getattr(model, "compatibility_mode", None),
        "writing_weights_centered": writing,
        "unembed_centered": unembed,
        "loader": getattr(model, "weight_processing_requested", None),
    }


def _centering(model) -> tuple[bool | None, bool | None]:
    """(writing weights centred, unembedding centred), measured once per model object until a
    parameter is replaced or changed in place (every probe load checks it: 31 loads per study)."""
    key = tuple((name, p.data_ptr(), p._version) for name, p in _parameters(model))
    cached = _CENTERING.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    blocks = _get(model, "blocks") or []
    writers = [(_get(model, "W_E"), -1)]
    for block in blocks:
        writers += [(_get(block, "attn", "W_O"), -1), (_get(block, "mlp", "W_out"), -1)]
    measured = [_centered(weight, dim) for weight, dim in writers]
    known = [value for value in measured if value is not None]
    result = (all(known) if known else None, _centered(_get(model, "W_U"), -1))
    _CENTERING[model] = (key, result)
    return result


def model_fingerprint(model) -> dict:
    """Model id, ``d_model``, backend, dtype, :func:`weight_processing` and :func:`weights_sha256`."""
    return {
        "model_id": model_id(model),
        "d_model": int(model.cfg.d_model),
        "n_layers": int(model.cfg.n_layers),
        "backend": type(model).__name__,
        "dtype": str(getattr(model.cfg, "dtype", "")).replace("torch.", ""),
        "weight_processing": weight_processing(model),
        "weights_sha256": weights_sha256(model),
    }
