"""Data parallelism under torchrun equals one process.

One ``torchrun --standalone --nproc_per_node 2`` launch (gloo on the CPU) runs this file as its
worker (``__main__`` below) through every stage: capture (to disk, in memory, resumed after
damage), probe fit, dose-response and patching sweeps, and the errors. Each rank saves what it
got; the tests compare both ranks with a single-process run of the same calls in the pytest
process (same tokenizer folder, same seeded tiny model).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from surprise_probe.interventions import (
    SteeringDirection,
    activation_patching,
    dose_response,
    run_sweep,
)
from surprise_probe.interventions.steering_sweep import encode_items
from surprise_probe.probes import fit_sweep

import surprise_probe as sp
from surprise_probe.core.capture.store import COLUMNS
from surprise_probe.core.models import distributed
from surprise_probe.core.utils.jsonio import read_json, write_json

REPO = Path(__file__).resolve().parents[1]
ITEMS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, how are you today?",
    "A cat sat on the mat and looked at the moon.",
    "Rivers flow to the sea; mountains rise to the sky.",
    "Numbers like 12, 345 and 6789 appear in text too.",
    "You are a helpful assistant. Answer the question briefly.",
    "The moon looked at the cat on the mat.",
    "How are you, quick brown dog?",
    "Mountains and rivers, cats and foxes.",
]
CONVERSATION = [
    {"role": "user", "content": "Hello world, how are you?"},
    {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
]
SWEEP_ITEMS = [CONVERSATION, ITEMS[0], ITEMS[3], ITEMS[4], ITEMS[6]]
PAIRS = [
    ([{"role": "user", "content": "Hi there?"}, {"role": "assistant", "content": a}],
     [{"role": "user", "content": "Hi there?"}, {"role": "assistant", "content": b}])
    for a, b in [(ITEMS[2], ITEMS[3]), (ITEMS[4], ITEMS[0]), (ITEMS[1], ITEMS[5])]
]
SHARD_SIZE = 2  # 9 items -> 5 shards: rank 0 writes 0, 2, 4 and rank 1 writes 1, 3
FIT = dict(n_folds=3, n_shuffles=3, n_boot=50, progress=False)
ALPHAS = [-3.0, 0.0, 2.0]
REAL_HOOKS = ["blocks.0.hook_resid_pre", "blocks.9.hook_resid_post"]
REAL_TEXTS = [
    "The river rose after three days of rain.",
    "She counted the coins twice and frowned.",
    "Photosynthesis turns light into chemical energy.",
    "My favourite colour is the blue of early evening.",
    "Seven ravens sat on the old stone wall.",
    "Tea or coffee? Neither, thank you.",
]


def _steering(model) -> SteeringDirection:
    d = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    return SteeringDirection(d / d.norm(), "blocks.0.hook_resid_post", 1.5)


def _stages(model, out: Path, items, *, hooks=None, full=True) -> dict:
    """Every distributed call of the test, in the order the worker and the reference run them
    (``full=False``, for the real model: only the capture to disk and the fit)."""
    results: dict = {}
    arrays: dict = {}
    run = sp.capture(model, items, hooks=hooks, out_dir=out / "capture", shard_size=SHARD_SIZE, batch_size=2,
                     progress=False)
    results["content_hash"] = run.manifest["content_hash"]
    results["manifest"] = {k: v for k, v in run.manifest.items() if k not in ("elapsed_seconds_this_session",)}
    results["memory_shards"] = []
    if full:
        memory = sp.capture(model, items, shard_size=SHARD_SIZE, batch_size=2, progress=False)
        results["memory_shards"] = [shard.index for shard in memory.shards()]
        for name in COLUMNS:
            arrays[f"memory:{name}"] = memory.column(name)
        for hook in memory.hooks:
            arrays[f"memory:{hook}"] = memory.activations(hook)

    result = fit_sweep(sp.load_capture(out / "capture"), **FIT)
    for fitted in result.hooks:
        arrays[f"coef:{fitted.hook}"] = fitted.coef
    for key, values in result.predictions.items():
        arrays[f"pred:{key}"] = values
    results["fit"] = {
        h.hook: {"r2": h.r2.value, "alpha": h.alpha, "fold_alphas": h.fold_alphas, "intercept": h.intercept,
                 "cv_r2_by_alpha": h.cv_r2_by_alpha, "shuffle_r2": h.shuffle_r2}
        for h in result.hooks
    }
    if full:
        dose = dose_response(model, SWEEP_ITEMS, _steering(model), ALPHAS, random_directions=2, n_boot=50,
                             progress=False)
        results["dose"] = dose.to_dict()
        patch = activation_patching(model, PAIRS, hooks=["blocks.1.hook_resid_post"], components=("all",),
                                    groups=("response", "first2"), n_boot=50, progress=False)
        results["patch"] = patch.to_dict()
    return {"results": results, "arrays": arrays}


def _cli(out: Path, hf_folder: str, items_txt: str) -> list[int]:
    """``surprise-probe capture`` then ``fit``, in this process (under torchrun: on every rank)."""
    from surprise_probe.app.cli import main

    common = ["--no-progress"]
    return [
        main(["capture", "--model", hf_folder, "--device", "cpu", "--input", items_txt, "--out", str(out / "cli_capture"),
              "--shard-size", str(SHARD_SIZE), "--batch-size", "2", "--n-boot", "50", *common]),
        main(["fit", "--activations", str(out / "cli_capture"), "--out", str(out / "cli_fit"), "--folds", "3",
              "--shuffles", "2", "--n-boot", "50", *common]),
    ]


def _worker(mode: str, out: Path, tokenizer_folder: str, hf_folder: str, items_txt: str) -> None:
    """Run by each torchrun process: every stage, then the error cases; save what this rank got."""
    torch.set_num_threads(1)
    rank = distributed.rank()
    if mode == "tiny":
        from transformers import AutoTokenizer

        from surprise_probe.testing import tiny_hooked_transformer

        model = tiny_hooked_transformer(tokenizer=AutoTokenizer.from_pretrained(tokenizer_folder))
        items, hooks = ITEMS, None
    else:
        model = sp.load_model("smollm2-135m-instruct", device="cpu", progress=False)
        items, hooks = REAL_TEXTS, REAL_HOOKS
    got = _stages(model, out, items, hooks=hooks, full=mode == "tiny")

    # An interrupted run: one shard of each rank and the manifest gone; each rank redoes its own.
    kept = {}
    if distributed.is_main():
        (out / "capture" / "manifest.json").unlink()
        for name in ("000000", "000001"):
            shutil.rmtree(out / "capture" / "shards" / name)
        kept = {p.name: p.stat().st_mtime_ns for p in (out / "capture" / "shards").iterdir()}
    distributed.barrier()
    resumed = sp.capture(model, items, hooks=hooks, out_dir=out / "capture", shard_size=SHARD_SIZE, batch_size=2,
                         progress=False)
    got["results"]["resumed_hash"] = resumed.manifest["content_hash"]
    if distributed.is_main():
        now = {p.name: p.stat().st_mtime_ns for p in (out / "capture" / "shards").iterdir()}
        got["results"]["rewritten"] = sorted(name for name in now if now[name] != kept.get(name))

    errors = {}
    if mode == "tiny":
        try:  # rank 1 was given other inputs
            sp.capture(model, items if rank == 0 else items[::-1], progress=False)
        except ValueError as error:
            errors["disagree"] = str(error)
        # fewer shards than ranks: the shards shrink so both ranks work (3 items), or one waits (1 item)
        for n in (3, 1):
            few = sp.capture(model, items[:n], out_dir=out / f"few{n}", progress=False)
            got["results"][f"few{n}"] = {"content_hash": few.manifest["content_hash"],
                                         "n_shards": len(few.manifest["shards"]), "n_sequences": few.n_sequences}
        try:  # one sequence for two ranks
            run_sweep(model, encode_items(model, items[:1]), "blocks.0.hook_resid_post",
                      _steering(model).direction[None], ALPHAS, progress=False)
        except ValueError as error:
            errors["few_sequences"] = str(error)
    got["results"]["errors"] = errors
    if mode == "tiny":
        got["results"]["cli_exit_codes"] = _cli(out, hf_folder, items_txt)
    got["results"]["world_size"] = distributed.world_size()
    write_json(out / f"rank{rank}.json", got["results"])
    np.savez(out / f"rank{rank}.npz", **{k.replace(":", "__"): v for k, v in got["arrays"].items()})
    distributed.barrier()


def _launch(mode: str, out: Path, tokenizer_folder: str, hf_folder: str = "", items_txt: str = "") -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__).resolve()), mode, str(out), tokenizer_folder, hf_folder, items_txt]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"torchrun exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    ranks = []
    for r in range(2):
        loaded = np.load(out / f"rank{r}.npz")
        ranks.append({"results": read_json(out / f"rank{r}.json"),
                      "arrays": {k.replace("__", ":"): loaded[k] for k in loaded.files}})
    return ranks


def _compare(ranks: list[dict], single: dict, fit_tol: float = 1e-10) -> None:
    reference = single["results"]
    for got in ranks:
        res, arr = got["results"], got["arrays"]
        assert res["world_size"] == 2
        # capture: the same store as one process, byte for byte
        assert res["content_hash"] == reference["content_hash"]
        assert res["resumed_hash"] == reference["content_hash"]
        ignore = {"versions"}
        assert {k: v for k, v in res["manifest"].items() if k not in ignore} == {
            k: v for k, v in reference["manifest"].items() if k not in ignore
        }
        assert res["memory_shards"] == reference["memory_shards"]
        for key, values in single["arrays"].items():
            if key.startswith("memory:"):
                np.testing.assert_array_equal(arr[key], values, err_msg=key)
        # fit: identical folds and targets, probes equal to 1e-10
        np.testing.assert_array_equal(arr["pred:folds"], single["arrays"]["pred:folds"])
        np.testing.assert_array_equal(arr["pred:sequence_ids"], single["arrays"]["pred:sequence_ids"])
        for key, values in single["arrays"].items():
            if key.startswith(("coef:", "pred:")):
                np.testing.assert_allclose(arr[key], values, rtol=0, atol=fit_tol, err_msg=key)
        for hook, fit in reference["fit"].items():
            assert res["fit"][hook]["alpha"] == fit["alpha"] and res["fit"][hook]["fold_alphas"] == fit["fold_alphas"]
            for key in ("r2", "intercept", "cv_r2_by_alpha", "shuffle_r2"):
                np.testing.assert_allclose(res["fit"][hook][key], fit[key], rtol=0, atol=fit_tol, err_msg=key)


@pytest.mark.usefixtures("one_thread")
def test_two_gloo_processes_equal_one_process(tmp_path, tiny_tokenizer, tiny_hooked, tiny_hf_folder):
    items_txt = tmp_path / "items.txt"
    items_txt.write_text("\n".join(ITEMS) + "\n")
    ranks = _launch("tiny", tmp_path / "dist", tiny_tokenizer.name_or_path, str(tiny_hf_folder), str(items_txt))
    single = _stages(tiny_hooked, tmp_path / "single", ITEMS)
    _compare(ranks, single)
    # the commands under torchrun: exit 0 on both ranks, the same capture and fit as one process
    assert [got["results"]["cli_exit_codes"] for got in ranks] == [[0, 0], [0, 0]]
    assert _cli(tmp_path / "single", str(tiny_hf_folder), str(items_txt)) == [0, 0]
    manifests = [read_json(tmp_path / where / "cli_capture" / "manifest.json") for where in ("dist", "single")]
    assert manifests[0]["content_hash"] == manifests[1]["content_hash"]
    heldout = [np.load(tmp_path / where / "cli_fit" / "heldout.npz") for where in ("dist", "single")]
    assert sorted(heldout[0].files) == sorted(heldout[1].files)
    np.testing.assert_array_equal(heldout[0]["folds"], heldout[1]["folds"])
    for key in heldout[1].files:
        np.testing.assert_allclose(heldout[0][key], heldout[1][key], rtol=0, atol=1e-10, err_msg=key)
    reference = single["results"]
    assert reference["manifest"]["n_sequences"] == len(ITEMS) and len(reference["manifest"]["shards"]) == 5
    # resume: only the two removed shards (one per rank) were written again
    assert ranks[0]["results"]["rewritten"] == ["000000", "000001"]
    for got in ranks:
        res = got["results"]
        # sweeps: per-sequence rows gathered from both ranks equal one process
        for key in ("entropy", "kl", "top1_agreement", "slopes", "probe_entropy_ci", "clean_entropy"):
            np.testing.assert_allclose(res["dose"][key], reference["dose"][key], rtol=0, atol=1e-9, err_msg=key)
        assert res["dose"]["n_sequences"] == len(SWEEP_ITEMS) and res["dose"]["n_forwards"] == reference["dose"]["n_forwards"]
        for key in ("fraction", "fraction_ci", "entropy_patched"):
            np.testing.assert_allclose(res["patch"][key]["all"], reference["patch"][key]["all"], rtol=0, atol=1e-5)
        for key in ("per_pair_gap", "entropy_source", "entropy_destination"):
            np.testing.assert_allclose(res["patch"][key], reference["patch"][key], rtol=0, atol=1e-5, err_msg=key)
        # errors are raised on every rank, and say what to change
        errors = res["errors"]
        assert "ranks disagree about the capture input" in errors["disagree"] and "inputs_hash" in errors["disagree"]
        for n, n_shards in ((3, 2), (1, 1)):  # the same data as one process with one shard
            single_few = sp.capture(tiny_hooked, ITEMS[:n], out_dir=tmp_path / "single" / f"few{n}", progress=False)
            assert res[f"few{n}"] == {"content_hash": single_few.manifest["content_hash"], "n_shards": n_shards,
                                      "n_sequences": n}
            assert len(single_few.manifest["shards"]) == 1
        assert "1 sequences cannot be split over 2 ranks" in errors["few_sequences"]


@pytest.mark.real_model
def test_two_processes_on_the_embedded_model(tmp_path):
    ranks = _launch("real", tmp_path / "dist", "")
    model = sp.load_model("smollm2-135m-instruct", device="cpu", progress=False)
    single = _stages(model, tmp_path / "single", REAL_TEXTS, hooks=REAL_HOOKS, full=False)
    _compare(ranks, single, fit_tol=1e-8)
    assert ranks[0]["results"]["rewritten"] == ["000000", "000001"]


def test_helpers_do_nothing_without_torchrun(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.split(3, "shards") == [0, 1, 2] and distributed.owns(7)
    values = [np.arange(6.0).reshape(2, 3), np.array([1, 2], dtype=np.int32)]
    summed = distributed.all_reduce_sum(values)
    assert summed[1].dtype == np.float64 and summed[1].tolist() == [1.0, 2.0]
    assert distributed.all_gather({"a": 1}) == [{"a": 1}]
    distributed.check_same({"a": 1}, "input")  # a world of one always agrees
    assert distributed.main_first(lambda: 5) == 5
    assert distributed.local_device("cuda") == "cuda"
    assert not torch.distributed.is_initialized()


def test_rank_and_split_follow_torchrun_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (3, 2, False)
    assert distributed.split(8, "sequences") == [2, 5] and distributed.owns(5) and not distributed.owns(4)
    assert distributed.local_device("cuda") == "cuda:1" and distributed.local_device("cuda:0") == "cuda:0"
    with pytest.raises(ValueError, match="2 pairs cannot be split over 3 ranks"):
        distributed.split(2, "pairs")
    with distributed.alone():
        assert (distributed.world_size(), distributed.rank()) == (1, 0)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        distributed.world_size()


def test_each_rank_loads_onto_its_own_gpu(monkeypatch):
    from surprise_probe.core.models.devices import resolve_device

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cpu") == "cpu"
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs: would check resolve_device('cuda') and ('auto') give 'cuda:1' on local rank 1")
    assert resolve_device("cuda") == resolve_device("auto") == "cuda:1"


if __name__ == "__main__":
    _worker(*sys.argv[1:2], Path(sys.argv[2]), *sys.argv[3:6])
