"""The intention analyzer on tiny models whose topic choice is fixed by training.

Two 2-layer models are trained in-process (seeded) on chat prompts answered "The <topic>.":
one always answers "fox" (its topic is settled before the first output token), the other picks
one of six topics uniformly. Collapse at k = 0 must show for the first and not for the second.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from surprise_probe.analyses.intention.analysis import analyze_intention
from surprise_probe.analyses.intention.config import IntentionConfig
from surprise_probe.analyses.intention.prompts import IntentionPrompt, read_intention_prompts
from surprise_probe.analyses.intention.statistics import topic_entropy
from surprise_probe.analyses.intention.topics import validate_lexicon
from surprise_probe.app.cli import main
from surprise_probe.core.forward.sampling import chat_prompt_ids
from surprise_probe.core.models.backends import hooked_transformer_available
from surprise_probe.testing import tiny_model

TOPICS = ["fox", "cat", "dog", "moon", "sea", "sky"]
LEXICON = validate_lexicon({t: [t] for t in TOPICS})
PHRASINGS = {
    "word": ["Hello world, how are you?", "Hello world, how are you today?"],
    "story": ["A cat sat on the mat.", "A cat sat on the mat and looked at the moon."],
    "numbers": ["Numbers like 12 appear in text.", "Numbers like 345 and 6789 appear in text too."],
}
PROMPTS = [IntentionPrompt(f"{group}-{i}", group, text, LEXICON)
           for group, texts in PHRASINGS.items() for i, text in enumerate(texts)]
SETTINGS = {"n_samples": 24, "max_new_tokens": 6, "ks": (0, 1, 2, 4), "prefill_tokens": 2, "prefill_samples": 2,
            "n_boot": 200, "n_folds": 3, "n_shuffles": 2, "temperature": 1.0, "followup_phrasings": None}
# tiny_model is a LayerNorm HookedTransformer on TransformerLens 3.x and a random Llama bridge
# (initializer_range 0.02) on 4.x, which settles more slowly: 40 steps leave its "fox" answer at
# topic entropy ~0.17 [0.01, 0.36] nats, 80 at ~0.06 [0.00, 0.16].
STEPS = 40 if hooked_transformer_available() else 80


def _train(tokenizer, always: str | None, seed: int, steps: int = STEPS):
    """A tiny model trained to answer every prompt with "The <topic>." (fixed or uniform topic)."""
    torch.manual_seed(seed)
    model = tiny_model(n_ctx=96, seed=seed, tokenizer=tokenizer)
    model.train()
    prompts = [chat_prompt_ids(model, p.prompt) for p in PROMPTS]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = {t: tokenizer(f"The {t}.", add_special_tokens=False)["input_ids"] + [end] for t in TOPICS}
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        rows, targets = [], []
        for _ in range(16):
            prompt = prompts[rng.integers(len(prompts))]
            answer = answers[always or TOPICS[rng.integers(len(TOPICS))]]
            rows.append(prompt + answer)
            targets.append([-100] * (len(prompt) - 1) + answer + [-100])
        width = max(map(len, rows))
        tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        labels = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(one_thread, tiny_tokenizer):
    settled = _train(tiny_tokenizer, always="fox", seed=1)
    settled.cfg.model_name = "tiny-settled"
    uniform = _train(tiny_tokenizer, always=None, seed=2)
    uniform.cfg.model_name = "tiny-uniform"
    return analyze_intention([settled, uniform], PROMPTS, progress=False, **SETTINGS)


def test_collapse_at_k0_shows_only_for_the_settled_model(trained):
    settled, uniform = trained.models
    # independent reference: the plug-in entropy of the label counts written in the rows
    for model in (settled, uniform):
        for row in model.rows:
            p = np.array(list(row["counts"].values()), float) / SETTINGS["n_samples"]
            assert row["entropy"] == pytest.approx(float(-(p * np.log(p)).sum()))
    assert settled.modal_share["value"] > 0.9
    assert settled.topic_entropy["high"] < 0.35
    assert all(row["modal_topic"] == "fox" for row in settled.rows)
    # uniform over 6 topics, 24 samples: plug-in entropy about 1.6 nats (log 6 = 1.79)
    assert uniform.topic_entropy["low"] > 1.0
    assert uniform.topic_entropy["value"] > settled.topic_entropy["high"] + 0.8
    assert uniform.modal_share["value"] < 0.5
    assert 1.4 < uniform.uniform_reference < math.log(6)


def test_commitment_curve_falls_once_the_topic_is_revealed(trained):
    settled, uniform = trained.models
    curve = {c["k"]: c for c in uniform.commitment}
    assert [c["k"] for c in uniform.commitment] == [0, 1, 2, 4]
    # k=1 reveals "The" (no topic yet); k=2 reveals the topic word itself
    assert curve[1]["value"] > 1.0
    assert curve[2]["value"] == pytest.approx(0.0, abs=1e-9)
    assert all(row["reference"]["mention_token"] == 2 for row in uniform.rows)
    # "The fox." has 3 content tokens: k=4 cannot be revealed, and says so
    assert curve[4]["value"] is None and curve[4]["n_references_too_short"] == len(PROMPTS)
    assert max(c["value"] for c in settled.commitment if c["k"] <= 2) < 0.35


def test_readout_and_prefill_are_reported_with_sizes(trained):
    settled, uniform = trained.models
    # one modal topic everywhere: no probe, and the reason is given
    assert "probe" not in settled.readout and "2 classes" in settled.readout["skipped"]
    assert len(settled.readout["logit_lens"]["accuracy"]) == settled.n_layers + 1
    assert settled.prefill["n_pairs"] == len(PROMPTS)
    for pair in settled.prefill["pairs"]:
        assert pair["own_topic"] == "fox" and pair["other_topic"] != "fox"
        assert pair["own_start"] == "The fox" and pair["other_start"] == "The " + pair["other_topic"]
    # pushed off its settled topic, the settled model is less sure of what follows; the uniform one is not
    assert settled.prefill["difference"]["low"] > 0.3
    assert settled.prefill["n_other_higher"] == len(PROMPTS)
    assert abs(uniform.prefill["difference"]["mean"]) < 0.1
    diff = settled.prefill["difference"]
    own = np.array([p["own_entropy"] for p in settled.prefill["pairs"]])
    other = np.array([p["other_entropy"] for p in settled.prefill["pairs"]])
    assert diff["mean"] == pytest.approx(float((other - own).mean()))
    assert settled.prefill["n_other_higher"] == int((other > own).sum())


def test_save_writes_json_with_config_versions_and_figures(trained, tmp_path):
    paths = trained.save(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["config"]["n_samples"] == SETTINGS["n_samples"]
    assert "torch" in data["software_versions"]
    assert [m["model_id"] for m in data["models"]] == ["tiny-settled", "tiny-uniform"]
    for name in ("topics", "commitment", "readout", "prefill"):
        assert paths[name].stat().st_size > 10_000


def test_cache_reuses_finished_sampling_and_redoes_it_for_another_config(tiny_tokenizer, tmp_path, one_thread):
    model = tiny_model(n_ctx=96, tokenizer=tiny_tokenizer)
    small = {**SETTINGS, "n_samples": 2, "ks": (0, 2), "n_boot": 20}
    first = analyze_intention([model], PROMPTS[:2], cache_dir=tmp_path, progress=False, **small)
    folder = tmp_path / model.cfg.model_name
    assert {"k0.json", "commit_k2.json"} <= {p.name for p in folder.iterdir()}
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    second = analyze_intention([model], PROMPTS[:2], cache_dir=tmp_path, progress=False, **small)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    assert first.models[0].rows == second.models[0].rows
    third = analyze_intention([model], PROMPTS[:2], cache_dir=tmp_path, progress=False, **{**small, "n_samples": 3})
    assert (folder / "k0.json").stat().st_mtime_ns != stamps["k0.json"]
    assert sum(third.models[0].rows[0]["counts"].values()) == 3


def test_topic_entropy_against_hand_values():
    assert topic_entropy(["a", "a", "a"]) == 0.0
    assert topic_entropy(["a", "b"]) == pytest.approx(math.log(2))
    assert topic_entropy(["a", "b", "other", "ambiguous"]) == pytest.approx(math.log(4))


BAD_FILES = [
    ('{"prompt": "Pick a fruit."}\n', "1: prompt has no 'topics'"),
    ('{"prompt": "ok", "topics": {"a": ["a"], "b": ["b"]}}\n{"prompt": "Pick", "topics": {}}\n', "2: 'topics' needs at least 2"),
    ('{"prompt": "", "topics": {"a": ["a"], "b": ["b"]}}\n', "1: 'prompt' must be a non-empty string"),
    ('["not", "an", "object"]\n', "1: expected an object"),
    ('{"prompt": "x", "topics": {"a": ["a"], "b": "b"}}\n', "1: topic 'b' needs a non-empty list"),
    ('{"prompt": "x", "topics": {"a": ["a"], "b": ["b"]}, "id": 1}\n'
     '{"prompt": "y", "topics": {"a": ["a"], "b": ["b"]}, "id": 1}\n', "2: duplicate id"),
    ('{"prompt": "x", "topics"\n', "1: not valid JSON"),
    ("\n\n", "holds no prompts"),
]


@pytest.mark.parametrize(("content", "message"), BAD_FILES)
def test_malformed_prompt_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"prompts.jsonl:?{message}" if message[0].isdigit() else message):
        read_intention_prompts(path)


def test_user_file_defaults_and_builtin_set(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "Pick one.", "topics": {"Red": ["RED"], "blue": ["blue"]}}\n')
    (prompt,) = read_intention_prompts(path)
    assert (prompt.id, prompt.group, prompt.topics) == ("line1", "line1", {"Red": ("red",), "blue": ("blue",)})
    builtin = read_intention_prompts("builtin")
    groups = {p.group for p in builtin}
    assert len(groups) >= 16 and len(builtin) >= 2 * len(groups)
    assert min(len(p.topics) for p in builtin) >= 6


@pytest.mark.parametrize(("bad", "message"), [
    ({"n_samples": 1}, "n_samples"), ({"temperature": 0.0}, "temperature"), ({"ks": (0, 4, 2)}, "increasing"),
    ({"ks": (0, 8), "max_new_tokens": 8}, "largest k"), ({"prompt_format": "html"}, "prompt_format"),
    ({"n_folds": 1}, "n_folds"), ({"level": 1.0}, "level"),
])
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        IntentionConfig(**bad)


def test_nested_bootstrap_against_hand_cases():
    from surprise_probe.core.utils.stats import bootstrap_nested

    def mean(draws):
        return draws.mean(-1)

    # no spread anywhere: the interval is the point
    assert bootstrap_nested(mean, [np.full(4, 2.0), np.full(3, 2.0)], n_boot=50)[:3] == (2.0, 2.0, 2.0)
    # no spread within units: only the group draw varies; two groups of means 0 and 1
    value, low, high, per_unit = bootstrap_nested(mean, [np.zeros(5), np.zeros(5), np.ones(5)],
                                                  np.array([0, 0, 1]), n_boot=400)
    assert value == pytest.approx(1 / 3) and per_unit.tolist() == [0.0, 0.0, 1.0]
    assert low == 0.0 and high == 1.0  # a replicate of two group-0 draws, or two group-1 draws


def test_nested_bootstrap_interval_covers_a_plug_in_entropy():
    from surprise_probe.analyses.intention.statistics import topic_entropy
    from surprise_probe.core.utils.stats import bootstrap_nested

    def entropy(draws):
        return np.array([topic_entropy([str(v) for v in row]) for row in draws])

    # 8 distinct labels per unit: every resample with a repeat has a lower plug-in entropy than
    # log 8, so uncentred replicates would put the whole interval below the point value
    units = [np.arange(8), np.arange(8), np.array([0, 0, 0, 0, 1, 1, 2, 3])]
    value, low, high, _ = bootstrap_nested(entropy, units, n_boot=400, seed=1)
    assert value == pytest.approx((2 * np.log(8) + topic_entropy(list("00001123"))) / 3)
    assert low < value < high
    assert high - low < 1.5  # the spread is kept, not inflated


@pytest.mark.parametrize(("argv", "message"), [
    (["--models", "no-such-model-xyz", "--prompts", "missing.jsonl"], "missing.jsonl"),
    (["--models", "smollm2-135m-instruct", "--n-samples", "1"], "n_samples"),
    (["--models", "smollm2-135m-instruct", "--ks", "0", "64"], "largest k"),
    (["--models", "smollm2-135m-instruct", "--temperature", "0"], "temperature"),
    (["--models", "smollm2-135m-instruct", "smollm2-135m-instruct"], "twice"),
    (["--models", "smollm2-135m-instruct", "--level", "2"], "--level"),
])
def test_cli_bad_arguments_exit_2_before_loading_a_model(argv, message, tmp_path, capsys, monkeypatch):
    import surprise_probe.analyses.intention.analysis as intention

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(intention, "load_model", refuse)
    code = main(["intention", "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_runs_end_to_end_on_a_local_folder_and_resumes(tiny_tokenizer, tmp_path, capsys, one_thread):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "tiny-lm-128"
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
    )).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    argv = ["intention", "--models", str(folder), "--limit-prompts", "1", "--n-samples", "2",
            "--max-new-tokens", "4", "--ks", "0", "1", "--n-boot", "20", "--device", "cpu", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "topic entropy at k=0" in printed and "3 phrasings" in printed
    data = json.loads((out / "intention.json").read_text())
    assert data["n_prompts"] == 1 and data["config"]["n_samples"] == 2
    assert main(argv) == 0
    assert "holds this result already" in capsys.readouterr().out
    assert main([*argv[:-3], "--n-samples", "3", "--out", str(out)]) == 2
    assert "n_samples=2, not n_samples=3" in capsys.readouterr().err


HELD_OUT = [
    {"id": "pet-1", "group": "pet", "prompt": "Which pet suits a small flat? Pick one.",
     "topics": {"Cat": ["CAT", "kitten"], "dog": ["dog", "pupp"], "fish": ["fish"]}},
    {"id": "pet-2", "group": "pet", "prompt": "Name one animal that makes a good pet.",
     "topics": {"Cat": ["CAT", "kitten"], "dog": ["dog", "pupp"], "fish": ["fish"]}},
    {"prompt": "Recommend one city: Zürich, Kraków or Lisboa? 🙂",
     "topics": {"city_a": ["Zürich", "zurich"], "city_b": ["KRAKÓW"], "city_c": ["lisboa"]}},
]


def test_a_held_out_user_file_runs_end_to_end(tiny_tokenizer, tmp_path, capsys, one_thread):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "tiny-lm-256"
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
    )).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in HELD_OUT) + "\n\n", encoding="utf-8")
    prompts = read_intention_prompts(path)
    assert [p.group for p in prompts] == ["pet", "pet", "line3"]
    assert prompts[2].topics == {"city_a": ("zürich", "zurich"), "city_b": ("kraków",), "city_c": ("lisboa",)}
    out = tmp_path / "out"
    argv = ["intention", "--models", str(folder), "--prompts", str(path), "--n-samples", "2", "--max-new-tokens", "4",
            "--ks", "0", "1", "--n-boot", "20", "--device", "cpu", "--out", str(out), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    data = json.loads((out / "intention.json").read_text())
    (model,) = data["models"]
    assert [row["id"] for row in model["rows"]] == ["pet-1", "pet-2", "line3"]
    labels = [s["label"] for row in model["rows"] for s in row["samples"]]
    assert len(labels) == 6 and all(label["label"] in {"Cat", "dog", "fish", "city_a", "city_b", "city_c",
                                                       "other", "ambiguous"} for label in labels)


def test_a_prompt_longer_than_the_context_is_named(tmp_path, tiny_hf_folder, capsys):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"id": "essay", "prompt": "word " * 80, "topics": {"a": ["a"], "b": ["b"]}}) + "\n")
    argv = ["intention", "--models", str(tiny_hf_folder), "--prompts", str(path), "--n-samples", "2",
            "--max-new-tokens", "4", "--ks", "0", "1", "--device", "cpu", "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "prompt 'essay'" in err and "context of 64 tokens" in err


class _WordModel:
    """A stand-in whose tokenizer gives one id per word (equal word count = equal token count)."""

    class tokenizer:  # noqa: N801 - mimics the attribute of a model
        def __new__(cls, text, add_special_tokens=False):
            return {"input_ids": list(range(len(text.split())))}


def test_prefill_names_the_other_topic_and_uses_a_stem_only_when_the_name_is_not_a_match():
    from surprise_probe.analyses.intention.prefill import _prefill_pair
    from surprise_probe.analyses.intention.topics import Labeller

    lexicon = validate_lexicon({"apple": ["apple"], "city_1": ["paris", "rome"], "cherry": ["cherr"]})
    prompt = IntentionPrompt("x", "x", "Pick one.", lexicon)
    labeller = Labeller(lexicon)
    text = "I like Apples a lot"
    record = {"text": text, "label": labeller(text).to_dict()}
    starts = {_prefill_pair(_WordModel, prompt, labeller, record, seed)["other_start"] for seed in range(20)}
    # "cherry" is matched by its stem, so its name stands in (capitalised, plural kept); "city_1" is
    # not ("city 1" is also two words), so its first stem of one word does.
    assert starts == {"I like Cherrys", "I like Paris"}
    pair = _prefill_pair(_WordModel, prompt, labeller, record, 0)
    assert pair["own_start"] == "I like Apples" and pair["own_topic"] == "apple"
