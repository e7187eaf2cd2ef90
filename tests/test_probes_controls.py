"""Position, bigram and covariate controls, and per-source scores, on data with known answers."""

from collections import defaultdict

import numpy as np
import pytest
from surprise_probe.probes import ArrayCapture, TokenTarget, fit_sweep
from surprise_probe.probes.controls import (
    bigram_mean_predictions,
    covariate_predictions,
    position_predictions,
    previous_token_ids,
    span_positions,
)
from surprise_probe.probes.folds import assign_folds
from surprise_probe.probes.scoring import SequenceBootstrap
from surprise_probe.probes.sources import calibration, scores_by_source

N_SEQ, LENGTH, VOCAB, D = 80, 16, 6, 8
HOOK = "blocks.0.hook_resid_post"


def columns(seed=0):
    rng = np.random.default_rng(seed)
    n = N_SEQ * LENGTH
    return rng, dict(
        token_ids=rng.integers(0, VOCAB, n),
        sequence_ids=np.repeat(np.arange(N_SEQ), LENGTH),
        positions=np.tile(np.arange(LENGTH), N_SEQ),
    )


def capture(target, acts, cols, **kwargs):
    return ArrayCapture({HOOK: acts}, input_surprise=target, sequences_per_shard=16, **cols, **kwargs)


def position_target(positions):
    return np.cos(positions * 1.3) * 2 + positions / 8  # an arbitrary function of position


def bigram_target(previous, current):
    table = np.random.default_rng(42).normal(size=(VOCAB + 1, VOCAB)) * 2
    return table[previous + 1, current]  # previous = -1 (sequence start) is its own row


def test_pure_position_target_is_explained_by_position_not_by_bigrams():
    rng, cols = columns(0)
    y = position_target(cols["positions"])
    y[cols["positions"] == 0] = np.nan
    result = fit_sweep(capture(y, rng.normal(size=(len(y), D)), cols), n_shuffles=0, n_boot=100, progress=False)
    assert result.controls["position_r2"].value > 0.999
    assert result.controls["bigram_r2"].value < 0.05
    assert result.controls["token_mean_r2"].value < 0.05


def test_bigram_target_is_explained_by_bigrams_not_by_position():
    rng, cols = columns(1)
    previous = previous_token_ids(cols["token_ids"], cols["sequence_ids"], cols["positions"])
    y = bigram_target(previous, cols["token_ids"])
    y[cols["positions"] == 0] = np.nan
    result = fit_sweep(capture(y, rng.normal(size=(len(y), D)), cols), n_shuffles=0, n_boot=100, progress=False)
    assert result.controls["bigram_r2"].value > 0.999
    assert result.controls["position_r2"].value < 0.05
    # the unigram mean explains only the part of the table that depends on the current token
    assert result.controls["token_mean_r2"].value < 0.5


def test_probe_beyond_position_is_zero_when_activations_only_encode_position():
    rng, cols = columns(2)
    one_hot = np.eye(LENGTH)[cols["positions"]]
    acts = np.concatenate([one_hot, rng.normal(size=(len(one_hot), 4))], axis=1)
    y = position_target(cols["positions"]) + rng.normal(size=len(one_hot))  # noise unknown to the model
    result = fit_sweep(capture(y, acts, cols), n_shuffles=0, n_boot=100, progress=False)
    row = result[HOOK]
    assert row.r2.value == pytest.approx(result.controls["position_r2"].value, abs=0.02)
    assert row.r2.value > 0.4
    assert abs(row.beyond_r2["position"].value) < 0.02
    assert row.beyond_r2["bigram"].value > 0.3  # bigrams do not explain position


def test_probe_beyond_position_finds_a_signal_independent_of_position():
    rng, cols = columns(3)
    n = N_SEQ * LENGTH
    signal = rng.normal(size=n)
    acts = np.concatenate([np.eye(LENGTH)[cols["positions"]], signal[:, None], rng.normal(size=(n, 3))], axis=1)
    y = position_target(cols["positions"]) + signal
    result = fit_sweep(capture(y, acts, cols), n_shuffles=0, n_boot=100, progress=False)
    row = result[HOOK]
    assert row.r2.value > 0.99
    assert row.beyond_r2["position"].value > 0.98  # the residual is `signal`, read linearly
    assert result.controls["position_r2"].value < 0.8


def test_position_and_bigram_predictions_match_a_loop_over_training_folds():
    rng, cols = columns(4)
    y = rng.normal(size=N_SEQ * LENGTH) + cols["positions"]
    folds = assign_folds(cols["sequence_ids"], 4, seed=0)
    previous = previous_token_ids(cols["token_ids"], cols["sequence_ids"], cols["positions"])
    position = position_predictions(cols["positions"], cols["positions"], y, folds, 4)
    bigram = bigram_mean_predictions(previous, cols["token_ids"], y, folds, 4)
    for fold in range(4):
        train = folds != fold
        by_position, by_pair, by_token = defaultdict(list), defaultdict(list), defaultdict(list)
        for p, a, b, value in zip(cols["positions"][train], previous[train], cols["token_ids"][train], y[train]):
            by_position[p].append(value)
            by_pair[a, b].append(value)
            by_token[b].append(value)
        for i in np.flatnonzero(~train)[:200]:
            assert position[i, fold] == pytest.approx(np.mean(by_position[cols["positions"][i]]), abs=1e-3)
            pair = (previous[i], cols["token_ids"][i])
            expected = np.mean(by_pair[pair]) if pair in by_pair else np.mean(by_token[pair[1]])
            assert bigram[i, fold] == pytest.approx(expected)


def test_bigram_backs_off_to_unigram_then_to_the_training_mean():
    previous = np.array([0, 0, 1, 2, 5, 9, 0])
    current = np.array([3, 3, 3, 7, 4, 3, 3])
    y = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 7.0, 100.0])
    folds = np.array([0, 0, 0, 0, 1, 1, 1])
    out = bigram_mean_predictions(previous, current, y, folds, 2)
    # column 1 is learned on fold 0 (rows 0-3)
    assert out[6, 1] == pytest.approx(1.5)  # pair (0, 3) seen twice
    assert out[5, 1] == pytest.approx(2.0)  # pair (9, 3) unseen -> type 3's mean (1, 2, 3)
    assert out[4, 1] == pytest.approx(4.0)  # pair (5, 4) and type 4 unseen -> training mean
    assert out[0, 0] == pytest.approx(100.0)  # column 0 is learned on fold 1: pair (0, 3) -> 100


def test_covariate_control_captures_a_curved_relation():
    rng = np.random.default_rng(5)
    covariate = rng.uniform(0, 4, 2000)
    y = covariate**2 + 0.1 * rng.normal(size=2000)
    folds = np.repeat(np.arange(4), 500)
    pred = covariate_predictions(covariate, y, folds, 4)[np.arange(2000), folds]
    linear = np.polyval(np.polyfit(covariate, y, 1), covariate)
    r2 = 1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2)
    r2_linear = 1 - np.sum((y - linear) ** 2) / np.sum((y - y.mean()) ** 2)
    assert r2 > 0.99 > r2_linear


def test_covariates_residualise_the_target_and_drop_tokens_they_lack():
    rng, cols = columns(6)
    n = N_SEQ * LENGTH
    signal, other = rng.normal(size=n), rng.normal(size=n)
    acts = np.stack([signal, other, *rng.normal(size=(4, n))], axis=1)
    y = signal + other
    scored_pos = cols["positions"] > 0
    keep = scored_pos & (cols["positions"] != 5)  # the covariate lacks position 5
    table = TokenTarget("other", cols["sequence_ids"][keep], cols["positions"][keep], other[keep])
    y[~scored_pos] = np.nan
    result = fit_sweep(
        capture(y, acts, cols), covariates={"other": table}, n_shuffles=0, n_boot=100, progress=False
    )
    assert result.config["n_tokens_dropped_for_covariates"] == N_SEQ
    assert result.n_tokens == int(keep.sum())
    assert result.controls["covariate_r2"]["other"].value == pytest.approx(0.5, abs=0.06)
    assert result[HOOK].beyond_r2["other"].value > 0.95  # y - other = signal, read from the activations
    with pytest.raises(ValueError, match="taken by a built-in control"):
        fit_sweep(capture(y, acts, cols), covariates={"bigram": table}, progress=False)


def test_calibration_matches_least_squares_and_sources_are_scored_apart():
    rng = np.random.default_rng(7)
    sequence_ids = np.repeat(np.arange(40), 25)
    prediction = rng.normal(size=1000)
    on = sequence_ids < 20
    y = np.where(on, prediction, 0.5 * prediction + 1.0) + 0.05 * rng.normal(size=1000)
    slope, intercept = calibration(SequenceBootstrap(sequence_ids, n_boot=200), y, prediction)
    reference = np.polyfit(prediction, y, 1)
    assert slope.value == pytest.approx(reference[0]) and intercept.value == pytest.approx(reference[1])
    assert slope.low < slope.value < slope.high
    labels = {s: ("own-sample" if s < 20 else "human") for s in range(40)}
    out = scores_by_source(labels, sequence_ids, y, {}, {"h": prediction}, n_boot=200)
    own, human = out["own-sample"]["hooks"]["h"], out["human"]["hooks"]["h"]
    assert own["calibration_slope"].value == pytest.approx(1.0, abs=0.02)
    assert human["calibration_slope"].value == pytest.approx(0.5, abs=0.02)
    assert human["calibration_intercept"].value == pytest.approx(1.0, abs=0.02)
    assert out["own-sample"]["n_sequences"] == 20 and out["human"]["n_tokens"] == 500


def test_fit_sweep_reports_sources():
    rng, cols = columns(8)
    y = rng.normal(size=N_SEQ * LENGTH)
    sources = {s: ("a" if s % 2 else "b") for s in range(N_SEQ)}
    result = fit_sweep(
        capture(y, rng.normal(size=(len(y), D)), cols), sources=sources, n_shuffles=0, n_boot=50, progress=False
    )
    assert set(result.by_source) == {"a", "b"}
    assert result.by_source["a"]["n_sequences"] == N_SEQ // 2
    assert HOOK in result.by_source["a"]["hooks"]
    payload = result.to_dict()
    assert payload["by_source"]["b"]["hooks"][HOOK]["r2"]["level"] == 0.95


def test_span_positions_count_scored_tokens_before():
    scored = np.array([0, 1, 1, 0, 1, 1, 1, 1], bool)
    sequence_ids = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    assert span_positions(scored, sequence_ids).tolist() == [0, 0, 1, 2, 2, 0, 1, 2]


def test_layer_sweep_figure_shows_each_control_with_its_own_colour_and_dash():
    from surprise_probe.probes.plots import layer_sweep_figure, source_figure

    rng, cols = columns(9)
    n = N_SEQ * LENGTH
    y = position_target(cols["positions"]) + rng.normal(size=n)
    table = TokenTarget("c", cols["sequence_ids"], cols["positions"], y + rng.normal(size=n))
    result = fit_sweep(
        capture(y, rng.normal(size=(n, D)), cols), covariates={"c": table},
        sources={s: "a" if s % 2 else "b" for s in range(N_SEQ)}, n_shuffles=2, n_boot=50, progress=False,
    )
    traces = {t.name: t for t in layer_sweep_figure(result).data if t.showlegend is not False}
    styles = {}
    for name in ("position", "bigram", "c"):
        baseline = next(t for label, t in traces.items() if label.endswith(": baseline") and
                        (name in label if name != "c" else label == "covariate c: baseline"))
        curve = traces[f"probe on target minus {name} baseline"]
        assert baseline.line.color == curve.line.color  # one colour per control
        assert curve.line.dash == "dot" and baseline.line.dash not in ("dot", "solid", None)
        assert baseline.y[0] == pytest.approx(result.controls[f"{name}_r2"].value if name != "c"
                                              else result.controls["covariate_r2"]["c"].value)
        styles[name] = (baseline.line.color, baseline.line.dash)
    assert len(set(styles.values())) == 3
    names = {t.name for t in source_figure(result).data}
    assert any(name.startswith("a (40 seq") for name in names) and any(name.startswith("b (") for name in names)


def test_training_residuals_are_cross_fitted_not_in_sample():
    # every token its own type: an in-sample type mean is the token's own value (residual 0), so a probe
    # trained on in-sample residuals would learn nothing; cross-fitted residuals keep the signal
    rng, cols = columns(10)
    n = N_SEQ * LENGTH
    cols["token_ids"] = np.arange(n)
    signal = rng.normal(size=(n, D))
    y = signal @ rng.normal(size=D) + 0.1 * rng.normal(size=n)
    result = fit_sweep(capture(y, signal, cols), n_shuffles=0, n_boot=50, progress=False)
    assert result.controls["token_mean_r2"].value < 0.01  # every held-out type is unseen
    assert result[HOOK].residual_r2.value > 0.95
    assert result[HOOK].beyond_r2["bigram"].value > 0.95


def test_cross_fitted_predictions_match_a_loop():
    from surprise_probe.probes.controls import cross_fitted_predictions, token_mean_fitter

    rng = np.random.default_rng(11)
    token_ids, y = rng.integers(0, 5, 300), rng.normal(size=300)
    folds = np.repeat(np.arange(4), 75)
    out = cross_fitted_predictions(token_mean_fitter(token_ids, y), folds, 4)
    for f in range(4):
        for i in rng.choice(300, 30, replace=False):
            train = (folds != f) & (folds != folds[i]) if folds[i] != f else folds != f
            same = train & (token_ids == token_ids[i])
            assert out[i, f] == pytest.approx(y[same].mean() if same.any() else y[train].mean())
