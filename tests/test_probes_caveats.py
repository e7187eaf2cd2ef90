"""Defaults and warnings agree: a probe no better than its controls is flagged where it is exported
and where it is steered with; steering's default number of random directions passes its own warning."""

import numpy as np
import pytest
from surprise_probe.interventions.experiments import steering_experiment
from surprise_probe.probes import ProbeDirection
from surprise_probe.probes.scoring import probe_caveats

from surprise_probe.app.cli import build_parser
from surprise_probe.core.utils.stats import (
    MIN_RANDOM_DIRECTIONS,
    permutation_p_text,
    small_sample_warnings,
)

STRONG = {"r2": {"value": 0.62, "low": 0.61, "high": 0.64}, "shuffle_p": 1 / 21,
          "residual_r2": {"value": 0.51, "low": 0.49, "high": 0.53}}
WEAK = {"r2": {"value": 0.07, "low": -0.004, "high": 0.13}, "shuffle_p": 0.167,
        "residual_r2": {"value": 0.02, "low": -0.01, "high": 0.05}}


def test_a_strong_probe_has_no_caveats_and_a_weak_one_has_each():
    assert probe_caveats(STRONG) == []
    notes = probe_caveats(WEAK, "blocks.3.hook_resid_post")
    assert len(notes) == 3
    assert "does not exclude 0" in notes[0] and "shuffled-label control" in notes[1] and "token-identity" in notes[2]
    # each rule on its own
    assert len(probe_caveats({**STRONG, "shuffle_p": 0.2})) == 1
    assert len(probe_caveats({**STRONG, "r2": {"value": 0.1, "low": -0.1, "high": 0.2}})) == 1
    assert len(probe_caveats({**STRONG, "residual_r2": {"value": 0.0, "low": -0.1, "high": 0.1}})) == 1


def test_the_permutation_p_at_its_floor_is_a_bound():
    assert permutation_p_text(1 / 21, 20).startswith("<= 0.048")
    assert permutation_p_text(3 / 21, 20) == "0.143"


def test_steer_defaults_pass_their_own_warning():
    _, commands = build_parser()
    default = next(a.default for a in commands["steer"]._actions if a.dest == "random_directions")
    assert default >= MIN_RANDOM_DIRECTIONS
    assert small_sample_warnings(random_directions=default) == []


def _probe(model, metrics):
    d = np.random.default_rng(0).normal(size=model.cfg.d_model)
    return ProbeDirection(d / np.linalg.norm(d), mean=0.0, std=1.0, hook="blocks.1.hook_resid_post", layer=1,
                          model_id=model.cfg.model_name, d_model=model.cfg.d_model, target="surprise",
                          metrics=metrics)


@pytest.mark.parametrize("metrics, flagged", [(STRONG, False), (WEAK, True)])
def test_steering_a_weak_probe_says_so_in_its_result(tiny_hooked, metrics, flagged):
    result = steering_experiment(tiny_hooked, ["A cat sat on the mat.", "Hello world, how are you?"],
                                 _probe(tiny_hooked, metrics), [-1.0, 0.0, 1.0], random_directions=1, n_boot=10,
                                 ablation=False, progress=False)
    said = [w for w in result.to_dict()["warnings"] if w.startswith("the steered probe at")]
    assert bool(said) == flagged
    assert ("the steered probe at" in result.summary()) == flagged


def test_the_steer_command_warns_before_loading_a_model(tiny_hooked, tmp_path, monkeypatch, capsys):
    from surprise_probe.app.cli import main
    from surprise_probe.app.commands import _common

    _probe(tiny_hooked, WEAK).save(tmp_path / "weak")
    loads = []
    monkeypatch.setattr(_common, "load_model", lambda name, **kwargs: loads.append(name) or tiny_hooked)
    (tmp_path / "in.txt").write_text("A cat sat on the mat.\nHello world.\n")
    assert main(["steer", "--probe", str(tmp_path / "weak.json"), "--input", str(tmp_path / "in.txt"), "--out",
                 str(tmp_path / "s"), "--strengths", "-1", "1", "--random-directions", "1", "--n-boot", "10",
                 "--no-ablation", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: the steered probe at blocks.1.hook_resid_post") == 3
