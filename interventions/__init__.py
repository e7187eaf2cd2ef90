"""Interventions along a direction: steer, clamp, ablate and patch; dose-response experiments.

>>> from surprise_probe.interventions import Steer, dose_response, activation_patching   # doctest: +SKIP
See docs/interventions.md.
"""

from surprise_probe.interventions.attribution import (
    AttributionPatching,
    attribution_patching,
    direction_attribution,
    validate_attribution,
)
from surprise_probe.interventions.dose_response import (
    Ablation,
    DoseResponse,
    directional_ablation,
    dose_response,
)
from surprise_probe.interventions.norm_control import NormControlResult, norm_control
from surprise_probe.interventions.patching import (
    PatchingResult,
    activation_patching,
    align_positions,
)
from surprise_probe.interventions.steered_generation import Sample, generate
from surprise_probe.interventions.steering_sweep import SweepTable, run_sweep

from surprise_probe.core.forward.directions import (
    SteeringDirection,
    from_probe,
    orthogonal_direction,
    random_directions,
)
from surprise_probe.core.forward.edits import (
    Ablate,
    Clamp,
    Intervention,
    Patch,
    Replace,
    Steer,
    Touched,
    apply_all,
    resid_hooks,
)

__all__ = [
    "Intervention",
    "Steer",
    "Clamp",
    "Ablate",
    "Patch",
    "Replace",
    "Touched",
    "apply_all",
    "resid_hooks",
    "SteeringDirection",
    "from_probe",
    "random_directions",
    "orthogonal_direction",
    "DoseResponse",
    "Ablation",
    "dose_response",
    "directional_ablation",
    "SweepTable",
    "run_sweep",
    "PatchingResult",
    "activation_patching",
    "align_positions",
    "AttributionPatching",
    "attribution_patching",
    "validate_attribution",
    "direction_attribution",
    "Sample",
    "generate",
    "NormControlResult",
    "norm_control",
]
