import json

import numpy as np
import pytest

import surprise_probe as sp
from surprise_probe.core.forward.responses import generate_to_jsonl, sample_responses

PROMPTS = ["Hello world, how are you?", "Tell me about the quick brown fox and the lazy dog."]


def test_batched_greedy_equals_one_at_a_time(tiny_model):
    together = sample_responses(tiny_model, PROMPTS, max_new_tokens=6, temperature=0)
    alone = [sample_responses(tiny_model, [p], max_new_tokens=6, temperature=0)[0] for p in PROMPTS]
    assert [r["token_ids"] for r in together] == [r["token_ids"] for r in alone]


def test_sampled_ids_are_scored_and_read_back_on_policy(tiny_hooked):
    (item,) = sample_responses(tiny_hooked, PROMPTS[:1], max_new_tokens=8, temperature=1.0, seed=3)
    scored = np.asarray(item["scored"])
    assert not scored[: item["prompt_len"]].any() and scored[item["prompt_len"] :].sum() >= 1
    encoded = sp.encode(tiny_hooked, {"token_ids": item["token_ids"], "scored": item["scored"]})
    assert encoded.token_ids.tolist() == item["token_ids"]  # exact ids, not re-tokenized text
    again = sample_responses(tiny_hooked, PROMPTS[:1], max_new_tokens=8, temperature=1.0, seed=3)[0]
    assert again["token_ids"] == item["token_ids"]  # seeded


def test_generate_to_jsonl_resumes_without_duplicates(tiny_hooked, tmp_path):
    prompts = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS * 2)]
    out = tmp_path / "r.jsonl"
    generate_to_jsonl(tiny_hooked, prompts[:3], out, max_new_tokens=4, batch_size=2)
    first = out.read_text().splitlines()
    generate_to_jsonl(tiny_hooked, prompts, out, max_new_tokens=4, batch_size=2)
    lines = out.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["p0", "p1", "p2", "p3"]
    assert lines[:3] == first  # earlier lines kept as written


def test_a_damaged_line_is_reported_and_sampled_again_never_counted(tiny_hooked, tmp_path):
    prompts = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS * 2)]
    out = tmp_path / "r.jsonl"
    generate_to_jsonl(tiny_hooked, prompts[:3], out, max_new_tokens=4, batch_size=2)
    with open(out, "a") as handle:
        handle.write('{"id": "p3", "tok')  # a damaged line
    with pytest.warns(UserWarning, match=r"r\.jsonl:4: not valid JSON \(the line stops after column 17, inside a "
                                         r"string .*; dropped, and its response is sampled again"):
        generate_to_jsonl(tiny_hooked, prompts, out, max_new_tokens=4, batch_size=2)
    records = [json.loads(line) for line in out.read_text().splitlines()]  # every line whole again
    assert sorted(r["id"] for r in records) == sorted(p["id"] for p in prompts)
    notes = []
    generate_to_jsonl(tiny_hooked, prompts, out, max_new_tokens=4, batch_size=2, on_damaged_line=notes.append)
    assert notes == []


def test_a_file_generate_did_not_write_is_never_touched(tiny_hooked, tmp_path):
    out = tmp_path / "mine.jsonl"
    out.write_text('{"note": "my own data"}\n')
    before = out.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="did not write"):
            generate_to_jsonl(tiny_hooked, [{"id": "a", "prompt": PROMPTS[0]}], out, max_new_tokens=2,
                              overwrite=overwrite)
    assert out.read_bytes() == before


def test_a_resume_with_another_temperature_is_refused(tiny_hooked, tmp_path):
    prompts = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    out = tmp_path / "r.jsonl"
    generate_to_jsonl(tiny_hooked, prompts[:1], out, max_new_tokens=3, temperature=0.7)
    with pytest.raises(FileExistsError, match="temperature=0.7, not temperature=1.0"):
        generate_to_jsonl(tiny_hooked, prompts, out, max_new_tokens=3, temperature=1.0)
    generate_to_jsonl(tiny_hooked, prompts, out, max_new_tokens=3, temperature=1.0, overwrite=True)
    assert {json.loads(line)["temperature"] for line in out.read_text().splitlines()} == {1.0}


def test_bad_generation_arguments(tiny_hooked):
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sample_responses(tiny_hooked, PROMPTS, temperature=-1)
    with pytest.raises(ValueError, match="exceeds n_ctx 64"):
        sample_responses(tiny_hooked, PROMPTS, max_new_tokens=500)
