"""Capture: hooked forward passes over many inputs, recording chosen activations plus
per-token surprise and entropy.

With ``out_dir`` the run streams shards to disk: memory is bounded by one shard, a crash never
leaves a shard that looks complete, and a rerun resumes.
"""


from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from surprise_probe.core.capture.store import (
    COLUMNS,
    FORMAT_VERSION,
    Capture,
    CaptureShard,
    ShardWriter,
    completed_shards,
    content_hash,
    load_capture,
)
from surprise_probe.core.forward.hooks import EMBEDDING_HOOK, resolve_hooks
from surprise_probe.core.forward.passes import _NUMPY_DTYPES, forward_metrics
from surprise_probe.core.models import distributed
from surprise_probe.core.models.basis import model_fingerprint, weights_sha256
from surprise_probe.core.models.devices import STORAGE_DTYPES, to_numpy
from surprise_probe.core.models.loading import model_id
from surprise_probe.core.text.encoding import Encoded, encode_all, pad_batch, pad_id
from surprise_probe.core.utils.jsonio import read_json, software_versions, write_json
from surprise_probe.core.utils.progress import tqdm

__all__ = ['capture']

def _inputs_hash(encoded: list[Encoded]) -> str:
    digest = hashlib.sha256()
    for item in encoded:
        digest.update(item.token_ids.tobytes())
        digest.update(np.packbits(item.scored).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


# What a capture writes into its folder (the store's files) and what the command adds around it.
CAPTURE_ENTRIES = frozenset({"run.json", "manifest.json", "shards"})
COMMAND_ENTRIES = frozenset({"config.json", ".lock", "capture_summary.json"})


def _claimed_by_capture_command(out_dir: Path) -> bool:
    try:
        record = read_json(out_dir / "config.json")
    except (FileNotFoundError, ValueError):
        return False
    return isinstance(record, dict) and record.get("command") == "capture"


def _prepare_out_dir(out_dir: Path, identity: dict, overwrite: bool) -> bool:
    """Check ``out_dir`` against this run; return True when it already holds the finished run.

    A folder holding files that are not a capture is refused even with ``overwrite`` (nothing the
    user owns is deleted). In a folder the ``capture`` command claimed (its ``config.json``),
    entries the user added beside the capture are left alone, and ``overwrite`` removes only the
    capture's own entries.
    """
    run_json = out_dir / "run.json"
    claimed = _claimed_by_capture_command(out_dir)
    present = [e for e in out_dir.iterdir()] if out_dir.exists() else []
    ours = [e for e in present if e.name in CAPTURE_ENTRIES]
    foreign = [e for e in present if e.name not in CAPTURE_ENTRIES and e.name not in COMMAND_ENTRIES]
    if foreign and not claimed and not run_json.exists():
        raise FileExistsError(
            f"refusing to write into {out_dir}: it is not empty and holds no capture; choose a new or "
            "empty folder (nothing there is deleted, even with overwrite)"
        )
    if ours:
        existing = read_json(run_json) if run_json.exists() else None
        if existing != identity:
            if not overwrite:
                what = ("a capture with no run.json (damaged)" if existing is None else
                        "a different capture (differs in: "
                        + ", ".join(sorted(k for k in identity if existing.get(k) != identity[k])) + ")")
                raise FileExistsError(
                    f"refusing to write into {out_dir}: it holds {what}; choose another folder or pass "
                    "overwrite=True (CLI: --overwrite) to replace it"
                )
            for entry in ours:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    if not run_json.exists():
        write_json(run_json, identity)
    return (out_dir / "manifest.json").exists()


def _check_lengths(items: list, encoded: list[Encoded]) -> None:
    """Refuse, before anything is written, inputs that leave input surprise undefined.

    Input surprise starts at the second token (the first has no context), so a one-token input has
    none, and a capture whose scored tokens are all first tokens has nothing to summarise.
    """
    for index, (item, enc) in enumerate(zip(items, encoded, strict=True)):
        if len(enc.token_ids) < 2:
            raise ValueError(
                f"input {index} ({item!r:.60}) is {len(enc.token_ids)} token long; capture needs at least 2 tokens "
                "per input, since input surprise starts at the second token; lengthen it or leave it out"
            )
    if not any(enc.scored[1:].any() for enc in encoded):
        raise ValueError("no input has a scored token after its first, so there is no input surprise to measure; "
                         "score more of each input (e.g. --score-prompt) or give longer inputs")


@torch.inference_mode()
def _capture_shard(
    model, index: int, encoded: list[Encoded], first_id: int, hooks: list[str], batch_size: int,
    np_dtype, padding_side: str, progress, writer: ShardWriter | None = None,
) -> CaptureShard:
    """One shard's forwards. With a ``writer`` each batch's activations go straight to disk (and
    the returned shard holds only the per-token columns); otherwise they are kept in memory."""
    columns: dict[str, list[np.ndarray]] = {k: [] for k in ("token_ids", "sequence_ids", "positions",
                                                             "input_surprise", "output_entropy", "scored")}
    acts: dict[str, list[np.ndarray]] = {hook: [] for hook in hooks}
    pad = pad_id(model)
    # Batches start at global multiples of batch_size, so (with shard_size a multiple of batch_size)
    # every sequence meets the same batch whatever the shard size: the same bytes, the same hash.
    cuts = [s for s in range(len(encoded)) if s == 0 or (first_id + s) % batch_size == 0] + [len(encoded)]
    for start, stop in zip(cuts[:-1], cuts[1:], strict=True):
        chunk = encoded[start:stop]
        batch = pad_batch(chunk, pad, padding_side)
        surprise, entropy, stored = forward_metrics(model, batch, hooks)
        real = batch.attention_mask.bool()
        positions = (torch.cumsum(batch.attention_mask, dim=1) - 1)[real]
        seq_ids = (torch.arange(len(chunk)) + first_id + start).unsqueeze(1).expand_as(real)[real]
        columns["token_ids"].append(batch.tokens[real].numpy())
        columns["sequence_ids"].append(seq_ids.numpy())
        columns["positions"].append(positions.numpy())
        columns["input_surprise"].append(surprise[real].float().cpu().numpy())
        columns["output_entropy"].append(entropy[real].float().cpu().numpy())
        columns["scored"].append(batch.scored[real].numpy())
        every = bool(real.all())
        for hook in hooks:
            # Without padding every row is real: a view, no copy. Convert to the storage dtype on
            # the model's device, then one copy to the CPU (none for float32 on the CPU).
            value = stored[hook]
            value = value.reshape(-1, value.shape[-1]) if every else value[real.to(value.device)]
            rows = to_numpy(value, np_dtype)
            if writer is not None:
                writer.add(hook, rows)
            else:
                acts[hook].append(rows)
        del stored, surprise, entropy
        if progress is not None:
            progress.update(len(chunk))
    return CaptureShard(
        index=index,
        hooks=tuple(hooks),
        _activations={} if writer is not None else {hook: np.concatenate(parts) for hook, parts in acts.items()},
        **{name: np.concatenate(parts) for name, parts in columns.items()},
    )


def capture(
    model,
    items: Iterable,
    *,
    hooks: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    out_dir: str | Path | None = None,
    batch_size: int = 8,
    storage_dtype: str | torch.dtype = torch.float32,
    dtype: str | torch.dtype | None = None,
    padding_side: str = "right",
    max_tokens: int | None = None,
    truncate: bool = False,
    score_prompt: bool = False,
    shard_size: int = 64,
    overwrite: bool = False,
    progress: bool = True,
) -> Capture:
    """Run ``items`` through ``model`` and record activations, input surprise and output entropy.

    Items are texts, conversations or ``{"token_ids": ...}`` dicts (see ``surprise_probe.core.text.encoding``).
    Everything is tokenized and validated before the first forward pass, so bad input fails fast.
    Without ``out_dir`` the result is in memory; with it, shards stream to disk and a rerun of
    the same call resumes where an interrupted one stopped. ``storage_dtype`` (``"float32"`` or
    ``"float16"``) is how activations are stored, independent of the model's dtype (``dtype=`` is
    its earlier name); surprise and entropy are always float32.

    Hooks: by default the embedding (``blocks.0.hook_resid_pre``) and every layer's
    ``hook_resid_post``. ``layers=[5, 10]`` captures those layers' ``hook_resid_post`` *and* the
    embedding, so the embedding-layer probe (the token-identity control of ``fit``) is always
    there; ``hooks=[...]`` captures exactly the hooks named.

    >>> from surprise_probe.testing import tiny_model
    >>> run = capture(tiny_model(), ["One text.", "Another text."], progress=False)
    >>> run.n_sequences, run.hooks[-1]
    (2, 'blocks.1.hook_resid_post')
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    if dtype is not None:  # the earlier name of storage_dtype
        storage_dtype = dtype
    if isinstance(storage_dtype, str):
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {list(STORAGE_DTYPES)}, got {storage_dtype!r}")
        storage_dtype = STORAGE_DTYPES[storage_dtype]
    if storage_dtype not in _NUMPY_DTYPES:
        raise ValueError(f"storage_dtype must be one of {list(_NUMPY_DTYPES)}, got {storage_dtype}")
    dtype = storage_dtype
    hooks = resolve_hooks(model, hooks, layers)
    if layers is not None and EMBEDDING_HOOK not in hooks:  # cheap, and fit's token-identity control
        hooks = [EMBEDDING_HOOK, *hooks]
    items = list(items)
    encoded = encode_all(model, items, max_tokens=max_tokens, truncate=truncate, score_prompt=score_prompt)
    if not encoded:
        raise ValueError("capture got no inputs")
    _check_lengths(items, encoded)
    world = distributed.world_size()
    if -(-len(encoded) // shard_size) < world:
        # Fewer shards than ranks: smaller shards, so the work is split (ranks beyond the inputs wait).
        shard_size = max(1, -(-len(encoded) // world))
    identity = {
        "format_version": FORMAT_VERSION,
        "model_id": model_id(model),
        # Same name, other weights (a re-downloaded or fine-tuned checkpoint) must not resume.
        "weights_sha256": weights_sha256(model),
        "hooks": hooks,
        "dtype": str(dtype).replace("torch.", ""),
        "inputs_hash": _inputs_hash(encoded),
        "n_sequences": len(encoded),
        "shard_size": shard_size,
        "batch_size": batch_size,
        "padding_side": padding_side,
        "score_prompt": score_prompt,
    }
    # Under torchrun every rank checks it was given the same run, then takes shards i with
    # i % world_size == rank; shard contents depend only on i, so the store equals one process's.
    distributed.check_same(identity, "capture input")
    np_dtype = _NUMPY_DTYPES[dtype]
    n_shards = (len(encoded) + shard_size - 1) // shard_size
    mine = distributed.split(n_shards, "shards", allow_idle=True)
    started = time.perf_counter()

    out_path = Path(out_dir) if out_dir is not None else None
    done: dict[int, dict] = {}
    if out_path is not None:
        if distributed.main_first(lambda: _prepare_out_dir(out_path, identity, overwrite)):

            return load_capture(out_path)
        done = completed_shards(out_path)

    bar = None
    if progress and distributed.is_main():
        sizes = {i: min(shard_size, len(encoded) - i * shard_size) for i in mine}
        resumed = sum(sizes[i] for i in mine if i in done)
        where = f" (rank 0 of {distributed.world_size()})" if distributed.is_distributed() else ""
        bar = tqdm(total=sum(sizes.values()), initial=resumed, desc=f"capture{where}", unit="seq")
    in_memory: list[CaptureShard] = []
    entries: list[dict] = []
    try:
        for index in mine:
            if index in done:
                entries.append(done[index])
                continue
            lo = index * shard_size
            part = encoded[lo : lo + shard_size]
            if out_path is None:
                in_memory.append(_capture_shard(model, index, part, lo, hooks, batch_size, np_dtype, padding_side, bar))
                continue
            # Stream each batch's activations into the shard's files (memory: one batch, not a shard).
            lengths = [len(item.token_ids) for item in part]
            with ShardWriter(out_path, index, hooks, sum(lengths), int(model.cfg.d_model), np_dtype,
                             sequence_lengths=lengths) as writer:
                shard = _capture_shard(
                    model, index, part, lo, hooks, batch_size, np_dtype, padding_side, bar, writer=writer
                )
                entries.append(writer.finish({name: shard.column(name) for name in COLUMNS}))
    finally:
        if bar is not None:
            bar.close()
    if distributed.is_distributed():
        if out_path is None:
            in_memory = sorted((s for part in distributed.all_gather(in_memory) for s in part), key=lambda s: s.index)
        else:
            entries = sorted((e for part in distributed.all_gather(entries) for e in part), key=lambda e: e["index"])

    # The per-sequence digests stay in each shard's shard.json (the manifest keeps their hash).
    shards_meta = [{k: v for k, v in e.items() if k != "sequence_digests"} for e in entries] if out_path is not None else [
        {"index": s.index, "n_tokens": len(s), "n_sequences": s.n_sequences, "n_scored": int(s.scored.sum())}
        for s in in_memory
    ]
    manifest = {
        **identity,
        "d_model": int(model.cfg.d_model),
        "model_fingerprint": model_fingerprint(model),
        "model_dtype": str(getattr(model.cfg, "dtype", "")).replace("torch.", ""),
        "n_layers": int(model.cfg.n_layers),
        "n_ctx": int(model.cfg.n_ctx),
        "n_tokens": int(sum(e["n_tokens"] for e in shards_meta)),
        "n_scored_tokens": int(sum(e["n_scored"] for e in shards_meta)),
        "n_truncated": sum(e.truncated_from is not None for e in encoded),
        "activation_shape": ["n_tokens", int(model.cfg.d_model)],
        "versions": software_versions(),
        "elapsed_seconds_this_session": round(time.perf_counter() - started, 3),
        "shards": shards_meta,
    }
    if out_path is None:
        return Capture(manifest, shards=in_memory)
    manifest["content_hash"] = content_hash(entries)
    if distributed.is_main():
        write_json(out_path / "manifest.json", manifest)
    distributed.barrier()  # no rank returns before the manifest exists
    return Capture(manifest, path=out_path)
