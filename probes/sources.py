"""Held-out probe scores split by the source of each sequence (e.g. on-policy vs other text).

A probe fitted on a mix of sources (the model's own samples and human-written text) can score
well overall while being miscalibrated on one of them. :func:`scores_by_source` reports, per
source label, the held-out R² (around that source's own mean) and the calibration of the target
on the prediction (least-squares ``target ≈ intercept + slope × prediction``; slope 1 and
intercept 0 for a calibrated probe), each with a bootstrap CI over that source's sequences.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from jaxtyping import Float, Int
from surprise_probe.probes.scoring import Estimate, SequenceBootstrap

from surprise_probe.core.utils.jsonio import read_jsonl

__all__ = ["calibration", "scores_by_source", "read_source_labels", "UNLABELLED"]

UNLABELLED = "unlabelled"


def read_source_labels(path, n_sequences: int | None = None) -> dict[int, str]:
    """Source labels from the inputs file a capture was made from: the ``source`` key of each line.

    Sequence ``i`` of a capture is the ``i``-th non-blank line of its input file; lines without a
    ``source`` key are left unlabelled. With ``n_sequences``, a file with another number of
    lines is refused (it is not the capture's input).

    >>> import json, tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "inputs.jsonl"
    >>> rows = [{"text": "mine", "source": "own-sample"}, {"text": "theirs", "source": "human"}, {"text": "?"}]
    >>> _ = path.write_text("".join(json.dumps(row) + chr(10) for row in rows))
    >>> read_source_labels(path, n_sequences=3)
    {0: 'own-sample', 1: 'human'}
    """
    labels, count = {}, 0
    for index, (number, value) in enumerate(read_jsonl(path)):
        count += 1
        if isinstance(value, dict) and "source" in value:
            if not isinstance(value["source"], str) or not value["source"]:
                raise ValueError(f"{path}:{number}: 'source' must be a non-empty string, got {value['source']!r}")
            labels[index] = value["source"]
    if n_sequences is not None and count != n_sequences:
        raise ValueError(
            f"{path} has {count} inputs but the capture has {n_sequences} sequences; "
            "expected the input file the capture was made from"
        )
    if not labels:
        raise ValueError(f"{path} has no 'source' key on any line; expected e.g. {{\"source\": \"own-sample\", ...}}")
    return labels


def calibration(
    boot: SequenceBootstrap, y: Float[np.ndarray, " n"], prediction: Float[np.ndarray, " n"]
) -> tuple[Estimate, Estimate]:
    """Slope and intercept of ``y`` regressed on ``prediction``, CIs over ``boot``'s sequences.

    >>> rng = np.random.default_rng(0); p = rng.normal(size=400)
    >>> boot = SequenceBootstrap(np.repeat(np.arange(40), 10), n_boot=200)
    >>> slope, intercept = calibration(boot, 2 * p + 1, p)
    >>> round(slope.value, 6), round(intercept.value, 6)
    (2.0, 1.0)
    """
    y = np.asarray(y, np.float64)
    prediction = np.asarray(prediction, np.float64)
    centre_p, centre_y = prediction.mean(), y.mean()
    p, t = prediction - centre_p, y - centre_y  # centred for precision; undone below
    columns = np.stack([np.ones_like(p), p, p * p, t, p * t], axis=1)

    def slope(n, sp, spp, st, spt):
        return (spt - sp * st / n) / (spp - sp * sp / n)

    def intercept(n, sp, spp, st, spt):
        # back to raw units: y - cy = slope (p - cp) + b  =>  y = slope p + (b + cy - slope cp)
        b = slope(n, sp, spp, st, spt)
        return st / n - b * sp / n + centre_y - b * centre_p

    return boot.estimate(slope, columns), boot.estimate(intercept, columns)


def scores_by_source(
    sources: Mapping[int, str],
    sequence_ids: Int[np.ndarray, " n"],
    y: Float[np.ndarray, " n"],
    baselines: Mapping[str, Float[np.ndarray, " n"]],
    hook_predictions: Mapping[str, Float[np.ndarray, " n"]],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Per source label: sizes, baseline R², and per hook R² and calibration (held-out predictions).

    ``sources`` maps sequence id -> label; sequences it lacks are labelled ``"unlabelled"``.
    ``baselines`` / ``hook_predictions``: held-out predictions on the same tokens as ``y``.
    """
    sequence_ids = np.asarray(sequence_ids)
    labels = np.array([str(sources.get(int(s), UNLABELLED)) for s in sequence_ids])
    out = {}
    for label in sorted(set(labels.tolist())):
        inside = labels == label
        if len(np.unique(sequence_ids[inside])) < 2 or np.ptp(y[inside]) == 0:
            out[label] = {
                "n_sequences": int(len(np.unique(sequence_ids[inside]))),
                "n_tokens": int(inside.sum()),
                "note": "too few sequences or a constant target: no scores",
            }
            continue
        boot = SequenceBootstrap(sequence_ids[inside], n_boot=n_boot, seed=seed)
        target = y[inside]
        hooks = {}
        for hook, prediction in hook_predictions.items():
            slope, intercept = calibration(boot, target, prediction[inside])
            hooks[hook] = {
                "r2": boot.r2(target, prediction[inside]),
                "calibration_slope": slope,
                "calibration_intercept": intercept,
                "mean_prediction": float(prediction[inside].mean()),
            }
        out[label] = {
            "n_sequences": int(len(np.unique(sequence_ids[inside]))),
            "n_tokens": int(inside.sum()),
            "mean_target": float(target.mean()),
            "baseline_r2": {name: boot.r2(target, p[inside]) for name, p in baselines.items()},
            "hooks": hooks,
        }
    return out
