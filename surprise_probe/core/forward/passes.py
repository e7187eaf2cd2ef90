"""The forward pass: hooked forwards, the final residual and its unembedding, per-token metrics.

Only the requested hook points get a hook (no full activation cache), and only scored
positions are unembedded where a caller needs the metrics alone.
"""


from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from surprise_probe.core.forward.metrics import chunked_surprise_and_entropy, surprise_and_entropy
from surprise_probe.core.models.backends import is_hooked_transformer
from surprise_probe.core.models.devices import model_device
from surprise_probe.core.text.encoding import Batch, encode, pad_batch, pad_id
from surprise_probe.core.utils.notebook import NotebookView, TextTable, number_text

__all__ = ['forward', 'forward_metrics', 'final_residual', 'unembed', 'token_metrics', 'TokenMetrics']

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

    >>> from surprise_probe.testing import tiny_hooked_transformer
    >>> m = token_metrics(tiny_hooked_transformer(), "The quick brown fox.")
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


