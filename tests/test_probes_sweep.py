"""Layer sweeps on planted data: recovery, controls, agreement with scikit-learn, bad input."""

import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler
from surprise_probe.probes import ArrayCapture, TokenTarget, fit_sweep, token_mean_predictions

N_SEQ, LENGTH, D = 60, 12, 8
SIGNAL_HOOK, NOISE_HOOK, EMBED_HOOK = (
    "blocks.1.hook_resid_post",
    "blocks.0.hook_resid_post",
    "blocks.0.hook_resid_pre",
)


def planted(seed=0, noise=0.3, n_seq=N_SEQ, **overrides):
    """Input surprise = a linear function of the activations at SIGNAL_HOOK, plus noise."""
    rng = np.random.default_rng(seed)
    n = n_seq * LENGTH
    sequence_ids = np.repeat(np.arange(n_seq), LENGTH)
    positions = np.tile(np.arange(LENGTH), n_seq)
    token_ids = rng.integers(0, 30, n)
    embedding_table = rng.normal(size=(30, D))
    signal = rng.normal(size=(n, D)) * rng.uniform(0.5, 5, D) + 3.0
    surprise = signal @ rng.normal(size=D) + noise * rng.normal(size=n) + 4.0
    surprise[positions == 0] = np.nan
    columns = dict(
        token_ids=token_ids,
        sequence_ids=sequence_ids,
        positions=positions,
        input_surprise=surprise,
        output_entropy=np.abs(rng.normal(size=n)) + 0.1 * np.nan_to_num(surprise),
    )
    columns.update(overrides.pop("columns", {}))
    acts = {
        EMBED_HOOK: embedding_table[token_ids],
        NOISE_HOOK: rng.normal(size=(n, D)),
        SIGNAL_HOOK: signal,
    }
    acts.update(overrides.pop("acts", {}))
    return ArrayCapture(acts, model_id="planted", sequences_per_shard=16, **columns, **overrides)


@pytest.fixture(scope="module")
def sweep():
    return fit_sweep(planted(), n_shuffles=9, n_boot=200, progress=False)


def test_planted_signal_is_recovered_and_controls_stay_at_zero(sweep):
    signal, noise = sweep[SIGNAL_HOOK], sweep[NOISE_HOOK]
    assert signal.r2.value > 0.95 and signal.r2.low > 0.9
    assert signal.pearson_r.value > 0.97
    assert signal.shuffle_p == pytest.approx(1 / 10)  # no shuffle reaches the real R^2
    assert max(abs(v) for v in signal.shuffle_r2) < 0.05
    assert noise.r2.value < 0.05
    assert sweep.best_hook() == SIGNAL_HOOK
    # the token identity says nothing here: token mean and embedding probe are near zero
    assert sweep.controls["token_mean_r2"].value < 0.05
    assert sweep.controls["embedding_r2"].value < 0.05
    assert signal.residual_r2.value > 0.9
    assert sweep.n_tokens == N_SEQ * (LENGTH - 1)  # position 0 has no input surprise


def test_bootstrap_point_equals_the_r2_from_statistics(sweep):
    for result in sweep.hooks:
        assert result.r2.value == pytest.approx(result.stats_r2, rel=1e-9, abs=1e-12)
        assert result.r2.low <= result.r2.value <= result.r2.high


def test_heldout_predictions_equal_sklearn_ridge_per_fold(sweep):
    run = planted()
    pred = sweep.predictions
    X = np.concatenate([s.activations(SIGNAL_HOOK)[s.positions > 0] for s in run.shards()])
    y, folds = pred["target"], pred["folds"]
    result = sweep[SIGNAL_HOOK]
    for fold, alpha in enumerate(result.fold_alphas):
        train, test = folds != fold, folds == fold
        scaler = StandardScaler().fit(X[train])
        reference = Ridge(alpha=alpha).fit(scaler.transform(X[train]), y[train])
        expected = reference.predict(scaler.transform(X[test]))
        got = pred[f"pred:{SIGNAL_HOOK}"][test]
        assert np.max(np.abs(got - expected)) / np.max(np.abs(expected)) <= 1e-6


def test_nested_alpha_matches_a_brute_force_inner_cv():
    run = planted(noise=3.0)
    alphas = [0.1, 10.0, 1000.0, 1e5]
    result = fit_sweep(
        run, hooks=[SIGNAL_HOOK], alphas=alphas, n_folds=4, n_shuffles=0, n_boot=10, progress=False
    )
    X = np.concatenate([s.activations(SIGNAL_HOOK)[s.positions > 0] for s in run.shards()])
    y, folds = result.predictions["target"], result.predictions["folds"]
    for outer in range(4):
        sse = np.zeros(len(alphas))
        for inner in set(range(4)) - {outer}:
            train, test = (folds != outer) & (folds != inner), folds == inner
            scaler = StandardScaler().fit(X[train])
            for a, alpha in enumerate(alphas):
                fit = Ridge(alpha=alpha).fit(scaler.transform(X[train]), y[train])
                sse[a] += np.sum((y[test] - fit.predict(scaler.transform(X[test]))) ** 2)
        assert result[SIGNAL_HOOK].fold_alphas[outer] == alphas[int(np.argmin(sse))]


def test_token_mean_uses_training_folds_and_backs_off_to_the_global_mean():
    token_ids = np.array([1, 1, 2, 3, 1, 2])
    y = np.array([1.0, 3.0, 10.0, 7.0, 5.0, 20.0])
    folds = np.array([0, 0, 0, 1, 1, 1])
    means = token_mean_predictions(token_ids, y, folds, 2)
    # fold 0 is predicted from fold 1: token 1 -> 5, token 2 -> 20, token 3 unseen -> mean(5, 7, 20)
    np.testing.assert_allclose(means[folds == 0, 0], [5.0, 5.0, 20.0])
    np.testing.assert_allclose(means[folds == 1, 1], [(1 + 3 + 10) / 3, 2.0, 10.0])


def test_token_identity_target_is_explained_by_the_controls():
    rng = np.random.default_rng(1)
    n = N_SEQ * LENGTH
    token_ids = rng.integers(0, 30, n)
    per_token = rng.normal(size=30) * 3
    surprise = per_token[token_ids] + 0.1 * rng.normal(size=n)
    result = fit_sweep(
        planted(columns={"token_ids": token_ids, "input_surprise": surprise}),
        n_shuffles=3,
        n_boot=50,
        progress=False,
    )
    assert result.controls["token_mean_r2"].value > 0.95
    assert result[SIGNAL_HOOK].residual_r2.value < 0.05  # nothing beyond token identity
    assert result[SIGNAL_HOOK].selectivity < -0.9


def test_user_target_table_is_aligned_by_sequence_and_position():
    run = planted()
    rng = np.random.default_rng(0)
    seq = np.repeat(np.arange(N_SEQ), LENGTH)
    pos = np.tile(np.arange(LENGTH), N_SEQ)
    values = seq * 100.0 + pos + rng.normal(size=len(seq))
    order = rng.permutation(len(seq))  # any order
    target = TokenTarget("label", seq[order], pos[order], values[order])
    result = fit_sweep(run, target, hooks=[NOISE_HOOK], n_shuffles=0, n_boot=10, progress=False)
    got = result.predictions
    np.testing.assert_allclose(
        got["target"], got["sequence_ids"] * 100.0 + got["positions"], atol=5
    )
    # the same tokens as surprise by default (position 0 left out, counted); every listed one with span="all"
    assert result.n_tokens == N_SEQ * (LENGTH - 1) and result.config["n_tokens_outside_span"] == N_SEQ
    every = fit_sweep(run, target, hooks=[NOISE_HOOK], n_shuffles=0, n_boot=10, span="all", progress=False)
    assert every.n_tokens == len(seq)


def test_entropy_target_and_capture_order_array():
    run = planted()
    result = fit_sweep(run, "entropy", hooks=[NOISE_HOOK], n_shuffles=0, n_boot=10, progress=False)
    assert result.target == "entropy" and result.n_tokens == N_SEQ * (LENGTH - 1)
    values = np.arange(N_SEQ * LENGTH, dtype=float) % 7
    result = fit_sweep(run, values, hooks=[NOISE_HOOK], n_shuffles=0, n_boot=10, progress=False)
    np.testing.assert_array_equal(result.predictions["target"], values[np.tile(np.arange(LENGTH), N_SEQ) > 0])
    result = fit_sweep(run, values, hooks=[NOISE_HOOK], n_shuffles=0, n_boot=10, span="all", progress=False)
    np.testing.assert_array_equal(result.predictions["target"], values)


# --- bad input ----------------------------------------------------------------------------------


def test_nonfinite_activation_names_shard_and_sequence():
    run = planted()
    bad = next(s for s in run.shards() if s.index == 1)
    bad._activations[SIGNAL_HOOK] = bad._activations[SIGNAL_HOOK].copy()
    bad._activations[SIGNAL_HOOK][5, 2] = np.inf
    with pytest.raises(
        ValueError,
        match=rf"'{SIGNAL_HOOK}' are not finite .* shard 1, first at sequence 16, position 5",
    ):
        fit_sweep(run, progress=False)


def test_nonfinite_target_names_sequence_and_position():
    rng = np.random.default_rng(0)
    surprise = rng.normal(size=N_SEQ * LENGTH)
    surprise[3 * LENGTH + 4] = np.nan
    with pytest.raises(
        ValueError, match=r"target 'surprise' is nan .* sequence 3, position 4 in shard 0"
    ):
        fit_sweep(planted(columns={"input_surprise": surprise}), progress=False)


def test_fewer_sequences_than_folds_is_an_error():
    with pytest.raises(
        ValueError, match=r"target 'surprise': 60 sequences cannot fill 61 folds"
    ):
        fit_sweep(planted(), n_folds=61, progress=False)


def test_constant_target_is_an_error():
    with pytest.raises(
        ValueError, match=r"target 'surprise' is constant \(2.5 on all 660 selected tokens\)"
    ):
        fit_sweep(planted(columns={"input_surprise": np.full(N_SEQ * LENGTH, 2.5)}), progress=False)


def test_hook_not_captured_lists_the_captured_hooks():
    with pytest.raises(
        ValueError,
        match=r"hook 'blocks.7.hook_resid_post' was not captured; captured hooks: \['blocks.0",
    ):
        fit_sweep(planted(), hooks=["blocks.7.hook_resid_post"], progress=False)


def test_misaligned_user_targets_are_errors():
    run = planted()
    with pytest.raises(
        ValueError, match=r"not in the capture, e.g. \(sequence_id 999, position 0\)"
    ):
        fit_sweep(
            run,
            TokenTarget("label", np.array([0, 999]), np.array([1, 0]), np.array([1.0, 2.0])),
            progress=False,
        )
    with pytest.raises(ValueError, match=r"lists \(sequence_id 0, position 1\) more than once"):
        fit_sweep(
            run,
            TokenTarget("label", np.array([0, 0]), np.array([1, 1]), np.array([1.0, 2.0])),
            progress=False,
        )
    with pytest.raises(ValueError, match=r"has 5 values but the capture has 720 tokens"):
        fit_sweep(run, np.arange(5.0), progress=False)


def test_missing_embedding_control_and_few_sequences_warn_loudly():
    full = fit_sweep(planted(), n_shuffles=0, n_boot=50, progress=False)
    assert full.warnings == []  # 60 sequences and the embedding hook: nothing to say
    with pytest.warns(UserWarning, match="no embedding-layer control: blocks.0.hook_resid_pre"):
        without = fit_sweep(planted(), hooks=[SIGNAL_HOOK], n_shuffles=0, n_boot=50, progress=False)
    assert "embedding_r2" not in without.controls and "no embedding-layer control" in without.warnings[0]
    assert without.to_dict()["warnings"] == without.warnings
    with pytest.warns(UserWarning, match="CIs from 6 sequences"):
        result = fit_sweep(planted(n_seq=6), n_folds=3, n_shuffles=0, n_boot=50, progress=False)
    assert result.warnings == ["CIs from 6 sequences: the bootstrap over so few is unreliable; use at least 10"]


def test_tables_and_plots_name_layers_as_transformer_lens_does():
    from surprise_probe.probes.plots import layer_sweep_figure

    result = fit_sweep(planted(), n_shuffles=0, n_boot=20, progress=False)
    table = result.to_markdown()
    # blocks.1.hook_resid_post is layer 1 (not depth 2); the embedding is "embed"
    assert "| blocks.1.hook_resid_post | 1 |" in table and "| blocks.0.hook_resid_pre | embed |" in table
    assert "| hook | layer |" in table and "depth" not in table
    axis = layer_sweep_figure(result).layout.xaxis
    assert list(axis.ticktext) == ["embed", "0", "1"] and list(axis.tickvals) == [0, 1, 2]
    assert "blocks.L.hook_resid_post" in axis.title.text
