"""Entropy vs surprise direction comparison on a tiny model."""

import numpy as np
import pytest
from surprise_probe.interventions.direction_comparison import (
    compare_directions,
    direction_comparison_figure,
    entropy_direction_comparison,
)
from surprise_probe.interventions.dose_response import dose_response
from surprise_probe.probes import ProbeDirection, fit_sweep

import surprise_probe as sp
from surprise_probe.testing import TINY_CORPUS

HOOK = "blocks.1.hook_resid_post"


def direction(vector, hook=HOOK, std=1.0, model=None):
    return ProbeDirection(np.asarray(vector) / np.linalg.norm(vector), mean=0.0, std=std, hook=hook, layer=1,
                          model_id=model.cfg.model_name, d_model=model.cfg.d_model, target="t")


def test_comparison_matches_separate_dose_responses_and_cosines(tiny_hooked, one_thread, tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, tiny_hooked.cfg.d_model))
    directions = {"a": direction(a, model=tiny_hooked), "b": direction(b, std=2.0, model=tiny_hooked)}
    strengths = [-1.0, 0.0, 1.0]
    result = compare_directions(tiny_hooked, TINY_CORPUS[:3], directions, strengths, random_directions=2,
                                n_boot=50, progress=False)
    alone = dose_response(tiny_hooked, TINY_CORPUS[:3], directions["b"], strengths, random_directions=2,
                          orthogonal=False, n_boot=50, progress=False)
    assert np.allclose(result.responses[1].entropy, alone.entropy)
    assert result.responses[1].probe_slope == pytest.approx(alone.probe_slope)
    expected = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert result.cosines[0][1] == pytest.approx(expected) and result.cosines[1][1] == pytest.approx(1.0)
    rows = result.summary_rows()
    assert [r["label"] for r in rows] == ["a", "b"] and rows[1]["std"] == 2.0
    assert len(rows[0]["kl_at_max_strength"]) == 2  # strengths -1 and +1
    paths = result.save(tmp_path)
    assert paths["json"].exists() and paths["html"].exists()
    assert "cosines" in result.to_markdown()
    names = {trace.name for trace in direction_comparison_figure(result).data}
    assert {"a", "b"} <= names


def test_entropy_directions_taken_at_best_and_surprise_hooks(tiny_hooked, one_thread):
    run = sp.capture(tiny_hooked, TINY_CORPUS * 2, progress=False)
    fits = {t: fit_sweep(run, t, n_folds=3, n_shuffles=0, n_boot=20, nested=False, progress=False)
            for t in ("surprise", "entropy")}
    surprise = fits["surprise"].direction("blocks.0.hook_resid_post")
    result = entropy_direction_comparison(tiny_hooked, TINY_CORPUS[:2], surprise, fits["entropy"], [-1.0, 1.0],
                                          random_directions=0, n_boot=20, progress=False)
    best = fits["entropy"].best_hook()
    assert result.labels[0] == "surprise"
    assert result.hooks[1] == best
    if best != surprise.hook:
        assert result.hooks[2] == surprise.hook
        assert np.allclose(result.responses[2].strengths, [-1.0, 1.0])
    with pytest.raises(ValueError, match="at least two directions"):
        compare_directions(tiny_hooked, TINY_CORPUS[:1], {"only": surprise}, [-1.0, 1.0])
