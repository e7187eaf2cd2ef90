"""TransformerLens' ``HookedTransformer`` from a Hugging Face model, and its processed-weights cache.

The weight processing (fold_ln, centering, value-bias folding) runs one block at a time, so the
first conversion holds one block's copies at a time; the processed weights of an embedded model
are cached as safetensors beside its folder and later read straight into the model's parameters.
``HookedTransformer`` exists on TransformerLens 3.x only.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from surprise_probe.core.utils.storage import sweep_temporaries, temporary_path

__all__ = ["hooked_from_hf", "hooked_cache_file", "hooked_from_cache", "write_hooked_cache", "processed_weights_file",
           "save_processed_weights", "store_forward_layout"]


# The weight processing both HookedTransformer paths apply (as HookedTransformer.from_pretrained);
# center_unembed is decided per model (see _hooked_from_hf).
_PROCESSING = {"fold_ln": True, "center_writing_weights": True, "fold_value_biases": True}


def _hooked_config(folder: Path, hf_config: dict, device: str, dtype: torch.dtype, n_devices: int):
    import transformer_lens.loading_from_pretrained as loading

    return loading.get_pretrained_model_config(
        str(folder), hf_cfg=hf_config, fold_ln=_PROCESSING["fold_ln"], device=device,
        n_devices=n_devices, default_prepend_bos=False, dtype=dtype,
    )


def hooked_from_hf(folder: Path, hf_model, tokenizer, device: str, dtype: torch.dtype, n_devices: int = 1):
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    cfg = _hooked_config(folder, hf_model.config.to_dict(), device, dtype, n_devices)
    state_dict = loading.get_pretrained_state_dict(str(folder), cfg, hf_model, dtype=dtype)
    # The model's parameters are allocated but untouched (no random init for pretrained configs),
    # so they take memory only as the processed weights are copied in.
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    # The same processing as HookedTransformer.from_pretrained. Centering the unembedding shifts
    # all logits of a position by one constant, which log_softmax ignores (but a logit softcap
    # does not, so softcapped models keep theirs uncentered, as in TransformerLens).
    softcap = getattr(cfg, "output_logits_soft_cap", -1.0) or -1.0
    _load_processed(model, state_dict, center_unembed=softcap <= 0)
    del state_dict
    model.move_model_modules_to_device()
    return model


def _load_processed(model, state_dict: dict[str, torch.Tensor], center_unembed: bool) -> None:
    """Load ``state_dict`` into ``model`` with TransformerLens' weight processing, a block at a time.

    ``ProcessWeights.process_weights`` clones the whole state dict at each of its steps, so
    converting the embedded model peaked at about four copies of its weights (3.2 GB for 135M
    parameters). None of its steps mixes the weights of two blocks: each block's layer norms fold
    into that block's own projections, the final norm into the unembedding, and the centering and
    value-bias folding act tensor by tensor. So TransformerLens' own ``process_weights`` runs here
    on one block's weights at a time (renamed to block 0 of a one-block config), then on the
    embeddings, final norm and unembedding: the same arithmetic on the same tensors, with one
    block's copies alive at a time. tests/test_models.py checks the result bit for bit against
    ``load_and_process_state_dict`` on LayerNorm and RMSNorm/grouped-query models.

    Configs this was not checked for (no foldable norm, 4-bit weights) take TransformerLens' path.
    """
    from transformer_lens.weight_processing import ProcessWeights

    cfg = model.cfg
    state_dict = model.fill_missing_keys(state_dict)
    has_norms = any(k.endswith((".ln1.w", ".ln2.w", "ln_final.w")) for k in state_dict)
    if cfg.normalization_type not in ("LNPre", "RMSPre") or cfg.load_in_4bit or not has_norms:
        model.load_and_process_state_dict(state_dict, center_unembed=center_unembed, **_PROCESSING)
        return
    flags = {**_PROCESSING, "refactor_factored_attn_matrices": False}
    one_block, no_block = copy.copy(cfg), copy.copy(cfg)
    one_block.n_layers, no_block.n_layers = 1, 0
    # Centering the writing weights insists on finding the embeddings: empty stand-ins.
    stand_ins = {"embed.W_E": torch.zeros(0, cfg.d_model), "pos_embed.W_pos": torch.zeros(0, cfg.d_model)}
    for layer in range(cfg.n_layers):
        prefix = f"blocks.{layer}."
        keys = [k for k in state_dict if k.startswith(prefix)]
        block = {"blocks.0." + k[len(prefix):]: state_dict.pop(k) for k in keys}
        block = ProcessWeights.process_weights({**block, **stand_ins}, one_block, center_unembed=False, **flags)
        for key, value in block.items():
            if key.startswith("blocks.0."):
                model.load_state_dict({prefix + key[len("blocks.0."):]: value}, strict=False)
        del block
    rest = ProcessWeights.process_weights(state_dict, no_block, center_unembed=center_unembed, **flags)
    state_dict.clear()
    for key in list(rest):
        model.load_state_dict({key: rest.pop(key)}, strict=False)
    model.setup()  # as load_and_process_state_dict does after folding


# Processed HookedTransformer weights of an embedded model are cached beside its folder, so later
# loads read them straight into the model's parameters: no Hugging Face model, no conversion and
# no processing copies (peak memory one copy of the weights instead of about three). Bumped
# whenever what such a file holds changes meaning; a file from another format is never read.
HOOKED_CACHE_FORMAT = 1
_SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int32: "I32", torch.int64: "I64",
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def hooked_cache_file(folder: Path, name: str, dtype: torch.dtype) -> Path:
    """The cache file of ``folder``'s processed HookedTransformer weights (see ``processed_weights_file``)."""
    return processed_weights_file(folder, name, dtype, "hooked", HOOKED_CACHE_FORMAT)


def processed_weights_file(folder: Path, name: str, dtype: torch.dtype, kind: str, cache_format: int) -> Path:
    """The cache file of ``folder``'s processed weights for backend ``kind``, named by a hash of
    everything that decides them.

    The key covers every file of the folder (name, size, modification time) and the bytes of its
    config and build marker, the dtype, the processing, the cache format and the versions of
    TransformerLens, transformers and torch; any change gives another file.
    """
    files = sorted(path for path in folder.iterdir() if path.is_file())
    key = {
        "format": cache_format,
        "dtype": _dtype_name(dtype),
        "processing": {**_PROCESSING, "center_unembed": "unless the logits are softcapped"},
        "versions": {package: importlib.metadata.version(package) for package in ("transformer-lens", "transformers")}
        | {"torch": torch.__version__},
        "files": [[path.name, path.stat().st_size, path.stat().st_mtime_ns] for path in files],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    for small in ("config.json", ".complete"):
        if (folder / small).is_file():
            digest.update((folder / small).read_bytes())
    return folder.parent / f"{name}.{kind}-{_dtype_name(dtype)}-{digest.hexdigest()[:16]}.safetensors"


def _config_signature(cfg) -> str:
    """A hash of a HookedTransformer config, without where the model runs (which the weights do not depend on)."""
    settings = {key: value for key, value in cfg.to_dict().items() if key not in ("device", "n_devices")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=repr).encode()).hexdigest()


def _config_from_files(folder: Path, device: str, dtype: torch.dtype, n_devices: int):
    from transformers import AutoConfig

    return _hooked_config(folder, AutoConfig.from_pretrained(folder).to_dict(), device, dtype, n_devices)


def write_hooked_cache(path: Path, model, folder: Path, tokenizer, device: str, dtype: torch.dtype,
                        n_devices: int) -> None:
    """Save ``model``'s weights and buffers as ``path`` (atomically), if a cached load rebuilds its config.

    Best effort: a failure (disk full, read-only cache) warns and the load goes on uncached.
    """
    from transformer_lens import HookedTransformer

    cfg = _config_from_files(folder, device, dtype, n_devices)
    signature = _config_signature(cfg)  # what a cached load compares before building the model
    # The model a cached load would build (its parameters allocated, not yet touched): its config
    # must be exactly the converted model's, else this folder is never cached.
    if _config_signature(HookedTransformer(cfg, tokenizer, move_to_device=False).cfg) != _config_signature(model.cfg):
        return
    save_processed_weights(path, model.state_dict(), {"format": str(HOOKED_CACHE_FORMAT), "config": signature},
                           "convert", stacklevel=5)


def save_processed_weights(path: Path, tensors: dict, metadata: dict[str, str], redo: str, stacklevel: int) -> None:
    """Write ``tensors`` (on the CPU, shared memory copied apart) as the safetensors file ``path``,
    atomically, and remove the same model's files under older keys. Best effort: a failure warns
    that later loads ``redo`` (convert, process) again, and the load goes on."""
    from safetensors.torch import save_file

    temporary = temporary_path(path)
    sweep_temporaries(path)
    try:
        kept, seen = {}, set()
        for key, value in tensors.items():
            value = value.detach().to("cpu").contiguous()
            pointer = value.untyped_storage().data_ptr()
            kept[key] = value.clone() if pointer in seen else value  # safetensors refuses shared memory
            seen.add(pointer)
        save_file(kept, str(temporary), metadata=metadata)
        del kept
        os.replace(temporary, path)
        for stale in path.parent.glob(path.name.rsplit("-", 1)[0] + "-*.safetensors"):
            if stale != path:  # the same model and dtype under an older key (another version, a rebuilt folder)
                stale.unlink(missing_ok=True)
    except (OSError, RuntimeError, ValueError) as error:
        warnings.warn(f"could not cache the processed weights as {path} ({error}); later loads {redo} again "
                      "(to keep them, set SURPRISE_PROBE_CACHE to a writable folder with space)", stacklevel=stacklevel)
    finally:
        temporary.unlink(missing_ok=True)


def hooked_from_cache(path: Path, folder: Path, tokenizer, device: str, dtype: torch.dtype, n_devices: int):
    """A HookedTransformer with the weights cached in ``path`` read straight into its parameters.

    None when there is no such file or it does not fit (then the caller converts and rewrites it).
    """
    from transformer_lens import HookedTransformer

    if not path.is_file():
        return None
    try:
        with open(path, "rb") as handle:
            header, data_start = _safetensors_header(handle)
            metadata = header.pop("__metadata__", None) or {}
            cfg = _config_from_files(folder, device, dtype, n_devices)
            if metadata.get("format") != str(HOOKED_CACHE_FORMAT) or metadata.get("config") != _config_signature(cfg):
                return None
            model = HookedTransformer(cfg, tokenizer, move_to_device=False)
            _read_into(handle, header, data_start, model.state_dict(), path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        warnings.warn(f"ignoring the processed-weights cache {path} ({error}); converting again", stacklevel=4)
        return None
    model.setup()  # as load_and_process_state_dict does after folding
    model.move_model_modules_to_device()
    return model


def _safetensors_header(handle) -> tuple[dict, int]:
    size = int.from_bytes(handle.read(8), "little")
    if not 0 < size < 100_000_000:
        raise ValueError(f"not a safetensors file (header size {size})")
    header = json.loads(handle.read(size))
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (the header is not a JSON object)")
    return header, 8 + size


def _read_into(handle, header: dict, data_start: int, targets: dict[str, torch.Tensor], path: Path) -> None:
    """Read every tensor of a safetensors file into the same-named CPU tensor of ``targets``, in place.

    Plain reads into the tensors' own memory: no second copy, no memory map.
    """
    if set(header) != set(targets):
        missing, extra = sorted(set(targets) - set(header)), sorted(set(header) - set(targets))
        raise ValueError(f"{path.name} holds other tensors than the model (missing {missing[:3]}, extra {extra[:3]})")
    for key, entry in header.items():
        target = targets[key]
        begin, end = entry["data_offsets"]
        nbytes = target.numel() * target.element_size()
        if (entry["dtype"] != _SAFETENSORS_DTYPES.get(target.dtype) or list(entry["shape"]) != list(target.shape)
                or end - begin != nbytes or target.device.type != "cpu" or not target.is_contiguous()):
            raise ValueError(f"{key}: cached {entry['dtype']} {entry['shape']} does not fit the model's "
                             f"{_dtype_name(target.dtype)} {list(target.shape)}")
        if nbytes == 0:
            continue
        handle.seek(data_start + begin)
        if handle.readinto(target.detach().reshape(-1).view(torch.uint8).numpy()) != nbytes:
            raise ValueError(f"{key}: {path.name} is truncated")


# Weights TransformerLens re-lays out on every forward (``F.linear(x, W.T.contiguous())``, an einops
# rearrange): module class -> {parameter: the permutation TL applies}. Stored in that order, TL's
# copy becomes a view. A one-token decoding step is dominated by these copies otherwise (each step
# copies every weight matrix: measured ~3x the matmul time of SmolLM2's MLPs at batch 8).
FORWARD_LAYOUT = {
    "GatedMLP": {"W_gate": (1, 0), "W_in": (1, 0), "W_out": (1, 0)},
    "Unembed": {"W_U": (1, 0)},
    "Attention": {"W_Q": (0, 2, 1), "W_K": (0, 2, 1), "W_V": (0, 2, 1), "W_O": (2, 0, 1)},
    "GroupedQueryAttention": {"W_Q": (0, 2, 1), "_W_K": (0, 2, 1), "_W_V": (0, 2, 1), "W_O": (2, 0, 1)},
}


def store_forward_layout(model) -> list[torch.nn.Parameter]:
    """Store a ``HookedTransformer``'s weight matrices in the memory order its forward asks for
    (``FORWARD_LAYOUT``), so TransformerLens' per-forward copies of them become views; returns the
    parameters changed. Values, shapes and every forward's numbers are unchanged; the parameters
    are no longer contiguous (``.contiguous()`` gives the usual layout back). Attention with split
    inputs (``use_split_qkv_input``/``use_attn_in``) is left as is."""
    if model.cfg.use_split_qkv_input or model.cfg.use_attn_in:
        return []
    changed = []
    # Outside inference mode (a caller may be inside it): parameters must stay ordinary tensors.
    with torch.inference_mode(False), torch.no_grad():
        for module in model.modules():
            for name, perm in FORWARD_LAYOUT.get(type(module).__name__, {}).items():
                param = module._parameters.get(name)
                if param is None or param.dim() != len(perm):
                    continue
                inverse = tuple(int(i) for i in np.argsort(perm))
                param.data = param.data.permute(perm).contiguous().permute(inverse)
                changed.append(param)
    return changed
