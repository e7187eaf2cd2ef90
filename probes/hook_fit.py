"""One hook's ridge fit from sufficient statistics, and the one pass over a capture that gathers them.

:func:`accumulate` reads every shard's activations once and keeps, per hook and per fold, the
float64 statistics (:class:`~probes.ridge.RidgeStats`) of the target and every control target;
:func:`fit_hook` solves every alpha, every fold, the nested alpha choice and the shuffled
controls from them (no second pass). Used by :func:`probes.sweep.fit_sweep`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from surprise_probe.probes.ridge import RidgeStats, heldout_sums, solve_ridge
from surprise_probe.probes.scoring import r2_from_sums
from surprise_probe.probes.targets import TargetData, shard_label

from surprise_probe.core.models import distributed
from surprise_probe.core.utils.progress import tqdm

__all__ = ["HookFit", "fit_hook", "accumulate"]


def _shard_activations(shard, hook: str, mask, label: str, sequence_ids, positions) -> np.ndarray:
    values = np.asarray(shard.activations(hook)[mask])
    values = values.reshape(len(values), -1)
    finite = np.isfinite(values).all(1)
    if not finite.all():
        i = np.flatnonzero(~finite)[0]
        raise ValueError(
            f"activations at {hook!r} are not finite ({int((~finite).sum())} token(s)) in {label}, first at "
            f"sequence {sequence_ids[i]}, position {positions[i]}; recapture (e.g. in float32) or drop those sequences"
        )
    return values


@dataclass
class HookFit:
    outer_coef: np.ndarray  # (k, 1 + n_sets, d): per outer fold, [target, each residual target]
    outer_intercept: np.ndarray  # (k, 1 + n_sets)
    fold_alphas: list[float]
    alpha: float
    cv_r2_by_alpha: list[float]
    stats_r2: float
    shuffle_r2: list[float]
    coef: np.ndarray
    intercept: float
    projection_mean: float
    projection_std: float


def fit_hook(
    fold_stats: list[RidgeStats],
    alphas: np.ndarray,
    nested: bool,
    standardize: bool,
    n_shuffles: int,
    n_sets: int = 1,
) -> HookFit:
    """Solve every fold, alpha and target column of one hook from its per-fold statistics.

    Target columns: 0 = target; then ``n_sets`` residual sets of k columns each (column
    ``1 + r * k + f`` = target minus control r fitted on fold f's training tokens); then the
    shuffled targets.
    """
    k = len(fold_stats)
    total = fold_stats[0]
    for stats in fold_stats[1:]:
        total = total + stats
    outer = [solve_ridge(total - fold_stats[f], alphas, standardize) for f in range(k)]
    outer_sums = [heldout_sums(fold_stats[f], outer[f]) for f in range(k)]
    outer_sse = np.stack([s["sse"] for s in outer_sums])  # (k, a, t)

    if nested:
        inner_sse = np.zeros_like(outer_sse)  # inner_sse[f]: summed over inner folds g != f
        for f in range(k):
            for g in range(f + 1, k):
                pair = solve_ridge(total - fold_stats[f] - fold_stats[g], alphas, standardize)
                inner_sse[f] += heldout_sums(fold_stats[g], pair)["sse"]
                inner_sse[g] += heldout_sums(fold_stats[f], pair)["sse"]
        chosen = inner_sse.argmin(1)  # (k, t)
    else:
        chosen = np.broadcast_to(outer_sse.sum(0).argmin(0), (k, outer_sse.shape[2]))

    def pooled_r2(column: int, alpha_index_per_fold) -> float:
        sums = {
            name: sum(outer_sums[f][name][alpha_index_per_fold[f], column] for f in range(k))
            for name in ("n", "sum_y", "sum_yy", "sse")
        }
        return float(r2_from_sums(sums["n"], sums["sum_y"], sums["sum_yy"], sums["sse"]))

    n_alphas = len(alphas)
    cv_r2_by_alpha = [pooled_r2(0, [a] * k) for a in range(n_alphas)]
    first_shuffle = 1 + n_sets * k
    shuffle_r2 = [
        pooled_r2(first_shuffle + s, chosen[:, first_shuffle + s]) for s in range(n_shuffles)
    ]

    # per outer fold, the columns its probes are fitted to: the target and its own residuals
    fold_columns = [[0] + [1 + r * k + f for r in range(n_sets)] for f in range(k)]
    outer_coef = np.stack(
        [np.stack([outer[f].coef[chosen[f, c], c] for c in fold_columns[f]]) for f in range(k)]
    )
    outer_intercept = np.array(
        [[outer[f].intercept[chosen[f, c], c] for c in fold_columns[f]] for f in range(k)]
    )
    best = int(np.argmax(cv_r2_by_alpha))
    final = solve_ridge(total, alphas[best : best + 1], standardize)
    coef = final.coef[0, 0]
    unit = coef / max(np.linalg.norm(coef), np.finfo(float).tiny)
    variance = unit @ total.centered_gram() @ unit / total.n
    return HookFit(
        outer_coef=outer_coef,
        outer_intercept=outer_intercept,
        fold_alphas=[float(alphas[chosen[f, 0]]) for f in range(k)],
        alpha=float(alphas[best]),
        cv_r2_by_alpha=cv_r2_by_alpha,
        stats_r2=pooled_r2(0, chosen[:, 0]),
        shuffle_r2=shuffle_r2,
        coef=coef,
        intercept=float(final.intercept[0, 0]),
        projection_mean=float(total.mean_x @ unit),
        projection_std=float(np.sqrt(max(variance, 0.0))),
    )


def accumulate(
    run, data: TargetData, hooks, folds, n_folds, columns, pool, progress
) -> dict[str, list[RidgeStats]]:
    """Step 1: one pass over the shards; per hook and fold, float64 sufficient statistics."""
    stats: dict[str, list[RidgeStats]] = {}
    shift_y = columns.mean(0)

    def add(shard, hook, mask, label, chunk, by_fold, owned) -> None:
        X = _shard_activations(
            shard, hook, mask, label, data.sequence_ids[chunk], data.positions[chunk]
        )
        if hook not in stats:
            # shift by the first shard's mean so the float64 sums stay small (exact centring later)
            shift_x = X.mean(0, dtype=np.float64)
            stats[hook] = [
                RidgeStats(X.shape[1], columns.shape[1], shift_x, shift_y) for _ in range(n_folds)
            ]
        elif X.shape[1] != stats[hook][0].n_features:
            raise ValueError(
                f"activations at {hook!r} have width {X.shape[1]} in {label} but {stats[hook][0].n_features} before"
            )
        if not owned:
            return  # another rank's shard, read here only for the shifts every rank must share
        Y = columns[chunk]
        for fold, members in enumerate(by_fold):
            if len(members):
                stats[hook][fold].update(X[members], Y[members])

    offset = 0
    shards = tqdm(
        run.shards(),
        total=getattr(run, "n_shards", None),
        desc="fit: reading shards",
        unit="shard",
        disable=not progress,
    )
    for index, shard in enumerate(shards):
        mask = data.masks[index]
        count = int(mask.sum())
        if count == 0:
            continue
        chunk = slice(offset, offset + count)
        offset += count
        owned = distributed.owns(index)  # under torchrun: shards index % world_size == rank
        if not owned and stats:
            continue
        shard_folds = folds[chunk]
        by_fold = [np.flatnonzero(shard_folds == f) for f in range(n_folds)]
        label = shard_label(shard, index)
        jobs = [pool.submit(add, shard, hook, mask, label, chunk, by_fold, owned) for hook in hooks]
        for job in jobs:
            job.result()  # re-raises the first error (e.g. non-finite activations)
    if distributed.is_distributed():
        for hook in hooks:  # the same order on every rank (threads fill `stats` in any order)
            _all_reduce_stats(stats[hook])
    return stats


def _all_reduce_stats(fold_stats: list[RidgeStats]) -> None:
    """Sum each fold's statistics over ranks in place (float64; every rank gets the totals)."""
    names = ("sum_x", "sum_y", "xtx", "xty", "yty")
    arrays = [np.array([s.n for s in fold_stats], dtype=np.float64)]
    arrays += [getattr(s, name) for s in fold_stats for name in names]
    summed = distributed.all_reduce_sum(arrays)
    for f, s in enumerate(fold_stats):
        s.n = int(round(summed[0][f]))
        for j, name in enumerate(names):
            setattr(s, name, summed[1 + f * len(names) + j])
