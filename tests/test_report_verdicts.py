"""The report's verdicts: each rule on hand-made results (yes, no, mixed and too-small cases), so a
rule that ignored its numbers, or a hard-coded answer, fails here."""

from __future__ import annotations

import copy

import pytest

from surprise_probe.core.utils.stats import MIN_RANDOM_DIRECTIONS, MIN_UNITS
from surprise_probe.report.verdicts import (
    MIXED,
    NO,
    NOT_RUN,
    NOT_TESTED,
    QUESTIONS,
    YES,
    cached_intention,
    causal,
    decodable,
    direct_effect,
    not_run,
    patching,
    policy_gap,
)


def _ci(value, low, high):
    return {"value": value, "low": low, "high": high, "level": 0.95}


def _sweep(**change):
    best = {"hook": "blocks.17.hook_resid_post", "r2": _ci(0.62, 0.60, 0.64), "shuffle_r2": [0.0] * 20,
            "shuffle_r2_max": 0.001, "shuffle_p": 1 / 21}
    sweep = {"best_hook": best["hook"], "n_sequences": 60, "n_tokens": 11429, "hooks": [best],
             "controls": {"token_mean_r2": _ci(0.11, 0.09, 0.13), "embedding_r2": _ci(0.26, 0.23, 0.27),
                          "bigram_r2": _ci(0.107, 0.08, 0.12), "position_r2": _ci(-0.005, -0.02, 0.01)}}
    for key, value in change.items():
        if key in best:
            best[key] = value
        elif key in sweep["controls"]:
            sweep["controls"][key] = value
        else:
            sweep[key] = value
    return sweep


def test_decodable_yes_no_and_too_small():
    verdict = decodable(_sweep())
    assert verdict.answer == YES and verdict.question == QUESTIONS["decodable"].text
    assert "0.620 [0.600, 0.640]" in verdict.numbers and "60 sequences" in verdict.numbers
    assert "bigram 0.107" in verdict.numbers and "position" in verdict.numbers
    # every control counts: the probe's CI must clear each control's upper bound
    assert decodable(_sweep(bigram_r2=_ci(0.5, 0.45, 0.61))).answer == NO
    assert decodable(_sweep(position_r2=_ci(0.5, 0.45, 0.61))).answer == NO
    assert decodable(_sweep(embedding_r2=_ci(0.59, 0.58, 0.605))).answer == NO
    assert decodable(_sweep(shuffle_r2_max=0.61)).answer == NO
    assert decodable(_sweep(r2=_ci(0.3, 0.0, 0.6))).answer == NO
    assert decodable(_sweep(shuffle_p=0.2)).answer == NO
    # too small to test: few sequences, or too few shuffles for p to reach 0.05
    assert decodable(_sweep(n_sequences=MIN_UNITS - 1)).answer == NOT_TESTED
    assert decodable(_sweep(shuffle_r2=[0.0] * 10, shuffle_p=1 / 11)).answer == NOT_TESTED


def _steer(k=MIN_RANDOM_DIRECTIONS, n=MIN_UNITS, slope=0.18, ci=(0.16, 0.20), z=7.7):
    return {"dose_response": {"hook": "blocks.17.hook_resid_post", "labels": ["probe", "orthogonal",
                                                                              *[f"random {i}" for i in range(k)]],
                              "n_sequences": n, "n_tokens": 1700, "probe_slope": slope, "probe_slope_ci": list(ci),
                              "random_slope_mean": 0.0, "random_slope_std": 0.02, "z_score": z}}


def test_causal_yes_no_and_too_small():
    assert causal(_steer()).answer == YES
    assert causal(_steer(slope=-0.1, ci=(-0.12, -0.08), z=-5.0)).answer == YES  # lowering entropy counts too
    assert causal(_steer(ci=(-0.01, 0.2))).answer == NO  # CI includes 0
    assert causal(_steer(z=1.5)).answer == NO  # no further than random directions
    assert causal(_steer(k=MIN_RANDOM_DIRECTIONS - 1)).answer == NOT_TESTED
    assert causal(_steer(n=MIN_UNITS - 1)).answer == NOT_TESTED
    assert f"{MIN_RANDOM_DIRECTIONS} random directions" in causal(_steer()).numbers
    assert str(MIN_RANDOM_DIRECTIONS) in QUESTIONS["causal"].rule and str(MIN_UNITS) in QUESTIONS["causal"].rule


def _norm(free=(0.084, 0.063, 0.114), frozen=(0.05, 0.02, 0.08), z=3.0, k=MIN_RANDOM_DIRECTIONS, n=MIN_UNITS):
    def effect(values, z_score):
        return {"probe_slope": values[0], "probe_slope_ci": list(values[1:]), "z_score": z_score,
                "random_slopes": [0.0] * k}
    return {"hook": "blocks.17.hook_resid_post", "n_sequences": n, "n_tokens": 400,
            "effects": {"total": effect(free, 3.6), "final_norm_frozen": effect(frozen, z)},
            "direct_share": {"final_norm_frozen": _ci(frozen[0] / free[0], 0.2, 0.9)}}


def test_direct_effect_yes_no_and_too_small():
    assert direct_effect(_norm()).answer == YES
    # the measured case: free slope up, frozen slope at -0.027 [-0.049, 0.000]: carried by the norm
    assert direct_effect(_norm(frozen=(-0.027, -0.049, 0.0002), z=-1.0)).answer == NO
    assert direct_effect(_norm(frozen=(-0.05, -0.08, -0.02), z=-3.0)).answer == NO  # the other side: not the same effect
    assert direct_effect(_norm(z=1.5)).answer == NO  # no further than random directions frozen the same way
    assert direct_effect(_norm(k=MIN_RANDOM_DIRECTIONS - 1)).answer == NOT_TESTED
    assert direct_effect(_norm(n=MIN_UNITS - 1)).answer == NOT_TESTED
    assert "share of the free slope" in direct_effect(_norm()).numbers


def _patch(n_pairs=MIN_UNITS, k=MIN_RANDOM_DIRECTIONS, fraction=0.3, ci=(0.1, 0.5), z=3.0,
           direction_hook="blocks.17.hook_resid_post"):
    hooks = ["blocks.0.hook_resid_post", "blocks.16.hook_resid_post", "blocks.29.hook_resid_post"]
    grid = [[0.0, 0.0] for _ in hooks]
    h = 1  # the cell the verdict reads: layer 16 (nearest to 17), group "response"
    fraction_grid, ci_grid, z_grid = copy.deepcopy(grid), [[[-1.0, 1.0]] * 2 for _ in hooks], copy.deepcopy(grid)
    fraction_grid[h][0], ci_grid[h][0], z_grid[h][0] = fraction, list(ci), z
    fraction_grid[2][1] = 0.9  # a larger fraction elsewhere must not decide the verdict
    return {"patching": {"hooks": hooks, "groups": ["response", "first4"], "direction_hook": direction_hook,
                         "n_pairs": n_pairs, "random_directions": k, "fraction": {"direction": fraction_grid},
                         "fraction_ci": {"direction": ci_grid}, "z": z_grid, "random_mean": grid,
                         "random_std": grid, "per_pair_gap": [0.2] * n_pairs}}


def test_patching_yes_no_and_too_small():
    verdict = patching(_patch())
    assert verdict.answer == YES and "blocks.16.hook_resid_post, response" in verdict.numbers
    assert patching(_patch(ci=(-0.1, 0.5))).answer == NO
    assert patching(_patch(z=1.0)).answer == NO
    assert patching(_patch(n_pairs=MIN_UNITS - 4)).answer == NOT_TESTED
    assert patching(_patch(k=2)).answer == NOT_TESTED


def _comparison(reader, source, ratio, n=16, fmt="assistant"):
    return {"reader": reader, "format": fmt, "source": source,
            "span": {"n_prompts": n, "ratio_off_on": _ci(*ratio)}}


def _gap(human=(0.93, 0.85, 1.03), other=(1.18, 1.05, 1.33), n=16, base=None):
    models = [{"name": "smollm2", "post_trained": True, "formats_read": ["assistant", "plain"],
               "sampling_format": "assistant"}]
    rows = [_comparison("smollm2", "human", human, n), _comparison("smollm2", "own_other_prompt", other, n),
            _comparison("smollm2", "human", (2.0, 1.9, 2.1), n, fmt="plain")]  # another format: not read
    if base:
        models.append({"name": "gemma", "post_trained": False, "formats_read": ["plain"], "sampling_format": "plain"})
        rows.append(_comparison("gemma", "human", base, n, fmt="plain"))
    return {"models": models, "summary": {"comparisons": rows}}


def test_gap_yes_no_mixed_and_too_small():
    mixed = policy_gap(_gap())
    assert mixed.answer == MIXED and "a gap only for own_other_prompt" in mixed.numbers
    assert "own_other_prompt (the reader's own answer to another prompt" in mixed.numbers  # the label explained
    assert policy_gap(_gap(human=(1.2, 1.1, 1.3))).answer == YES
    assert policy_gap(_gap(other=(1.0, 0.9, 1.1))).answer == NO
    assert policy_gap(_gap(n=MIN_UNITS - 1)).answer == NOT_TESTED
    with_base = policy_gap(_gap(base=(1.01, 0.92, 1.10)))
    assert with_base.answer == MIXED and "base reader gemma" in with_base.numbers
    no_ci = _gap()
    no_ci["summary"]["comparisons"][0]["span"]["ratio_off_on"].update(low=None, high=None)
    assert policy_gap(no_ci).answer == NOT_TESTED


def _intention(n=MIN_UNITS, entropy=(0.3, 0.2, 0.4), other=0.2, probe_low=0.6, prefill_low=0.1, pairs=MIN_UNITS,
               probe=True):
    readout = {"classes": ["a", "b"], "n_prompts": n, "n_folds": 5}
    if probe:
        readout.update(probe=[{"depth": 0, "accuracy": 0.3, "low": 0.1, "high": 0.5, "majority": 0.3},
                              {"depth": 9, "accuracy": 0.7, "low": probe_low, "high": 0.8, "majority": 0.3}],
                       shuffled=[{"accuracy": 0.3}, {"accuracy": 0.35}])
    else:
        readout.update(classes=[], n_prompts=0, n_folds=0)
    return {"models": [{
        "model_id": "smollm2", "uniform_reference": 1.53, "bucket_shares": {"other": other, "ambiguous": 0.0},
        "topic_entropy": {**_ci(*entropy), "n_prompts": n}, "readout": readout,
        "prefill": {"difference": {"mean": prefill_low + 0.1, "low": prefill_low, "high": prefill_low + 0.2},
                    "n_pairs": pairs, "n_other_higher": pairs}}]}


def test_cached_intention_yes_no_mixed_and_too_small():
    assert cached_intention(_intention()).answer == YES
    assert cached_intention(_intention(entropy=(1.5, 1.4, 1.6), probe_low=0.2, prefill_low=-0.1)).answer == NO
    assert cached_intention(_intention(prefill_low=-0.1)).answer == MIXED
    assert cached_intention(_intention(n=4, pairs=4)).answer == NOT_TESTED


def test_a_low_entropy_from_samples_naming_no_topic_is_not_caching():
    """The Quickstart's case: 0.298 at k = 0 against uniform 1.530 reads as caching by the entropy
    alone, but most samples name no topic, and the prefill test says otherwise."""
    quickstart = _intention(entropy=(0.298, 0.2, 0.4), other=0.85, probe=False, prefill_low=-0.2)
    verdict = cached_intention(quickstart)
    assert verdict.answer == NO
    assert "85% of samples name no lexicon topic" in verdict.numbers and "not informative" in verdict.numbers
    assert "modal topic(s)" not in verdict.numbers and "topic probe not fitted: it learns topics" in verdict.numbers
    # the same entropy with most samples naming a topic does count
    assert cached_intention(_intention(entropy=(0.298, 0.2, 0.4), other=0.2, probe=False)).answer == YES


def test_not_run_keeps_the_question_and_rule():
    verdict = not_run("gap", "the gap stage failed: boom")
    assert verdict.answer == NOT_RUN and verdict.rule == QUESTIONS["gap"].rule and "boom" in verdict.numbers


@pytest.mark.parametrize("key", list(QUESTIONS))
def test_every_rule_is_stated_with_the_toolkits_minimums(key):
    rule = QUESTIONS[key].rule
    assert str(MIN_UNITS) in rule and len(rule) > 100
