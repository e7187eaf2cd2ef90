"""Devices and dtypes: validate what the user asked for against what this machine has.

``load_model`` and every command resolve ``device`` and ``dtype`` here *before* loading a model,
so a bad value fails in a second with a message naming what was asked and what exists.

>>> resolve_dtype("bf16"), resolve_dtype(torch.float16)
(torch.bfloat16, torch.float16)
>>> resolve_device("cpu")
'cpu'
"""

from __future__ import annotations

import ctypes
import functools
import gc
import sys

import numpy as np
import torch
from torch import Tensor

from surprise_probe.core.models import distributed

__all__ = [
    "DTYPES",
    "STORAGE_DTYPES",
    "resolve_device",
    "resolve_dtype",
    "resolve_device_map",
    "available_devices",
    "model_device",
    "to_numpy",
    "release_memory",
]

# Model dtypes by name (and common aliases).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
# Dtypes activations can be stored in on disk (numpy has no bfloat16).
STORAGE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}


def available_devices() -> list[str]:
    """The devices torch can use here, e.g. ``['cpu']`` or ``['cpu', 'cuda:0', 'cuda:1']``."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def _no_gpu_note() -> str:
    build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    return f"devices here: {', '.join(available_devices())} (torch {torch.__version__}, {build})"


def resolve_device(device: str | torch.device | None = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; check any other value exists.

    Under torchrun a bare ``"cuda"`` (or ``"auto"`` with a GPU) means this rank's own GPU,
    ``cuda:LOCAL_RANK``, so N processes on a node of N GPUs do not all load onto GPU 0.

    Raises ``ValueError`` naming the device asked for and the devices that exist.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return distributed.local_device("cuda") if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device {device!r} is not a device name; expected 'auto', 'cpu', 'cuda' or 'cuda:N' "
            f"({_no_gpu_note()})"
        ) from error
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for, but no CUDA GPU is visible; {_no_gpu_note()}")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device {device!r} was asked for, but only {count} CUDA device(s) exist; {_no_gpu_note()}")
    elif parsed.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {device!r} was asked for, but MPS is not available; {_no_gpu_note()}")
    elif parsed.type != "cpu":
        raise ValueError(f"device {device!r} is not supported; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return distributed.local_device(str(parsed))


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """A model dtype from a name (``"bfloat16"``, ``"bf16"``, ``"float16"``, ...) or a torch dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; expected one of float32, bfloat16, float16")
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.strip().lower().removeprefix("torch.")]
    raise ValueError(f"dtype {dtype!r} is not supported; expected one of float32, bfloat16, float16 (or a torch dtype)")


def resolve_device_map(device_map, n_devices: int | None, max_memory) -> tuple[object, int]:
    """Check the multi-device options; returns ``(device_map, n_devices)``.

    ``device_map``: None, ``"auto"``/``"balanced"``/``"sequential"`` or a dict
    ``{module: device}`` (Hugging Face style; loads through the TransformerBridge).
    ``n_devices``: split a HookedTransformer's layers over this many CUDA devices.
    """
    if n_devices is not None and (not isinstance(n_devices, int) or isinstance(n_devices, bool) or n_devices < 1):
        raise ValueError(f"n_devices must be a whole number >= 1, got {n_devices!r}")
    n_devices = n_devices or 1
    if n_devices > 1:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count < n_devices:
            raise ValueError(
                f"n_devices={n_devices} was asked for, but only {count} CUDA device(s) exist; {_no_gpu_note()}"
            )
    if isinstance(device_map, str):
        if device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
            raise ValueError(
                f"device_map {device_map!r} is not supported; expected 'auto', 'balanced', 'sequential' "
                "or a dict {module name: device}"
            )
    elif isinstance(device_map, dict):
        if not device_map:
            raise ValueError("device_map is an empty dict; give {module name: device} for the model's modules")
        for module, target in device_map.items():
            if isinstance(target, int) or (isinstance(target, str) and target.startswith("cuda")):
                resolve_device(f"cuda:{target}" if isinstance(target, int) else target)
            elif target not in ("cpu",):
                raise ValueError(
                    f"device_map[{module!r}] = {target!r} is not supported; expected 'cpu', a CUDA index "
                    "or 'cuda:N' (disk and meta offload do not work through TransformerLens hooks)"
                )
    elif device_map is not None:
        raise ValueError(f"device_map must be None, 'auto' or a dict, got {type(device_map).__name__}")
    if device_map is not None and n_devices > 1:
        raise ValueError("pass device_map or n_devices, not both")
    if max_memory is not None:
        if not isinstance(max_memory, dict) or not max_memory:
            raise ValueError(f"max_memory must be a dict like {{0: '20GiB', 'cpu': '60GiB'}}, got {max_memory!r}")
        if device_map is None and n_devices == 1:
            raise ValueError("max_memory only applies with device_map= (or n_devices > 1)")
    return device_map, n_devices


def model_device(model) -> torch.device:
    """The device of the model's input embedding (where token ids and masks must go)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device(getattr(model.cfg, "device", None) or "cpu")


def to_numpy(tensor: Tensor, dtype=np.float32) -> np.ndarray:
    """A CPU numpy copy in ``dtype``; converts on the tensor's device first (bf16 has no numpy)."""
    target = {np.float32: torch.float32, np.float16: torch.float16, np.float64: torch.float64}.get(
        np.dtype(dtype).type
    )
    if target is not None and tensor.is_floating_point():
        tensor = tensor.to(target)
    return tensor.detach().cpu().numpy().astype(dtype, copy=False)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where there is none (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_memory() -> bool:
    """Collect garbage, then hand the heap pages it freed back to the OS; True if they were handed back.

    glibc keeps freed heap pages mapped, so after a heavy step (loading a model, a study stage)
    the process's resident memory never falls and the next step's peak stacks on the last one.
    ``malloc_trim(0)`` returns them (Linux with glibc; elsewhere only the collection runs, never
    an error).
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
