"""The on/off-policy entropy gap: sign by construction, exact spans, empty responses, inputs, CLI."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from surprise_probe.analyses.policy.gap import policy_gap
from surprise_probe.analyses.policy.prompts import (
    GapPrompt,
    prefix_ids,
    read_gap_prompts,
    text_response_ids,
)
from surprise_probe.analyses.policy.reading import read_responses
from surprise_probe.analyses.policy.statistics import auroc_with_ci, summarize
from surprise_probe.analyses.policy.writers import WriterResponse, sample_writer
from surprise_probe.app.cli import main
from surprise_probe.core.forward.sampling import chat_prompt_ids, sample
from surprise_probe.testing import TINY_CORPUS, tiny_hooked_transformer
from tests.conftest import needs_hooked_transformer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [GapPrompt(f"p{i}", text) for i, text in enumerate(TINY_CORPUS)]


@pytest.fixture(scope="module")
def trained(tiny_tokenizer):
    """A tiny model trained (seeded AdamW) on its own low-temperature samples, and an untrained peer."""
    needs_hooked_transformer()
    torch.manual_seed(0)
    model = tiny_hooked_transformer(tokenizer=tiny_tokenizer, n_ctx=96, seed=1)
    drawn = sample(model, [chat_prompt_ids(model, p.prompt) for p in PROMPTS], n_samples=2, max_new_tokens=10,
                   temperature=0.5, stop_ids=())
    width = max(len(d.token_ids) for d in drawn)
    tokens = torch.zeros(len(drawn), width, dtype=torch.long)
    target = torch.zeros(len(drawn), width, dtype=torch.bool)
    for row, d in enumerate(drawn):
        tokens[row, : len(d.token_ids)] = torch.tensor(d.token_ids)
        target[row, len(d.prompt_ids) : len(d.token_ids)] = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(50):
        log_probs = torch.log_softmax(model(tokens[:, :-1]), -1).gather(-1, tokens[:, 1:, None])[..., 0]
        loss = -(log_probs * target[:, 1:]).sum() / target[:, 1:].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model, tiny_hooked_transformer(tokenizer=tiny_tokenizer, n_ctx=96, seed=7)


@pytest.fixture(scope="module")
def gap(trained):
    model, other = trained
    prompts = [GapPrompt(p.id, p.prompt, "The cat sat on the mat." if i % 2 else None) for i, p in enumerate(PROMPTS)]
    return policy_gap({"trained": model, "untrained": other}, prompts, max_new_tokens=10, temperature=0.5,
                      n_samples=2, n_boot=200, progress=False)


def test_a_model_trained_on_its_own_samples_reads_them_at_lower_entropy(gap):
    row = gap.comparison("trained", "assistant", "writer:untrained")
    assert row["span"]["ratio_off_on"]["low"] > 1.5  # measured ~9x
    assert row["span"]["sign_count"]["off_higher"] == len(PROMPTS)
    assert row["auroc_entropy"]["auroc"] > 0.9
    assert gap.comparison("trained", "assistant", "own_other_prompt")["span"]["ratio_off_on"]["low"] > 1.5
    # The untrained reader has no such gap (its CI holds 1 within 1%).
    control = gap.comparison("untrained", "assistant", "writer:trained")["span"]["ratio_off_on"]
    assert 0.99 < control["value"] < 1.01


def test_statistics_match_a_direct_computation(gap):
    rows = gap.to_dict()["per_response"]

    def per_prompt(reader, source):
        values = {}
        for r in rows:
            if r["reader"] == reader and r["format"] == "assistant" and r["source"] == source:
                values.setdefault(r["prompt_index"], []).append(r["mean_entropy"])
        return {i: np.mean(v) for i, v in values.items()}

    on, off = per_prompt("trained", "own"), per_prompt("trained", "writer:untrained")
    expected_ratio = sum(off.values()) / sum(on.values())
    row = gap.comparison("trained", "assistant", "writer:untrained")
    assert row["span"]["ratio_off_on"]["value"] == pytest.approx(expected_ratio, rel=1e-12)
    assert gap.cell("trained", "assistant", "own")["mean_entropy"]["mean"] == pytest.approx(np.mean(list(on.values())))
    own_scores = [-r["mean_entropy"] for r in rows if (r["reader"], r["format"], r["source"]) == ("trained", "assistant", "own")]
    off_scores = [-r["mean_entropy"] for r in rows
                  if (r["reader"], r["format"], r["source"]) == ("trained", "assistant", "writer:untrained")]
    expected_auc = roc_auc_score([1] * len(own_scores) + [0] * len(off_scores), own_scores + off_scores)
    assert row["auroc_entropy"]["auroc"] == pytest.approx(expected_auc)
    human = gap.cell("trained", "assistant", "human")
    assert human["n_responses"] == 3 and gap.to_dict()["n_prompts_with_human_answer"] == 3


def test_own_reads_use_the_exact_sampled_ids_and_entropy_equals_a_full_forward(trained):
    model, _ = trained
    responses = {"m": sample_writer(model, "m", PROMPTS[:2], fmt="assistant", max_new_tokens=6, progress=False)}
    readings = read_responses(model, "m", PROMPTS[:2], responses, ["assistant"], progress=False)
    own = next(r for r in readings if r.source == "own" and r.prompt_index == 0)
    response = responses["m"][0]
    assert own.exact_ids and len(own.entropy) == len(response.content_ids)
    tokens = torch.tensor([chat_prompt_ids(model, PROMPTS[0].prompt) + response.content_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(tokens)[0].double(), -1)
    reference = -(log_probs.exp() * log_probs).sum(-1)[-len(response.content_ids) :]
    np.testing.assert_allclose(own.entropy, reference.numpy(), atol=1e-4)


@pytest.mark.parametrize("fmt", ["assistant", "user", "plain"])
def test_the_scored_span_is_exactly_the_response_in_each_format(tiny_hooked, fmt):
    tokenizer = tiny_hooked.tokenizer
    prompt, text = "Hello world, how are you?", "The quick brown fox jumps."
    prefix, ids = prefix_ids(tiny_hooked, prompt, fmt), text_response_ids(tiny_hooked, text, fmt)
    assert tokenizer.decode(ids).strip() == text
    full = tokenizer.decode(prefix + ids)
    expected = {
        "assistant": tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True) + text,
        "user": tokenizer.apply_chat_template([{"role": "user", "content": prompt + "\n\n" + text}],
                                              tokenize=False).removesuffix("<|im_end|>\n"),
        "plain": "<|endoftext|>Question: " + prompt + "\nAnswer: " + text,
    }[fmt]
    assert full == expected


def test_empty_responses_are_counted_not_dropped(tiny_hooked):
    responses = {
        "m": [WriterResponse("m", i, p.id, 0, "assistant", [] if i == 1 else [300, 301], False, "x")
              for i, p in enumerate(PROMPTS[:3])],
    }
    readings = read_responses(tiny_hooked, "m", PROMPTS[:3], responses, ["assistant"], progress=False)
    summary = summarize(readings, k=2, max_position=4, n_boot=50)
    own = next(c for c in summary["cells"] if c["source"] == "own")
    assert own["n_responses"] == 3 and own["n_empty"] == 1 and own["n_tokens"] == 4
    assert own["mean_entropy"]["n_prompts"] == 2


def test_a_model_without_chat_template_reads_plain_only(tiny_tokenizer, tmp_path):
    needs_hooked_transformer()
    model = tiny_hooked_transformer(tokenizer=tiny_tokenizer, n_ctx=96, seed=2)
    model.tokenizer = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    model.tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template.*--formats plain"):
        policy_gap({"base": model}, PROMPTS[:2], formats=["assistant"], max_new_tokens=3, progress=False)
    result = policy_gap({"base": model}, PROMPTS[:2], max_new_tokens=3, n_boot=20, progress=False)
    assert result.models[0]["formats_read"] == ["plain"] and result.models[0]["sampling_format"] == "plain"
    assert result.config["plain_format"] == "Question: {prompt}\nAnswer:"


def test_sampling_resumes_from_the_store_and_refuses_other_settings(tiny_hooked, tmp_path):
    store = tmp_path / "responses" / "m.jsonl"
    full = sample_writer(tiny_hooked, "m", PROMPTS[:4], fmt="assistant", max_new_tokens=5, batch_size=2,
                         store=tmp_path / "full.jsonl", progress=False)
    first = sample_writer(tiny_hooked, "m", PROMPTS[:2], fmt="assistant", max_new_tokens=5, batch_size=2,
                          store=store, progress=False)  # as if interrupted after two prompts
    assert len(store.read_text().splitlines()) == 2
    resumed = sample_writer(tiny_hooked, "m", PROMPTS[:4], fmt="assistant", max_new_tokens=5, batch_size=2,
                            store=store, progress=False)
    assert [r.content_ids for r in resumed] == [r.content_ids for r in full]
    assert resumed[:2] == first
    with pytest.raises(FileExistsError, match="max_new_tokens=5, not 6"):
        sample_writer(tiny_hooked, "m", PROMPTS[:4], fmt="assistant", max_new_tokens=6, store=store, progress=False)


def test_auroc_and_its_interval_against_sklearn():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 30), rng.normal(0, 1, 40)
    result = auroc_with_ci(pos, neg)
    assert result["auroc"] == pytest.approx(roc_auc_score([1] * 30 + [0] * 40, np.r_[pos, neg]))
    assert result["low"] < result["auroc"] < result["high"]
    assert auroc_with_ci(np.array([1.0]), np.array([]))["n_neg"] == 0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", r"prompts.jsonl:2: not valid JSON"),
        ('{"answer": "x"}', r"prompts.jsonl:2: 'prompt' must be a non-empty string"),
        ('{"prompt": "  "}', r"prompts.jsonl:2: 'prompt' must be a non-empty string"),
        ('{"prompt": "ok", "answer": 3}', r"prompts.jsonl:2: 'answer' must be a non-empty string"),
        ('["prompt"]', r"prompts.jsonl:2: expected an object"),
        ('{"prompt": "b", "id": "a"}', r"prompts.jsonl:2: id 'a' already used on line 1"),
    ],
)
def test_malformed_prompt_files_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a", "id": "a"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_gap_prompts(path)


def test_a_valid_prompt_file_with_answers(tmp_path):
    path = tmp_path / "held_out.jsonl"
    path.write_text('{"prompt": "What is 2+2?", "answer": "4."}\n\n{"prompt": "Name a colour."}\n')
    assert read_gap_prompts(path) == [GapPrompt("line-1", "What is 2+2?", "4."), GapPrompt("line-3", "Name a colour.")]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompts", "PROMPTS"], "prompts.jsonl:1: not valid JSON"),
        (["--formats", "chat"], "invalid choice: 'chat'"),
        (["--n-prompts", "-1"], "expected an integer >= 0"),
        (["--k", "0"], "expected an integer >= 1"),
        (["--models", "MODEL", "MODEL"], "lists a model twice"),
        (["--probe", "nowhere/probe"], "probe.json does not exist"),
    ],
)
def test_bad_arguments_exit_2_before_any_model_loads(tmp_path, tiny_hf_folder, monkeypatch, capsys, argv, message):
    import surprise_probe.app.commands.gap as gap_command

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(gap_command, "load_model", no_loading)
    bad = tmp_path / "prompts.jsonl"
    bad.write_text("{oops\n")
    argv = [str(bad) if a == "PROMPTS" else str(tiny_hf_folder) if a == "MODEL" else a for a in argv]
    if "--models" not in argv:
        argv = ["--models", str(tiny_hf_folder), *argv]
    assert main(["gap", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("surprise-probe gap: error:") and message in err and len(err.splitlines()) == 1


def test_gap_command_end_to_end_and_resume(tmp_path, tiny_hf_folder, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hello world", "answer": "The cat sat."}\n{"prompt": "Rivers flow to the sea"}\n')
    argv = ["gap", "--models", str(tiny_hf_folder), "--prompts", str(prompts), "--out", str(tmp_path / "out"),
            "--max-new-tokens", "4", "--n-boot", "50", "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "out" / "gap.json").read_text())
    assert result["n_prompts"] == 2 and result["n_prompts_with_human_answer"] == 1
    assert result["software_versions"]["torch"] and result["config"]["max_new_tokens"] == 4
    assert (tmp_path / "out" / "gap.html").stat().st_size > 1_000_000
    assert len((tmp_path / "out" / "responses").glob("*.jsonl").__next__().read_text().splitlines()) == 2
    capsys.readouterr()
    assert main(argv) == 0
    assert "already" in capsys.readouterr().out


HELD_OUT = (
    '{"prompt": "Why does bread go stale?", "answer": "Starch recrystallizes as it ages."}\n'
    '{"prompt": "¿Cuál es la capital de Australia?", "answer": "Canberra, elegida como compromiso."}\n'
    "\n"
    '{"id": "kanji", "prompt": "What does 猫 mean?", "answer": "猫 means \\"cat\\" 🙂"}\n'
    '{"prompt": "Give me one tip for sleeping better."}\n'
)


@pytest.fixture(scope="module")
def tiny_long_folder(tmp_path_factory, tiny_tokenizer):
    """A random Llama with 256 positions (the tiny byte-level tokenizer spends many tokens on unicode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-lm-256")
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
    )).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_a_held_out_user_file_runs_end_to_end(tmp_path, tiny_long_folder, capsys):
    prompts = tmp_path / "held_out.jsonl"
    prompts.write_text(HELD_OUT, encoding="utf-8")
    out = tmp_path / "out"
    argv = ["gap", "--models", str(tiny_long_folder), "--prompts", str(prompts), "--n-prompts", "0", "--out", str(out),
            "--max-new-tokens", "4", "--n-boot", "20", "--no-progress", "--device", "cpu"]
    assert main(argv) == 0, capsys.readouterr().err
    result = json.loads((out / "gap.json").read_text())
    assert [p["id"] for p in result["prompts"]] == ["line-1", "line-2", "kanji", "line-5"]
    assert [p["has_answer"] for p in result["prompts"]] == [True, True, True, False]
    human = [r for r in result["per_response"] if r["source"] == "human"]
    # One human read per answered prompt in each of the three formats; the missing answer is no row.
    assert sorted({r["prompt_index"] for r in human}) == [0, 1, 2] and len(human) == 3 * 3
    assert all(r["n_tokens"] > 0 for r in human)


def test_a_prompt_longer_than_the_context_is_named(tmp_path, tiny_hf_folder, capsys):
    prompts = tmp_path / "long.jsonl"
    prompts.write_text('{"prompt": "short"}\n{"id": "essay", "prompt": "' + "word " * 80 + '"}\n')
    argv = ["gap", "--models", str(tiny_hf_folder), "--prompts", str(prompts), "--out", str(tmp_path / "out"),
            "--max-new-tokens", "4", "--no-progress", "--device", "cpu"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "prompt 'essay'" in err and "context of 64 tokens" in err


def test_probe_readout_auroc_for_the_reader_it_was_fitted_on(trained, tmp_path):
    from surprise_probe.probes.direction import ProbeDirection

    from surprise_probe.core.models.loading import model_id

    model, other = trained
    rng = np.random.default_rng(3)
    vector = rng.normal(size=model.cfg.d_model)
    hook = "blocks.1.hook_resid_post"
    ProbeDirection(vector / np.linalg.norm(vector), mean=0.0, std=1.0, hook=hook, layer=1,
                   model_id=model_id(model), d_model=model.cfg.d_model, target="surprise").save(tmp_path / "probe")
    result = policy_gap({"trained": model, "untrained": other}, PROMPTS[:6], formats=["assistant"],
                        max_new_tokens=6, n_boot=20, probe_path=tmp_path / "probe", progress=False)
    assert result.models[0]["probe"]["hook"] == hook and result.models[1]["probe"] is None
    own = [r for r in result.readings if (r.reader, r.source) == ("trained", "own")]
    # The readout of one response equals the mean projection of its span, from an independent forward.
    first = next(r for r in own if len(r.entropy))
    response = next(w for w in result.responses["trained"] if w.prompt_index == first.prompt_index)
    prefix = prefix_ids(model, PROMPTS[first.prompt_index].prompt, "assistant")
    _, cache = model.run_with_cache(torch.tensor([prefix + response.content_ids]))
    span = cache[hook][0, len(prefix):].numpy().astype(np.float64)
    assert first.probe_readout == pytest.approx(float((span @ (vector / np.linalg.norm(vector))).mean()), rel=1e-4)
    row = result.comparison("trained", "assistant", "writer:untrained")
    off = [r.probe_readout for r in result.readings if (r.reader, r.source) == ("trained", "writer:untrained")
           and len(r.entropy)]
    on = [r.probe_readout for r in own if len(r.entropy)]
    expected = roc_auc_score([1] * len(on) + [0] * len(off), -np.array(on + off))
    assert row["auroc_probe"]["auroc"] == pytest.approx(expected)
    assert "auroc_probe" not in result.comparison("untrained", "assistant", "writer:trained")


def test_one_prompt_gives_no_interval_and_says_what_it_needs(trained):
    """From n = 1 the gap once reported AUROC 1.00 [1.00, 1.00] and off/on 1.000 [1.000, 1.000], with
    own_other_prompt silently absent: now the number stands with the reason it has no interval."""
    model, other = trained
    result = policy_gap({"trained": model, "untrained": other}, PROMPTS[:1], formats=["assistant"],
                        max_new_tokens=6, n_boot=20, progress=False)
    row = result.comparison("trained", "assistant", "writer:untrained")
    ratio, auroc = row["span"]["ratio_off_on"], row["auroc_entropy"]
    assert np.isfinite(ratio["value"]) and np.isnan(ratio["low"]) and np.isnan(ratio["high"])
    assert ratio["note"] == "no CI: a CI over prompts needs at least 2 prompts, got 1"
    assert np.isnan(auroc["low"]) and "a DeLong CI needs at least 2 responses on each side, got 1 and 1" in auroc["note"]
    own = result.cell("trained", "assistant", "own")["mean_entropy"]
    assert np.isnan(own["low"]) and own["n_prompts"] == 1
    warnings = result.summary["warnings"]
    assert any("own_other_prompt" in w and "needs at least 2 prompts" in w for w in warnings)
    text = result.report()
    assert "[1.00, 1.00]" not in text and "[1.000, 1.000]" not in text
    assert "[no CI: a CI over prompts needs at least 2 prompts, got 1]" in text
    assert "warning: 1 prompt: own_other_prompt" in text and result.to_dict()["warnings"] == warnings
    # Two prompts: intervals again, and the small sample is still said.
    two = policy_gap({"trained": model}, PROMPTS[:2], formats=["assistant"], max_new_tokens=6, n_boot=20,
                     progress=False)
    assert np.isfinite(two.comparison("trained", "assistant", "own_other_prompt")["span"]["ratio_off_on"]["low"])
    assert two.summary["warnings"][0].startswith("CIs from 2 prompts")
