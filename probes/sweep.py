"""Layer sweeps: ridge probes for every hook and every alpha from one pass over a capture.

:func:`fit_sweep` reads a capture (``surprise_probe.load_capture`` or :class:`probes.ArrayCapture`)
in three steps:

0. the small per-token columns (targets, token ids, sequence ids) of every shard: selects the
   tokens, assigns folds grouped by sequence, and builds the control targets;
1. the activations, shard by shard: accumulates float64 sufficient statistics per hook and per
   fold, for the real target and every control target at once;
2. the activations again: held-out predictions of the chosen probes, for sequence-bootstrap CIs.

Everything else (every alpha, every fold, nested alpha selection, the shuffled controls) is
solved from the statistics. See docs/probes.md for what is fitted and how to read the results.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import einops
import numpy as np
from surprise_probe.probes.controls import (
    bigram_mean_fitter,
    covariate_fitter,
    cross_fitted_predictions,
    position_fitter,
    token_mean_fitter,
)
from surprise_probe.probes.folds import assign_folds
from surprise_probe.probes.hook_fit import HookFit, accumulate, fit_hook
from surprise_probe.probes.results import (
    EMBEDDING_HOOK,
    HookResult,
    SweepResult,
    hook_depth,
    hook_layer,
)
from surprise_probe.probes.scoring import SequenceBootstrap
from surprise_probe.probes.sources import scores_by_source
from surprise_probe.probes.targets import (
    SPANS,
    TargetData,
    TokenTarget,
    load_target_file,
    lookup_target,
    select_target,
)
from threadpoolctl import threadpool_limits

from surprise_probe.core.models import distributed
from surprise_probe.core.utils.progress import tqdm
from surprise_probe.core.utils.stats import small_sample_warnings

__all__ = ["DEFAULT_ALPHAS", "fit_sweep"]

DEFAULT_ALPHAS = np.logspace(-2, 6, 17)
DEFAULT_FOLDS = 5  # cross-validation folds, grouped by sequence
RESERVED_CONTROLS = ("token", "position", "bigram")


def _check_hooks(run, hooks) -> list[str]:
    captured = list(run.hooks)
    hooks = captured if hooks is None else list(dict.fromkeys(hooks))
    if not hooks:
        raise ValueError(f"no hooks to fit; captured hooks: {captured}")
    for hook in hooks:
        if hook not in captured:
            raise ValueError(f"hook {hook!r} was not captured; captured hooks: {captured}")
    return hooks


def _data_hash(run, target: TargetData) -> str:
    manifest = getattr(run, "manifest", {}) or {}
    digest = hashlib.sha256()
    digest.update(
        str(manifest.get("content_hash") or manifest.get("inputs_hash") or run.model_id).encode()
    )
    digest.update(target.name.encode())
    for array in (target.y, target.sequence_ids, target.positions):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _covariate_values(data: TargetData, covariates) -> dict[str, np.ndarray]:
    values = {}
    for name, table in (covariates or {}).items():
        if name in RESERVED_CONTROLS:
            raise ValueError(
                f"covariate name {name!r} is taken by a built-in control; choose another name"
            )
        if isinstance(table, (str, Path)):
            table = load_target_file(table)
        if not isinstance(table, TokenTarget):
            raise ValueError(
                f"covariate {name!r} must be a table keyed by (sequence_id, position) "
                "(a TokenTarget or an .npz / (m, 3) .npy file)"
            )
        values[name] = lookup_target(table, data.sequence_ids, data.positions)
    return values


def fit_sweep(
    run,
    target: str | Path | TokenTarget | np.ndarray = "surprise",
    *,
    hooks: list[str] | None = None,
    alphas=None,
    n_folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    n_shuffles: int = 20,
    n_boot: int = 1000,
    nested: bool = True,
    standardize: bool = True,
    covariates: Mapping[str, TokenTarget | str | Path] | None = None,
    sources: Mapping[int, str] | None = None,
    span: str = "scored",
    progress: bool = True,
) -> SweepResult:
    """Fit and score a ridge probe at every hook of ``run``, with controls.

    ``target``: ``"surprise"`` (default), ``"entropy"``, a :class:`~probes.targets.TokenTarget`,
    a 1-D array in capture order, or a path to a ``.npy``/``.npz`` target file. ``alphas``: the
    ridge grid (default ``DEFAULT_ALPHAS``). With ``nested`` (default, needs ``n_folds >= 3``),
    each outer fold chooses its alpha by an inner CV over the other folds, so the reported
    held-out scores never saw the data that chose the alpha.

    Controls, all learned on the training folds: token-type mean, position (sequence and scored
    span), bigram (previous + current token), each reported as a baseline R² and as the probe's
    R² on the target minus the control. ``covariates`` (name -> per-token table, e.g. another
    model's surprise) add "the target beyond the covariate" the same way; tokens a covariate
    lacks are dropped from the whole sweep (counted in ``config``). ``sources`` (sequence id ->
    label, e.g. ``own-sample`` / ``human``) adds R² and calibration per source. ``span``: which
    tokens, the same for every target by default (``"scored"``: the scored span at position > 0;
    ``"all"``: see :mod:`probes.targets`); ``config["span"]`` says which.

    ``hooks``: the captured hooks to fit (default every one); keep ``blocks.0.hook_resid_pre``
    among them, it is the embedding-layer (token-identity) control.

    >>> import surprise_probe as sp
    >>> from surprise_probe.testing import TINY_CORPUS, tiny_model
    >>> run = sp.capture(tiny_model(), TINY_CORPUS * 2, progress=False)  # or sp.load_capture(folder)
    >>> result = fit_sweep(run, "surprise", hooks=["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"],
    ...                    n_folds=3, n_shuffles=2, n_boot=50, progress=False)
    >>> result.best_hook(), result.n_sequences
    ('blocks.1.hook_resid_post', 12)
    >>> row = result["blocks.1.hook_resid_post"]          # one HookResult per hook
    >>> round(row.r2.value, 3) == round(result.table()[1]["r2"], 3)
    True
    """
    hooks = _check_hooks(run, hooks)
    alphas = _check_options(alphas, n_shuffles)
    nested = bool(nested and n_folds >= 3)
    data, covariate_values, n_selected, folds = _select_tokens(run, target, span, covariates, n_folds, seed)
    if distributed.is_distributed():
        distributed.split(len(data.masks), "shards")  # a clear error when ranks outnumber shards
        distributed.check_same(
            {"data": _data_hash(run, data), "hooks": hooks, "alphas": alphas.tolist(), "n_folds": n_folds,
             "seed": seed, "n_shuffles": n_shuffles, "nested": nested, "standardize": standardize},
            "fit input",
        )
    oof, columns, n_sets = _control_targets(data, covariate_values, folds, n_folds, n_shuffles, seed)
    fits = _fit_hooks(run, data, hooks, folds, n_folds, columns, alphas, nested, standardize, n_shuffles, n_sets,
                      progress)
    predictions = _heldout_predictions(run, data, hooks, folds, fits, n_sets, progress)
    boot = SequenceBootstrap(data.sequence_ids, n_boot=n_boot, seed=seed)
    controls = _control_scores(data, oof, boot, covariate_values, hooks, n_boot, seed)
    names = list(oof)
    results = [_score_hook(hook, fits[hook], predictions[hook], data, oof, names, folds, n_folds, boot,
                           controls["token_mean_r2"], n_shuffles) for hook in hooks]
    notes = []
    if controls["embedding_hook"]:
        controls["embedding_r2"] = next(r.r2 for r in results if r.hook == EMBEDDING_HOOK)
    else:
        notes.append(f"no embedding-layer control: {EMBEDDING_HOOK} is not among the fitted hooks, so the "
                     "token-identity control is only the token-type mean; capture it (capture --layers adds "
                     "it) and fit it")
    notes += small_sample_warnings(units=data.n_sequences, unit_name="sequences")
    for note in notes:
        warnings.warn(note, stacklevel=2)
    by_source = (
        scores_by_source(
            dict(sources),
            data.sequence_ids,
            data.y,
            {name: oof[name] for name in ("token", "position", "bigram")},
            {hook: predictions[hook][:, 0] for hook in hooks},
            n_boot=n_boot,
            seed=seed,
        )
        if sources
        else {}
    )
    config = _sweep_config(data, hooks, alphas, n_folds, seed, n_shuffles, n_boot, nested, standardize,
                           covariate_values, n_selected)
    return SweepResult(
        model_id=str(run.model_id),
        d_model=int(run.d_model),
        model_fingerprint=dict((getattr(run, "manifest", None) or {}).get("model_fingerprint") or {}),
        target=data.name,
        config=config,
        hooks=results,
        controls=controls,
        n_tokens=data.n_tokens,
        n_sequences=data.n_sequences,
        data_hash=_data_hash(run, data),
        predictions={
            "sequence_ids": data.sequence_ids,
            "positions": data.positions,
            "span_positions": data.span_positions,
            "token_ids": data.token_ids,
            "folds": folds,
            "target": data.y,
            "token_mean": oof["token"],
            "position_mean": oof["position"],
            "bigram_mean": oof["bigram"],
            **{f"covariate:{name}": covariate_values[name] for name in covariate_values},
            **{f"pred:{hook}": predictions[hook][:, 0] for hook in hooks},
        },
        by_source=by_source,
        warnings=notes,
    )


# --- fit_sweep's steps, in order ----------------------------------------------------------------------

def _check_options(alphas, n_shuffles: int) -> np.ndarray:
    """The ridge grid, sorted (default ``DEFAULT_ALPHAS``); errors name the bad value."""
    alphas = np.sort(np.asarray(DEFAULT_ALPHAS if alphas is None else alphas, dtype=np.float64).reshape(-1))
    if len(alphas) == 0 or np.any(~np.isfinite(alphas)) or np.any(alphas <= 0):
        raise ValueError(f"alphas must be a non-empty list of finite values > 0, got {alphas.tolist()}")
    if n_shuffles < 0:
        raise ValueError(f"n_shuffles must be >= 0, got {n_shuffles}")
    return alphas


def _select_tokens(run, target, span: str, covariates, n_folds: int, seed: int):
    """Step 0: the tokens and their target (less those a covariate lacks), and folds by sequence."""
    data = select_target(run, target, span=span)
    covariate_values = _covariate_values(data, covariates)
    n_selected = data.n_tokens
    if covariate_values:
        keep = np.all([np.isfinite(v) for v in covariate_values.values()], axis=0)
        if not keep.any():
            raise ValueError(
                f"no token of target {data.name!r} has a value in every covariate "
                f"({sorted(covariate_values)}); are they from this capture?"
            )
        data = data.restrict(keep)
        covariate_values = {name: v[keep] for name, v in covariate_values.items()}
    try:
        folds = assign_folds(data.sequence_ids, n_folds, seed)
    except ValueError as error:
        raise ValueError(f"target {data.name!r}: {error}") from None
    for fold in range(n_folds):
        rest = data.y[folds != fold]
        if np.ptp(rest) == 0:
            raise ValueError(
                f"target {data.name!r} is constant ({rest[0]}) on the training tokens of fold {fold}; "
                "nothing to fit there (capture more varied sequences)"
            )
    return data, covariate_values, n_selected, folds


def _control_targets(data, covariate_values: dict, folds: np.ndarray, n_folds: int, n_shuffles: int, seed: int):
    """Step 1: the controls' cross-fitted predictions and the columns every hook's probe fits.

    Returns the controls' out-of-fold predictions (name -> per token), the target columns (the
    target, the target minus each control, then the shuffled targets) and the number of controls.
    """
    fitters = {
        "token": token_mean_fitter(data.token_ids, data.y),
        "position": position_fitter(data.positions, data.span_positions, data.y),
        "bigram": bigram_mean_fitter(data.previous_ids, data.token_ids, data.y),
        **{name: covariate_fitter(values, data.y) for name, values in covariate_values.items()},
    }
    # column f of each: on fold f the held-out prediction, on the other folds a prediction from
    # data without fold f and the token's own fold, so training residuals are not in-sample
    control_fits = {name: cross_fitted_predictions(fit, folds, n_folds) for name, fit in fitters.items()}
    rows = np.arange(data.n_tokens)
    oof = {name: fit[rows, folds] for name, fit in control_fits.items()}
    rng = np.random.default_rng(seed + 1)
    shuffled = [data.y[rng.permutation(data.n_tokens), None] for _ in range(n_shuffles)]
    columns = np.concatenate(
        [data.y[:, None], *(data.y[:, None] - fit for fit in control_fits.values()), *shuffled],
        axis=1,
    )
    return oof, columns, len(control_fits)


def _fit_hooks(run, data, hooks, folds, n_folds, columns, alphas, nested, standardize, n_shuffles, n_sets,
               progress) -> dict[str, HookFit]:
    """Step 2: one pass over the activations for every hook's statistics, then each hook's fits.

    Hooks run in parallel threads with one BLAS thread each: numpy releases the GIL inside BLAS
    and LAPACK, and multi-threaded BLAS on these few-hundred-wide matrices spin-waits, which is
    up to 10x slower whenever another process holds a core.
    """
    workers = max(1, min(len(hooks), os.cpu_count() or 1))
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        stats = accumulate(run, data, hooks, folds, n_folds, columns, pool, progress)

        def solve(hook: str) -> tuple[str, HookFit]:
            return hook, fit_hook(stats.pop(hook), alphas, nested, standardize, n_shuffles, n_sets)

        return dict(tqdm(pool.map(solve, hooks), total=len(hooks), desc="fit: solve", unit="hook",
                         disable=not progress))


def _heldout_predictions(run, data, hooks, folds, fits, n_sets: int, progress) -> dict[str, np.ndarray]:
    """Step 3: every token through the probe of its own held-out fold (per hook: target and residuals)."""
    predictions = {hook: np.zeros((data.n_tokens, 1 + n_sets)) for hook in hooks}
    offset = 0
    for index, shard in enumerate(
        tqdm(run.shards(), total=getattr(run, "n_shards", None), desc="fit: held-out predictions", unit="shard",
             disable=not progress)
    ):
        mask = data.masks[index]
        count = int(mask.sum())
        if count == 0:
            continue
        chunk = slice(offset, offset + count)
        offset += count
        if not distributed.owns(index):
            continue  # another rank's rows; summed in below
        shard_folds = folds[chunk]
        for hook in hooks:
            X = np.asarray(shard.activations(hook)[mask], dtype=np.float64).reshape(count, -1)
            fit = fits[hook]
            # every token through every outer fold's probe, for the target and each residual target
            per_fold = einops.einsum(X, fit.outer_coef, "n d, fold t d -> n fold t") + fit.outer_intercept[None]
            predictions[hook][chunk] = per_fold[np.arange(count), shard_folds]
    if distributed.is_distributed():
        predictions = dict(zip(hooks, distributed.all_reduce_sum([predictions[h] for h in hooks]), strict=True))
    return predictions


def _control_scores(data, oof: dict, boot: SequenceBootstrap, covariate_values: dict, hooks, n_boot: int,
                    seed: int) -> dict:
    """Step 4a: each control's own held-out R² and r (the baselines every probe is read against)."""
    baseline_r2 = {name: boot.r2(data.y, prediction) for name, prediction in oof.items()}
    return {
        "token_mean_r2": baseline_r2["token"],
        "token_mean_r": boot.pearson(data.y, oof["token"]),
        "position_r2": baseline_r2["position"],
        "position_r": boot.pearson(data.y, oof["position"]),
        "bigram_r2": baseline_r2["bigram"],
        "bigram_r": boot.pearson(data.y, oof["bigram"]),
        "covariate_r2": {name: baseline_r2[name] for name in covariate_values},
        "embedding_hook": EMBEDDING_HOOK if EMBEDDING_HOOK in hooks else None,
        "surprise_entropy_r": (
            SequenceBootstrap(data.pair_sequence_ids, n_boot=n_boot, seed=seed).pearson(
                data.pair_surprise, data.pair_entropy
            )
            if len(data.pair_surprise) > 2
            else None
        ),
    }


def _score_hook(hook: str, fit: HookFit, pred: np.ndarray, data, oof: dict, names: list[str], folds, n_folds: int,
                boot: SequenceBootstrap, token_mean_r2, n_shuffles: int) -> HookResult:
    """Step 4b: one hook's held-out scores: R² and r with CIs, per fold, beyond each control, shuffle p."""
    r2 = boot.r2(data.y, pred[:, 0])
    fold_r2 = []
    for fold in range(n_folds):
        y_fold = data.y[folds == fold]
        fold_r2.append(float(1 - np.sum((y_fold - pred[folds == fold, 0]) ** 2)
                             / np.sum((y_fold - y_fold.mean()) ** 2)))
    exceed = sum(value >= r2.value for value in fit.shuffle_r2)
    beyond = {name: boot.r2(data.y - oof[name], pred[:, 1 + r]) for r, name in enumerate(names)}
    return HookResult(
        hook=hook,
        depth=float(hook_depth(hook)),
        layer=hook_layer(hook),
        alpha=fit.alpha,
        fold_alphas=fit.fold_alphas,
        r2=r2,
        pearson_r=boot.pearson(data.y, pred[:, 0]),
        residual_r2=beyond.pop("token"),
        shuffle_r2=fit.shuffle_r2,
        shuffle_p=(1 + exceed) / (1 + n_shuffles) if n_shuffles else float("nan"),
        selectivity=r2.value - token_mean_r2.value,
        cv_r2_by_alpha=fit.cv_r2_by_alpha,
        fold_r2=fold_r2,
        stats_r2=fit.stats_r2,
        coef=fit.coef,
        intercept=fit.intercept,
        projection_mean=fit.projection_mean,
        projection_std=fit.projection_std,
        beyond_r2=beyond,
    )


def _sweep_config(data, hooks, alphas, n_folds, seed, n_shuffles, n_boot, nested, standardize, covariate_values,
                  n_selected) -> dict:
    """What the sweep did, in words and numbers (``SweepResult.config``)."""
    return {
        "target": data.name,
        "hooks": hooks,
        "alphas": alphas.tolist(),
        "n_folds": n_folds,
        "seed": seed,
        "n_shuffles": n_shuffles,
        "n_boot": n_boot,
        "nested": nested,
        "standardize": standardize,
        "folds": "grouped by sequence id (seeded permutation, round-robin)",
        "controls": {
            "residual_training_targets": "cross-fitted: each training token's control prediction comes from "
            "folds other than the held-out fold and its own (needs >= 3 folds)",
            "token": "mean target per token type on the training folds (unseen -> training mean)",
            "position": "ridge (alpha 1e-3) on one-hot bins of position in sequence and in scored span",
            "bigram": "mean target per (previous, current) token pair (unseen -> token type -> training mean)",
            **{name: "ridge on the covariate and one-hot bins of its training quantiles" for name in covariate_values},
        },
        "covariates": sorted(covariate_values),
        "span": data.span,
        "span_rule": SPANS[data.span],
        "n_tokens_outside_span": data.n_outside_span,
        "n_tokens_selected": n_selected,
        "n_tokens_dropped_for_covariates": n_selected - data.n_tokens,
    }
