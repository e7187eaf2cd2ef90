"""Nothing lost, nothing stale: damaged captures, edited probes, locks, and a real SIGKILL mid-shard."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from surprise_probe.probes import ProbeDirection

import surprise_probe as sp
from surprise_probe.core.utils.outputs import FolderLocked, claim_output, folder_lock
from tests.conftest import TEXTS

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).parents[1]


@pytest.fixture
def small_capture(tiny_hooked, tmp_path):
    out = tmp_path / "cap"
    sp.capture(tiny_hooked, TEXTS * 2, out_dir=out, shard_size=3, progress=False)
    return out


def _a_file(capture_dir: Path, name: str) -> Path:
    return sorted((capture_dir / "shards").glob(f"*/{name}"))[1]


def test_load_capture_verify_finds_changed_bytes_at_the_same_size(small_capture):
    sp.load_capture(small_capture, verify=True)  # intact: passes
    target = _a_file(small_capture, "blocks.1.hook_resid_post.npy")
    data = bytearray(target.read_bytes())
    data[-8:] = bytes(8)  # same size, different values
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"blocks\.1\.hook_resid_post\.npy does not match its manifest hash"):
        sp.load_capture(small_capture, verify=True)


def test_load_capture_verify_finds_a_zero_byte_file(small_capture):
    target = _a_file(small_capture, "input_surprise.npy")
    target.write_bytes(b"")
    with pytest.raises(ValueError, match=r"input_surprise\.npy has 0 bytes, its manifest says \d+"):
        sp.load_capture(small_capture, verify=True)
    # Without verify the damage still surfaces as a clear error naming the file, not a numpy traceback.
    run = sp.load_capture(small_capture)
    with pytest.raises(ValueError, match=r"input_surprise\.npy cannot be read"):
        run.column("input_surprise")


def test_load_capture_verify_finds_a_missing_shard(small_capture):
    import shutil

    shutil.rmtree(sorted((small_capture / "shards").iterdir())[0])
    with pytest.raises(ValueError, match=r"shard folder .*000000 is missing"):
        sp.load_capture(small_capture, verify=True)


def test_an_edited_probe_field_is_refused(tmp_path):
    d = np.ones(4) / 2.0
    probe = ProbeDirection(d, mean=0.1, std=1.7, hook="blocks.1.hook_resid_post", layer=1, model_id="m",
                           d_model=4, target="surprise")
    meta = probe.save(tmp_path / "probe")
    assert ProbeDirection.load(meta).std == pytest.approx(1.7)
    for field, value in (("std", 17.0), ("hook", "blocks.0.hook_resid_post"), ("model_id", "other")):
        info = json.loads(meta.read_text())
        original = dict(info)
        info[field] = value
        meta.write_text(json.dumps(info))
        with pytest.raises(ValueError, match="does not match its artifact hash"):
            ProbeDirection.load(meta)
        meta.write_text(json.dumps(original))
    weights = tmp_path / "probe.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # truncated
    with pytest.raises(ValueError, match=r"probe\.safetensors cannot be read"):
        ProbeDirection.load(meta)


def test_a_second_writer_is_refused_and_a_stale_lock_cleared(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (folder / ".lock").write_text(json.dumps({"pid": other.pid, "host": os.uname().nodename, "started": 0}))
        with pytest.raises(FolderLocked, match=rf"pid {other.pid} on host"):
            with folder_lock(folder / ".lock"):
                pass
    finally:
        other.kill()
        other.wait()
    # The process is gone: its lock is stale and is replaced.
    with folder_lock(folder / ".lock") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not (folder / ".lock").exists()


def test_claim_output_never_deletes_what_it_did_not_write(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="did not write"):
            with claim_output(folder, "fit", {"seed": 0}, overwrite=overwrite):
                pass
    assert (folder / "notes.txt").read_text() == "keep me" and sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    import torch
    torch.set_num_threads(1)
    import surprise_probe as sp
    from surprise_probe import store
    from surprise_probe.testing import tiny_model
    from tests.conftest import TEXTS

    out, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = tiny_model()
    if mode == "kill":
        real_save, count = np.save, [0]
        def slow_save(path, array, *args, **kwargs):
            real_save(path, array, *args, **kwargs)
            count[0] += 1
            if ".tmp-000002" in str(path) and count[0] > 0:
                print("WRITING", path, flush=True)  # inside shard 2's temporary folder, files half written
                time.sleep(60)
        store.np.save = slow_save  # write_shard: a whole shard saved file by file
        if hasattr(store, "ShardWriter"):  # streaming writer: a shard's rows written batch by batch
            real_add = store.ShardWriter.add
            def slow_add(self, hook, rows):
                real_add(self, hook, rows)
                if self.index == 2:
                    for handle in self.files.values():
                        handle.flush()
                    print("WRITING", self.tmp / hook, flush=True)  # shard 2's rows half written
                    time.sleep(60)
            store.ShardWriter.add = slow_add
    run = sp.capture(model, TEXTS * 3, out_dir=out, shard_size=3, batch_size=2, progress=False)
    print("HASH", run.manifest["content_hash"], flush=True)
""")


def _run_capture_subprocess(out: Path, mode: str, **kwargs):
    return subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out), mode], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, **kwargs)


def test_sigkill_in_the_middle_of_a_shard_then_resume_gives_the_same_content(tmp_path):
    import torch

    from surprise_probe.testing import tiny_model

    torch.manual_seed(0)  # the same model and inputs as the subprocess, captured without interruption
    clean_hash = sp.capture(tiny_model(), TEXTS * 3, out_dir=tmp_path / "clean", shard_size=3,
                            batch_size=2, progress=False).manifest["content_hash"]

    killed_dir = tmp_path / "killed"
    victim = _run_capture_subprocess(killed_dir, "kill")
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline:
        line = victim.stdout.readline()
        if line.startswith("WRITING") or not line:
            break
    assert line.startswith("WRITING"), "the capture never reached shard 2"
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    victim.stdout.close()
    assert victim.returncode == -signal.SIGKILL
    shards = sorted(p.name for p in (killed_dir / "shards").iterdir())
    assert ".tmp-000002" in shards and "000002" not in shards  # killed mid-shard: a partial temp folder
    assert not (killed_dir / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        sp.load_capture(killed_dir)

    resumed = _run_capture_subprocess(killed_dir, "resume")
    resumed_out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0
    assert resumed_out.split("HASH ")[1].split()[0] == clean_hash
    sp.load_capture(killed_dir, verify=True)


def test_a_run_that_wrote_nothing_does_not_block_other_settings(tmp_path):
    folder = tmp_path / "out"
    with pytest.raises(RuntimeError, match="bad device"):
        with claim_output(folder, "capture", {"device": "tpu"}):
            raise RuntimeError("bad device")  # stopped before writing anything but its record
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    with claim_output(folder, "capture", {"device": "cpu"}) as claim:
        (folder / "result.txt").write_text("done")
        claim.finish()
    assert json.loads((folder / "config.json").read_text())["config"] == {"device": "cpu"}
    # Once something is written, other settings are refused again.
    with pytest.raises(FileExistsError, match="device=cpu, not device=cuda"):
        with claim_output(folder, "capture", {"device": "cuda"}):
            pass
    with pytest.raises(FileExistsError, match="holds a capture run"):
        with claim_output(tmp_path / "out", "fit", {"device": "cpu"}):
            pass


def test_a_finished_record_whose_result_was_removed_is_redone(tmp_path):
    folder = tmp_path / "out"
    with claim_output(folder, "gap", {"seed": 0}) as claim:
        (folder / "gap.json").write_text("{}")
        claim.finish()
    with claim_output(folder, "gap", {"seed": 0}) as claim:
        assert claim.resumed and claim.finished
    (folder / "gap.json").unlink()  # the user removed the result by hand
    with claim_output(folder, "gap", {"seed": 0}) as claim:
        assert claim.resumed and not claim.finished  # the command resumes and writes it again
    single = tmp_path / "g.jsonl"
    with claim_output(single, "generate", {"seed": 0}, is_file=True) as claim:
        single.write_text('{"id": "a"}\n')
        claim.finish()
    single.unlink()
    with claim_output(single, "generate", {"seed": 0}, is_file=True) as claim:
        assert not claim.finished


def test_overwrite_of_an_interrupted_run_keeps_what_was_there_before_it(tmp_path):
    """An unfinished record lists no outputs yet: what its claim found there is the user's."""
    folder = tmp_path / "out"
    with claim_output(folder, "fit", {"seed": 0}) as claim:
        (folder / "result.json").write_text("{}")
        claim.finish()
    (folder / "notes.txt").write_text("keep me")
    with claim_output(folder, "fit", {"seed": 1}, overwrite=True) as claim:
        assert claim.foreign == ("notes.txt",) and not (folder / "result.json").exists()
        (folder / "half.json").write_text("{}")  # then the run is killed: no finish()
    with claim_output(folder, "fit", {"seed": 2}, overwrite=True) as claim:
        assert not (folder / "half.json").exists()  # the interrupted run's output is gone
        claim.finish()
    assert (folder / "notes.txt").read_text() == "keep me"
    assert json.loads((folder / "config.json").read_text())["outputs"] == []


# --- a full disk or a file-size limit; temporaries; a damaged output line on resume ----------------

DISK_SCRIPT = textwrap.dedent("""
    import json, os, resource, sys, warnings
    warnings.filterwarnings("ignore")
    import torch
    torch.set_num_threads(1)
    from surprise_probe.app.cli import main
    from surprise_probe.app.commands import _common
    from surprise_probe.testing import tiny_model
    from tests.conftest import TEXTS

    work = sys.argv[1]
    os.chdir(work)
    torch.manual_seed(0)
    model = tiny_model()
    _common.load_model = lambda name, **kwargs: model
    open("texts.txt", "w").write("\\n".join(TEXTS * 2) + "\\n")
    open("prompts.jsonl", "w").write("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\\n"
                                             for i, t in enumerate(TEXTS[:4])))
    fit = "fit --activations cap --out {out} --folds 3 --shuffles 1 --n-boot 10 --no-nested --no-progress"
    assert main("capture --input texts.txt --out cap --n-boot 10 --no-progress".split()) == 0
    assert main(fit.format(out="fit").split()) == 0
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    results = {}
    for name, limit, argv in [
        ("capture-config", 300, "capture --input texts.txt --out cap2 --n-boot 10 --no-progress"),
        ("capture-shard", 3000, "capture --input texts.txt --out cap3 --n-boot 10 --no-progress"),
        ("fit-html", 100_000, fit.format(out="fit2")),
        ("steer-html", 100_000, "steer --probe fit/probe.json --input texts.txt --out steer --strengths -1 1 "
                                "--random-directions 1 --n-boot 10 --no-progress"),
        ("generate-jsonl", 1000, "generate --prompts prompts.jsonl --out g.jsonl --max-new-tokens 3 --no-progress"),
    ]:
        sys.stderr = open(f"{name}.err", "w")
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            code = main(argv.split())
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            sys.stderr.close()
            sys.stderr = sys.__stderr__
        results[name] = [code, open(f"{name}.err").read()]
    # The same fit, rerun with room to write: it finishes and nothing temporary is left anywhere.
    results["fit-rerun"] = [main(fit.format(out="fit2").split()), ""]
    print("RESULTS", json.dumps(results))
""")


def test_a_full_disk_names_the_path_and_the_fix_and_leaves_no_temporaries(tmp_path):
    """Under a file-size limit every write failed with "[Errno 27] File too large" and no path, and
    left .config.json.tmp-*, .sweep.html.tmp-* or a .tmp-000000 shard folder behind."""
    run = subprocess.run([sys.executable, "-c", DISK_SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.split("RESULTS ", 1)[1])
    expected = {"capture-config": r"cap2/config\.json", "capture-shard": r"capture shard 000000 cap3/shards/\.tmp-000000/",
                "fit-html": r"fit2/\w+\.html", "steer-html": r"steer/\w+\.html", "generate-jsonl": r"g\.jsonl"}
    for name, where in expected.items():
        code, err = results[name]
        lines = [line for line in err.splitlines() if not line.startswith("warning:")]  # steer's probe caveats
        assert code == 1 and len(lines) == 1, (name, err)
        assert re.search(rf"error: could not write .*{where}\S*: the file is larger than the file-size limit "
                         r"\(`ulimit -f`\) or the file system allows; raise the limit \(`ulimit -f unlimited`\) "
                         "or write somewhere else", lines[0]), (name, lines[0])
        assert "[Errno" not in lines[0]
    assert results["fit-rerun"][0] == 0
    left = [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert left == [], left


def test_a_killed_writers_temporary_is_swept_by_the_next_write(tmp_path):
    from surprise_probe.core.utils.jsonio import write_json

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".sweep.html.tmp-{int(dead.stdout)}"  # a process killed while writing sweep.html
    stale.write_text("half a page")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        kept = tmp_path / f".sweep.html.tmp-{live.pid}"  # a live writer's temporary is left alone
        kept.write_text("being written")
        write_json(tmp_path / "sweep.html", {"a": 1})
        assert not stale.exists() and kept.exists()
    finally:
        live.kill()
        live.wait()


def test_generate_recomputes_a_damaged_line_on_resume(tiny_hooked, tmp_path, monkeypatch, capsys):
    """A rerun after line 2 of 4 was cut in half said "nothing to do" and left it invalid."""
    from surprise_probe.app.cli import main
    from surprise_probe.app.commands import _common

    monkeypatch.setattr(_common, "load_model", lambda name, **kwargs: tiny_hooked)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(TEXTS[:4])))
    out = tmp_path / "g.jsonl"
    argv = ["generate", "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "3", "--no-progress"]
    assert main(argv) == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][: len(lines[1]) // 2] + "\n" + "".join(lines[2:]))
    capsys.readouterr()
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "nothing to do" not in captured.out
    assert re.search(rf"warning: {re.escape(str(out))}:2: not valid JSON \(the line stops after column \d+, "
                     r".*was it cut off\?\); dropped, and its response is sampled again", captured.err), captured.err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ["p0", "p1", "p2", "p3"]
    assert json.loads((tmp_path / "g.jsonl.config.json").read_text())["n_responses"] == 4
    assert main(argv) == 0 and "nothing to do" in capsys.readouterr().out
    # A whole line that lost its id counts as damaged too; one with another prompt's id is an error.
    records[0].pop("id")
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(argv) == 0 and "g.jsonl:1: has no 'id'" in capsys.readouterr().err


def test_a_bare_json_string_line_is_one_text_as_documented(tmp_path):
    from surprise_probe.core.text.files import read_inputs

    path = tmp_path / "in.jsonl"
    path.write_text('"A plain text."\n{"text": "Another."}\n')
    assert read_inputs(path) == ["A plain text.", {"text": "Another."}]
    assert '`"some text"`, read as' in (ROOT / "docs" / "capture.md").read_text()
    path.write_text("42\n")
    with pytest.raises(ValueError, match=r"in\.jsonl:1: expected a JSON object, a list of messages or a string"):
        read_inputs(path)
