"""The batched engine behind dose-response and ablation: many (direction, amount) conditions per
sequence, measured against the clean run over the scored span. The amount of an edit is the
steering strength (``kind="steer"``, std units) or the ablated fraction (``kind="ablate"``).

Batched (default), two engines giving the same numbers as the loop:

- on a HookedTransformer with a residual-stream hook (``blocks.L.hook_resid_pre/post``), the
  compute floor (``interventions.suffix``): the clean sequence runs once (its prompt keys and
  values cached), and each block of conditions runs only the blocks after the hook, only at the
  positions from the first edited one on, unembedded only at scored positions;
- otherwise (a TransformerBridge, another hook), *fan-out*: each sequence runs alone and the
  intervention hook copies it into one row per condition plus a clean row, so everything before
  the hook is computed once per block of conditions; on a TransformerBridge the positions before
  the first edited one (the prompt) run once per sequence, their keys and values frozen in a
  Hugging Face cache that every block attends to (``suffix.bridge_frozen_prefix``).

Both batched engines run only the conditions that can differ from the clean run: a condition
whose edit is the identity (additive steering at strength exactly 0, see ``identity_amounts``) is
the clean run, so its metrics are filled from it (entropy = the clean entropy, KL = 0 exactly,
top-1 agreement = 1) without a row; a repeated amount is run once and copied.

``batched=False`` runs the reference loop: one condition at a time over padded batches of
sequences, every condition including the identity ones (what a hand-written loop does, and the
check that they equal the clean run); every engine gives the same numbers (tested to 1e-5).
Memory is bounded in every engine: at most ``batch_size`` rows and ``max_batch_tokens`` tokens
per forward, and logits are turned into metrics a chunk of tokens at a time
(``metrics.CHUNK_ELEMENTS``), so the full (rows x positions x vocab) logits never exist.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import einops
import numpy as np
import torch
from jaxtyping import Float
from surprise_probe.interventions.steered_metrics import clean_distribution, segment_sums
from surprise_probe.interventions.suffix import (
    bridge_from_layer,
    bridge_frozen_prefix,
    bridge_residual,
    bridge_start_layer,
    clean_prefix,
    run_from_hook,
    start_layer,
    warn_whole_forwards,
)
from torch import Tensor

from surprise_probe.core.forward.edits import Ablate, Steer
from surprise_probe.core.forward.metrics import CHUNK_ELEMENTS
from surprise_probe.core.forward.passes import logits_only_at, unembed
from surprise_probe.core.models import distributed
from surprise_probe.core.models.devices import model_device
from surprise_probe.core.text.encoding import Encoded, encode, pad_batch, pad_id
from surprise_probe.core.utils.progress import tqdm

__all__ = ["SweepTable", "run_sweep", "encode_items", "identity_amounts", "MAX_STEER", "KEEP_SCORED_LOGITS"]

FREEZE_PREFIX = True
"""Whether the fan-out engine computes a bridge's positions before the first edited one once per
sequence (``interventions.suffix.bridge_frozen_prefix``; a switch for benchmarks and tests)."""

START_AT_HOOK = True
"""Whether the fan-out engine starts a bridge's forwards at the hook (``interventions.suffix.bridge_from_layer``)
where it can, running the blocks before it once per sequence (a switch for benchmarks and tests)."""

KEEP_SCORED_LOGITS = True
"""Whether the fan-out engine unembeds the scored positions only (``logits_only_at``; a switch for
benchmarks: ``False`` unembeds every position, as before)."""

LOGITS_ELEMENTS = 2**26
"""At most this many logits (256 MB in float32) per fan-out forward: its rows of conditions are
bounded by it as well as by ``batch_size`` and ``max_batch_tokens``."""

# A steering edit of this size or more (strength x std, along a unit direction) overflows the
# float32 sum of squares every layer norm computes (sqrt of float32's largest value): the norm
# becomes infinite, the normalised activation zero, and the output uniform for any direction.
MAX_STEER = float(np.sqrt(np.finfo(np.float32).max))


@dataclass
class SweepTable:
    """Per-sequence sums over the scored span; divide by ``n_tokens`` for token means."""

    labels: list[str]
    amounts: np.ndarray  # (n_amount,) steering strengths or ablated fractions
    entropy: np.ndarray  # (n_dir, n_amount, n_seq) sum of output entropy (nats)
    kl: np.ndarray  # (n_dir, n_amount, n_seq) sum of KL(steered || clean) (nats)
    agree: np.ndarray  # (n_dir, n_amount, n_seq) count of top-1 tokens equal to the clean top-1
    clean_entropy: np.ndarray  # (n_seq,)
    n_tokens: np.ndarray  # (n_seq,) scored tokens per sequence
    n_forwards: int = 0
    n_rows: int = 0  # (sequence, condition) rows run through the model, clean runs not counted

    def mean(self, name: str) -> np.ndarray:
        """Token-weighted mean over all sequences, ``(n_dir, n_amount)``."""
        return getattr(self, name).sum(-1) / self.n_tokens.sum()


def identity_amounts(kind: str, amounts: Sequence[float] | np.ndarray) -> np.ndarray:
    """Which ``amounts`` make the edit the identity, so that their conditions are the clean run.

    Only additive steering at strength exactly 0 (``kind="steer"``; -0.0 included): the edit is
    ``x + 0 * scale * d`` with ``scale`` and ``d`` finite (``Steer`` checks both), which equals
    ``x`` for every float ``x`` (inf and NaN included), and the float32 round trip of a bf16 or
    fp16 activation is exact. Ablation at fraction 0 is *not* provably the identity: ``x - 0 *
    <x, d> d`` is NaN wherever the projection ``<x, d>`` is inf or NaN (an inf in ``x``, or an
    overflowing dot product), so it always runs, as does every other kind.

    >>> identity_amounts("steer", [-2.0, 0.0, -0.0, 1e-9]).tolist(), identity_amounts("ablate", [0.0]).tolist()
    ([False, True, True, False], [False])
    """
    amounts = np.asarray(amounts, dtype=np.float64).reshape(-1)
    return (amounts == 0.0) if kind == "steer" else np.zeros(len(amounts), dtype=bool)


def encode_items(model, items, **encode_kwargs) -> list:
    """Encode raw items (or pass ``Encoded`` through); refuse inputs with an empty scored span."""

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


def _forward(model, batch) -> Tensor:
    device = model_device(model)
    with torch.no_grad():
        return model(batch.tokens.to(device), attention_mask=batch.attention_mask.to(device), return_type="logits")


def _token_chunks(n_seq_tokens: list[int], max_tokens: int, max_rows: int) -> list[list[int]]:
    """Consecutive groups of sequences with at most ``max_rows`` rows and ``max_tokens`` padded
    tokens (rows x longest) each; a sequence longer than ``max_tokens`` goes alone."""
    groups: list[list[int]] = []
    for s, n in enumerate(n_seq_tokens):
        if groups:
            group = groups[-1]
            longest = max(n, *(n_seq_tokens[g] for g in group))
            if len(group) < max_rows and longest * (len(group) + 1) <= max_tokens:
                group.append(s)
                continue
        groups.append([s])
    return groups


@torch.no_grad()
def run_sweep(
    model,
    encoded: Sequence,
    hook: str,
    directions: Float[Tensor, "n_dir d_model"],
    amounts: Sequence[float],
    *,
    labels: Sequence[str] | None = None,
    kind: str = "steer",
    scale: float = 1.0,
    positions: str = "response",
    batch_size: int = 32,
    max_batch_tokens: int = 8192,
    batched: bool = True,
    progress: bool = True,
) -> SweepTable:
    """Run every (direction, amount) condition on every sequence and measure the scored span.

    ``kind="steer"`` adds ``strength * scale * d`` for each strength in ``amounts``;
    ``kind="ablate"`` removes each fraction in ``amounts`` of the component along ``d``.
    ``positions`` is where the edit is applied: ``"response"`` (the scored span) or ``"all"``
    (every real token). Every forward has at most ``batch_size`` rows and ``max_batch_tokens``
    tokens (rows x positions; a single sequence longer than that still runs). The batched engines
    run each distinct non-identity condition once (strength 0 is the clean run:
    ``identity_amounts``), the loop every condition; ``n_rows`` counts the rows run.
    Raises ``ValueError`` naming the amount and direction if a condition produces non-finite logits
    or saturates the model (a uniform output distribution at every scored token, entropy = ln V,
    where the clean run's is not), and before any forward for a steering strength whose edit
    overflows the float32 norm of the activation (``MAX_STEER``).
    """
    amounts, directions = _check_sweep(model, kind, positions, batch_size, max_batch_tokens, amounts, directions,
                                       scale)
    labels = list(labels) if labels is not None else [f"direction {i}" for i in range(len(directions))]
    if distributed.is_distributed():
        # Under torchrun: this rank runs sequences rank, rank + world, ...; the rows are gathered.
        mine = distributed.split(len(encoded), "sequences")
        show = progress and distributed.is_main()
        with distributed.alone():
            part = run_sweep(
                model, [encoded[s] for s in mine], hook, directions, amounts, labels=labels, kind=kind, scale=scale,
                positions=positions, batch_size=batch_size, max_batch_tokens=max_batch_tokens, batched=batched,
                progress=show,
            )
        return _gather_rows(part, mine, len(encoded))
    sweep = _Sweep(model, encoded, hook, directions, amounts, labels, kind, scale, positions)
    layer = start_layer(model, hook) if batched else None
    if layer is not None:
        sweep.run_suffix(layer, batch_size, max_batch_tokens, progress)
    elif batched:
        sweep.run_fan_out(batch_size, max_batch_tokens, progress)
    else:
        sweep.run_loop(batch_size, max_batch_tokens, progress)
    if batched:
        _fill_skipped(sweep.table, sweep.identity, sweep.first_of)
    return sweep.table


def _check_sweep(model, kind: str, positions: str, batch_size: int, max_batch_tokens: int, amounts, directions,
                 scale: float) -> tuple[np.ndarray, Tensor]:
    """``run_sweep``'s arguments checked before any forward; returns the amounts and directions as arrays."""
    if kind not in ("steer", "ablate"):
        raise ValueError(f"kind must be 'steer' or 'ablate', got {kind!r}")
    if positions not in ("response", "all"):
        raise ValueError(f"positions must be 'response' or 'all', got {positions!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be at least 1, got {max_batch_tokens}")
    amount_name = "strength" if kind == "steer" else "fraction"
    amounts = np.asarray(amounts, dtype=np.float64).reshape(-1)
    if len(amounts) == 0 or not np.isfinite(amounts).all():
        raise ValueError(f"{amount_name}s must be a non-empty list of finite numbers, got {amounts.tolist()}")
    if kind == "steer" and np.abs(amounts).max() * scale >= MAX_STEER:
        worst = float(amounts[np.argmax(np.abs(amounts))])
        raise ValueError(
            f"strength={worst:g} (x std {scale:g}) adds {abs(worst) * scale:.3g} along a unit direction: the edited "
            f"activation's squared norm overflows float32, so every later layer norm outputs zeros and the output "
            f"is uniform (entropy = ln V) for any direction; use strengths with |strength| * std below {MAX_STEER:.3g}"
        )
    directions = torch.as_tensor(directions, dtype=torch.float32)
    if directions.ndim == 1:
        directions = directions.unsqueeze(0)
    d_model = int(model.cfg.d_model)
    if directions.shape[-1] != d_model:
        raise ValueError(f"directions have width {directions.shape[-1]} but the model has d_model={d_model}")
    return amounts, directions


class _Sweep:
    """One sweep's conditions, its table, and the three engines that fill it.

    The batched engines (``run_suffix``, ``run_fan_out``) run only ``to_run``: not the identity
    edits (the clean run, filled in at the end) and each repeated amount once (copied to its
    repeats at the end); the reference loop (``run_loop``) runs every condition.
    """

    def __init__(self, model, encoded: Sequence, hook: str, directions: Tensor, amounts: np.ndarray,
                 labels: list[str], kind: str, scale: float, positions: str) -> None:
        self.model, self.encoded, self.hook, self.directions, self.amounts = model, encoded, hook, directions, amounts
        self.labels, self.kind, self.positions = labels, kind, positions
        self.amount_name = "strength" if kind == "steer" else "fraction"
        self.make = Steer if kind == "steer" else Ablate
        self.extra = {"scale": scale} if kind == "steer" else {}
        n_dir, n_amount, n_seq = len(directions), len(amounts), len(encoded)
        self.conditions = [(i, j) for i in range(n_dir) for j in range(n_amount)]
        self.identity = identity_amounts(kind, amounts)
        self.first_of = [int(np.flatnonzero(amounts == a)[0]) for a in amounts]  # first index of each amount
        self.to_run = [c for c, (_, j) in enumerate(self.conditions) if not self.identity[j] and self.first_of[j] == j]
        self.device = model_device(model)
        self.vocab = int(model.cfg.d_vocab_out)
        self.uniform = np.log(self.vocab) * (1 - 1e-6)  # a mean entropy at or above this: every output is uniform
        shape = (n_dir, n_amount, n_seq)
        self.table = SweepTable(
            labels, amounts, np.zeros(shape), np.zeros(shape), np.zeros(shape),
            np.zeros(n_seq), np.array([int(e.scored.sum()) for e in encoded], dtype=np.float64),
        )

    # --- recording ------------------------------------------------------------------------------

    def store(self, rows: list[tuple[int, int]], sums) -> None:
        """Enter per-row sums (entropy, KL, agreement, finite) for (sequence, condition) ``rows``."""
        entropy, kl, agree, finite = sums
        table, amounts, name = self.table, self.amounts, self.amount_name
        for row, (s, c) in enumerate(rows):
            i, j = self.conditions[c]
            if not finite[row]:
                raise ValueError(
                    f"{name}={amounts[j]:g} on direction {self.labels[i]!r} ({self.kind}) gave non-finite logits "
                    f"(NaN or inf) for input {s}; the edited activation overflowed, use smaller {name}s"
                )
            if entropy[row] >= table.n_tokens[s] * self.uniform > table.clean_entropy[s]:
                raise ValueError(
                    f"{name}={amounts[j]:g} on direction {self.labels[i]!r} ({self.kind}) saturated the model on "
                    f"input {s}: its output is uniform (entropy = ln {self.vocab} = {np.log(self.vocab):.4f} nats) "
                    f"at every scored token, so the edit swamped the activation (rounding or a layer norm left "
                    f"nothing of it); use smaller {name}s"
                )
            table.entropy[i, j, s], table.kl[i, j, s], table.agree[i, j, s] = entropy[row], kl[row], agree[row]

    def record(self, rows: list[tuple[int, int]], logits: Tensor, scored: Tensor, clean: dict) -> None:
        """Metrics of ``logits`` (one row per (sequence, condition) of ``rows``) at ``scored``."""
        scored = scored.to(logits.device)
        segments = [(row, *clean[s]) for row, (s, _) in enumerate(rows)]
        # all scored (only the scored positions' logits were made): a view, not an indexed copy
        flat = logits.reshape(-1, logits.shape[-1]) if bool(scored.all()) else logits[scored]
        self.store(rows, segment_sums(lambda a, b: flat[a:b], segments, int(logits.shape[-1]), len(rows)))

    def keep_clean(self, s: int, selected: Tensor, clean: dict) -> None:
        """Clean log-probs and top-1 tokens at the scored tokens of sequence ``s`` (``selected``:
        their logits), computed once per sequence."""
        if not torch.isfinite(selected).all():
            raise ValueError(f"input {s} gives non-finite logits even without intervention")
        log_probs, top1, entropy = clean_distribution(selected)
        clean[s] = (log_probs, top1)
        self.table.clean_entropy[s] = float(entropy.double().sum())

    def edit(self, block: list[int], n_rows: int, where: Tensor, with_clean: bool):
        """The intervention running a block of conditions as rows (row 0 clean if asked)."""
        picked = [self.conditions[c] for c in block]
        dirs = self.directions[[i for i, _ in picked]]
        row_amounts = torch.tensor([self.amounts[j] for _, j in picked], dtype=torch.float32)
        if with_clean:
            dirs = torch.cat([self.directions[:1], dirs])
            row_amounts = torch.cat([torch.zeros(1), row_amounts])
        return self.make(hooks=self.hook, direction=dirs, **{self.amount_name: row_amounts}, fan_out=n_rows,
                         positions=where.expand(n_rows, -1), **self.extra)

    # --- the engines ----------------------------------------------------------------------------

    def run_suffix(self, layer: int, batch_size: int, max_batch_tokens: int, progress: bool) -> None:
        """Compute floor (interventions.suffix): the clean run once, each condition from the hook
        on, only from the first edited position on, unembedded only at scored positions."""
        model, table = self.model, self.table
        per_forward_rows = [
            max(1, min(batch_size, max_batch_tokens // max(1, len(e.token_ids) - _first_edited(e, self.positions))))
            for e in self.encoded
        ]
        n_blocks = sum(-(-len(self.to_run) // r) for r in per_forward_rows)
        with tqdm(total=n_blocks, desc=f"{self.kind} sweep", unit="fwd", disable=not progress) as bar:
            for s, item in enumerate(self.encoded):
                tokens = torch.as_tensor(item.token_ids, dtype=torch.long, device=self.device).unsqueeze(0)
                first = _first_edited(item, self.positions)
                prefix = clean_prefix(model, tokens, layer, first)
                suffix_scored = torch.as_tensor(item.scored[first:], dtype=torch.bool)
                where = suffix_scored if self.positions == "response" else torch.ones_like(suffix_scored)
                at = torch.nonzero(suffix_scored).squeeze(-1).to(self.device)
                clean_final = run_from_hook(model, prefix, prefix.residual)[0, at]
                clean = {}
                self.keep_clean(s, _unembed_chunks(model, clean_final), clean)
                table.n_forwards += 1
                rows = per_forward_rows[s]
                for k in range(0, len(self.to_run), rows):
                    block = self.to_run[k : k + rows]
                    edited = self.edit(block, len(block), where, with_clean=False).edited(prefix.residual, self.hook)
                    final = run_from_hook(model, prefix, edited)[:, at]  # (rows, n_at, d_model)
                    flat = einops.rearrange(final, "rows at d -> (rows at) d")  # row-major: row r is segment r
                    self.store([(s, c) for c in block], segment_sums(
                        lambda a, b, flat=flat: unembed(model, flat[a:b].unsqueeze(0))[0],
                        [(r, *clean[s]) for r in range(len(block))], self.vocab, len(block),
                    ))
                    table.n_forwards += 1
                    table.n_rows += len(block)
                    bar.update()
                del prefix, clean

    def run_fan_out(self, batch_size: int, max_batch_tokens: int, progress: bool) -> None:
        """One unpadded sequence per forward; the hook copies it to [clean, conditions...] rows,
        so the layers before the hook run once for all of them."""
        model = self.model
        warn_whole_forwards(model, [self.hook], "the steering sweep")
        bar = None
        for s, item in enumerate(self.encoded):
            n_tok = len(item.token_ids)
            # the logits exist at the scored positions only (or every position): bounded per forward too
            n_logits = (int(item.scored.sum()) if KEEP_SCORED_LOGITS else n_tok) * int(model.cfg.d_vocab_out)
            per_forward = max(1, min(batch_size, max_batch_tokens // max(1, n_tok),
                                     LOGITS_ELEMENTS // max(1, n_logits)) - 1)
            # With nothing to run (every condition is the clean run), one block of no conditions
            # still gives the clean row.
            blocks = [self.to_run[k : k + per_forward] for k in range(0, len(self.to_run), per_forward)] or [[]]
            if bar is None:
                bar = tqdm(total=len(self.encoded) * len(blocks), desc=f"{self.kind} sweep", unit="fwd",
                           disable=not progress)
            tokens = torch.as_tensor(item.token_ids, dtype=torch.long, device=self.device).unsqueeze(0)
            # Everything before the first edited position is the clean run's: on a bridge its keys
            # and values are computed once (bridge_frozen_prefix) and each forward runs from there.
            first = _first_edited(item, self.positions) if FREEZE_PREFIX else 0
            with bridge_frozen_prefix(model, tokens[:, :first]) as frozen:
                start = first if frozen is not None else 0
                self._fan_out_sequence(s, item, tokens[:, start:], start, frozen or {}, blocks, bar)
        if bar is not None:
            bar.close()

    def _fan_out_sequence(self, s: int, item, tokens: Tensor, start: int, frozen: dict, blocks: list, bar) -> None:
        """The fan-out forwards of sequence ``s`` from position ``start`` on (``frozen``: the
        arguments that give them the positions before it)."""
        model, table = self.model, self.table
        scored = torch.as_tensor(item.scored[start:], dtype=torch.bool).unsqueeze(0)
        where = scored if self.positions == "response" else torch.ones_like(scored)
        # Only the scored columns are unembedded (logits_only_at); the logits then hold just
        # those, all of them scored.
        columns = torch.nonzero(scored[0]).squeeze(-1)
        if KEEP_SCORED_LOGITS:
            scored = torch.ones(1, len(columns), dtype=torch.bool)
        clean: dict[int, Tensor] = {}
        # With more than one block of conditions, a bridge runs the blocks before the hook once: the
        # clean residual there, then each block of conditions from the hook on (as run_suffix does).
        layer = bridge_start_layer(model, self.hook) if START_AT_HOOK and len(blocks) > 1 else None
        residual = None
        if layer is not None:
            with torch.no_grad():
                residual = bridge_residual(model, tokens, layer, **frozen)
            table.n_forwards += 1
        for block in blocks:
            n_rows = len(block) + 1  # row 0 is the clean run (amount 0)
            keep = logits_only_at(model, columns) if KEEP_SCORED_LOGITS else contextlib.nullcontext({})
            edit = self.edit(block, n_rows, where, with_clean=True)
            run = edit.apply(model) if residual is None else bridge_from_layer(
                model, layer, edit.edited(residual, self.hook))
            with run, keep as kwargs, torch.no_grad():
                logits = model(tokens, return_type="logits", **kwargs, **frozen)
            table.n_forwards += 1
            bar.update()
            if logits.shape[0] != n_rows:
                raise RuntimeError(
                    f"fanning out at {self.hook} gave {logits.shape[0]} rows instead of {n_rows}; this model "
                    "does not support it, run with batched=False"
                )
            if s not in clean:
                self.keep_clean(s, logits[0][scored[0].to(logits.device)], clean)
            if block:
                self.record([(s, c) for c in block], logits[1:], scored.expand(len(block), -1), clean)
            table.n_rows += len(block)
            del logits

    def run_loop(self, batch_size: int, max_batch_tokens: int, progress: bool) -> None:
        """The reference loop: one condition (scalar amount, one direction) per forward over padded
        batches of sequences; the clean runs first."""
        model, table, encoded = self.model, self.table, self.encoded
        pad = pad_id(model)
        seq_chunks = _token_chunks([len(e.token_ids) for e in encoded], max_batch_tokens, batch_size)
        with tqdm(total=len(seq_chunks) * (1 + len(self.conditions)), desc=f"{self.kind} loop", unit="fwd",
                  disable=not progress) as bar:
            clean = {}
            for seqs in seq_chunks:
                batch = pad_batch([encoded[s] for s in seqs], pad)
                logits = _forward(model, batch)
                table.n_forwards += 1
                bar.update()
                for row, s in enumerate(seqs):
                    self.keep_clean(s, logits[row][batch.scored[row].to(logits.device)], clean)
                del logits
            for c, (i, j) in enumerate(self.conditions):
                for seqs in seq_chunks:
                    batch = pad_batch([encoded[s] for s in seqs], pad)
                    where = batch.scored if self.positions == "response" else batch.attention_mask.bool()
                    intervention = self.make(hooks=self.hook, direction=self.directions[i],
                                             **{self.amount_name: float(self.amounts[j])}, positions=where,
                                             **self.extra)
                    with intervention.apply(model):
                        logits = _forward(model, batch)
                    table.n_forwards += 1
                    table.n_rows += len(seqs)
                    bar.update()
                    self.record([(s, c) for s in seqs], logits, batch.scored, clean)
                    del logits


def _fill_skipped(table: SweepTable, identity: np.ndarray, first_of: list[int]) -> None:
    """The conditions the batched engines did not run: an identity edit is the clean run (entropy
    = the clean entropy, KL = 0 exactly, every top-1 token agrees); a repeated amount equals its
    first occurrence."""
    for j in range(len(identity)):
        if identity[j]:
            table.entropy[:, j] = table.clean_entropy
            table.kl[:, j] = 0.0
            table.agree[:, j] = table.n_tokens
        elif first_of[j] != j:
            for values in (table.entropy, table.kl, table.agree):
                values[:, j] = values[:, first_of[j]]


def _gather_rows(part: SweepTable, mine: list[int], n_seq: int) -> SweepTable:
    """The whole table from every rank's rows: each rank fills its own sequences' columns and
    leaves zeros elsewhere, so the float64 sum over ranks is exact."""
    names = ("entropy", "kl", "agree", "clean_entropy", "n_tokens")
    spread = []
    for name in names:
        values = getattr(part, name)
        full = np.zeros(values.shape[:-1] + (n_seq,))
        full[..., mine] = values
        spread.append(full)
    summed = distributed.all_reduce_sum([*spread, np.array([part.n_forwards, part.n_rows])])
    return SweepTable(part.labels, part.amounts, *summed[: len(names)], n_forwards=int(summed[-1][0]),
                      n_rows=int(summed[-1][1]))


def _first_edited(item, positions: str) -> int:
    """The first position an edit touches (0 for ``"all"``): everything before it is shared."""
    return 0 if positions == "all" else int(np.flatnonzero(item.scored)[0])


def _unembed_chunks(model, final: Tensor) -> Tensor:
    """Logits of ``final`` (tokens x d_model) in chunks of tokens (one result tensor)."""
    step = max(1, CHUNK_ELEMENTS // int(model.cfg.d_vocab_out))
    return torch.cat([unembed(model, final[a : a + step].unsqueeze(0))[0] for a in range(0, len(final), step)])

