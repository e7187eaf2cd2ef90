"""The forward pass: hooked forwards, the final residual and its unembedding, per-token metrics.

Only the requested hook points get a hook (no full activation cache), and only scored
positions are unembedded where a caller needs the metrics alone.
"""


from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from surprise_probe.core.forward.metrics import (
    chunk_positions,
    chunked_surprise_and_entropy,
    cross_entropy,
    next_token_statistics,
    output_entropy,
    surprise_and_entropy,
)
from surprise_probe.core.models.backends import is_hooked_transformer
from surprise_probe.core.models.devices import model_device
from surprise_probe.core.text.encoding import Batch, encode, pad_batch, pad_id
from surprise_probe.core.utils.notebook import NotebookView, TextTable, number_text

__all__ = ['forward', 'forward_metrics', 'final_residual', 'unembed', 'token_metrics', 'TokenMetrics',
           'ScoredMetrics', 'scored_metrics', 'output_entropy_at',
           'logits_only_at']

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}


def _keepers(hooks: Sequence[str], stored: dict[str, Tensor]) -> list[tuple[str, object]]:
    def keeper(name: str):
        def hook_fn(activation, hook):  # noqa: ARG001 - TransformerLens hook signature
            # A reference only: no copy, no device sync; the caller copies what it records.
            stored[name] = activation.detach()

        return hook_fn

    return [(name, keeper(name)) for name in hooks]


def forward(
    model, batch: Batch, hooks: Sequence[str] = ()
) -> tuple[Float[Tensor, "batch pos vocab"], dict[str, Float[Tensor, "batch pos d_model"]]]:
    """One forward pass returning logits and the activations at ``hooks`` (and nothing else).

    Materialises the full (batch x pos x vocab) logits; :func:`forward_metrics` does not.
    """
    stored: dict[str, Tensor] = {}
    device = model_device(model)
    logits = model.run_with_hooks(
        batch.tokens.to(device),
        fwd_hooks=_keepers(hooks, stored),
        return_type="logits",
        attention_mask=batch.attention_mask.to(device),
    )
    return logits, stored


def final_residual(model, batch: Batch, hooks: Sequence[str] = ()):
    """The residual stream after the last block (before the final norm) and the ``hooks``'
    activations, or ``None`` when the model cannot stop there (a TransformerBridge, or a hook
    at or after the final norm was asked for)."""
    if not is_hooked_transformer(model) or any(h.startswith(("ln_final", "unembed")) for h in hooks):
        return None
    stored: dict[str, Tensor] = {}
    device = model_device(model)
    residual = model.run_with_hooks(
        batch.tokens.to(device),
        fwd_hooks=_keepers(hooks, stored),
        attention_mask=batch.attention_mask.to(device),
        stop_at_layer=int(model.cfg.n_layers),
    )
    return residual, stored


def unembed(model, residual: Float[Tensor, "... pos d_model"]) -> Float[Tensor, "... pos vocab"]:
    """Final norm + unembedding (+ logit softcap) of a HookedTransformer's final residual, at
    just the positions given: the same numbers as the full forward's logits there."""
    from transformer_lens.utilities import apply_softcap

    if model.cfg.normalization_type is not None:
        residual = model.ln_final(residual)
    # ``model.unembed`` copies the (d_model x vocab) unembedding transposed on every call (113 MB
    # for SmolLM2, more time than the metrics); the matmul reads it in place. Same numbers in
    # float32 to rounding (the accumulation order can differ in the last bit).
    logits = residual @ model.W_U.to(residual.dtype)
    if bool(model.b_U.any()):
        logits = logits + model.b_U
    return apply_softcap(logits, model.cfg.output_logits_soft_cap)


def forward_metrics(
    model, batch: Batch, hooks: Sequence[str] = ()
) -> tuple[Float[Tensor, "batch pos"], Float[Tensor, "batch pos"], dict[str, Float[Tensor, "batch pos d_model"]]]:
    """Input surprise, output entropy and the ``hooks``' activations from one forward pass.

    On a HookedTransformer the final residual is unembedded a chunk of positions at a time, so
    the full (batch x pos x vocab) logits never exist; metrics are float32 (float64 above a
    131k vocabulary) whatever the model's dtype.
    """
    attention_mask = batch.attention_mask
    out = final_residual(model, batch, hooks)
    if out is None:
        logits, stored = forward(model, batch, hooks)
        surprise, entropy = surprise_and_entropy(logits, batch.tokens, attention_mask)
        return surprise, entropy, stored
    residual, stored = out
    surprise, entropy = chunked_surprise_and_entropy(
        lambda start, stop: unembed(model, residual[:, start:stop]),
        batch.tokens, int(model.cfg.d_vocab_out), attention_mask,
    )
    return surprise, entropy, stored


@contextlib.contextmanager
def logits_only_at(model, columns: Sequence[int] | Tensor) -> Iterator[dict]:
    """Inside this block, a forward of ``model`` unembeds only the positions ``columns`` (the same
    for every row): its logits are ``(batch, len(columns), vocab)``, column ``i`` the logits at
    position ``columns[i]``. Yields the keyword arguments the forward takes (a TransformerBridge:
    ``logits_to_keep``; a HookedTransformer: none, the unembedding's input is cut to those
    positions, after every norm and hook has run). Hooks and edits on the model still apply.

    >>> from surprise_probe.testing import tiny_model
    >>> model = tiny_model()
    >>> tokens = model.to_tokens("A short text for the example.")
    >>> with logits_only_at(model, [2, 4]) as kwargs:
    ...     part = model(tokens, **kwargs)
    >>> part.shape[1], bool(torch.allclose(part, model(tokens)[:, [2, 4]], atol=1e-5))
    (2, True)
    """
    columns = torch.as_tensor(columns, dtype=torch.long)
    if not is_hooked_transformer(model):
        yield {"logits_to_keep": columns.to(model_device(model))}
        return

    def keep(module, args):  # noqa: ARG001 - PyTorch forward pre-hook signature
        return (args[0][:, columns.to(args[0].device)], *args[1:])

    handle = model.unembed.register_forward_pre_hook(keep)
    try:
        yield {}
    finally:
        handle.remove()


@torch.no_grad()
def output_entropy_at(model, batch: Batch, columns: Sequence[int]) -> Float[Tensor, "batch n_columns"]:
    """Output entropy of every row of ``batch`` at the positions ``columns`` only: a HookedTransformer
    unembeds its final residual there, a TransformerBridge is asked for just those columns' logits
    (``logits_to_keep``); a bounded number of positions' logits exist at a time. The hooks and
    edits active on the model apply (patching calls it inside ``apply_all``).

    >>> from surprise_probe.testing import tiny_model
    >>> model = tiny_model()
    >>> batch = pad_batch([encode(model, "One short text here.")], pad_id(model))
    >>> output_entropy_at(model, batch, [1, 3]).shape
    torch.Size([1, 2])
    """
    columns = torch.as_tensor(list(columns), dtype=torch.long)
    out = final_residual(model, batch)
    if out is not None:
        residual = out[0][:, columns.to(out[0].device)]
        logits_at = lambda a, b: unembed(model, residual[:, a:b])  # noqa: E731 - one line, used once
    else:  # a TransformerBridge: only those columns' logits
        device = model_device(model)
        with logits_only_at(model, columns) as keep:
            logits = model(batch.tokens.to(device), attention_mask=batch.attention_mask.to(device),
                           return_type="logits", **keep)
        logits_at = lambda a, b: logits[:, a:b]  # noqa: E731
    step = chunk_positions(int(batch.tokens.shape[0]), int(model.cfg.d_vocab_out))
    return torch.cat([output_entropy(logits_at(a, a + step)) for a in range(0, len(columns), step)], dim=1)


@dataclass(frozen=True)
class ScoredMetrics:
    """Per-token metrics of a batch at its scored positions (NaN everywhere else), from one forward.

    For a scored position ``t`` (``p_t``: the distribution over the token after ``t``):

    - ``output_entropy[b, t] = H_t``, as :func:`forward_metrics` gives it;
    - ``log_likelihood[b, t] = log p_{t-1}(x_t)`` (minus the input surprise);
    - ``log_rank[b, t]``: log of ``x_t``'s rank under ``p_{t-1}`` (1 = the top token);
    - ``expected_log_likelihood[b, t] = sum_v p_{t-1}(v) log p_{t-1}(v)`` and
      ``log_likelihood_variance[b, t]``: the mean and variance of ``log p_{t-1}(X)`` for ``X ~ p_{t-1}``
      (Fast-DetectGPT's analytic reference, the reader being the sampling and the scoring model);
    - ``cross_entropy[b, t] = -sum_v q_{t-1}(v) log p_{t-1}(v)`` with ``q`` an observer model's
      distribution on the same ids (Binoculars), or ``None`` without an observer.

    The quantities at ``t`` that look back at ``p_{t-1}`` are NaN where ``t - 1`` is padding or
    ``t = 0``. ``n_unembedded`` counts the positions whose logits were computed: the scored ones
    and the ones just before them.
    """

    output_entropy: Float[Tensor, "batch pos"]
    log_likelihood: Float[Tensor, "batch pos"]
    log_rank: Float[Tensor, "batch pos"]
    expected_log_likelihood: Float[Tensor, "batch pos"]
    log_likelihood_variance: Float[Tensor, "batch pos"]
    cross_entropy: Float[Tensor, "batch pos"] | None
    n_unembedded: int


def _logits_at_positions(model, batch: Batch, hooks: Sequence[str], rows: Tensor, cols: Tensor):
    """``(logits_at, stored)``: ``logits_at(a, b)`` -> the logits at positions ``(rows[a:b], cols[a:b])``.

    A HookedTransformer unembeds its final residual at just those positions; otherwise (a
    TransformerBridge, or a hook at or after the final norm) only the columns any row needs are
    unembedded (:func:`logits_only_at`).
    """
    out = final_residual(model, batch, hooks)
    if out is not None:
        residual, stored = out
        gathered = residual[rows.to(residual.device), cols.to(residual.device)]
        return (lambda a, b: unembed(model, gathered[a:b])), stored
    stored: dict[str, Tensor] = {}
    device = model_device(model)
    columns, within = torch.unique(cols, return_inverse=True)
    with logits_only_at(model, columns) as keep:
        logits = model.run_with_hooks(
            batch.tokens.to(device), fwd_hooks=_keepers(hooks, stored), return_type="logits",
            attention_mask=batch.attention_mask.to(device), **keep,
        )
    rows, within = rows.to(logits.device), within.to(logits.device)
    return (lambda a, b: logits[rows[a:b], within[a:b]]), stored


@torch.no_grad()
def scored_metrics(
    model, batch: Batch, hooks: Sequence[str] = (), observer=None
) -> tuple[ScoredMetrics, dict[str, Float[Tensor, "batch pos d_model"]]]:
    """:class:`ScoredMetrics` at ``batch.scored`` and the ``hooks``' activations, from one forward.

    Only the scored positions and the positions that predict them are unembedded (never the full
    batch x pos x vocab logits); the metrics are float32 (float64 above a 131k vocabulary).
    ``observer`` (a model with the same vocabulary) reads the same ids in a forward of its own and
    adds the Binoculars cross term. No gradients (a detector pass, not an attribution).
    """
    scored = batch.scored.bool()
    real = batch.attention_mask.bool()
    predicts = torch.zeros_like(scored)
    predicts[:, :-1] = scored[:, 1:] & real[:, :-1]
    rows, cols = (scored | predicts).nonzero(as_tuple=True)
    if observer is not None and int(observer.cfg.d_vocab_out) != int(model.cfg.d_vocab_out):
        raise ValueError(f"the observer's vocabulary ({int(observer.cfg.d_vocab_out)}) is not the reader's "
                         f"({int(model.cfg.d_vocab_out)}); Binoculars needs one tokenizer")
    # Nothing scored: the forward still runs for the hooks (unembedding one position).
    asked = (rows, cols) if len(rows) else (torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    logits_at, stored = _logits_at_positions(model, batch, hooks, *asked)
    observer_logits_at = _logits_at_positions(observer, batch, (), *asked)[0] if observer is not None else None
    width = batch.tokens.shape[1]
    targets = batch.tokens[rows, (cols + 1).clamp(max=width - 1)]
    step = chunk_positions(1, int(model.cfg.d_vocab_out))
    grids: dict[str, Tensor] = {}
    for start in range(0, len(rows), step):
        stop = min(len(rows), start + step)
        logits = logits_at(start, stop)
        stats = next_token_statistics(logits, targets[start:stop])
        here = (rows[start:stop], cols[start:stop])
        chunk = {"output_entropy": (stats.entropy, scored[here], 0)}
        for name in ("log_likelihood", "log_rank", "expected_log_likelihood", "log_likelihood_variance"):
            chunk[name] = (getattr(stats, name), predicts[here], 1)
        if observer_logits_at is not None:
            chunk["cross_entropy"] = (cross_entropy(observer_logits_at(start, stop), logits), predicts[here], 1)
        for name, (values, where, shift) in chunk.items():
            _place(grids, name, batch.tokens.shape, values, *here, where, shift)
        del logits
    empty = torch.full(batch.tokens.shape, float("nan"))
    names = ["output_entropy", "log_likelihood", "log_rank", "expected_log_likelihood", "log_likelihood_variance"]
    metrics = ScoredMetrics(
        *(grids.get(name, empty) for name in names),
        cross_entropy=None if observer is None else grids.get("cross_entropy", empty),
        n_unembedded=len(rows),
    )
    return metrics, stored


def _place(grids: dict[str, Tensor], name: str, shape, values: Tensor, rows: Tensor, cols: Tensor,
           where: Tensor, shift: int) -> None:
    """Write ``values[where]`` at ``(rows, cols + shift)`` of the NaN-filled grid ``grids[name]``."""
    if name not in grids:
        grids[name] = torch.full(shape, float("nan"), dtype=values.dtype, device=values.device)
    where = where.to(values.device)
    grids[name][rows.to(values.device)[where], cols.to(values.device)[where] + shift] = values[where]


@dataclass(frozen=True, repr=False)
class TokenMetrics(NotebookView):
    """Per-position metrics of one text or conversation (``input_surprise[0]`` is NaN).

    ``table()`` is one line per position (``print`` it; a notebook shows it as a table).
    """

    tokens: list[str]
    token_ids: np.ndarray
    input_surprise: np.ndarray
    output_entropy: np.ndarray
    scored: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    def table(self) -> str:
        rows = [f"{'pos':>4} {'token':<16} {'surprise':>9} {'entropy':>8} scored"]
        cells = []
        for i, (token, s, h, m) in enumerate(
            zip(self.tokens, self.input_surprise, self.output_entropy, self.scored, strict=False)
        ):
            rows.append(f"{i:>4} {token!r:<16.16} {s:>9.3f} {h:>8.3f} {'*' if m else ''}")
            cells.append([i, repr(token), f"{s:.3f}", f"{h:.3f}", "*" if m else ""])
        return TextTable("\n".join(rows), ["pos", "token", "surprise", "entropy", "scored"], cells)

    def _view(self) -> tuple[str, list[tuple[str, str]]]:
        scored = np.asarray(self.scored, bool)
        surprise = self.input_surprise[scored & np.isfinite(self.input_surprise)]
        entropy = self.output_entropy[scored]
        mean_s = number_text(surprise.mean() if surprise.size else None)
        mean_h = number_text(entropy.mean() if entropy.size else None)
        n = len(self.token_ids)
        rows = [("tokens", f"{n} ({int(scored.sum())} scored)"),
                ("mean input surprise (scored)", f"{mean_s} nats"),
                ("mean output entropy (scored)", f"{mean_h} nats")]
        if surprise.size:
            top = int(np.flatnonzero(scored & np.isfinite(self.input_surprise))[surprise.argmax()])
            token = self.tokens[top] if top < len(self.tokens) else int(self.token_ids[top])
            rows.append(("most surprising token", f"{token!r} at {top}: {number_text(surprise.max())} nats"))
        rows.append(("sample", "one sequence, no CI; .table() lists every position"))
        headline = f"{n} tokens, {int(scored.sum())} scored, mean surprise {mean_s}, entropy {mean_h} nats"
        return headline, rows


@torch.inference_mode()
def token_metrics(model, item, *, truncate: bool = False, score_prompt: bool = False) -> TokenMetrics:
    """Teacher-forced input surprise and output entropy for one text or conversation.

    >>> from surprise_probe.testing import tiny_model
    >>> m = token_metrics(tiny_model(), "The quick brown fox.")
    >>> bool(np.isnan(m.input_surprise[0])), len(m.tokens) == len(m.output_entropy)
    (True, True)
    """
    encoded = encode(model, item, truncate=truncate, score_prompt=score_prompt)
    batch = pad_batch([encoded], pad_id(model))
    surprise, entropy, _ = forward_metrics(model, batch)
    tokens = [model.tokenizer.decode([int(t)]) for t in encoded.token_ids] if model.tokenizer else []
    return TokenMetrics(
        tokens=tokens,
        token_ids=encoded.token_ids,
        input_surprise=surprise[0].float().cpu().numpy(),
        output_entropy=entropy[0].float().cpu().numpy(),
        scored=encoded.scored,
    )


