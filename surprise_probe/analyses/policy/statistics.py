"""The gap's statistics: per cell, per paired comparison, by position, and the reader x writer matrix.

Per reader x format x source, CIs over prompts (prompt = unit): mean entropy over the span and over
the first ``k`` tokens; entropy by position; per-prompt paired differences (off - on) with a sign
count and sign test; the off/on ratio with a paired bootstrap CI; the AUROC of telling own from
off-policy responses by mean entropy alone (lower = own) with a DeLong CI, and, given a probe
direction, by the probe's mean readout over the span. Empty responses are counted per cell and
left out of every mean.

Beside the entropy AUROC, the same comparison gives the AUROC of the zero-shot detectors of
model-written text in :data:`DETECTORS` (mean log-likelihood, mean log-rank, Fast-DetectGPT's
analytic criterion, Binoculars), each from the same reads, each oriented so that a higher score
means "written by the reader" (own = the positives), with the same DeLong CI.
:func:`temperature_curve` gives the off/on ratio against own responses sampled at other
temperatures.

A statistic given too few units says so instead of a degenerate number: a CI over prompts needs at
least 2 prompts and a DeLong CI at least 2 responses on each side (else its bounds are NaN and a
``note`` says what it needs); ``own_other_prompt`` needs at least 2 prompts; the summary's
``warnings`` list every such case, and CIs from fewer than ``MIN_UNITS`` prompts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.stats
from jaxtyping import Float

from surprise_probe.analyses.policy.reading import Reading
from surprise_probe.core.utils.stats import bootstrap_sums, small_sample_warnings

__all__ = ["auroc_with_ci", "summarize", "DETECTORS", "response_statistics", "temperature_curve"]


def auroc_with_ci(
    positives: Float[np.ndarray, " m"], negatives: Float[np.ndarray, " n"], level: float = 0.95
) -> dict:
    """AUROC = P(score of a positive > score of a negative) (+ half the ties), with a DeLong CI.

    >>> auroc_with_ci(np.array([3.0, 4.0]), np.array([1.0, 2.0]))["auroc"]
    1.0
    """
    pos, neg = np.asarray(positives, np.float64), np.asarray(negatives, np.float64)
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        return {"auroc": float("nan"), "low": float("nan"), "high": float("nan"), "n_pos": m, "n_neg": n,
                "note": f"no AUROC: it needs responses on both sides, got {m} and {n}"}
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    auc = float(psi.mean())
    if m < 2 or n < 2:  # DeLong's variance needs a spread on each side; one response has none
        return {"auroc": auc, "low": float("nan"), "high": float("nan"), "n_pos": m, "n_neg": n, "level": level,
                "method": "DeLong", "note": f"no CI: a DeLong CI needs at least 2 responses on each side, got {m} "
                                            f"and {n}"}
    v10, v01 = psi.mean(1), psi.mean(0)
    var = (v10.var(ddof=1) / m if m > 1 else 0.0) + (v01.var(ddof=1) / n if n > 1 else 0.0)
    z = scipy.stats.norm.ppf(0.5 + level / 2)
    half = z * math.sqrt(max(var, 0.0))
    return {"auroc": auc, "low": max(0.0, auc - half), "high": min(1.0, auc + half), "n_pos": m, "n_neg": n,
            "level": level, "method": "DeLong"}


# Each detector: the per-response statistic it reads (a key of :func:`response_statistics` and of
# ``per_response`` in gap.json), its sign (score = sign x statistic, so a higher score means
# on-policy: written by the reader), what it measures, and which direction means on-policy.
DETECTORS: dict[str, dict] = {
    "entropy": {
        "statistic": "mean_entropy", "sign": -1,
        "measures": "mean output entropy of the reader over the response (its uncertainty about each next token)",
        "on_policy": "lower mean entropy",
    },
    "log_likelihood": {
        "statistic": "mean_log_likelihood", "sign": 1,
        "measures": "mean over response tokens of log p(x_t | x_<t) under the reader",
        "on_policy": "higher mean log-likelihood",
    },
    "log_rank": {
        "statistic": "mean_log_rank", "sign": -1,
        "measures": "mean over response tokens of the log of x_t's rank in the reader's next-token distribution "
                    "(rank 1 = its top token; ties share the best rank)",
        "on_policy": "lower mean log-rank (score = minus the mean log-rank)",
    },
    "fast_detectgpt": {
        "statistic": "fast_detectgpt", "sign": 1,
        "measures": "Fast-DetectGPT's analytic criterion (Bao et al. 2023), the reader sampling and scoring: "
                    "sum_t (log p(x_t) - mu_t) / sqrt(sum_t var_t), mu_t and var_t the mean and variance of "
                    "log p(X) for X drawn from the reader's distribution at t",
        "on_policy": "higher criterion",
    },
    "binoculars": {
        "statistic": "binoculars", "sign": -1,
        "measures": "Binoculars (Hans et al. 2024): the reader's log-perplexity of the response divided by the "
                    "cross-perplexity mean_t(-sum_v q_t(v) log p_t(v)), p the reader (performer) and q an observer "
                    "model with the same tokenizer, on the same ids",
        "on_policy": "lower Binoculars score (score = minus it)",
    },
}


def response_statistics(r: Reading) -> dict[str, float]:
    """Each detector's per-response statistic (NaN where undefined: an empty response, zero
    variance, no observer). Keys: the ``statistic`` of each entry of :data:`DETECTORS`."""
    nan = float("nan")
    if not len(r.entropy):
        return {d["statistic"]: nan for d in DETECTORS.values()}
    variance = float(np.sum(r.log_likelihood_variance)) if len(r.log_likelihood_variance) else nan
    fast = (float(np.sum(r.log_likelihood - r.expected_log_likelihood)) / math.sqrt(variance)
            if variance > 0 else nan)
    cross = float(np.mean(r.cross_entropy)) if len(r.cross_entropy) == len(r.entropy) else nan
    return {
        "mean_entropy": float(np.mean(r.entropy)),
        "mean_log_likelihood": float(np.mean(r.log_likelihood)) if len(r.log_likelihood) else nan,
        "mean_log_rank": float(np.mean(r.log_rank)) if len(r.log_rank) else nan,
        "fast_detectgpt": fast,
        "binoculars": -float(np.mean(r.log_likelihood)) / cross if cross > 0 else nan,
    }


def _ci(values: np.ndarray, n_boot: int, level: float, seed: int) -> dict:
    """Mean of per-prompt values with a bootstrap CI over prompts."""
    values = np.asarray(values, np.float64)
    if len(values) == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n_prompts": 0}
    if len(values) < 2:
        return {"mean": float(values.mean()), "low": float("nan"), "high": float("nan"), "n_prompts": len(values),
                "note": _NO_CI.format(n=len(values))}
    point, low, high = bootstrap_sums(np.divide, values, np.ones_like(values), n_boot=n_boot, level=level, seed=seed)
    return {"mean": point, "low": low, "high": high, "n_prompts": len(values)}


_NO_CI = "no CI: a CI over prompts needs at least 2 prompts, got {n}"


def _per_prompt(readings: list[Reading], k: int | None) -> dict[int, float]:
    """Per prompt: mean over its responses of each response's mean entropy (first k tokens if k)."""
    values: dict[int, list[float]] = {}
    for r in readings:
        if len(r.entropy):
            values.setdefault(r.prompt_index, []).append(float(r.entropy[:k].mean()))
    return {i: float(np.mean(v)) for i, v in values.items()}


def _paired(on: dict[int, float], off: dict[int, float], n_boot: int, level: float, seed: int) -> dict:
    shared = sorted(set(on) & set(off))
    a, b = np.array([off[i] for i in shared]), np.array([on[i] for i in shared])
    if not shared:
        return {"n_prompts": 0}
    ratio = bootstrap_sums(np.divide, a, b, n_boot=n_boot, level=level, seed=seed)
    ratio_row = {"value": ratio[0], "low": ratio[1], "high": ratio[2]}
    if len(shared) < 2:  # one prompt: every resample is that prompt, so the "interval" is the point
        ratio_row.update(low=float("nan"), high=float("nan"), note=_NO_CI.format(n=len(shared)))
    diff = _ci(a - b, n_boot, level, seed)
    n_higher = int((a > b).sum())
    n_lower = int((a < b).sum())
    p = scipy.stats.binomtest(n_higher, n_higher + n_lower).pvalue if n_higher + n_lower else float("nan")
    return {
        "n_prompts": len(shared),
        "ratio_off_on": ratio_row,
        "difference_off_minus_on": diff,
        "sign_count": {"off_higher": n_higher, "off_lower": n_lower, "ties": len(shared) - n_higher - n_lower,
                       "sign_test_p": p},
    }


def summarize(
    readings: Sequence[Reading], *, k: int = 8, max_position: int = 48, n_boot: int = 1000, level: float = 0.95,
    seed: int = 0, binoculars: Mapping[str, dict] | None = None,
) -> dict:
    """Cells, paired comparisons against ``own``, AUROCs, position curves and the reader x writer matrix.

    ``binoculars`` maps a reader to ``{"available": bool, "observer": name or None, "reason": str}``
    (why a reader has no Binoculars score); by default it is read off the readings.
    """
    binoculars = dict(binoculars or {})
    for reader in {r.reader for r in readings} - set(binoculars):
        observer = next((r.observer for r in readings if r.reader == reader and r.observer), None)
        binoculars[reader] = {"available": observer is not None, "observer": observer,
                              "reason": None if observer else "no observer model read these texts"}
    groups: dict[tuple[str, str, str], list[Reading]] = {}
    for r in readings:
        groups.setdefault((r.reader, r.format, r.source), []).append(r)
    cells, comparisons, curves = [], [], []
    for (reader, fmt, source), rs in sorted(groups.items()):
        cells.append({"reader": reader, "format": fmt, "source": source,
                      **_cell(rs, k=k, n_boot=n_boot, level=level, seed=seed)})
        curve = _position_curve(rs, max_position=max_position, n_boot=n_boot, level=level, seed=seed)
        if curve is not None:
            curves.append({"reader": reader, "format": fmt, "source": source, **curve})
    for (reader, fmt, source), rs in sorted(groups.items()):
        if source == "own" or (reader, fmt, "own") not in groups:
            continue
        comparisons.append({"reader": reader, "format": fmt, "source": source,
                            **_comparison(groups[(reader, fmt, "own")], rs, k=k, n_boot=n_boot, level=level,
                                          seed=seed, binoculars=binoculars[reader])})
    detectors = {name: {"key": f"auroc_{name}", **spec} for name, spec in DETECTORS.items()}
    detectors["binoculars"].update(
        available=any(b["available"] for b in binoculars.values()),
        readers={reader: dict(b) for reader, b in sorted(binoculars.items())})
    return {"cells": cells, "comparisons": comparisons, "curves": curves, "matrix": _matrix(cells),
            "detectors": detectors, "warnings": _warnings(readings, comparisons)}


def _warnings(readings: Sequence[Reading], comparisons: list[dict]) -> list[str]:
    """What the sample is too small for, saying how many it needs (empty when nothing is)."""
    n_prompts = len({r.prompt_index for r in readings})
    notes = []
    if n_prompts < 2:
        notes.append(f"{n_prompts} prompt: own_other_prompt (a reader's own response to another prompt) needs at "
                     "least 2 prompts, so it is not read; CIs over prompts need at least 2, so none is given")
    notes += small_sample_warnings(units=n_prompts, unit_name="prompts") if n_prompts >= 2 else []
    for row in comparisons:
        for key in ("auroc_entropy", "auroc_probe"):
            note = (row.get(key) or {}).get("note")
            if note:
                notes.append(f"{row['reader']} {row['format']} {row['source']} {key}: {note}")
    return list(dict.fromkeys(notes))


def _cell(rs: list[Reading], *, k: int, n_boot: int, level: float, seed: int) -> dict:
    """Sizes and mean entropy (span and first ``k`` tokens, CIs over prompts) of one reader x format x source."""
    tokens = np.concatenate([r.entropy for r in rs]) if rs else np.zeros(0)
    lengths = np.array([len(r.entropy) for r in rs])
    whole, first = _per_prompt(rs, None), _per_prompt(rs, k)
    return {
        "n_responses": len(rs), "n_empty": int((lengths == 0).sum()),
        "n_truncated": int(sum(r.truncated > 0 for r in rs)),
        "n_exact_ids": int(sum(r.exact_ids for r in rs)),
        "n_tokens": int(len(tokens)), "mean_length": float(lengths.mean()) if len(rs) else float("nan"),
        "mean_entropy": _ci(np.array(list(whole.values())), n_boot, level, seed),
        f"mean_entropy_first_{k}": _ci(np.array(list(first.values())), n_boot, level, seed),
        "n_tokens_first_k": int(sum(min(len(r.entropy), k) for r in rs)),
    }


def _position_curve(rs: list[Reading], *, max_position: int, n_boot: int, level: float, seed: int) -> dict | None:
    """Entropy by position: per prompt, the mean over its responses at each position; CIs over prompts."""
    per_prompt: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for r in rs:
        s, c = per_prompt.setdefault(r.prompt_index, (np.zeros(max_position), np.zeros(max_position)))
        e = r.entropy[:max_position]
        s[: len(e)] += e
        c[: len(e)] += 1
    if not per_prompt:
        return None
    sums = np.stack([v[0] for v in per_prompt.values()], 1)
    counts = np.stack([v[1] for v in per_prompt.values()], 1)
    point, low, high = bootstrap_sums(np.divide, sums, counts, n_boot=n_boot, level=level, seed=seed)
    if len(per_prompt) < 2:  # one prompt: no interval over prompts
        low, high = np.full_like(point, np.nan), np.full_like(point, np.nan)
    return {"mean": point, "low": low, "high": high, "n_tokens": counts.sum(1)}


def _comparison(own: list[Reading], rs: list[Reading], *, k: int, n_boot: int, level: float, seed: int,
                binoculars: dict | None = None) -> dict:
    """One off-policy source against ``own``: paired statistics (span, first ``k``) and AUROCs."""
    on_whole, off_whole = _per_prompt(own, None), _per_prompt(rs, None)
    on_first, off_first = _per_prompt(own, k), _per_prompt(rs, k)
    row = {"span": _paired(on_whole, off_whole, n_boot, level, seed),
           f"first_{k}": _paired(on_first, off_first, n_boot, level, seed)}
    # AUROC per detector: own responses are the positives and every score is oriented so that
    # higher means own (0.5 = indistinguishable); e.g. entropy's score is -mean entropy.
    own_stats = [response_statistics(r) for r in own if len(r.entropy)]
    off_stats = [response_statistics(r) for r in rs if len(r.entropy)]
    for name, spec in DETECTORS.items():
        if name == "binoculars" and not (binoculars or {}).get("available"):
            row["auroc_binoculars"] = {"available": False,
                                       "reason": (binoculars or {}).get("reason") or "no observer model"}
            continue
        on = np.array([spec["sign"] * x[spec["statistic"]] for x in own_stats])
        off = np.array([spec["sign"] * x[spec["statistic"]] for x in off_stats])
        auroc = auroc_with_ci(on[np.isfinite(on)], off[np.isfinite(off)], level)
        auroc.update(available=True, n_undefined=int((~np.isfinite(on)).sum() + (~np.isfinite(off)).sum()))
        if name == "binoculars":
            auroc["observer"] = binoculars["observer"]
        row[f"auroc_{name}"] = auroc
    own_probe = np.array([r.probe_readout for r in own if np.isfinite(r.probe_readout)])
    off_probe = np.array([r.probe_readout for r in rs if np.isfinite(r.probe_readout)])
    if len(own_probe) and len(off_probe):
        # The surprise probe reads lower predicted surprise on own text: score = -readout.
        row["auroc_probe"] = auroc_with_ci(-own_probe, -off_probe, level)
    return row


def _matrix(cells: list[dict]) -> dict:
    """Per format: reader x writer mean entropy (writer = reader is the on-policy read)."""
    out: dict[str, dict] = {}
    for cell in cells:
        source = cell["source"]
        if source == "own":
            writer = cell["reader"]
        elif source.startswith("writer:"):
            writer = source.split(":", 1)[1]
        elif source == "human":
            writer = "human"
        else:
            continue
        out.setdefault(cell["format"], {}).setdefault(cell["reader"], {})[writer] = cell["mean_entropy"]
    return out


def temperature_curve(
    readings: Sequence[Reading],
    by_temperature: Mapping[float, Sequence[Reading]],
    formats: Mapping[str, str],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> list[dict]:
    """Off/on mean-entropy ratio per reader, off-policy source and sampling temperature.

    ``by_temperature[T]``: the reads of each reader's own responses sampled at ``T`` (sources
    ``own`` and ``own_other_prompt``) in the format ``formats[reader]`` (the one it samples in,
    where read); the other sources (``writer:<model>``, ``human``) are the reads in ``readings``,
    which do not depend on ``T``. One row per (reader, source, T): the ratio with its paired bootstrap CI over prompts,
    ``n`` prompts, and the reader's own mean entropy at ``T`` with its CI.
    """
    rows = []
    for temperature in sorted(by_temperature):
        at_t = by_temperature[temperature]
        for reader, fmt in formats.items():
            own = [r for r in at_t if (r.reader, r.format, r.source) == (reader, fmt, "own")]
            if not own:
                continue
            on = _per_prompt(own, None)
            off_sources: dict[str, list[Reading]] = {}
            for r in readings:
                if r.reader == reader and r.format == fmt and r.source not in ("own", "own_other_prompt"):
                    off_sources.setdefault(r.source, []).append(r)
            other = [r for r in at_t if (r.reader, r.format, r.source) == (reader, fmt, "own_other_prompt")]
            if other:
                off_sources["own_other_prompt"] = other
            own_mean = _ci(np.array(list(on.values())), n_boot, level, seed)
            for source, rs in sorted(off_sources.items()):
                paired = _paired(on, _per_prompt(rs, None), n_boot, level, seed)
                ratio = paired.get("ratio_off_on", {})
                row = {"reader": reader, "format": fmt, "temperature": float(temperature), "source": source,
                       "ratio": ratio.get("value", float("nan")),
                       "ci": [ratio.get("low", float("nan")), ratio.get("high", float("nan"))],
                       "n": paired["n_prompts"], "level": level,
                       "mean_entropy_own": own_mean, "n_empty_own": sum(not len(r.entropy) for r in own)}
                if ratio.get("note"):
                    row["note"] = ratio["note"]
                rows.append(row)
    return sorted(rows, key=lambda r: (r["reader"], r["format"], r["source"], r["temperature"]))
