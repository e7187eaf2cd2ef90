import json

import pytest
import torch

from surprise_probe.cli import main


@pytest.fixture(scope="module")
def long_context_folder(tmp_path_factory):
    """A tiny random Llama with room for short conversations (n_ctx 256)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from surprise_probe.testing import tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny-study-lm")
    tokenizer = tiny_tokenizer(folder)
    torch.manual_seed(2)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_study_runs_end_to_end_and_resumes(long_context_folder, tmp_path, capsys):
    inputs = tmp_path / "in.jsonl"
    with open(inputs, "w") as handle:
        for i in range(8):
            handle.write(json.dumps({"messages": [
                {"role": "user", "content": f"Question {i}: how are you?"},
                {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog. " * (1 + i % 3)},
            ]}) + "\n")
    argv = ["study", "--model", str(long_context_folder), "--input", str(inputs), "--out", str(tmp_path / "s"),
            "--steer-inputs", "3", "--random-directions", "2", "--alphas", "-2", "0", "2"]
    assert main(argv) == 0
    out = tmp_path / "s"
    for path in ("capture/manifest.json", "fit_surprise/sweep.json", "fit_surprise/probe.json",
                 "fit_entropy/sweep.json", "steer/steer.json", "steer/dose_response.html", "token_view.html",
                 "index.html", "study.json"):
        assert (out / path).exists(), path
    index = (out / "index.html").read_text()
    assert "fit_surprise/sweep.html" in index and "steer/dose_response.html" in index
    steer = json.loads((out / "steer" / "steer.json").read_text())
    assert steer["dose_response"]["alphas"] == [-2.0, 0.0, 2.0]
    capsys.readouterr()
    # A rerun skips every finished step.
    assert main(argv) == 0
    assert capsys.readouterr().out.count("done already; skipped") == 3
