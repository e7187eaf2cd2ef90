"""The TransformerBridge's processed-weights cache (TransformerLens 3.9 and 4.x).

``enable_compatibility_mode`` runs TransformerLens' weight processing (fold the norms, center the
unembedding, fold the value biases) on the bridge's state dict, then hands the result to the
bridge's components and the adapter. Only the middle step, ``ProcessWeights.process_weights``, a
function of the state dict, the config and the flags, costs time (0.66 s of a 2.8 s SmolLM2 load;
docs/benchmarks.md). ``bridge_processing_cache`` replaces that one step by a read of its cached
result, so everything else the bridge sets while it processes (component flags, the adapter's own
post-processing, hook aliases) runs exactly as without a cache.

A cached result is used only for the same input: the file's name hashes the model folder, the
dtype and the library versions (``processed_weights_file``), and its metadata records the input's
keys, shapes and dtypes, the config's fields and the flags, all compared before it is read.
"""

from __future__ import annotations

import hashlib
import json
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from surprise_probe.core.models.hooked import processed_weights_file, save_processed_weights

__all__ = ["BRIDGE_CACHE_FORMAT", "bridge_cache_file", "bridge_processing_cache"]

BRIDGE_CACHE_FORMAT = 1
ENABLED = True
"""Whether ``bridge_processing_cache`` reads and writes its file (a switch for benchmarks: ``False``
processes the weights on every load)."""
_PATCH = threading.Lock()  # the processing function is patched on TransformerLens' class, process-wide


def bridge_cache_file(folder: Path, name: str, dtype: torch.dtype) -> Path:
    """Where ``folder``'s processed bridge weights are cached (beside the folder; see ``processed_weights_file``)."""
    return processed_weights_file(folder, name, dtype, "bridge", BRIDGE_CACHE_FORMAT)


def _signature(state_dict: dict, cfg, flags: dict) -> str:
    """A hash of what decides the processing's result, apart from the weights' values (the file's name has those)."""
    tensors = sorted((key, list(value.shape), str(value.dtype)) for key, value in state_dict.items()
                     if isinstance(value, torch.Tensor))
    settings = cfg.to_dict() if hasattr(cfg, "to_dict") else vars(cfg)
    settings = {key: value for key, value in settings.items() if key not in ("device", "n_devices")}
    flags = {key: (type(value).__name__ if key == "adapter" else value) for key, value in flags.items()}
    payload = json.dumps([BRIDGE_CACHE_FORMAT, tensors, settings, flags], sort_keys=True, default=repr)
    return hashlib.sha256(payload.encode()).hexdigest()


@contextmanager
def bridge_processing_cache(path: Path) -> Iterator[dict]:
    """Inside, TransformerLens' weight processing reads its result from ``path`` when that holds
    the result for the same input, else computes it and writes ``path`` (atomically, best effort:
    a failure warns and the load goes on). Yields ``{"hit": bool | None}``: whether the processing
    read the cache (None: it did not run).

    >>> import tempfile
    >>> from pathlib import Path
    >>> from surprise_probe.testing import tiny_llama_folder
    >>> from transformer_lens.model_bridge import TransformerBridge
    >>> folder, hf_model = tiny_llama_folder(tempfile.mkdtemp(), n_layers=1, d_model=32)
    >>> path = Path(tempfile.mkdtemp()) / "tiny.safetensors"
    >>> for _ in range(2):
    ...     bridge = TransformerBridge.boot_transformers(str(folder), hf_model=hf_model, device="cpu")
    ...     with bridge_processing_cache(path) as status:
    ...         bridge.enable_compatibility_mode()
    ...     print(status["hit"])
    False
    True
    """
    from transformer_lens.weight_processing import ProcessWeights

    status: dict = {"hit": None}
    if not ENABLED:
        yield status
        return
    compute = ProcessWeights.process_weights

    def cached(state_dict, cfg, **flags):
        signature = _signature(state_dict, cfg, flags)
        device = next((v.device for v in state_dict.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        result = _read(path, signature, device)
        status["hit"] = result is not None
        if result is None:
            result = compute(state_dict, cfg, **flags)
            _write(path, result, signature)
        return result

    with _PATCH:
        original = ProcessWeights.__dict__["process_weights"]
        ProcessWeights.process_weights = staticmethod(cached)
        try:
            yield status
        finally:
            ProcessWeights.process_weights = original


def _read(path: Path, signature: str, device: torch.device) -> dict[str, torch.Tensor] | None:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            metadata = handle.metadata() or {}
            if metadata.get("signature") != signature:
                return None  # another input under the same name (a config or flag changed): recompute
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        warnings.warn(f"ignoring the processed-weights cache {path} ({error}); processing again", stacklevel=6)
        return None


def _write(path: Path, result: dict, signature: str) -> None:
    save_processed_weights(path, result, {"format": str(BRIDGE_CACHE_FORMAT), "signature": signature}, "process",
                           stacklevel=7)
