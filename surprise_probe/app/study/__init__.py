"""The main job on one model, end to end, into one output folder: a list of stages.

:func:`run_study` takes a loaded model (loaded once, by the caller) and the inputs, and runs
each :class:`Stage` in order, each into its own sub-folder:

1. ``capture/``: every layer's residual stream, input surprise and output entropy;
2. ``fit_surprise/``, ``fit_entropy/``: ridge probes at every layer, with controls (and the
   probe direction at every hook, ``directions/``);
3. ``steer/``: steering along the best surprise direction (dose-response against random
   directions) and its directional ablation;
4. ``compare/``: the same dose-response along the entropy probe's directions, side by side with
   the surprise direction (is it the surprise direction, or any entropy-related one?);
5. ``patch/``: activation patching along the surprise direction between on-policy reads (the
   model's own sampled answer, exact ids) and off-policy reads (its answer to a prompt of another
   topic, read under this prompt), with the pairs saved in ``pairs.json``;
6. ``attribution/``: attribution patching on the same pairs, validated against exact patching,
   and the token view's data (one input, every per-token quantity at every layer);
7. ``gap/``: the on/off-policy entropy gap, read by the model and, when installed, by a base
   model (``base_reader``, e.g. gemma-3-270m);
8. ``intention/``: the cached-intention analysis on open-ended prompts;
9. ``report.html`` (the ``report`` stage): one self-contained page with every stage's figure,
   numbers (CI, control, n) and links to its JSON; ``index.html`` points to it.

Each stage records its settings (``<stage>/config.json``). A rerun skips a finished stage whose
settings match, refuses one whose settings differ (naming the setting), or, with
``overwrite=True``, recomputes it. A stage that fails is recorded in ``study.json`` with its
error, the stages that do not need it still run, and the report names it.
Other stages can be added: ``run_study(..., stages=[*default_stages()[:-1], my_stage, report])``.

The study lives in the app layer: no library module imports it. ``settings`` holds its sizes and
the time estimate, ``stages`` the stages (each with its report sections), ``runner`` the loop.
"""

from surprise_probe.app.study.runner import StudyResult, check_stages, run_study
from surprise_probe.app.study.settings import (
    DEFAULT_SETTINGS,
    PATCH_GROUPS,
    QUICK_SETTINGS,
    calibration_forward_seconds,
    describe_sizes,
    estimate_seconds,
    patch_layers,
)
from surprise_probe.app.study.stages import (
    Stage,
    StudyContext,
    build_policy_pairs,
    default_stages,
    direction_path,
    report_sections,
)

__all__ = [
    "Stage",
    "StudyContext",
    "StudyResult",
    "run_study",
    "default_stages",
    "report_sections",
    "check_stages",
    "estimate_seconds",
    "calibration_forward_seconds",
    "describe_sizes",
    "patch_layers",
    "build_policy_pairs",
    "direction_path",
    "DEFAULT_SETTINGS",
    "QUICK_SETTINGS",
    "PATCH_GROUPS",
]
