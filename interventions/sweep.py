"""The batched engine behind dose-response and ablation: many (direction, alpha) conditions per
sequence, measured against the clean run over the scored span.

Batched (default): each sequence runs alone (no padding) and the intervention hook *fans it out*
in the batch dimension to one row per condition (per-row direction and alpha) plus a clean row,
at most ``batch_size`` rows per forward. Everything before the hook is computed once per sequence
instead of once per alpha, and the clean run comes free. ``batched=False`` runs the reference
loop: one condition at a time over padded batches of sequences; both give the same numbers
(tested to 1e-5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float
from surprise_probe.interventions.hooks import Ablate, Steer
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["SweepTable", "run_sweep", "encode_items", "row_metrics"]


@dataclass
class SweepTable:
    """Per-sequence sums over the scored span; divide by ``n_tokens`` for token means."""

    labels: list[str]
    alphas: np.ndarray  # (n_alpha,)
    entropy: np.ndarray  # (n_dir, n_alpha, n_seq) sum of output entropy (nats)
    kl: np.ndarray  # (n_dir, n_alpha, n_seq) sum of KL(steered || clean) (nats)
    agree: np.ndarray  # (n_dir, n_alpha, n_seq) count of top-1 tokens equal to the clean top-1
    clean_entropy: np.ndarray  # (n_seq,)
    n_tokens: np.ndarray  # (n_seq,) scored tokens per sequence
    n_forwards: int = 0

    def mean(self, name: str) -> np.ndarray:
        """Token-weighted mean over all sequences, ``(n_dir, n_alpha)``."""
        return getattr(self, name).sum(-1) / self.n_tokens.sum()


def encode_items(model, items, **encode_kwargs) -> list:
    """Encode raw items (or pass ``Encoded`` through); refuse inputs with an empty scored span."""
    from surprise_probe.inputs import Encoded, encode

    encoded = [
        item if isinstance(item, Encoded) else encode(model, item, index=i, **encode_kwargs)
        for i, item in enumerate(items)
    ]
    if not encoded:
        raise ValueError("no inputs given; expected at least one text or conversation")
    for i, item in enumerate(encoded):
        if not item.scored.any():
            raise ValueError(
                f"input {i} has no scored tokens (empty scored span, e.g. a conversation without an "
                "assistant turn); give it a response or score the whole text"
            )
    return encoded


def row_metrics(
    logits: Float[Tensor, "batch pos vocab"],
    scored: Bool[Tensor, "batch pos"],
    clean_log_probs: Float[Tensor, "tokens vocab"],
) -> tuple[Float[Tensor, " batch"], Float[Tensor, " batch"], Float[Tensor, " batch"], Bool[Tensor, " batch"]]:
    """Per-row sums over scored tokens of entropy, KL(steered || clean), top-1 agreement; and
    whether every scored logit of the row is finite. ``clean_log_probs`` follow ``scored`` order."""
    rows = torch.nonzero(scored, as_tuple=True)[0]
    selected = logits[scored]
    finite = torch.zeros(scored.shape[0], dtype=torch.bool).index_fill_(0, rows.unique(), True)
    bad_tokens = ~torch.isfinite(selected).all(-1)
    finite[rows[bad_tokens]] = False
    dtype = torch.float64 if selected.dtype == torch.float64 else torch.float32
    log_probs = torch.log_softmax(selected.to(dtype), -1)
    probs = log_probs.exp()
    entropy = -torch.nan_to_num(probs * log_probs, nan=0.0).sum(-1)
    kl = torch.nan_to_num(probs * (log_probs - clean_log_probs.to(dtype)), nan=0.0).sum(-1)
    agree = (log_probs.argmax(-1) == clean_log_probs.argmax(-1)).to(dtype)

    def per_row(values: Tensor) -> Tensor:
        return torch.zeros(scored.shape[0], dtype=torch.float64).index_add_(0, rows, values.double())

    return per_row(entropy), per_row(kl), per_row(agree), finite


def _forward(model, batch) -> Tensor:
    with torch.no_grad():
        return model(batch.tokens, attention_mask=batch.attention_mask, return_type="logits")


def run_sweep(
    model,
    encoded: Sequence,
    hook: str,
    directions: Float[Tensor, "n_dir d_model"],
    alphas: Sequence[float],
    *,
    labels: Sequence[str] | None = None,
    kind: str = "steer",
    scale: float = 1.0,
    positions: str = "response",
    batch_size: int = 32,
    batched: bool = True,
    progress: bool = True,
) -> SweepTable:
    """Run every (direction, alpha) condition on every sequence and measure the scored span.

    ``kind="steer"`` adds ``alpha * scale * d``; ``kind="ablate"`` removes ``alpha`` times the
    component along ``d``. ``positions`` is where the edit is applied: ``"response"`` (the scored
    span) or ``"all"`` (every real token). Raises ``ValueError`` naming the alpha and direction if a
    condition produces non-finite logits.
    """
    from surprise_probe.inputs import pad_batch, pad_id

    if kind not in ("steer", "ablate"):
        raise ValueError(f"kind must be 'steer' or 'ablate', got {kind!r}")
    if positions not in ("response", "all"):
        raise ValueError(f"positions must be 'response' or 'all', got {positions!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    alphas = np.asarray(alphas, dtype=np.float64).reshape(-1)
    if len(alphas) == 0 or not np.isfinite(alphas).all():
        raise ValueError(f"alphas must be a non-empty list of finite numbers, got {alphas.tolist()}")
    directions = torch.as_tensor(directions, dtype=torch.float32)
    if directions.ndim == 1:
        directions = directions.unsqueeze(0)
    d_model = int(model.cfg.d_model)
    if directions.shape[-1] != d_model:
        raise ValueError(f"directions have width {directions.shape[-1]} but the model has d_model={d_model}")
    labels = list(labels) if labels is not None else [f"direction {i}" for i in range(len(directions))]
    n_dir, n_alpha, n_seq = len(directions), len(alphas), len(encoded)
    conditions = [(i, j) for i in range(n_dir) for j in range(n_alpha)]
    pad = pad_id(model)
    shape = (n_dir, n_alpha, n_seq)
    table = SweepTable(
        labels, alphas, np.zeros(shape), np.zeros(shape), np.zeros(shape),
        np.zeros(n_seq), np.array([int(e.scored.sum()) for e in encoded], dtype=np.float64),
    )

    make = Steer if kind == "steer" else Ablate
    extra = {"scale": scale} if kind == "steer" else {}

    def record(rows: list[tuple[int, int]], logits: Tensor, scored: Tensor, clean: dict[int, Tensor]) -> None:
        clean_lp = torch.cat([clean[s] for s, _ in rows])
        entropy, kl, agree, finite = row_metrics(logits, scored, clean_lp)
        for row, (s, c) in enumerate(rows):
            i, j = conditions[c]
            if not finite[row]:
                raise ValueError(
                    f"alpha={alphas[j]:g} on direction {labels[i]!r} ({kind}) gave non-finite logits "
                    f"(NaN or inf) for input {s}; the edited activation overflowed, use smaller alphas"
                )
            table.entropy[i, j, s], table.kl[i, j, s], table.agree[i, j, s] = entropy[row], kl[row], agree[row]

    def keep_clean(s: int, logits_row: Tensor, scored_row: Tensor, clean: dict[int, Tensor]) -> None:
        selected = logits_row[scored_row]
        if not torch.isfinite(selected).all():
            raise ValueError(f"input {s} gives non-finite logits even without intervention")
        dtype = torch.float64 if selected.dtype == torch.float64 else torch.float32
        clean[s] = torch.log_softmax(selected.to(dtype), -1)
        table.clean_entropy[s] = float(-(clean[s].exp() * clean[s]).nan_to_num(0.0).sum())

    if batched:
        # One unpadded sequence per forward; the hook fans it out to [clean, conditions...] rows,
        # so the layers before the hook run once for all of them.
        per_forward = max(1, batch_size - 1)
        blocks = [list(range(k, min(len(conditions), k + per_forward))) for k in range(0, len(conditions), per_forward)]
        bar = tqdm(total=n_seq * len(blocks), desc=f"{kind} sweep", unit="fwd", disable=not progress)
        for s, item in enumerate(encoded):
            tokens = torch.as_tensor(item.token_ids, dtype=torch.long).unsqueeze(0)
            scored = torch.as_tensor(item.scored, dtype=torch.bool).unsqueeze(0)
            clean: dict[int, Tensor] = {}
            for block in blocks:
                n_rows = len(block) + 1  # row 0 is the clean run (alpha 0)
                dirs = torch.cat([directions[:1], directions[[conditions[c][0] for c in block]]])
                row_alphas = torch.tensor([0.0, *[alphas[conditions[c][1]] for c in block]], dtype=torch.float32)
                where = scored if positions == "response" else torch.ones_like(scored)
                intervention = make(hooks=hook, direction=dirs, alpha=row_alphas, fan_out=n_rows,
                                    positions=where.expand(n_rows, -1), **extra)
                with intervention.apply(model), torch.no_grad():
                    logits = model(tokens, return_type="logits")
                table.n_forwards += 1
                bar.update()
                if logits.shape[0] != n_rows:
                    raise RuntimeError(
                        f"fanning out at {hook} gave {logits.shape[0]} rows instead of {n_rows}; this model "
                        "does not support it, run with batched=False"
                    )
                keep_clean(s, logits[0], scored[0], clean)
                record([(s, c) for c in block], logits[1:], scored.expand(len(block), -1), clean)
    else:
        # The reference loop: one condition (scalar alpha, one direction) per forward over padded
        # batches of sequences; the clean runs first.
        seq_chunks = [list(range(k, min(n_seq, k + batch_size))) for k in range(0, n_seq, batch_size)]
        bar = tqdm(total=len(seq_chunks) * (1 + len(conditions)), desc=f"{kind} loop", unit="fwd",
                   disable=not progress)
        clean = {}
        for seqs in seq_chunks:
            batch = pad_batch([encoded[s] for s in seqs], pad)
            logits = _forward(model, batch)
            table.n_forwards += 1
            bar.update()
            for row, s in enumerate(seqs):
                keep_clean(s, logits[row], batch.scored[row], clean)
        for c, (i, j) in enumerate(conditions):
            for seqs in seq_chunks:
                batch = pad_batch([encoded[s] for s in seqs], pad)
                where = batch.scored if positions == "response" else batch.attention_mask.bool()
                intervention = make(hooks=hook, direction=directions[i], alpha=float(alphas[j]),
                                    positions=where, **extra)
                with intervention.apply(model):
                    logits = _forward(model, batch)
                table.n_forwards += 1
                bar.update()
                record([(s, c) for s in seqs], logits, batch.scored, clean)
    bar.close()
    return table
