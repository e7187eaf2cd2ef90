"""CLI conventions and the bad-input matrix: every bad input is one clear line, and nothing is changed.

The model is not needed to reject bad arguments: the loader is replaced by one that fails the test
when a usage error would have loaded a model, and by the tiny model where a case needs one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from surprise_probe.probes import ProbeDirection

import surprise_probe as sp
import surprise_probe.analyses.intention.analysis as intention_module
from surprise_probe.app.cli import build_parser, main
from surprise_probe.app.commands import _common
from surprise_probe.app.commands import gap as gap_command
from surprise_probe.core.models.loading import load_model as real_load_model
from surprise_probe.core.models.loading import model_id
from tests.conftest import CONVERSATION, TEXTS

pytestmark = pytest.mark.usefixtures("one_thread")


# --- conventions ------------------------------------------------------------------------------------

def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"surprise-probe {sp.__version__}"


def test_models_json_prints_only_json(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)  # the whole output parses: no table before it
    assert {row["name"] for row in rows} >= {"smollm2-135m-instruct", "gemma-3-270m"}


def test_help_shows_defaults_and_flag_names_are_shared():
    _, commands = build_parser()
    for name, parser in commands.items():
        text = parser.format_help()
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False) and action.dest != "help":
                assert "(default:" in (action.help or "") or f"(default: {action.default}" in " ".join(text.split()), (
                    name, action.dest)
        flags = {flag for action in parser._actions for flag in action.option_strings}
        assert "--bootstrap" not in flags and "--alphas" not in flags or name == "fit", (name, "one flag name per thing")
        if any(a.dest == "n_boot" for a in parser._actions):
            assert "--n-boot" in flags


@pytest.fixture
def tiny_loader(monkeypatch, tiny_hooked):
    calls = []

    def load(name, **kwargs):
        calls.append(name)
        return tiny_hooked

    monkeypatch.setattr(_common, "load_model", load)
    return calls


def _strict_json(path: Path):
    def refuse(token, path=path):
        pytest.fail(f"{path}: {token} is not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _files(root: Path) -> dict[str, tuple]:
    """Every file's identity: size, modification time and inode (any write or replacement changes
    one), plus the content hash of files under 256 kB (the inputs and records)."""
    state = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            info = p.stat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if info.st_size < 256_000 else None
            state[str(p.relative_to(root))] = (info.st_size, info.st_mtime_ns, info.st_ino, digest)
    return state


def test_every_output_config_reruns_its_command(tiny_loader, tiny_hooked, tmp_path, capsys):
    texts = tmp_path / "in.txt"
    texts.write_text("\n".join(TEXTS[:4]) + "\n")
    assert main(["capture", "--input", str(texts), "--out", str(tmp_path / "cap"), "--layers", "0", "1",
                 "--n-boot", "20", "--no-progress"]) == 0
    assert main(["capture", "--config", str(tmp_path / "cap" / "config.json"), "--out", str(tmp_path / "cap2")]) == 0
    assert (sp.load_capture(tmp_path / "cap").manifest["content_hash"]
            == sp.load_capture(tmp_path / "cap2").manifest["content_hash"])
    fit = ["fit", "--activations", str(tmp_path / "cap"), "--out", str(tmp_path / "fit"), "--folds", "3",
           "--shuffles", "2", "--n-boot", "20", "--no-nested", "--no-progress"]
    assert main(fit) == 0
    assert main(["fit", "--config", str(tmp_path / "fit" / "config.json"), "--out", str(tmp_path / "fit2")]) == 0
    one = json.loads((tmp_path / "fit" / "sweep.json").read_text())
    two = json.loads((tmp_path / "fit2" / "sweep.json").read_text())
    assert one["hooks"] == two["hooks"] and one["capture"]["verified"] == "sizes+hashes"
    # Rerunning the same command into a finished folder does nothing and changes nothing.
    before = _files(tmp_path / "fit")
    assert main(fit) == 0 and "nothing to do" in capsys.readouterr().out
    assert _files(tmp_path / "fit") == before
    steer = ["steer", "--probe", str(tmp_path / "fit" / "probe.json"), "--input", str(texts), "--out",
             str(tmp_path / "steer"), "--strengths", "-1", "0", "1", "--random-directions", "1", "--n-boot", "20",
             "--no-progress"]
    assert main(steer) == 0
    payload = json.loads((tmp_path / "steer" / "steer.json").read_text())
    assert len(payload["probe"]["sha256"]) == 64 and "torch" in payload["software_versions"]
    assert main(["steer", "--config", str(tmp_path / "steer" / "config.json"), "--out", str(tmp_path / "steer2")]) == 0
    again = json.loads((tmp_path / "steer2" / "steer.json").read_text())
    assert again["dose_response"]["entropy"] == payload["dose_response"]["entropy"]
    # Identical fits write identical probe bytes, so steer.json / patch.json record the same probe hash.
    for name in ("probe.safetensors", "probe.json"):
        assert (tmp_path / "fit" / name).read_bytes() == (tmp_path / "fit2" / name).read_bytes(), name
    steer_fit2 = [*steer[:2], str(tmp_path / "fit2" / "probe.json"), *steer[3:6], str(tmp_path / "steer3"), *steer[7:]]
    assert main(steer_fit2) == 0
    third = json.loads((tmp_path / "steer3" / "steer.json").read_text())
    assert third["probe"]["sha256"] == payload["probe"]["sha256"] and payload["probe"]["verified"] is True
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(TEXTS[:2])))
    assert main(["generate", "--prompts", str(prompts), "--out", str(tmp_path / "gen.jsonl"), "--max-new-tokens", "3",
                 "--no-progress"]) == 0
    assert main(["generate", "--config", str(tmp_path / "gen.jsonl.config.json"), "--out",
                 str(tmp_path / "gen2.jsonl")]) == 0
    assert (tmp_path / "gen.jsonl").read_text() == (tmp_path / "gen2.jsonl").read_text()
    for path in tmp_path.rglob("*.json"):  # strict JSON everywhere
        _strict_json(path)
    # every output readable like any file the user writes: 0666 less the umask (0644 under 022)
    umask = os.umask(0)
    os.umask(umask)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in tmp_path.rglob("*")
             if p.is_file() and p.name not in ("in.txt", "prompts.jsonl")}
    assert modes and set(modes.values()) == {oct(0o666 & ~umask)}, modes
    assert tiny_loader  # the loader was used (the cases above needed the model)


# --- the bad-input matrix ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built_workspace(tmp_path_factory, tiny_hooked, tiny_tokenizer):
    """Inputs, a finished capture, a fit folder, and a probe: what the bad-input cases point at (built once)."""
    w = tmp_path_factory.mktemp("matrix") / "w"
    w.mkdir()
    (w / "in.txt").write_text("\n".join(TEXTS[:3]) + "\n")
    (w / "in.jsonl").write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps({"text": TEXTS[0]}) + "\n")
    (w / "empty.txt").write_text("\n\n")
    (w / "empty.jsonl").write_text("")
    (w / "bad_utf8.txt").write_bytes(b"fine line\nbad \xff\xfe line\n")
    (w / "bad_utf8.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    (w / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "cut\n')
    (w / "both.jsonl").write_text(json.dumps({"text": "hello", "token_ids": [1, 2]}) + "\n")
    (w / "strids.jsonl").write_text(json.dumps({"token_ids": ["1", "2"]}) + "\n")
    (w / "in.csv").write_text("a,b\n")
    (w / "prompts.jsonl").write_text(json.dumps({"id": "a", "prompt": "Hello there"}) + "\n")
    (w / "intid.jsonl").write_text(json.dumps({"id": 7, "prompt": "Hello there"}) + "\n")
    (w / "dupid.jsonl").write_text((json.dumps({"id": "a", "prompt": "Hi"}) + "\n") * 2)
    (w / "noprompt.jsonl").write_text(json.dumps({"id": "a"}) + "\n")
    (w / "mine.jsonl").write_text('{"note": "a user file"}\n')
    (w / "pairs.jsonl").write_text(json.dumps({"source": {"text": TEXTS[0]}, "destination": {"text": TEXTS[1]}}) + "\n")
    (w / "badpairs.jsonl").write_text(json.dumps({"source": {"text": TEXTS[0]}}) + "\n")
    (w / "a_file").write_text("not a folder")
    (w / "userdir").mkdir()
    (w / "folder.jsonl").mkdir()
    (w / "locked").mkdir()  # another live run (pid 1 on this host) is writing here
    (w / "locked" / ".lock").write_text(json.dumps({"pid": 1, "host": os.uname().nodename, "started": 0}))
    (w / "locked.jsonl.lock").write_text(json.dumps({"pid": 1, "host": os.uname().nodename, "started": 0}))
    (w / "userdir" / "notes.txt").write_text("keep me")
    (w / "texts.txt").write_text("\n".join(TEXTS * 2) + "\n")
    with pytest.MonkeyPatch.context() as patch:
        # Relative paths (from inside the workspace), so the recorded settings hold for every copy.
        patch.chdir(w)
        patch.setattr(_common, "load_model", lambda name, **kwargs: tiny_hooked)
        assert main(["capture", "--input", "texts.txt", "--out", "cap", "--shard-size", "4",
                     "--n-boot", "10", "--no-progress"]) == 0
        assert main(["fit", "--activations", "cap", "--out", "fit", "--folds", "3", "--shuffles", "1",
                     "--n-boot", "10", "--no-nested", "--no-progress"]) == 0
    incomplete = w / "incomplete"
    shutil.copytree(w / "cap", incomplete)
    (incomplete / "manifest.json").unlink()
    d = np.random.default_rng(0).normal(size=tiny_hooked.cfg.d_model)
    probe = ProbeDirection(d / np.linalg.norm(d), mean=0.0, std=1.0, hook="blocks.1.hook_resid_post", layer=1,
                           model_id=model_id(tiny_hooked), d_model=tiny_hooked.cfg.d_model, target="surprise")
    probe.save(w / "probe")
    probe.__class__(probe.direction, mean=0.0, std=1.0, hook=probe.hook, layer=1, model_id="another-model",
                    d_model=probe.d_model, target="surprise").save(w / "other_probe")
    edited = json.loads((w / "probe.json").read_text())
    shutil.copy(w / "probe.safetensors", w / "edited.safetensors")
    edited["std"] = 99.0
    (w / "edited.json").write_text(json.dumps(edited))
    unhashed = dict(edited, std=100.0)  # std x 100 and the artifact hash removed
    del unhashed["artifact_sha256"]
    (w / "unhashed.json").write_text(json.dumps(unhashed))
    shutil.copy(w / "probe.safetensors", w / "unhashed.safetensors")
    (w / "onetoken.jsonl").write_text(json.dumps({"token_ids": [5]}) + "\n")
    (w / "longpair.jsonl").write_text(json.dumps({"source": {"token_ids": [5] * 100},
                                                  "destination": {"text": TEXTS[1]}}) + "\n")
    (w / "truncated.safetensors").write_bytes((w / "probe.safetensors").read_bytes()[:50])
    shutil.copy(w / "probe.json", w / "truncated.json")
    damaged = w / "damaged"
    shutil.copytree(w / "cap", damaged)
    target = sorted(damaged.glob("shards/*/blocks.1.hook_resid_post.npy"))[0]
    data = bytearray(target.read_bytes())
    data[-4:] = bytes(4)
    target.write_bytes(bytes(data))
    zero = w / "zero"
    shutil.copytree(w / "cap", zero)
    sorted(zero.glob("shards/*/output_entropy.npy"))[0].write_bytes(b"")
    _gap_and_intention_workspace(w, tiny_tokenizer)
    for broken, remove in (("lm_no_tokenizer", ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")),
                           ("lm_no_weights", ("model.safetensors",))):
        shutil.copytree(w / "lm", w / broken)
        for name in remove:
            (w / broken / name).unlink(missing_ok=True)
    return w


TOPICS = {"food": ["bread", "cake"], "sea": ["fish", "boat"]}


def _hf_folder(folder: Path, tokenizer, chat_template: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if not chat_template:  # a base model: no template in its tokenizer files
        settings = json.loads((folder / "tokenizer_config.json").read_text())
        settings.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(settings))
        for file in folder.glob("chat_template*"):
            file.unlink()


def _unfinished(folder: Path) -> None:
    record = json.loads((folder / "config.json").read_text())
    record["finished"] = False  # as a run interrupted before it finished leaves it
    (folder / "config.json").write_text(json.dumps(record))


def _gap_and_intention_workspace(w: Path, tokenizer) -> None:
    """Model folders (with and without a chat template), prompt files, and finished/interrupted runs."""
    _hf_folder(w / "lm", tokenizer, chat_template=True)
    _hf_folder(w / "base", tokenizer, chat_template=False)
    (w / "gap.jsonl").write_text(json.dumps({"prompt": "Hello there", "answer": "Hi."}) + "\n"
                                 + json.dumps({"prompt": "Why is the sky blue?"}) + "\n")
    (w / "gap_bad.jsonl").write_text(json.dumps({"prompt": "ok"}) + '\n{"prompt": \n')
    (w / "gap_utf8.jsonl").write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n')
    (w / "gap_empty_answer.jsonl").write_text(json.dumps({"prompt": "ok", "answer": ""}) + "\n")
    phrasings = ["Tell me a story.", "Write a story.", "Say something.", "Tell me anything."]
    (w / "topics.jsonl").write_text("".join(
        json.dumps({"id": f"p{i}", "group": f"g{i // 2}", "prompt": text, "topics": TOPICS}) + "\n"
        for i, text in enumerate(phrasings)))
    (w / "topics_bad.jsonl").write_text(json.dumps({"prompt": "a", "topics": TOPICS}) + "\n{oops\n")
    (w / "no_topics.jsonl").write_text(json.dumps({"prompt": "Tell me a story."}) + "\n")
    (w / "one_topic.jsonl").write_text(json.dumps({"prompt": "Tell me a story.", "topics": {"food": ["bread"]}}) + "\n")
    (w / "topics_dupid.jsonl").write_text((json.dumps({"id": "a", "prompt": "Hi", "topics": TOPICS}) + "\n") * 2)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(w)
        assert main((GAP_RUN + " --out gap_run").split()) == 0
        assert main((INTENTION_RUN + " --out intention_run").split()) == 0
    shutil.copytree(w / "gap_run", w / "gap_cut")  # interrupted, then a cached response line damaged
    _unfinished(w / "gap_cut")
    (w / "gap_cut" / "gap.json").unlink()
    cache = w / "gap_cut" / "responses" / "lm.jsonl"
    lines = cache.read_text().splitlines(keepends=True)
    cache.write_text(lines[0] + lines[1][: len(lines[1]) // 2] + "\n" + "".join(lines[2:]))
    shutil.copytree(w / "intention_run", w / "intention_cut")
    _unfinished(w / "intention_cut")
    (w / "intention_cut" / "intention.json").unlink()
    k0 = w / "intention_cut" / "samples" / "lm" / "k0.json"
    k0.write_text(k0.read_text()[:50])


GAP_RUN = ("gap --models lm --prompts gap.jsonl --samples-per-prompt 1 --max-new-tokens 4 --n-boot 10 "
           "--batch-size 2 --no-progress")
INTENTION_RUN = ("intention --models lm --prompts topics.jsonl --n-samples 2 --max-new-tokens 4 --ks 0 1 --n-folds 2 "
                 "--n-shuffles 1 --n-boot 10 --prefill-samples 1 --prefill-tokens 2 --no-progress")


@pytest.fixture
def workspace(built_workspace, tmp_path):
    """A fresh copy per case, so one case can never hide another's damage.

    Files are hard links (the workspace holds ~60 MB of HTML and model files): a case that writes
    a new file or replaces one atomically leaves the others' copies alone, and a case that edits
    a file in place fails its own "nothing changed" check.
    """
    copy = tmp_path / "w"
    shutil.copytree(built_workspace, copy, copy_function=os.link)
    return copy


P = "{w}/probe.json"
# (id, argv with {w} for the workspace, exit code, text the one stderr line must contain)
CASES = [
    # capture
    ("capture-batch-size-0", "capture --input {w}/in.txt --out {w}/o --batch-size 0", 2, "'0'"),
    ("capture-max-tokens-negative", "capture --input {w}/in.txt --out {w}/o --max-tokens -1 --truncate", 2, "'-1'"),
    ("capture-max-tokens-0", "capture --input {w}/in.txt --out {w}/o --max-tokens 0", 2, "'0'"),
    ("capture-layers-abc", "capture --input {w}/in.txt --out {w}/o --layers abc", 2, "'abc'"),
    ("capture-layers-and-hooks", "capture --input {w}/in.txt --out {w}/o --layers 1 --hooks x", 2, "--layers or --hooks"),
    ("capture-shard-size-0", "capture --input {w}/in.txt --out {w}/o --shard-size 0", 2, "'0'"),
    ("capture-bad-dtype", "capture --input {w}/in.txt --out {w}/o --dtype float8", 2, "'float8'"),
    ("capture-missing-input", "capture --input {w}/nope.txt --out {w}/o", 2, "nope.txt"),
    ("capture-empty-txt", "capture --input {w}/empty.txt --out {w}/o", 2, "empty.txt"),
    ("capture-empty-jsonl", "capture --input {w}/empty.jsonl --out {w}/o", 2, "empty.jsonl"),
    ("capture-bad-utf8-txt", "capture --input {w}/bad_utf8.txt --out {w}/o", 2, "bad_utf8.txt:2"),
    ("capture-bad-utf8-jsonl", "capture --input {w}/bad_utf8.jsonl --out {w}/o", 2, "bad_utf8.jsonl:2"),
    ("capture-bad-json-line", "capture --input {w}/bad.jsonl --out {w}/o", 2, "bad.jsonl:2"),
    ("capture-text-and-token-ids", "capture --input {w}/both.jsonl --out {w}/o", 2, "both.jsonl:1"),
    ("capture-string-token-ids", "capture --input {w}/strids.jsonl --out {w}/o", 2, "strids.jsonl:1"),
    ("capture-csv-input", "capture --input {w}/in.csv --out {w}/o", 2, ".csv"),
    ("capture-model-no-tokenizer", "capture --input {w}/in.txt --out {w}/o --model {w}/lm_no_tokenizer", 2,
     "no tokenizer files"),
    ("capture-model-no-weights", "capture --input {w}/in.txt --out {w}/o --model {w}/lm_no_weights", 2, "no weights"),
    ("capture-layers-beyond-model", "capture --input {w}/in.txt --out {w}/o --model {w}/lm --layers 0 5", 2,
     "--layers 5: ./lm has 1 layers (0..0)"),
    ("capture-out-is-a-file", "capture --input {w}/in.txt --out {w}/a_file", 2, "a_file is a file"),
    ("capture-out-under-a-file", "capture --input {w}/in.txt --out {w}/a_file/sub", 2, "a_file is a file"),
    ("capture-out-user-folder", "capture --input {w}/in.txt --out {w}/userdir", 2, "did not write"),
    ("capture-out-user-folder-overwrite", "capture --input {w}/in.txt --out {w}/userdir --overwrite", 2, "did not write"),
    ("capture-other-settings", "capture --input {w}/texts.txt --out {w}/cap --layers 0", 2, "layers=None, not layers=[0]"),
    ("capture-locked-by-another-run", "capture --input {w}/in.txt --out {w}/locked", 1, "pid 1 on host"),
    ("generate-locked-by-another-run", "generate --prompts {w}/prompts.jsonl --out {w}/locked.jsonl", 1,
     "pid 1 on host"),
    ("fit-locked-by-another-run", "fit --activations {w}/cap --out {w}/locked", 1, "pid 1 on host"),
    ("steer-locked-by-another-run", f"steer --probe {P} --input {{w}}/in.txt --out {{w}}/locked", 1, "pid 1 on host"),
    ("patch-locked-by-another-run", f"patch --probe {P} --pairs {{w}}/pairs.jsonl --out {{w}}/locked", 1,
     "pid 1 on host"),
    ("study-locked-by-another-run", "study --input {w}/texts.txt --out {w}/locked --steer-inputs 2", 1, "pid 1 on host"),
    ("capture-unknown-flag", "capture --input {w}/in.txt --out {w}/o --bogus", 2, "--bogus"),
    ("capture-missing-out", "capture --input {w}/in.txt", 2, "--out"),
    # generate
    ("generate-max-new-tokens-0", "generate --prompts {w}/prompts.jsonl --out {w}/g.jsonl --max-new-tokens 0", 2, "'0'"),
    ("generate-temperature-nan", "generate --prompts {w}/prompts.jsonl --out {w}/g.jsonl --temperature nan", 2, "'nan'"),
    ("generate-temperature-negative", "generate --prompts {w}/prompts.jsonl --out {w}/g.jsonl --temperature -1", 2, "'-1'"),
    ("generate-limit-0", "generate --prompts {w}/prompts.jsonl --out {w}/g.jsonl --limit 0", 2, "'0'"),
    ("generate-seed-negative", "generate --prompts {w}/prompts.jsonl --out {w}/g.jsonl --seed -2", 2, "'-2'"),
    ("generate-empty-prompts", "generate --prompts {w}/empty.jsonl --out {w}/g.jsonl", 2, "empty.jsonl"),
    ("generate-integer-id", "generate --prompts {w}/intid.jsonl --out {w}/g.jsonl", 2, "intid.jsonl:1"),
    ("generate-duplicate-id", "generate --prompts {w}/dupid.jsonl --out {w}/g.jsonl", 2, "dupid.jsonl:2"),
    ("generate-no-prompt-key", "generate --prompts {w}/noprompt.jsonl --out {w}/g.jsonl", 2, "noprompt.jsonl:1"),
    ("generate-bad-utf8", "generate --prompts {w}/bad_utf8.jsonl --out {w}/g.jsonl", 2, "bad_utf8.jsonl:1"),
    ("generate-user-file", "generate --prompts {w}/prompts.jsonl --out {w}/mine.jsonl", 2, "did not write"),
    ("generate-user-file-overwrite", "generate --prompts {w}/prompts.jsonl --out {w}/mine.jsonl --overwrite", 2,
     "did not write"),
    ("generate-out-not-jsonl", "generate --prompts {w}/prompts.jsonl --out {w}/g.txt", 2, "g.txt"),
    ("generate-out-is-folder", "generate --prompts {w}/prompts.jsonl --out {w}/folder.jsonl", 2, "is a folder"),
    # fit
    ("fit-missing-capture", "fit --activations {w}/nope --out {w}/f", 2, "nope"),
    ("fit-incomplete-capture", "fit --activations {w}/incomplete --out {w}/f", 2, "incomplete"),
    ("fit-folds-1", "fit --activations {w}/cap --out {w}/f --folds 1", 2, "--folds"),
    ("fit-negative-alpha", "fit --activations {w}/cap --out {w}/f --alphas -1", 2, "-1"),
    ("fit-unknown-hook", "fit --activations {w}/cap --out {w}/f --hooks blocks.9.hook_resid_post", 2, "blocks.9"),
    ("fit-unknown-target", "fit --activations {w}/cap --out {w}/f --target nope", 2, "'nope'"),
    ("fit-n-boot-0", "fit --activations {w}/cap --out {w}/f --n-boot 0", 2, "'0'"),
    ("fit-old-bootstrap-flag", "fit --activations {w}/cap --out {w}/f --bootstrap 10", 2, "--bootstrap"),
    ("fit-into-other-fit", "fit --activations {w}/cap --out {w}/fit --folds 3 --shuffles 1 --n-boot 10 --no-nested "
     "--seed 1", 2, "seed=0, not seed=1"),
    ("fit-out-is-capture", "fit --activations {w}/cap --out {w}/cap", 2, "capture folder itself"),
    ("fit-out-is-a-file", "fit --activations {w}/cap --out {w}/a_file", 2, "a_file is a file"),
    ("fit-changed-bytes", "fit --activations {w}/damaged --out {w}/f --folds 3 --no-progress", 1,
     "does not match its manifest hash"),
    ("fit-zero-byte-npy", "fit --activations {w}/zero --out {w}/f --folds 3 --no-progress", 1, "output_entropy.npy"),
    # steer
    ("steer-random-directions-negative", f"steer --probe {P} --input {{w}}/in.txt --out {{w}}/s --random-directions -3",
     2, "'-3'"),
    ("steer-strength-nan", f"steer --probe {P} --input {{w}}/in.txt --out {{w}}/s --strengths nan 1", 2, "'nan'"),
    ("steer-one-strength", f"steer --probe {P} --input {{w}}/in.txt --out {{w}}/s --strengths 1 1", 2, "--strengths"),
    ("steer-old-alphas-flag", f"steer --probe {P} --input {{w}}/in.txt --out {{w}}/s --alphas 1 2", 2, "--alphas"),
    ("steer-samples-negative", f"steer --probe {P} --input {{w}}/in.txt --out {{w}}/s --samples -1", 2, "'-1'"),
    ("steer-max-new-tokens-0", f"steer --probe {P} --input {{w}}/in.txt --out {{w}}/s --max-new-tokens 0", 2, "'0'"),
    ("steer-temperature-nan", f"steer --probe {P} --input {{w}}/in.txt --out {{w}}/s --temperature nan", 2, "'nan'"),
    ("steer-missing-probe", "steer --probe {w}/nope.json --input {w}/in.txt --out {w}/s", 2, "nope"),
    ("steer-truncated-probe", "steer --probe {w}/truncated.json --input {w}/in.txt --out {w}/s", 2, "truncated.safetensors"),
    ("steer-edited-probe", "steer --probe {w}/edited.json --input {w}/in.txt --out {w}/s", 2, "artifact hash"),
    ("steer-empty-input", f"steer --probe {P} --input {{w}}/empty.jsonl --out {{w}}/s", 2, "empty.jsonl"),
    ("steer-bad-position", f"steer --probe {P} --input {{w}}/in.txt --out {{w}}/s --positions middle", 2, "'middle'"),
    ("steer-out-is-a-file", f"steer --probe {P} --input {{w}}/in.txt --out {{w}}/a_file", 2, "a_file is a file"),
    ("steer-probe-of-another-model", "steer --probe {w}/other_probe.json --input {w}/in.txt --out {w}/s", 1,
     "another-model"),
    # patch
    ("patch-missing-pairs", f"patch --probe {P} --pairs {{w}}/nope.jsonl --out {{w}}/p", 2, "nope.jsonl"),
    ("patch-bad-pairs", f"patch --probe {P} --pairs {{w}}/badpairs.jsonl --out {{w}}/p", 2, "badpairs.jsonl:1"),
    ("patch-group-first0", f"patch --probe {P} --pairs {{w}}/pairs.jsonl --out {{w}}/p --groups first0", 2, "'first0'"),
    ("patch-layer-negative", f"patch --probe {P} --pairs {{w}}/pairs.jsonl --out {{w}}/p --layers -1", 2, "'-1'"),
    ("patch-layer-out-of-range", f"patch --probe {P} --pairs {{w}}/pairs.jsonl --out {{w}}/p --layers 9", 1, "layer 9"),
    ("patch-bad-component", f"patch --probe {P} --pairs {{w}}/pairs.jsonl --out {{w}}/p --components foo", 2, "'foo'"),
    ("patch-n-boot-0", f"patch --probe {P} --pairs {{w}}/pairs.jsonl --out {{w}}/p --n-boot 0", 2, "'0'"),
    # study
    ("study-steer-inputs-negative", "study --input {w}/in.txt --out {w}/st --steer-inputs -1", 2, "'-1'"),
    ("study-steer-inputs-too-many", "study --input {w}/texts.txt --out {w}/st --steer-inputs 100", 2, "100"),
    ("study-one-strength", "study --input {w}/in.txt --out {w}/st --strengths 2 2", 2, "--strengths"),
    ("study-random-directions-negative", "study --input {w}/in.txt --out {w}/st --random-directions -3", 2, "'-3'"),
    ("study-csv-input", "study --input {w}/in.csv --out {w}/st", 2, ".csv"),
    ("study-out-is-a-file", "study --input {w}/in.txt --out {w}/a_file", 2, "a_file is a file"),
    ("study-out-user-folder", "study --input {w}/texts.txt --out {w}/userdir --steer-inputs 2", 2, "did not write"),
    ("capture-bad-device", "capture --input {w}/in.txt --out {w}/o --device tpu", 2, "--device tpu"),
    ("gap-bad-device", "gap --models {w}/lm --prompts {w}/gap.jsonl --out {w}/g --device cuda:x", 2, "--device cuda:x"),
    ("fit-target-unknown-model", "fit --activations {w}/cap --out {w}/f --target model:no-such-model-xyz", 2,
     "--target model:no-such-model-xyz: the model 'no-such-model-xyz' cannot be loaded here"),
    ("fit-residualize-on-unknown-model", "fit --activations {w}/cap --out {w}/f --residualize-on model:nope-xyz", 2,
     "--residualize-on model:nope-xyz"),
    ("capture-unknown-model", "capture --model no-such-model-xyz --input {w}/in.txt --out {w}/o", 2,
     "--model no-such-model-xyz: unknown model"),
    ("capture-model-folder-without-config", "capture --model {w}/userdir --input {w}/in.txt --out {w}/o", 2,
     "has no config.json"),
    ("generate-unknown-model", "generate --model no-such-model-xyz --prompts {w}/prompts.jsonl --out {w}/g.jsonl", 2,
     "--model no-such-model-xyz: unknown model"),
    ("steer-unknown-model", f"steer --model no-such-model-xyz --probe {P} --input {{w}}/in.txt --out {{w}}/s", 2,
     "--model no-such-model-xyz: unknown model"),
    ("patch-unknown-model", f"patch --model no-such-model-xyz --probe {P} --pairs {{w}}/pairs.jsonl --out {{w}}/p", 2,
     "--model no-such-model-xyz: unknown model"),
    ("study-unknown-model", "study --model no-such-model-xyz --input {w}/texts.txt --out {w}/st --steer-inputs 2", 2,
     "--model no-such-model-xyz: unknown model"),
    ("study-unknown-base-reader", "study --input {w}/in.txt --out {w}/st --steer-inputs 2 --base-reader nope-xyz", 2,
     "'nope-xyz'"),
    ("study-patch-pairs-1", "study --input {w}/in.txt --out {w}/st --steer-inputs 2 --patch-pairs 1", 2,
     "--patch-pairs 1"),
    ("study-intention-samples-1", "study --input {w}/in.txt --out {w}/st --steer-inputs 2 --intention-samples 1", 2,
     "--intention-samples 1"),
    ("study-bad-json-line", "study --input {w}/bad.jsonl --out {w}/st", 2, "bad.jsonl:2"),
    ("study-bad-utf8", "study --input {w}/bad_utf8.txt --out {w}/st", 2, "bad_utf8.txt:2"),
    ("study-empty-input", "study --input {w}/empty.txt --out {w}/st", 2, "empty.txt"),
    ("study-max-inputs-0", "study --input {w}/in.txt --out {w}/st --max-inputs 0", 2, "'0'"),
    # gap (its prompts file, its models, its output folder)
    ("gap-bad-json-line", "gap --models {w}/lm --prompts {w}/gap_bad.jsonl --out {w}/g", 2, "gap_bad.jsonl:2"),
    ("gap-no-prompt-key", "gap --models {w}/lm --prompts {w}/noprompt.jsonl --out {w}/g", 2, "noprompt.jsonl:1"),
    ("gap-integer-id", "gap --models {w}/lm --prompts {w}/intid.jsonl --out {w}/g", 2, "intid.jsonl:1"),
    ("gap-duplicate-id", "gap --models {w}/lm --prompts {w}/dupid.jsonl --out {w}/g", 2, "dupid.jsonl:2"),
    ("gap-empty-answer", "gap --models {w}/lm --prompts {w}/gap_empty_answer.jsonl --out {w}/g", 2,
     "gap_empty_answer.jsonl:1"),
    ("gap-bad-utf8", "gap --models {w}/lm --prompts {w}/gap_utf8.jsonl --out {w}/g", 2, "gap_utf8.jsonl:2"),
    ("gap-empty-prompts", "gap --models {w}/lm --prompts {w}/empty.jsonl --out {w}/g", 2, "empty.jsonl"),
    ("gap-missing-prompts", "gap --models {w}/lm --prompts {w}/nope.jsonl --out {w}/g", 2, "nope.jsonl"),
    ("gap-unknown-model", "gap --models no-such-model-xyz --prompts {w}/gap.jsonl --out {w}/g", 2,
     "--models no-such-model-xyz: unknown model"),
    ("gap-folder-without-config", "gap --models {w}/userdir --prompts {w}/gap.jsonl --out {w}/g", 2, "config.json"),
    ("gap-model-twice", "gap --models {w}/lm {w}/lm --prompts {w}/gap.jsonl --out {w}/g", 2, "twice"),
    ("gap-chat-format-without-template", "gap --models {w}/lm {w}/base --prompts {w}/gap.jsonl --out {w}/g "
     "--formats plain assistant", 2, "base: its tokenizer has no chat template"),
    ("gap-bad-format", "gap --models {w}/lm --prompts {w}/gap.jsonl --out {w}/g --formats chat", 2, "'chat'"),
    ("gap-temperature-nan", "gap --models {w}/lm --prompts {w}/gap.jsonl --out {w}/g --temperature nan", 2, "'nan'"),
    ("gap-level-above-1", "gap --models {w}/lm --prompts {w}/gap.jsonl --out {w}/g --level 1.5", 2, "'1.5'"),
    ("gap-k-0", "gap --models {w}/lm --prompts {w}/gap.jsonl --out {w}/g --k 0", 2, "'0'"),
    ("gap-n-prompts-negative", "gap --models {w}/lm --prompts {w}/gap.jsonl --out {w}/g --n-prompts -1", 2, "'-1'"),
    ("gap-missing-probe", "gap --models {w}/lm --prompts {w}/gap.jsonl --out {w}/g --probe {w}/nope", 2, "nope.json"),
    ("gap-edited-probe", "gap --models {w}/lm --prompts {w}/gap.jsonl --out {w}/g --probe {w}/edited", 2,
     "artifact hash"),
    ("gap-out-is-a-file", "gap --models {w}/lm --prompts {w}/gap.jsonl --out {w}/a_file", 2, "a_file is a file"),
    ("gap-out-user-folder", "gap --models {w}/lm --prompts {w}/gap.jsonl --out {w}/userdir --overwrite", 2,
     "did not write"),
    ("gap-out-other-command", "gap --models {w}/lm --prompts {w}/gap.jsonl --out {w}/fit", 2, "holds a fit run"),
    ("gap-other-settings", GAP_RUN + " --out {w}/gap_run --temperature 0.5", 2, "temperature=1.0, not temperature=0.5"),
    ("gap-locked-by-another-run", "gap --models {w}/lm --prompts {w}/gap.jsonl --out {w}/locked", 1, "pid 1 on host"),
    ("gap-resume-damaged-cache", GAP_RUN + " --out {w}/gap_cut", 1, "lm.jsonl:2"),
    # intention (its prompts and topics, its models, its output folder)
    ("intention-bad-json-line", "intention --models {w}/lm --prompts {w}/topics_bad.jsonl --out {w}/i", 2,
     "topics_bad.jsonl:2"),
    ("intention-no-topics", "intention --models {w}/lm --prompts {w}/no_topics.jsonl --out {w}/i", 2,
     "no_topics.jsonl:1"),
    ("intention-one-topic", "intention --models {w}/lm --prompts {w}/one_topic.jsonl --out {w}/i", 2,
     "one_topic.jsonl:1"),
    ("intention-duplicate-id", "intention --models {w}/lm --prompts {w}/topics_dupid.jsonl --out {w}/i", 2,
     "topics_dupid.jsonl:2"),
    ("intention-empty-prompts", "intention --models {w}/lm --prompts {w}/empty.jsonl --out {w}/i", 2, "empty.jsonl"),
    ("intention-unknown-model", "intention --models no-such-model-xyz --prompts {w}/topics.jsonl --out {w}/i", 2,
     "--models no-such-model-xyz: unknown model"),
    ("intention-model-twice", "intention --models {w}/lm {w}/lm --prompts {w}/topics.jsonl --out {w}/i", 2, "twice"),
    ("intention-chat-without-template", "intention --models {w}/base --prompts {w}/topics.jsonl --out {w}/i "
     "--prompt-format chat", 2, "base: its tokenizer has no chat template"),
    ("intention-temperature-nan", "intention --models {w}/lm --prompts {w}/topics.jsonl --out {w}/i --temperature nan",
     2, "'nan'"),
    ("intention-ks-negative", "intention --models {w}/lm --prompts {w}/topics.jsonl --out {w}/i --ks -1", 2, "'-1'"),
    ("intention-k-beyond-response", "intention --models {w}/lm --prompts {w}/topics.jsonl --out {w}/i "
     "--max-new-tokens 2 --ks 0 5", 2, "largest k (5)"),
    ("intention-one-sample", "intention --models {w}/lm --prompts {w}/topics.jsonl --out {w}/i --n-samples 1", 2,
     "got 1"),
    ("intention-limit-prompts-0", "intention --models {w}/lm --prompts {w}/topics.jsonl --out {w}/i --limit-prompts 0",
     2, "'0'"),
    ("intention-out-is-a-file", "intention --models {w}/lm --prompts {w}/topics.jsonl --out {w}/a_file", 2,
     "a_file is a file"),
    ("intention-out-user-folder", "intention --models {w}/lm --prompts {w}/topics.jsonl --out {w}/userdir", 2,
     "did not write"),
    ("intention-out-gap-folder", "intention --models {w}/lm --prompts {w}/topics.jsonl --out {w}/gap_run", 2,
     "holds a gap run"),
    ("intention-other-settings", INTENTION_RUN + " --out {w}/intention_run --temperature 0.5", 2, "temperature=1.0, not temperature=0.5"),
    ("intention-locked-by-another-run", "intention --models {w}/lm --prompts {w}/topics.jsonl --out {w}/locked", 1,
     "pid 1 on host"),
    ("intention-resume-damaged-cache", INTENTION_RUN + " --out {w}/intention_cut", 1, "k0.json:"),
    # degenerate inputs and unverified artifacts (issue #28)
    ("capture-one-token-input", "capture --input {w}/onetoken.jsonl --out {w}/o", 1,
     "input 0 ({'token_ids': [5]}) is 1 token long; capture needs at least 2 tokens per input"),
    ("capture-line-cut-off", "capture --input {w}/bad.jsonl --out {w}/o", 2,
     "bad.jsonl:2: not valid JSON (the line stops after column 13, inside a string that opens at column 10"),
    ("gap-line-cut-off", "gap --models {w}/lm --prompts {w}/gap_bad.jsonl --out {w}/g", 2,
     "gap_bad.jsonl:2: not valid JSON (the line stops after column 11, before its JSON value is complete"),
    ("steer-strength-overflows", f"steer --probe {P} --input {{w}}/in.txt --out {{w}}/s --strengths 0 1e38", 2,
     "--strengths 1e+38: times the probe's std (1) it overflows the float32 norm"),
    ("steer-unhashed-probe", "steer --probe {w}/unhashed.json --input {w}/in.txt --out {w}/s", 2,
     "unhashed.json has no artifact hash (artifact_sha256)"),
    ("patch-unhashed-probe", "patch --probe {w}/unhashed.json --pairs {w}/pairs.jsonl --out {w}/p", 2,
     "(CLI: steer / patch --allow-unverified-probe)"),
    ("patch-pair-too-long", f"patch --probe {P} --pairs {{w}}/longpair.jsonl --out {{w}}/p", 1,
     "pair 0 source has 100 tokens, more than the model context of 64; patching does not truncate"),
    ("study-max-inputs-1", "study --input {w}/texts.txt --out {w}/st --max-inputs 1", 2,
     "the study needs at least 5 inputs, since its probes use 5 cross-validation folds grouped by input; got 1"),
    # --config and the command line itself
    ("config-missing-file", "fit --config {w}/nope.json", 2, "nope.json"),
    ("config-other-command", "steer --config {w}/fit/config.json", 2, "records a `fit` run"),
    ("config-not-json", "fit --config {w}/in.txt", 2, "in.txt"),
    ("no-command", "", 2, "command"),
    ("unknown-command", "frobnicate", 2, "frobnicate"),
]


@pytest.fixture
def guarded_loader(monkeypatch, tiny_hooked):
    """The tiny model, loaded only by cases that get past validation (exit code 1 cases).

    gap and intention load the local model folders they name (recorded too)."""
    calls = []

    def load(name, **kwargs):
        calls.append(name)
        return tiny_hooked

    def load_folder(name, **kwargs):
        calls.append(name)
        return real_load_model(name, **kwargs)

    monkeypatch.setattr(_common, "load_model", load)
    monkeypatch.setattr(gap_command, "load_model", load_folder)
    monkeypatch.setattr(intention_module, "load_model", load_folder)
    return calls


@pytest.mark.parametrize("case_id, argv, code, named", CASES, ids=[c[0] for c in CASES])
def test_bad_input_matrix(case_id, argv, code, named, workspace, guarded_loader, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    before = _files(workspace)
    capsys.readouterr()
    result = main(argv.format(w=".").split())
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert result == code, captured.err
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert re.match(r"surprise-probe( \w+)?: (error|interrupted)", lines[0]), lines[0]
    assert named in lines[0], lines[0]
    if code == 2:
        assert guarded_loader == [], "a usage error must be found before a model is loaded"
    after = _files(workspace)
    changed = {k for k in before if after.get(k) != before[k]}
    assert not changed, f"changed or removed: {sorted(changed)}"
    # Nothing new either, except an empty output folder a runtime failure may leave behind.
    assert not (set(after) - set(before) - {k for k in after if k.endswith("config.json")}), set(after) - set(before)


def test_matrix_counts(capsys):
    """For the report: how many cases, and their split by exit code."""
    by_code = {}
    for _, _, code, _ in CASES:
        by_code[code] = by_code.get(code, 0) + 1
    with capsys.disabled():
        print(f"\nbad-input matrix: {len(CASES)} cases; exit 2: {by_code.get(2, 0)}, exit 1: {by_code.get(1, 0)}")
    assert len(CASES) >= 60


def test_debug_shows_the_traceback(workspace, guarded_loader, capsys):
    assert main(["fit", "--activations", str(workspace / "zero"), "--out", str(workspace / "f"), "--folds", "3",
                 "--no-progress", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_dangling_symlink_as_out_is_named(workspace, guarded_loader, capsys):
    """It gave a raw "[Errno 17] File exists"."""
    (workspace / "dangling").symlink_to(workspace / "nowhere")
    (workspace / "dangling.jsonl").symlink_to(workspace / "nowhere.jsonl")
    for argv in (["capture", "--input", str(workspace / "in.txt"), "--out", str(workspace / "dangling")],
                 ["generate", "--prompts", str(workspace / "prompts.jsonl"), "--out", str(workspace / "dangling.jsonl")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "is a symbolic link to" in err and "nowhere" in err and "which does not exist" in err, err
        assert "Errno" not in err
    assert guarded_loader == []


def test_an_unhashed_probe_runs_only_with_the_flag_and_is_recorded_so(workspace, guarded_loader, capsys):
    argv = ["steer", "--probe", str(workspace / "unhashed.json"), "--input", str(workspace / "in.txt"), "--out",
            str(workspace / "s"), "--strengths", "-1", "1", "--random-directions", "1", "--n-boot", "10",
            "--no-ablation", "--no-progress"]
    assert main(argv) == 2
    assert main([*argv, "--allow-unverified-probe"]) == 0
    err = capsys.readouterr().err
    assert "unhashed.json has no artifact hash: its fields (std, hook, ...) are used unverified" in err
    payload = json.loads((workspace / "s" / "steer.json").read_text())
    assert payload["probe"]["verified"] is False and payload["dose_response"]["std"] == 100.0
    # A permission, not a setting: the same run without the flag is refused again, not resumed.
    assert "allow_unverified_probe" not in json.loads((workspace / "s" / "config.json").read_text())["config"]


def test_read_only_out(workspace, guarded_loader, capsys):
    if os.geteuid() == 0:
        pytest.skip("running as root: a read-only folder is still writable; the check is os.access(W_OK)")
    folder = workspace / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert main(["capture", "--input", str(workspace / "in.txt"), "--out", str(folder / "o")]) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        folder.chmod(0o700)


# --- --overwrite removes only what the toolkit wrote ------------------------------------------------

def _add_user_entries(folder: Path) -> None:
    (folder / "my_notes.txt").write_text("the user's notes")
    (folder / "my_plots").mkdir()
    (folder / "my_plots" / "fig.png").write_bytes(b"not really a png")


def _user_entries_survive(folder: Path) -> None:
    assert (folder / "my_notes.txt").read_text() == "the user's notes"
    assert (folder / "my_plots" / "fig.png").read_bytes() == b"not really a png"
    record = json.loads((folder / "config.json").read_text())
    assert record["finished"] and not {"my_notes.txt", "my_plots"} & set(record["outputs"]), record["outputs"]
    assert set(record["foreign"]) == {"my_notes.txt", "my_plots"}


OVERWRITE_RERUNS = {  # folder, a rerun with other settings, then the settings that built it
    "capture": ("cap", "capture --input texts.txt --out cap --shard-size 2 --n-boot 10 --no-progress",
                "capture --input texts.txt --out cap --shard-size 4 --n-boot 10 --no-progress"),
    "fit": ("fit", "fit --activations cap --out fit --folds 2 --shuffles 1 --n-boot 10 --no-nested --no-progress",
            "fit --activations cap --out fit --folds 3 --shuffles 1 --n-boot 10 --no-nested --no-progress"),
    "gap": ("gap_run", GAP_RUN.replace("--max-new-tokens 4", "--max-new-tokens 3") + " --out gap_run",
            GAP_RUN + " --out gap_run"),
}


@pytest.mark.parametrize("command", sorted(OVERWRITE_RERUNS))
def test_overwrite_keeps_what_the_user_put_in_the_folder(command, workspace, guarded_loader, monkeypatch):
    """A finished folder, a user file and folder added, a rerun with other settings and --overwrite."""
    folder, other, original = OVERWRITE_RERUNS[command]
    monkeypatch.chdir(workspace)
    before = json.loads((workspace / folder / "config.json").read_text())
    _add_user_entries(workspace / folder)
    assert main([*other.split(), "--overwrite"]) == 0
    after = json.loads((workspace / folder / "config.json").read_text())
    assert after["config"] != before["config"]  # the other settings took effect: it did recompute
    _user_entries_survive(workspace / folder)
    if command == "capture":
        assert sp.load_capture(workspace / folder).n_shards == 5  # 10 texts, --shard-size 2
    # Back to the first settings (the user's entries are now recorded as theirs): kept again.
    assert main([*original.split(), "--overwrite"]) == 0
    assert json.loads((workspace / folder / "config.json").read_text())["config"] == before["config"]
    _user_entries_survive(workspace / folder)


def test_allow_download_reaches_the_loader_and_is_not_a_setting(tiny_hooked, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(_common, "load_model", lambda name, **kwargs: calls.append(kwargs) or tiny_hooked)
    (tmp_path / "in.txt").write_text("\n".join(TEXTS[:3]) + "\n")
    argv = ["capture", "--input", str(tmp_path / "in.txt"), "--out", str(tmp_path / "cap"), "--layers", "0",
            "--n-boot", "10", "--no-progress"]
    assert main([*argv, "--allow-download"]) == 0
    assert calls[-1]["allow_download"] is True
    # a permission, not a setting: the same capture without it resumes (nothing to redo)
    assert "allow_download" not in json.loads((tmp_path / "cap" / "config.json").read_text())["config"]
    assert main(argv) == 0 and calls[-1]["allow_download"] is False
