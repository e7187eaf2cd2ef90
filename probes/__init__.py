"""Linear probes on captured activations: ridge / logistic, grouped CV, controls, directions.

>>> import surprise_probe as sp, probes                           # doctest: +SKIP
>>> result = probes.fit_sweep(sp.load_capture("runs/capture"))    # doctest: +SKIP
>>> direction = result.direction()                                # doctest: +SKIP
"""

from surprise_probe.probes.controls import token_mean_predictions
from surprise_probe.probes.data import ArrayCapture
from surprise_probe.probes.direction import ProbeDirection
from surprise_probe.probes.folds import GroupedKFold, assign_folds
from surprise_probe.probes.logistic import LogisticProbe, cross_validate_classifier
from surprise_probe.probes.results import HookResult, SweepResult
from surprise_probe.probes.ridge import (
    RidgeProbe,
    RidgeSolution,
    RidgeStats,
    heldout_sums,
    solve_ridge,
)
from surprise_probe.probes.scoring import Estimate, SequenceBootstrap
from surprise_probe.probes.sweep import DEFAULT_ALPHAS, fit_sweep
from surprise_probe.probes.targets import TokenTarget, load_target_file, select_target

__all__ = [
    "fit_sweep",
    "SweepResult",
    "HookResult",
    "DEFAULT_ALPHAS",
    "RidgeProbe",
    "LogisticProbe",
    "cross_validate_classifier",
    "ProbeDirection",
    "RidgeStats",
    "RidgeSolution",
    "solve_ridge",
    "heldout_sums",
    "GroupedKFold",
    "assign_folds",
    "TokenTarget",
    "select_target",
    "load_target_file",
    "token_mean_predictions",
    "Estimate",
    "SequenceBootstrap",
    "ArrayCapture",
]
