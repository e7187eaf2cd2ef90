"""scripts/gpu_check.py: the smoke mode runs every stage on the CPU and writes the GPU mode's JSON.

The real check needs one CUDA GPU (``python scripts/gpu_check.py --out FILE.json``); here the
same code runs on tiny shapes (``--smoke``), and the GPU mode's JSON skeleton (every stage
skipped by a zero time budget) is checked to have exactly the same structure.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from surprise_probe.core.models.backends import (
    hooked_transformer_available,
    transformer_lens_version,
)

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _script_module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _strict_json(path: Path) -> dict:
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _structure(record: dict, gc) -> None:
    """The fields both modes write: one constant set in the script, asserted here."""
    assert set(record) == set(gc.TOP_FIELDS)
    assert set(record["models"]) == set(gc.MODELS)
    assert set(record["targets"]) == set(gc.TARGETS)
    for name, model in record["models"].items():
        assert set(model) == set(gc.MODEL_FIELDS), name
        assert model["name"] == name
        assert model["config"]["vocab_size"] == {"llama-3.1-8b": 128256, "gemma-3-262k": 262144}[name]
        assert set(model["stages"]) == set(gc.STAGES), name
        for stage, entry in model["stages"].items():
            assert set(entry) == set(gc.STAGE_FIELDS), (name, stage)
            assert (entry["target"] is not None) == (stage in gc.TARGETS), (name, stage)


@pytest.fixture(scope="module")
def gc():
    return _script_module()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "smoke.json"
    result = _run(["--smoke", "--out", str(out)], timeout=150)  # ~30 s on an idle 2-core machine
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return _strict_json(out), result.stdout


def test_smoke_runs_every_stage(smoke, gc):
    record, stdout = smoke
    _structure(record, gc)
    assert record["mode"] == "smoke" and record["finished"] and record["all_ok"] and record["no_oom"]
    assert record["versions"]["torch"] and record["versions"]["transformer_lens"]
    # load_model's rule: Llama as a HookedTransformer where TransformerLens has one (3.x), else the bridge.
    llama = "HookedTransformer" if hooked_transformer_available() else "TransformerBridge"
    assert record["options"]["llama_backend"] == ("hooked" if hooked_transformer_available() else "bridge")
    for name, model in record["models"].items():
        assert model["backend"] == {"llama-3.1-8b": llama, "gemma-3-262k": "TransformerBridge"}[name]
        assert model["n_parameters"] > 0
        for stage, entry in model["stages"].items():
            assert entry["ok"] and entry["error"] is None, (name, stage, entry["error"])
            assert entry["seconds"] > 0, (name, stage)
            assert entry["peak_memory_gb"] is None  # no per-stage peak on the CPU
            if entry["baseline"] is None:  # fit and agreement: nothing to compare with
                assert entry["baseline_seconds"] is None and entry["ratio"] is None, (name, stage)
            else:
                assert entry["baseline_seconds"] > 0, (name, stage)
                assert math.isfinite(entry["ratio"]) and entry["ratio"] > 0, (name, stage)
                assert entry["ratio"] == pytest.approx(entry["seconds"] / entry["baseline_seconds"])
            if stage in gc.TARGETS:
                assert entry["target_met"] == (entry["ratio"] <= gc.TARGETS[stage]["max_ratio"])
        assert model["stages"]["steer"]["details"]["n_conditions"] == 30
        assert model["stages"]["read"]["details"]["source"] == "the sampled ids"
        agreement = model["bf16_vs_fp32"]
        assert set(agreement) == set(gc.AGREEMENT_FIELDS)
        assert all(math.isfinite(value) for value in agreement.values())
        # bfloat16 against float32 on the same weights: small, and of the order of Hugging Face's own.
        assert agreement["entropy_max_abs_diff"] < 0.05 and agreement["surprise_max_abs_diff"] < 0.1
        # The wrapping is the Hugging Face model: float32 metrics agree to rounding.
        wrapped = model["stages"]["agreement"]["details"]["toolkit_vs_hf_fp32"]
        assert wrapped["surprise_max_abs_diff"] < 1e-4 and wrapped["entropy_max_abs_diff"] < 1e-4
    assert "capture" in stdout and "bf16 vs fp32" in stdout  # the printed table


def test_gpu_mode_writes_the_same_fields(smoke, gc, tmp_path, monkeypatch, capsys):
    """The GPU mode's JSON, with a zero time budget (every stage skipped, no model built) on the CPU."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # main() sets them; restored after the test
        monkeypatch.setenv(name, os.environ.get(name, "1"))
    out = tmp_path / "gpu.json"
    assert gc.main(["--out", str(out), "--device", "cpu", "--budget-s", "0"]) == 1  # stages not run are errors
    assert "skipped" in capsys.readouterr().out
    record = _strict_json(out)
    _structure(record, gc)
    assert record["mode"] == "gpu" and not record["all_ok"]
    assert record["models"]["llama-3.1-8b"]["config"]["hidden_size"] == 4096
    assert record["models"]["llama-3.1-8b"]["sizes"]["capture_length"] == 2048
    for model in record["models"].values():
        for entry in model["stages"].values():
            assert not entry["ok"] and entry["error"].startswith("skipped")
    smoke_record = smoke[0]
    for name in gc.MODELS:
        assert set(record["models"][name]["sizes"]) == set(smoke_record["models"][name]["sizes"])
        assert set(record["models"][name]["config"]) == set(smoke_record["models"][name]["config"])


def test_llama_backend_follows_the_installed_transformer_lens(gc):
    assert gc.resolve_llama_backend("bridge") == "bridge"
    if hooked_transformer_available():
        assert gc.resolve_llama_backend("auto") == gc.resolve_llama_backend("hooked") == "hooked"
    else:
        assert gc.resolve_llama_backend("auto") == "bridge"
        with pytest.raises(ValueError, match=f"TransformerLens {transformer_lens_version()}.*3.x only"):
            gc.resolve_llama_backend("hooked")
    with pytest.raises(ValueError, match="'fast'"):
        gc.resolve_llama_backend("fast")
