"""Targets that ask whose surprise the residual stream tracks, on the tokens of a capture.

- **local surprise** (:func:`local_surprise`, spec ``local:W``): the captured model's own
  ``-log p(x_t | x_{t-W} .. x_{t-1})``, reading only the last ``W`` tokens (token ids from the
  capture, so no tokenizer is involved; for ``t <= W`` the window is the whole prefix and this
  equals the full-context surprise). The windows run as batches of ``W`` tokens, and only the last
  window position is unembedded.
- **another model's surprise** (:func:`other_model_surprise`, spec ``model:NAME``): the capture's
  token ids are decoded to text (chat-template markup included, read by the other model as plain
  text; a leading BOS of the captured model is left out, the reader adds its own), the other model reads that text with its own tokenizer, and its per-token surprise is
  carried onto the captured tokens by character offsets (``surprise_probe.core.text.alignment``; captured
  tokens without a character span, e.g. the first bytes of a split emoji, get no value).

Both return a :class:`~surprise_probe.probes.targets.TokenTarget` over the capture's scored tokens
at position > 0 (the tokens of the ``surprise`` target), usable as ``fit_sweep(run, target)`` or as
a covariate (``fit_sweep(run, "surprise", covariates={"local-4": target})``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float, Int
from surprise_probe.probes.targets import TokenTarget, load_target_file
from torch import Tensor

from surprise_probe.core.forward.metrics import surprise_and_entropy
from surprise_probe.core.models.backends import is_hooked_transformer
from surprise_probe.core.models.loading import load_model as load_named_model
from surprise_probe.core.models.loading import model_id
from surprise_probe.core.text.alignment import align_values, token_char_spans
from surprise_probe.core.utils.progress import tqdm

__all__ = [
    "TargetSpec",
    "parse_target_spec",
    "capture_sequences",
    "local_surprise",
    "other_model_surprise",
    "computed_target",
    "resolve_target",
]


@dataclass(frozen=True)
class TargetSpec:
    """A computed target: ``kind`` ``"local"`` (``window`` tokens) or ``"model"`` (``model`` name)."""

    kind: str
    window: int | None = None
    model: str | None = None

    @property
    def name(self) -> str:
        """File-name safe: ``local-4``, ``model-gemma-3-270m``."""
        if self.kind == "local":
            return f"local-{self.window}"
        return "model-" + re.sub(r"[^A-Za-z0-9._-]+", "_", str(self.model))


def parse_target_spec(spec: str) -> TargetSpec | None:
    """``"local:4"`` / ``"model:gemma-3-270m"`` -> :class:`TargetSpec`; anything else -> None.

    >>> parse_target_spec("local:16"), parse_target_spec("surprise")
    (TargetSpec(kind='local', window=16, model=None), None)
    """
    if not isinstance(spec, str):
        return None
    if spec.startswith("local:"):
        value = spec.split(":", 1)[1]
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"target {spec!r}: the window of local:W must be an integer >= 1, got {value!r}")
        return TargetSpec("local", window=int(value))
    if spec.startswith("model:"):
        name = spec.split(":", 1)[1]
        if not name:
            raise ValueError(f"target {spec!r}: expected model:NAME (e.g. model:gemma-3-270m)")
        return TargetSpec("model", model=name)
    return None


def capture_sequences(run) -> dict[int, tuple[Int[np.ndarray, " n"], np.ndarray]]:
    """Per sequence id: its token ids in position order and its selection mask (scored, position > 0)."""
    out = {}
    for shard in run.shards():
        seq = np.asarray(shard.sequence_ids)
        pos = np.asarray(shard.positions)
        ids = np.asarray(shard.token_ids)
        selected = np.asarray(shard.scored, bool) & (pos > 0)
        for sequence in np.unique(seq):
            rows = np.flatnonzero(seq == sequence)
            rows = rows[np.argsort(pos[rows])]
            if not np.array_equal(pos[rows], np.arange(len(rows))):
                raise ValueError(f"sequence {sequence} of the capture does not hold positions 0..{len(rows) - 1}")
            out[int(sequence)] = (ids[rows], selected[rows])
    return out


@torch.inference_mode()
def _last_log_prob(model, windows: Int[Tensor, "batch w"], last: Int[Tensor, " batch"], next_ids) -> Tensor:
    """``log p(next | window[:last + 1])`` per row; right padding is never attended to (causal)."""
    rows = torch.arange(len(windows))
    if is_hooked_transformer(model):
        # unembed only the position that is scored
        resid = model(windows, stop_at_layer=model.cfg.n_layers)
        logits = model.unembed(model.ln_final(resid[rows, last][:, None, :]))[:, 0]
    else:
        logits = model(windows, return_type="logits")[rows, last]
    log_probs = torch.log_softmax(logits.to(torch.float64 if logits.shape[-1] > 131_072 else torch.float32), -1)
    return log_probs[rows, next_ids]


def local_surprise(
    model, run, window: int, *, batch_size: int = 64, progress: bool = True
) -> TokenTarget:
    """The model's surprise at each selected token given only the previous ``window`` tokens.

    >>> import surprise_probe as sp
    >>> from surprise_probe.testing import tiny_model
    >>> model = tiny_model()
    >>> run = sp.capture(model, ["The quick brown fox jumps."], progress=False)
    >>> whole = local_surprise(model, run, window=64, progress=False)   # window >= length: full context
    >>> bool(np.allclose(whole.values, run.column("input_surprise", scored_only=True)[1:], atol=1e-4))
    True
    """
    if int(window) < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    window = int(window)
    sequences = capture_sequences(run)
    contexts, lasts, nexts, keys = [], [], [], []
    width = min(window, max(int(ids.size) - 1 for ids, _ in sequences.values()))
    for sequence, (ids, selected) in sequences.items():
        for t in np.flatnonzero(selected):
            context = ids[max(0, t - window) : t]
            padded = np.zeros(width, np.int64)
            padded[: len(context)] = context
            contexts.append(padded)
            lasts.append(len(context) - 1)
            nexts.append(ids[t])
            keys.append((sequence, t))
    if not keys:
        raise ValueError("the capture has no scored tokens at position > 0; nothing to compute")
    contexts = torch.as_tensor(np.stack(contexts))
    lasts, nexts = torch.as_tensor(lasts), torch.as_tensor(np.asarray(nexts))
    device = getattr(model.cfg, "device", None) or "cpu"
    values = np.empty(len(keys))
    for start in tqdm(
        range(0, len(keys), batch_size), desc=f"local surprise (window {window})", unit="batch", disable=not progress
    ):
        stop = start + batch_size
        log_p = _last_log_prob(
            model, contexts[start:stop].to(device), lasts[start:stop].to(device), nexts[start:stop].to(device)
        )
        values[start:stop] = -log_p.cpu().numpy()
    keys = np.asarray(keys, np.int64)
    return TokenTarget(f"local-{window}", keys[:, 0], keys[:, 1], values)


@torch.inference_mode()
def _reader_surprise(reader, text: str) -> tuple[Int[np.ndarray, "m 2"], Float[np.ndarray, " m"]]:
    """The reader's character offsets and input surprise for ``text`` read as plain text."""
    tokenizer = reader.tokenizer
    encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    bos = tokenizer.bos_token_id
    if getattr(reader.cfg, "default_prepend_bos", False) and bos is not None and (not ids or ids[0] != bos):
        ids, offsets = [bos, *ids], [(0, 0), *offsets]  # as surprise_probe.core.text.encoding reads a text
    limit = int(reader.cfg.n_ctx)
    if len(ids) > limit:
        raise ValueError(f"a text of {len(ids)} {model_id(reader)} tokens exceeds its context of {limit}")
    device = getattr(reader.cfg, "device", None) or "cpu"
    tokens = torch.as_tensor([ids], device=device)
    logits = reader(tokens, return_type="logits")
    surprise, _ = surprise_and_entropy(logits, tokens)
    return np.asarray(offsets, np.int64).reshape(-1, 2), surprise[0].double().cpu().numpy()


def other_model_surprise(run, tokenizer, reader, *, progress: bool = True) -> TokenTarget:
    """``reader``'s surprise on the capture's text, aligned to the captured tokens by characters.

    ``tokenizer``: the captured model's tokenizer (decodes the captured ids); ``reader``: a
    TransformerLens model with a fast tokenizer (character offsets). Selected tokens (scored,
    position > 0) without an aligned value are left out of the table.
    """
    if not getattr(reader.tokenizer, "is_fast", False):
        raise ValueError(f"{model_id(reader)} has no fast tokenizer; character offsets need one")
    seqs, positions, values = [], [], []
    sequences = capture_sequences(run)
    for sequence, (ids, selected) in tqdm(
        sequences.items(), desc=f"surprise of {model_id(reader)}", unit="seq", disable=not progress
    ):
        # a leading BOS is the captured model's, not part of the text (the reader adds its own)
        skip = int(len(ids) > 0 and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)
        text, spans = token_char_spans(tokenizer, ids[skip:])
        spans = np.concatenate([np.zeros((skip, 2), np.int64), spans])
        offsets, surprise = _reader_surprise(reader, text)
        aligned = align_values(spans, offsets, surprise)
        keep = selected & np.isfinite(aligned)
        seqs.append(np.full(int(keep.sum()), sequence))
        positions.append(np.flatnonzero(keep))
        values.append(aligned[keep])
    return TokenTarget(
        f"model-{model_id(reader)}",
        np.concatenate(seqs).astype(np.int64),
        np.concatenate(positions).astype(np.int64),
        np.concatenate(values),
    )


def computed_target(
    run, spec: TargetSpec | str, *, load_model: Callable | None = None, progress: bool = True
) -> tuple[TokenTarget, dict]:
    """Compute a ``local:W`` / ``model:NAME`` target on ``run``; returns it and a description.

    ``load_model(name)`` loads models by name (default ``surprise_probe.load_model``); the
    captured model is loaded by the capture's ``model_id``.

    >>> import surprise_probe as sp
    >>> from surprise_probe.testing import TINY_CORPUS, tiny_model
    >>> model = tiny_model()
    >>> run = sp.capture(model, TINY_CORPUS[:2], progress=False)
    >>> target, info = computed_target(run, "local:2", load_model=lambda name: model, progress=False)
    >>> target.name, len(target.values) == info["n_selected_tokens"], info["rule"]
    ('local-2', True, '-log p(x_t | previous 2 tokens), same model, capture token ids')
    """
    if isinstance(spec, str):
        parsed = parse_target_spec(spec)
        if parsed is None:
            raise ValueError(f"target {spec!r} is not local:W or model:NAME")
        spec = parsed
    if load_model is None:
        load_model = load_named_model
    own = load_model(run.model_id)
    n_selected = sum(int(selected.sum()) for _, selected in capture_sequences(run).values())
    if spec.kind == "local":
        target = local_surprise(own, run, spec.window, progress=progress)
        rule = f"-log p(x_t | previous {spec.window} tokens), same model, capture token ids"
    else:
        reader = load_model(spec.model)
        target = other_model_surprise(run, own.tokenizer, reader, progress=progress)
        rule = (
            f"{model_id(reader)} reads decode(captured ids) as plain text; its token surprises are "
            "shared among captured tokens in proportion to overlapping characters (surprise_probe.core.text.alignment)"
        )
    target = TokenTarget(spec.name, target.sequence_ids, target.positions, target.values)
    info = {
        "target": spec.name,
        "kind": spec.kind,
        "window": spec.window,
        "model": spec.model,
        "captured_model": run.model_id,
        "rule": rule,
        "n_selected_tokens": n_selected,
        "n_tokens_with_value": len(target.values),
    }
    return target, info


def resolve_target(
    run, spec, folder: str | Path | None = None, *, load_model: Callable | None = None, progress: bool = True
):
    """``spec`` as ``fit_sweep`` takes it: ``local:W`` / ``model:NAME`` computed, anything else as is.

    With ``folder``, a computed target is saved as ``folder/targets/<name>.npz`` (+ ``.json``) and
    read back instead of recomputed when that file was computed on the same capture (content hash).
    """
    parsed = parse_target_spec(spec) if isinstance(spec, str) else None
    if parsed is None:
        return spec
    capture_hash = (getattr(run, "manifest", None) or {}).get("content_hash")
    stem = None if folder is None else Path(folder) / "targets" / parsed.name
    if stem is not None and capture_hash is not None:
        npz, meta = stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".json")
        if npz.exists() and meta.exists() and json.loads(meta.read_text()).get("capture_content_hash") == capture_hash:
            return load_target_file(npz)
    target, info = computed_target(run, parsed, load_model=load_model, progress=progress)
    if stem is not None:
        target.save(stem, {**info, "capture_content_hash": capture_hash})
    return target
