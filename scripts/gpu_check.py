"""One-command GPU check (issue #26): the toolkit's chain at real 8B / 262k-vocabulary shapes.

On one CUDA GPU, with no download, this builds two models with random weights directly on the
device in bfloat16 -- Llama-3.1-8B's exact config, and a Gemma-3-like config with a 262,144-token
vocabulary (Gemma-3-4B's widths, fewer layers) -- wraps each into TransformerLens the way
``sp.load_model`` does, and runs the chain at moderate sizes:

    build        random Hugging Face model on the device + TransformerLens wrapping + warm-up
    capture      ``sp.capture`` of every layer's residual stream (+ embedding) with surprise/entropy
    fit          ``fit_sweep`` (ridge probe) over the captured hooks (a subset at d_model 4096)
    steer        ``dose_response``: about 30 direction x strength conditions
    patch        ``activation_patching`` along the probe direction
    attribution  ``attribution_patching`` at every layer (one forward + one backward per pair)
    sample       ``generate`` with the key-value cache (the policy gap's sampler)
    read         teacher-forced read of the sampled ids (``sp.capture`` with no hooks)
    agreement    bfloat16 vs float32 surprise and entropy on a shallower model of the same widths

Per stage it records wall seconds, the seconds of a plain Hugging Face baseline on the same shapes
in the same run (a forward, a forward + backward, or ``generate``), their ratio, the peak GPU
memory of the stage (``torch.cuda.max_memory_allocated``, reset per stage), ok and the error.
A failing stage records its error and the next stages still run. One strict JSON (``--out``,
rewritten after every stage, so a run cut short still leaves what it measured) plus a table.
Exit code 0 when every stage ran (a missed target is reported, not an error), 1 otherwise.

    python scripts/gpu_check.py --out gpu_check.json            # one GPU; sized for ~8 min on an H100 (estimate)
    python scripts/gpu_check.py --smoke --out smoke.json        # tiny shapes on the CPU, ~30 s

On the GPU machine transformer_lens (and its small dependencies) must be carried as wheels.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from surprise_probe.interventions import (
    SteeringDirection,
    activation_patching,
    attribution_patching,
    dose_response,
    generate,
    random_directions,
)
from surprise_probe.probes import fit_sweep

import surprise_probe as sp
from surprise_probe.core.models.backends import (
    hooked_transformer_available,
    transformer_lens_version,
)
from surprise_probe.core.models.loading import bridge_from_hf
from surprise_probe.core.utils.jsonio import finite_or_none, write_json
from surprise_probe.testing import tiny_tokenizer

SCHEMA_VERSION = 1

# The JSON's structure: one constant, shared by both modes (tests/test_gpu_check.py checks it).
TOP_FIELDS = (
    "schema", "mode", "device", "options", "versions", "started_utc", "total_seconds", "budget_seconds",
    "targets", "models", "all_ok", "no_oom", "targets_missed", "finished",
)
MODEL_FIELDS = ("name", "architecture", "backend", "config", "n_parameters", "note", "sizes", "bf16_vs_fp32",
                "stages")
STAGES = ("build", "capture", "fit", "steer", "patch", "attribution", "sample", "read", "agreement")
STAGE_FIELDS = ("seconds", "baseline_seconds", "ratio", "peak_memory_gb", "ok", "error", "baseline", "target",
                "target_met", "details")
AGREEMENT_FIELDS = ("surprise_max_abs_diff", "entropy_max_abs_diff", "surprise_mean_abs_diff",
                    "entropy_mean_abs_diff", "n_tokens")
MODELS = ("llama-3.1-8b", "gemma-3-262k")

# Targets, as ratios of the stage's seconds to its baseline's seconds.
TARGETS = {
    "capture": {"max_ratio": 1.10, "text": "capture <= 1.10x a plain Hugging Face forward"},
    "sample": {"max_ratio": 1.25, "text": "sampling >= 0.8x the tokens/s of Hugging Face generate (ratio <= 1.25)"},
}

# ---------------------------------------------------------------------------------------------
# Model configs: real shapes (GPU) and the same architectures at tiny widths (smoke).

LLAMA_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    tie_word_embeddings=False, attention_bias=False, mlp_bias=False, bos_token_id=128000, eos_token_id=128001,
)
# Gemma-3-4B's widths (hidden 2560, 8/4 heads of 256, MLP 10240, sliding window 1024, 5 local : 1
# global layers) with 12 of its 34 layers and the 262,144-token vocabulary of gemma-3-270m/1b.
GEMMA_262K = dict(
    vocab_size=262144, hidden_size=2560, intermediate_size=10240, num_hidden_layers=12, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
    max_position_embeddings=131072, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    final_logit_softcapping=None, attn_logit_softcapping=None, tie_word_embeddings=True,
    pad_token_id=0, eos_token_id=1, bos_token_id=2,
)
# Tiny widths for --smoke: the same architectures and the real vocabularies (so the 262k path,
# float64 metrics above 131k, runs too), two layers.
SMOKE_WIDTHS = {
    "llama-3.1-8b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16),
    "gemma-3-262k": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                         layer_types=["sliding_attention", "full_attention"]),
}


@dataclass(frozen=True)
class Sizes:
    """How much work each stage does (the JSON records it per model)."""

    capture_sequences: int
    capture_length: int
    capture_batch: int
    fit_hooks: str  # "all", or "embedding+middle"
    fit_folds: int
    steer_sequences: int
    steer_prompt: int
    steer_response: int
    steer_strengths: tuple[float, ...]
    steer_random_directions: int
    steer_batch: int
    patch_pairs: int
    patch_prompt: int
    patch_response: int
    patch_hooks: int
    patch_batch: int
    attribution_pairs: int
    attribution_prompt: int
    attribution_response: int
    sample_rows: int
    sample_prompt: int
    sample_new_tokens: int
    read_batch: int
    agreement_layers: int
    agreement_sequences: int
    agreement_length: int
    n_boot: int

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in self.__dict__.items()}


GPU_SIZES = Sizes(
    capture_sequences=64, capture_length=2048, capture_batch=8, fit_hooks="embedding+middle", fit_folds=3,
    steer_sequences=16, steer_prompt=256, steer_response=256, steer_strengths=(-4.0, -2.0, -1.0, 1.0, 2.0, 4.0),
    steer_random_directions=3, steer_batch=16,
    patch_pairs=8, patch_prompt=256, patch_response=256, patch_hooks=4, patch_batch=16,
    attribution_pairs=4, attribution_prompt=128, attribution_response=128,
    sample_rows=32, sample_prompt=128, sample_new_tokens=128, read_batch=8,
    agreement_layers=6, agreement_sequences=4, agreement_length=512, n_boot=200,
)
SMOKE_SIZES = Sizes(
    capture_sequences=12, capture_length=32, capture_batch=4, fit_hooks="all", fit_folds=3,
    steer_sequences=4, steer_prompt=8, steer_response=8, steer_strengths=(-4.0, -2.0, -1.0, 1.0, 2.0, 4.0),
    steer_random_directions=3, steer_batch=4,
    patch_pairs=2, patch_prompt=8, patch_response=8, patch_hooks=2, patch_batch=4,
    attribution_pairs=2, attribution_prompt=8, attribution_response=8,
    sample_rows=4, sample_prompt=8, sample_new_tokens=8, read_batch=4,
    agreement_layers=2, agreement_sequences=2, agreement_length=32, n_boot=50,
)

# ---------------------------------------------------------------------------------------------
# Small helpers: JSON, timing, memory.


def _is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def sync(device: str) -> None:
    if _is_cuda(device):
        torch.cuda.synchronize()


def timed(device: str, fn):
    """``(result, seconds)`` of ``fn()``, with the device synchronized before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def free_memory(device: str) -> None:
    gc.collect()
    if _is_cuda(device):
        torch.cuda.empty_cache()


def reset_peak(device: str) -> None:
    if _is_cuda(device):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float | None:
    """Peak GPU memory since the last reset (None on the CPU: there is no per-stage peak there)."""
    if _is_cuda(device):
        return torch.cuda.max_memory_allocated() / 2**30
    return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": _version("transformers"),
        "transformer_lens": _version("transformer-lens") or _version("transformer_lens"),
        "numpy": np.__version__,
        "surprise_probe": getattr(sp, "__version__", None),
    }


def device_name(device: str) -> str:
    if _is_cuda(device):
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30
        return f"{torch.cuda.get_device_name(torch.device(device))} ({total:.1f} GiB)"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, " \
           f"{torch.get_num_threads()} torch threads)"


def random_ids(rng: np.random.Generator, vocab: int, n: int) -> list[int]:
    # Ids 0..2 are the tiny tokenizer's special tokens (pad/BOS, <|im_start|>, <|im_end|>).
    return rng.integers(3, vocab, size=n).tolist()


def prompt_response(rng, vocab: int, prompt: int, response: int) -> dict:
    """A ``{"token_ids", "scored"}`` item: an unscored prompt, then a scored response."""
    return {"token_ids": random_ids(rng, vocab, prompt + response), "scored": [False] * prompt + [True] * response}


def _batches(rows: list[list[int]], size: int):
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


# ---------------------------------------------------------------------------------------------
# Models: random Hugging Face weights on the device, wrapped into TransformerLens.


def hf_config(name: str, smoke: bool, n_layers: int | None = None):
    from transformers import Gemma3TextConfig, LlamaConfig

    if name == "llama-3.1-8b":
        settings, cls, architecture = dict(LLAMA_8B), LlamaConfig, "LlamaForCausalLM"
    else:
        settings, cls, architecture = dict(GEMMA_262K), Gemma3TextConfig, "Gemma3ForCausalLM"
    if smoke:
        settings.update(SMOKE_WIDTHS[name])
    if n_layers is not None:
        settings["num_hidden_layers"] = n_layers
        if settings.get("layer_types") is not None:  # keep the pattern's last (global) layer
            settings["layer_types"] = settings["layer_types"][-n_layers:]
    config = cls(**settings)
    config.architectures = [architecture]
    return config


def build_hf(config, device: str, dtype: torch.dtype, seed: int = 0):
    """A randomly initialised causal LM, allocated and initialised directly on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def tokenizer_folder(config, folder: Path):
    """The config and a tiny tokenizer, saved where TransformerLens reloads them by path (no weights)."""

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer(folder)
    config.save_pretrained(folder)
    return tokenizer


def _finish_wrap(model, tokenizer, name: str):
    """What ``sp.load_model`` does after conversion: the name, no BOS prepended, the original tokenizer."""
    model.cfg.model_name = name
    model.cfg.default_prepend_bos = False
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if hasattr(type(model), "tokenizer") and isinstance(type(model).tokenizer, property):
        model._tokenizer = tokenizer  # TransformerBridge: its setter would swap the tokenizer again
    else:
        model.tokenizer = tokenizer
    model.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0
    return model.eval()


def wrap_hooked(hf_model, tokenizer, folder: Path, name: str, device: str, dtype: torch.dtype):
    """A ``HookedTransformer`` from an in-memory Llama, as ``sp.load_model`` converts one.

    The same TransformerLens config (``fold_ln=True``: RMSPre norms) and state-dict conversion as
    the loader; weights are copied device to device (the Hugging Face model stays untouched, for
    the baseline). The loader's processing for an RMSNorm model is: the norm weights folded into
    the following projections and the unembedding centered (TransformerLens skips centering the
    writing weights of RMSNorm models, and Llama has no value biases); it is done here in place on
    the TransformerLens parameters, so no full copy of the state dict is ever made on the GPU.
    """
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    cfg = loading.get_pretrained_model_config(
        str(folder), hf_cfg=hf_model.config.to_dict(), fold_ln=True, device=device, n_devices=1,
        default_prepend_bos=False, dtype=dtype,
    )
    state = loading.get_pretrained_state_dict(str(folder), cfg, hf_model, dtype=dtype)
    with warnings.catch_warnings(), torch.device(device):
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    norms = {key: state.pop(key) for key in list(state) if key.endswith((".ln1.w", ".ln2.w", "ln_final.w"))}
    state = model.fill_missing_keys(state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise RuntimeError(f"state dict does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    del state
    with torch.no_grad():
        for layer, block in enumerate(model.blocks):
            w1 = norms[f"blocks.{layer}.ln1.w"].to(block.attn.W_Q.device)
            for weight in ("W_Q", "_W_K", "_W_V", "W_K", "W_V"):
                param = block.attn._parameters.get(weight)
                if param is not None:
                    param.mul_(w1[None, :, None].to(param.dtype))
            w2 = norms[f"blocks.{layer}.ln2.w"].to(block.mlp.W_in.device)
            for weight in ("W_in", "W_gate"):
                param = block.mlp._parameters.get(weight)
                if param is not None:
                    param.mul_(w2[:, None].to(param.dtype))
        model.unembed.W_U.mul_(norms["ln_final.w"].to(model.unembed.W_U.device)[:, None].to(model.unembed.W_U.dtype))
        model.unembed.W_U.sub_(model.unembed.W_U.mean(-1, keepdim=True))
        model.unembed.b_U.sub_(model.unembed.b_U.mean())
    model.setup()
    model.move_model_modules_to_device()
    return _finish_wrap(model, tokenizer, name)


def wrap_bridge(hf_model, tokenizer, folder: Path, name: str, device: str, dtype: torch.dtype):
    """A ``TransformerBridge`` around ``hf_model``, built as ``sp.load_model`` builds one (weight
    processing and the bridge fast paths: ``bridge_from_hf``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        bridge = bridge_from_hf(folder, hf_model, tokenizer, dtype, device)
    return _finish_wrap(bridge, tokenizer, name)


def resolve_llama_backend(asked: str) -> str:
    """``auto`` -> what ``sp.load_model`` picks for Llama: HookedTransformer where this TransformerLens
    has it (3.x), else the bridge (4.x). ``hooked`` on 4.x is an error naming the version."""
    if asked not in ("auto", "hooked", "bridge"):
        raise ValueError(f"--llama-backend must be auto, hooked or bridge, got {asked!r}")
    if asked == "auto":
        return "hooked" if hooked_transformer_available() else "bridge"
    if asked == "hooked" and not hooked_transformer_available():
        raise ValueError(f"--llama-backend hooked needs HookedTransformer, which TransformerLens "
                         f"{transformer_lens_version()} does not have (3.x only); use auto or bridge")
    return asked


def wrap(name: str, hf_model, tokenizer, folder: Path, device: str, dtype: torch.dtype, llama_backend: str = "hooked"):
    """The backend ``sp.load_model(backend="auto")`` picks for a folder: HookedTransformer for Llama on
    TransformerLens 3.x (``llama_backend="bridge"`` forces the bridge; see ``resolve_llama_backend``),
    the TransformerBridge for Gemma 3 (TransformerLens 3.9's HookedTransformer does not support it).

    The bridge wraps ``hf_model`` itself, so it gets a copy (the original stays a plain baseline).
    """
    if name == "llama-3.1-8b" and llama_backend == "hooked":
        return wrap_hooked(hf_model, tokenizer, folder, name, device, dtype), "HookedTransformer"
    return wrap_bridge(copy.deepcopy(hf_model), tokenizer, folder, name, device, dtype), "TransformerBridge"


def _hf_forward(hf_model, rows: list[list[int]], device: str, batch: int) -> None:
    with torch.inference_mode():
        for chunk in _batches(rows, batch):
            ids = torch.tensor(chunk, device=device)
            hf_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)


def _one_forward(ctx, rows: list[list[int]], batch: int) -> float:
    """Seconds of one plain forward of ``rows`` (the faster of two: it is multiplied by the number of
    conditions, so a first-call overhead must not be multiplied with it)."""
    return min(timed(ctx.device, lambda: _hf_forward(ctx.hf, rows, ctx.device, batch))[1] for _ in range(2))


def _diff(a: np.ndarray, b: np.ndarray) -> tuple[float | None, float | None]:
    keep = np.isfinite(a) & np.isfinite(b)
    if not keep.any():
        return None, None
    d = np.abs(a[keep].astype(np.float64) - b[keep].astype(np.float64))
    return float(d.max()), float(d.mean())


# ---------------------------------------------------------------------------------------------
# Stages. Each takes the context, returns {"seconds", "baseline_seconds", "baseline", "details"}.


@dataclass
class Context:
    name: str
    smoke: bool
    device: str
    sizes: Sizes
    work: Path
    llama_backend: str = "hooked"
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    config: object = None
    hf: object = None
    model: object = None
    tokenizer: object = None
    backend: str | None = None
    run: object = None
    direction: object = None
    direction_source: str | None = None
    sampled: list | None = None
    prompt: list | None = None
    agreement: dict | None = None

    @property
    def vocab(self) -> int:
        return int(self.config.vocab_size)

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def need_model(self):
        if self.model is None or self.hf is None:
            raise RuntimeError("no model: the build stage failed")
        return self.model


def _folder(ctx: Context, what: str) -> Path:
    # A neutral name: TransformerLens 3.9 guesses the architecture from a path containing "llama" or
    # "gemma" (and then fails), whatever its config.json says.
    return ctx.work / f"model{MODELS.index(ctx.name)}-{what}"


def stage_build(ctx: Context) -> dict:

    dtype = torch.bfloat16
    ctx.config = hf_config(ctx.name, ctx.smoke)
    folder = _folder(ctx, "main")
    ctx.tokenizer = tokenizer_folder(ctx.config, folder)
    ctx.hf, hf_seconds = timed(ctx.device, lambda: build_hf(ctx.config, ctx.device, dtype, seed=0))
    (ctx.model, ctx.backend), wrap_seconds = timed(
        ctx.device, lambda: wrap(ctx.name, ctx.hf, ctx.tokenizer, folder, ctx.device, dtype, ctx.llama_backend))
    # First calls, kept out of the timed stages: CUDA kernels and cuBLAS handles on both sides, and
    # the toolkit's per-model weight hash (sha256 of every parameter, cached per model object).
    warm = [random_ids(ctx.rng, ctx.vocab, 16)]
    _, hf_warm = timed(ctx.device, lambda: _hf_forward(ctx.hf, warm, ctx.device, 1))
    _, first_capture = timed(ctx.device, lambda: sp.capture(ctx.model, [{"token_ids": warm[0]}], progress=False))
    n_params = sum(p.numel() for p in ctx.hf.parameters())
    return {
        "seconds": hf_seconds + wrap_seconds + hf_warm + first_capture,
        "baseline_seconds": hf_seconds + hf_warm,
        "baseline": "building the random Hugging Face model on the device + one warm-up forward",
        "details": {
            "hf_build_seconds": hf_seconds, "wrap_seconds": wrap_seconds, "hf_warmup_seconds": hf_warm,
            "first_capture_seconds": first_capture, "backend": ctx.backend, "n_parameters": n_params,
            "model_dtype": str(getattr(ctx.model.cfg, "dtype", dtype)).replace("torch.", ""),
            "n_ctx": int(ctx.model.cfg.n_ctx),
        },
    }


def stage_capture(ctx: Context) -> dict:

    model, s = ctx.need_model(), ctx.sizes
    rows = [random_ids(ctx.rng, ctx.vocab, s.capture_length) for _ in range(s.capture_sequences)]
    _, baseline = timed(ctx.device, lambda: _hf_forward(ctx.hf, rows, ctx.device, s.capture_batch))
    items = [{"token_ids": row} for row in rows]
    # One shard per batch: in memory, a shard's activations are concatenated once it is complete,
    # so small shards keep that transient copy small (64 x 2048 tokens x 33 hooks at d_model 4096
    # are 35 GB of float16).
    ctx.run, seconds = timed(ctx.device, lambda: sp.capture(
        model, items, batch_size=s.capture_batch, shard_size=s.capture_batch, storage_dtype="float16",
        progress=False))
    surprise = ctx.run.column("input_surprise")
    entropy = ctx.run.column("output_entropy")
    hooks = list(ctx.run.hooks)
    n_tokens = int(ctx.run.n_tokens)
    return {
        "seconds": seconds,
        "baseline_seconds": baseline,
        "baseline": "plain Hugging Face forward (logits, no cache) of the same batches",
        "details": {
            "n_sequences": s.capture_sequences, "length": s.capture_length, "batch": s.capture_batch,
            "shard_size": s.capture_batch, "n_tokens": n_tokens, "n_hooks": len(hooks), "storage_dtype": "float16",
            "activation_gb": n_tokens * len(hooks) * int(model.cfg.d_model) * 2 / 2**30,
            "tokens_per_second": n_tokens / seconds, "baseline_tokens_per_second": n_tokens / baseline,
            "surprise_mean": float(np.nanmean(surprise)), "entropy_mean": float(np.nanmean(entropy)),
            "log_vocab": math.log(ctx.vocab),
            "all_finite": bool(np.isfinite(entropy).all() and np.isfinite(surprise[1:]).sum() > 0),
        },
    }


def stage_fit(ctx: Context) -> dict:

    if ctx.run is None:
        raise RuntimeError("no capture to fit: the capture stage failed")
    s = ctx.sizes
    hooks = list(ctx.run.hooks)
    middle = f"blocks.{ctx.n_layers // 2}.hook_resid_post"
    fit_hooks = hooks if s.fit_hooks == "all" else [hooks[0], middle]
    try:
        result, seconds = timed(ctx.device, lambda: fit_sweep(
            ctx.run, "surprise", hooks=fit_hooks, n_folds=s.fit_folds, nested=False, n_shuffles=0,
            n_boot=s.n_boot, progress=False))
    finally:
        ctx.run = None  # the captured activations (35 GB of host memory at 8B) are not needed again
    ctx.direction = result.direction(middle)
    ctx.direction_source = f"probe fitted at {middle}"
    r2 = {row["hook"]: row.get("r2") for row in result.table()}
    return {
        "seconds": seconds,
        "baseline_seconds": None,
        "baseline": None,
        "details": {
            "hooks_fitted": fit_hooks, "n_hooks_captured": len(hooks), "n_folds": s.fit_folds, "nested": False,
            "n_tokens": int(result.n_tokens), "r2": r2, "direction_hook": middle,
            "direction_std": float(ctx.direction.std),
            "seconds_per_hook": seconds / len(fit_hooks),
            "all_hooks_seconds_estimate": seconds / len(fit_hooks) * len(hooks),
            "note": "CPU (numpy float64) work; no GPU baseline. Random weights: R2 is not meaningful.",
        },
    }


def _direction(ctx: Context):
    """The fitted probe direction, or (when the fit failed) a random one, so later stages still run."""

    if ctx.direction is None:
        hook = f"blocks.{ctx.n_layers // 2}.hook_resid_post"
        vector = random_directions(int(ctx.model.cfg.d_model), 1, seed=7)[0]
        ctx.direction = SteeringDirection(vector, hook, 1.0, label="probe")
        ctx.direction_source = f"random unit direction at {hook} (the fit stage failed)"
    return ctx.direction


def stage_steer(ctx: Context) -> dict:

    model, s = ctx.need_model(), ctx.sizes
    direction = _direction(ctx)
    items = [prompt_response(ctx.rng, ctx.vocab, s.steer_prompt, s.steer_response) for _ in range(s.steer_sequences)]
    result, seconds = timed(ctx.device, lambda: dose_response(
        model, items, direction, list(s.steer_strengths), random_directions=s.steer_random_directions,
        orthogonal=True, positions="response", batch_size=s.steer_batch, n_boot=s.n_boot, progress=False))
    n_conditions = len(result.labels) * len(result.strengths)
    one = _one_forward(ctx, [i["token_ids"] for i in items], s.steer_batch)
    return {
        "seconds": seconds,
        "baseline_seconds": one * n_conditions,
        "baseline": f"{n_conditions} plain Hugging Face forwards of the items (one per condition; one measured, best of 2)",
        "details": {
            "n_sequences": s.steer_sequences, "prompt": s.steer_prompt, "response": s.steer_response,
            "n_conditions": n_conditions, "directions": result.labels, "strengths": result.strengths,
            "hook": result.hook, "n_forwards": result.n_forwards, "n_tokens": result.n_tokens,
            "one_forward_seconds": one, "clean_entropy": result.clean_entropy, "probe_slope": result.probe_slope,
            "direction": ctx.direction_source,
        },
    }


def _pairs(ctx: Context, n: int, prompt: int, response: int) -> list[tuple[dict, dict]]:
    pairs = []
    for _ in range(n):
        shared = random_ids(ctx.rng, ctx.vocab, prompt)
        source, destination = (
            {"token_ids": shared + random_ids(ctx.rng, ctx.vocab, response),
             "scored": [False] * prompt + [True] * response} for _ in range(2))
        pairs.append((source, destination))
    return pairs


def stage_patch(ctx: Context) -> dict:

    model, s = ctx.need_model(), ctx.sizes
    direction = _direction(ctx)
    layers = np.linspace(0, ctx.n_layers - 1, s.patch_hooks).round().astype(int)
    hooks = list(dict.fromkeys(f"blocks.{layer}.hook_resid_post" for layer in layers))
    groups, components = ("prompt", "response", "first4"), ("direction", "all")
    pairs = _pairs(ctx, s.patch_pairs, s.patch_prompt, s.patch_response)
    result, seconds = timed(ctx.device, lambda: activation_patching(
        model, pairs, hooks=hooks, groups=groups, direction=direction, components=components,
        batch_size=s.patch_batch, n_boot=s.n_boot, progress=False))
    n_conditions = len(hooks) * len(groups) * len(components)
    one = _one_forward(ctx, [d["token_ids"] for _, d in pairs], s.patch_batch)
    return {
        "seconds": seconds,
        "baseline_seconds": one * (n_conditions + 2),
        "baseline": f"{n_conditions} + 2 plain Hugging Face forwards of the destinations (one per patched "
                    "condition, plus the clean source and destination; one measured, best of 2)",
        "details": {
            "n_pairs": s.patch_pairs, "prompt": s.patch_prompt, "response": s.patch_response, "hooks": hooks,
            "groups": list(groups), "components": list(components), "n_conditions": n_conditions,
            "one_forward_seconds": one, "n_measured_tokens": result.n_measured_tokens,
            "entropy_source": result.entropy_source, "entropy_destination": result.entropy_destination,
            "direction": ctx.direction_source,
        },
    }


def _hf_attribution_baseline(ctx: Context, pairs) -> None:
    """Forward of every source; forward + backward of every destination's mean response entropy
    (``sp.surprise_and_entropy`` on the full logits) to the input embeddings."""

    hf = ctx.hf
    sources = [p[0]["token_ids"] for p in pairs]
    _hf_forward(hf, sources, ctx.device, len(sources))
    ids = torch.tensor([p[1]["token_ids"] for p in pairs], device=ctx.device)
    scored = torch.tensor([p[1]["scored"] for p in pairs], device=ctx.device)
    with torch.enable_grad():
        embeds = hf.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = hf(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), use_cache=False).logits
        _, entropy = sp.surprise_and_entropy(logits, ids)
        measured = entropy[scored].mean()
        torch.autograd.grad(measured, [embeds])


def stage_attribution(ctx: Context) -> dict:

    model, s = ctx.need_model(), ctx.sizes
    direction = _direction(ctx)
    pairs = _pairs(ctx, s.attribution_pairs, s.attribution_prompt, s.attribution_response)
    result, seconds = timed(ctx.device, lambda: attribution_patching(
        model, pairs, direction=direction, groups=("response", "first4"), progress=False))
    _, baseline = timed(ctx.device, lambda: _hf_attribution_baseline(ctx, pairs))
    estimate = np.asarray(result.estimate, dtype=np.float64)
    return {
        "seconds": seconds,
        "baseline_seconds": baseline,
        "baseline": "Hugging Face forward of the sources + forward and backward (to the input embeddings) "
                    "of the destinations' mean response entropy, all pairs in one batch",
        "details": {
            "n_pairs": s.attribution_pairs, "prompt": s.attribution_prompt, "response": s.attribution_response,
            "n_hooks": len(result.hooks), "estimate_shape": list(estimate.shape),
            "estimate_finite": bool(np.isfinite(estimate).all()), "direction": ctx.direction_source,
        },
    }


def stage_sample(ctx: Context) -> dict:
    from transformers import GenerationConfig

    model, s = ctx.need_model(), ctx.sizes
    ctx.prompt = random_ids(ctx.rng, ctx.vocab, s.sample_prompt)
    item = {"token_ids": ctx.prompt}
    pad = int(ctx.tokenizer.pad_token_id)
    # Plain multinomial sampling, as the toolkit's sampler: top_k=0 and top_p=1 switch off the
    # defaults generate would otherwise apply (top-k 50), and no end-of-sequence id (the toolkit
    # samples with stop_at_eos=False), so both sides draw exactly new_tokens per row.
    ctx.hf.generation_config.eos_token_id = None
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=s.sample_new_tokens,
                              eos_token_id=None, pad_token_id=pad)
    ids = torch.tensor([ctx.prompt] * s.sample_rows, device=ctx.device)

    def hf_generate(new_tokens: int):
        with torch.inference_mode():
            return ctx.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                   max_new_tokens=new_tokens)

    # Warm-up of both samplers (2 new tokens), then the timed runs.
    timed(ctx.device, lambda: hf_generate(2))
    timed(ctx.device, lambda: generate(model, item, max_new_tokens=2, n_samples=s.sample_rows, stop_at_eos=False))
    out, baseline = timed(ctx.device, lambda: hf_generate(s.sample_new_tokens))
    samples, seconds = timed(ctx.device, lambda: generate(
        model, item, max_new_tokens=s.sample_new_tokens, n_samples=s.sample_rows, temperature=1.0, seed=0,
        stop_at_eos=False))
    ctx.sampled = [list(sample.token_ids) for sample in samples]
    lengths = [len(row) for row in ctx.sampled]
    new_tokens = sum(lengths)
    hf_new = int(out.shape[0] * (out.shape[1] - ids.shape[1]))
    return {
        "seconds": seconds,
        "baseline_seconds": baseline,
        "baseline": "Hugging Face generate (KV cache, multinomial sampling at temperature 1, no top-k/top-p), "
                    "same prompt, rows and new tokens",
        "details": {
            "rows": s.sample_rows, "prompt": s.sample_prompt, "new_tokens": s.sample_new_tokens,
            "sampled_lengths_min_max": [min(lengths), max(lengths)], "tokens_per_second": new_tokens / seconds,
            "baseline_tokens_per_second": hf_new / baseline, "speed_vs_generate": baseline / seconds,
        },
    }


def stage_read(ctx: Context) -> dict:

    model, s = ctx.need_model(), ctx.sizes
    if ctx.sampled and ctx.prompt:
        responses, source = ctx.sampled, "the sampled ids"
        prompt = ctx.prompt
    else:  # sampling failed: read random responses, so the stage still runs
        prompt = random_ids(ctx.rng, ctx.vocab, s.sample_prompt)
        responses = [random_ids(ctx.rng, ctx.vocab, s.sample_new_tokens) for _ in range(s.sample_rows)]
        source = "random ids (the sample stage failed)"
    items = [{"token_ids": prompt + r, "scored": [False] * len(prompt) + [True] * len(r)} for r in responses]
    rows = [item["token_ids"] for item in items]
    # Teacher-forced read as the policy gap does it (batches of read_batch, surprise and entropy
    # over the response): sp.capture with no hooks. Equal lengths, so no padding on either side.
    run, seconds = timed(ctx.device, lambda: sp.capture(model, items, hooks=[], batch_size=s.read_batch,
                                                        progress=False))
    _, baseline = timed(ctx.device, lambda: _hf_forward(ctx.hf, rows, ctx.device, s.read_batch))
    entropy = run.column("output_entropy", scored_only=True)
    return {
        "seconds": seconds,
        "baseline_seconds": baseline,
        "baseline": "plain Hugging Face forward of the same sequences, same batches",
        "details": {
            "source": source, "n_sequences": len(items), "n_tokens": int(run.n_tokens),
            "n_scored": int(entropy.size), "entropy_mean": float(np.nanmean(entropy)) if entropy.size else None,
            "api": "sp.capture(hooks=[]) on {'token_ids', 'scored'} items (the gap's read_responses is not public)",
        },
    }


def _metrics(model, items, batch: int) -> tuple[np.ndarray, np.ndarray]:

    run = sp.capture(model, items, hooks=[], batch_size=batch, progress=False)
    return run.column("input_surprise"), run.column("output_entropy")


def _hf_metrics(hf_model, rows, device: str) -> tuple[np.ndarray, np.ndarray]:

    surprise, entropy = [], []
    with torch.inference_mode():
        for row in rows:
            ids = torch.tensor([row], device=device)
            logits = hf_model(input_ids=ids, use_cache=False).logits
            s, e = sp.surprise_and_entropy(logits, ids)
            surprise.append(s[0].float().cpu().numpy())
            entropy.append(e[0].float().cpu().numpy())
    return np.concatenate(surprise), np.concatenate(entropy)


def _pair(a, b) -> dict:
    surprise = _diff(a[0], b[0])
    entropy = _diff(a[1], b[1])
    return {"surprise_max_abs_diff": surprise[0], "entropy_max_abs_diff": entropy[0],
            "surprise_mean_abs_diff": surprise[1], "entropy_mean_abs_diff": entropy[1],
            "n_tokens": int(a[1].size)}


def stage_agreement(ctx: Context) -> dict:
    """bf16 vs fp32 on the same random weights: a model of the same widths and vocabulary with
    ``agreement_layers`` layers (the full-depth model's float32 copy would not fit beside it)."""
    s = ctx.sizes
    # The full-size models are no longer needed: give their memory back first.
    ctx.model = ctx.hf = ctx.run = None
    free_memory(ctx.device)
    config = hf_config(ctx.name, ctx.smoke, n_layers=s.agreement_layers)
    folder = _folder(ctx, "agreement")
    tokenizer = tokenizer_folder(config, folder)
    rows = [random_ids(ctx.rng, int(config.vocab_size), s.agreement_length) for _ in range(s.agreement_sequences)]
    items = [{"token_ids": row} for row in rows]

    def run():
        hf32 = build_hf(config, ctx.device, torch.float32, seed=1)
        tl32, _ = wrap(ctx.name, hf32, tokenizer, folder, ctx.device, torch.float32, ctx.llama_backend)
        m32 = _metrics(tl32, items, s.agreement_sequences)
        del tl32
        h32 = _hf_metrics(hf32, rows, ctx.device)
        hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
        del hf32
        free_memory(ctx.device)
        h16 = _hf_metrics(hf16, rows, ctx.device)
        tl16, _ = wrap(ctx.name, hf16, tokenizer, folder, ctx.device, torch.bfloat16, ctx.llama_backend)
        m16 = _metrics(tl16, items, s.agreement_sequences)
        del tl16, hf16
        return m32, m16, h32, h16

    (m32, m16, h32, h16), seconds = timed(ctx.device, run)
    free_memory(ctx.device)
    ctx.agreement = _pair(m16, m32)
    return {
        "seconds": seconds,
        "baseline_seconds": None,
        "baseline": None,
        "details": {
            "layers": s.agreement_layers, "sequences": s.agreement_sequences, "length": s.agreement_length,
            "toolkit_bf16_vs_fp32": ctx.agreement,
            "hf_bf16_vs_fp32": _pair(h16, h32),
            "toolkit_vs_hf_fp32": _pair(m32, h32),
            "toolkit_vs_hf_bf16": _pair(m16, h16),
            "entropy_mean_fp32": float(np.nanmean(m32[1])), "log_vocab": math.log(int(config.vocab_size)),
            "note": "random weights: the distributions are far flatter than a trained model's; "
                    "hf_bf16_vs_fp32 is Hugging Face's own bf16 error on the same weights, for scale",
        },
    }


STAGE_FUNCTIONS = {
    "build": stage_build, "capture": stage_capture, "fit": stage_fit, "steer": stage_steer, "patch": stage_patch,
    "attribution": stage_attribution, "sample": stage_sample, "read": stage_read, "agreement": stage_agreement,
}
assert tuple(STAGE_FUNCTIONS) == STAGES


def empty_stage(name: str) -> dict:
    target = TARGETS.get(name)
    return {
        "seconds": None, "baseline_seconds": None, "ratio": None, "peak_memory_gb": None, "ok": False,
        "error": None, "baseline": None, "target": target["text"] if target else None, "target_met": None,
        "details": {},
    }


_OOM = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


def run_stage(name: str, ctx: Context, deadline: float | None) -> dict:
    entry = empty_stage(name)
    if deadline is not None and time.perf_counter() > deadline:
        entry["error"] = "skipped: the time budget (--budget-s) was spent"
        return entry
    reset_peak(ctx.device)
    at_start = torch.cuda.memory_allocated() / 2**30 if _is_cuda(ctx.device) else None
    try:
        result = STAGE_FUNCTIONS[name](ctx)
    except Exception as error:  # noqa: BLE001 - recorded; the other stages still run
        entry["error"] = f"{type(error).__name__}: {error}"[:2000]
        entry["details"] = {"traceback": traceback.format_exc()[-4000:],
                            "out_of_memory": isinstance(error, _OOM) or "out of memory" in str(error).lower()}
    else:
        entry.update({key: result[key] for key in ("seconds", "baseline_seconds", "baseline", "details")})
        entry["ok"] = True
        seconds, baseline = entry["seconds"], entry["baseline_seconds"]
        if seconds is not None and baseline:
            entry["ratio"] = seconds / baseline
        target = TARGETS.get(name)
        if target and entry["ratio"] is not None:
            entry["target_met"] = entry["ratio"] <= target["max_ratio"]
    entry["peak_memory_gb"] = peak_gb(ctx.device)
    entry["details"]["memory_at_start_gb"] = at_start  # resident (weights) when the stage began
    free_memory(ctx.device)
    return entry


def empty_model(name: str, sizes: Sizes) -> dict:
    return {
        "name": name, "architecture": None, "backend": None, "config": None, "n_parameters": None, "note": None,
        "sizes": sizes.to_dict(), "bf16_vs_fp32": None, "stages": {stage: empty_stage(stage) for stage in STAGES},
    }


_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window", "layer_types",
                "rope_parameters", "tie_word_embeddings", "final_logit_softcapping", "query_pre_attn_scalar")


def run_model(name: str, smoke: bool, device: str, sizes: Sizes, work: Path, record: dict, out: Path,
              start: float, deadline: float | None, llama_backend: str = "hooked") -> None:
    entry = record["models"][name]
    ctx = Context(name=name, smoke=smoke, device=device, sizes=sizes, work=work, llama_backend=llama_backend)
    config = hf_config(name, smoke)  # what the build stage builds (recorded even if it fails)
    settings = config.to_dict()
    entry["config"] = {key: settings.get(key) for key in _CONFIG_KEYS if key in settings}
    entry["architecture"] = config.architectures[0]
    entry["note"] = (
        "Llama-3.1-8B's config (random weights)" if name == "llama-3.1-8b" else
        "Gemma3ForCausalLM (transformers' Gemma3TextConfig): Gemma-3-4B widths, "
        f"{config.num_hidden_layers} layers, 262,144-token vocabulary (random weights)"
    ) + ("; tiny widths for --smoke" if smoke else "")
    for stage in STAGES:
        entry["stages"][stage] = run_stage(stage, ctx, deadline)
        if stage == "fit":
            ctx.run = None  # whatever happened to the fit, the captured activations are not needed again
        if stage == "build":
            entry["backend"] = ctx.backend
            entry["n_parameters"] = entry["stages"]["build"]["details"].get("n_parameters")
        if stage == "agreement" and ctx.agreement is not None:
            entry["bf16_vs_fp32"] = ctx.agreement
        record["total_seconds"] = time.perf_counter() - start
        write_json(out, record)
        print(f"[{name}] {stage}: {'ok' if entry['stages'][stage]['ok'] else entry['stages'][stage]['error']}",
              file=sys.stderr, flush=True)
    ctx.model = ctx.hf = ctx.run = None
    free_memory(device)


# ---------------------------------------------------------------------------------------------
# Output.


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(record: dict) -> str:
    head = f"{'model':<14} {'stage':<12} {'seconds':>9} {'baseline':>9} {'ratio':>7} {'target':>7} {'peak GB':>8}  result"
    lines = [head, "-" * len(head)]
    for name, model in record["models"].items():
        for stage, entry in model["stages"].items():
            met = {True: "met", False: "MISSED", None: "-"}[entry["target_met"]]
            result = "ok" if entry["ok"] else (entry["error"] or "not run").splitlines()[0][:70]
            lines.append(f"{name:<14} {stage:<12} {_fmt(entry['seconds']):>9} {_fmt(entry['baseline_seconds']):>9} "
                         f"{_fmt(entry['ratio']):>7} {met:>7} {_fmt(entry['peak_memory_gb']):>8}  {result}")
        agreement = model.get("bf16_vs_fp32")
        if agreement:
            lines.append(f"{'':<14} bf16 vs fp32: surprise max |diff| {_fmt(agreement['surprise_max_abs_diff'], '.4f')}"
                         f", entropy max |diff| {_fmt(agreement['entropy_max_abs_diff'], '.4f')} nats")
    lines.append(f"mode {record['mode']} on {record['device']}; total {_fmt(record['total_seconds'], '.1f')} s; "
                 f"all stages ok: {record['all_ok']}; targets missed: {record['targets_missed'] or 'none'}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (< 1 minute)")
    parser.add_argument("--out", required=True, help="the JSON to write (rewritten after every stage)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="which models to run")
    parser.add_argument("--llama-backend", choices=("auto", "hooked", "bridge"), default="auto",
                        help="TransformerLens backend for the Llama model (Gemma 3 always loads as a bridge); "
                             "auto: HookedTransformer on TransformerLens 3.x, the bridge on 4.x")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip (and record as not run) the stages that would start after this many seconds "
                             "(default: 540 on the GPU, none with --smoke)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        llama_backend = resolve_llama_backend(args.llama_backend)
    except ValueError as error:
        print(f"gpu_check: {error}", file=sys.stderr)
        return 2
    # Nothing may reach the network (the GPU machine has none): fail fast instead of waiting on
    # timeouts. Set before anything imports transformers / huggingface_hub (they read it at import).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    smoke = bool(args.smoke)
    device = args.device or ("cpu" if smoke else "cuda")
    if _is_cuda(device) and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (use --smoke for the CPU check)", file=sys.stderr)
        return 2
    sizes = SMOKE_SIZES if smoke else GPU_SIZES
    budget = args.budget_s if args.budget_s is not None else (None if smoke else 540.0)
    start = time.perf_counter()
    deadline = None if budget is None else start + budget
    out = Path(args.out)
    record = {
        "schema": SCHEMA_VERSION, "mode": "smoke" if smoke else "gpu", "device": device_name(device),
        "options": {"device": device, "models": list(args.models), "llama_backend": llama_backend},
        "versions": versions(), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "total_seconds": 0.0, "budget_seconds": budget,
        "targets": {stage: dict(target) for stage, target in TARGETS.items()},
        "models": {name: empty_model(name, sizes) for name in args.models},
        "all_ok": False, "no_oom": None, "targets_missed": [], "finished": False,
    }
    with tempfile.TemporaryDirectory(prefix="sp-gpu-check-") as work:
        for name in args.models:
            run_model(name, smoke, device, sizes, Path(work), record, out, start, deadline, llama_backend)
    record["total_seconds"] = time.perf_counter() - start
    stages = [(name, stage, entry) for name, model in record["models"].items()
              for stage, entry in model["stages"].items()]
    record["all_ok"] = all(entry["ok"] for _, _, entry in stages)
    record["no_oom"] = not any(entry["details"].get("out_of_memory") for _, _, entry in stages)
    record["targets_missed"] = [f"{name}/{stage}" for name, stage, entry in stages if entry["target_met"] is False]
    record["finished"] = True
    assert set(record) == set(TOP_FIELDS), sorted(record)
    write_json(out, record)
    print(table(finite_or_none(record)))
    print(f"wrote {out}")
    return 0 if record["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
