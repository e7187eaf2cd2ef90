import importlib
import json
import shutil

import numpy as np
import pytest

import surprise_probe as sp
from surprise_probe.core.capture.store import ShardWriter
from surprise_probe.core.forward.metrics import surprise_and_entropy
from tests.conftest import CONVERSATION, TEXTS

# `surprise_probe.core.capture.run` the function shadows the module of the same name on the package.
capture_module = importlib.import_module("surprise_probe.core.capture.run")


def _columns(run):
    return {name: run.column(name) for name in ("token_ids", "sequence_ids", "positions", "scored")}


def test_metrics_match_raw_logits(tiny_model):
    """Capture's numbers equal an independent computation from the model's raw logits."""
    from tests.test_metrics import reference

    run = sp.capture(tiny_model, TEXTS, batch_size=2, progress=False)
    for i, text in enumerate(TEXTS):
        ids = sp.encode(tiny_model, text).token_ids
        logits = tiny_model(__import__("torch").tensor(ids)[None]).detach().double().numpy()
        ref_s, ref_h = reference(logits, ids[None])
        rows = run.column("sequence_ids") == i
        np.testing.assert_allclose(run.column("input_surprise")[rows], ref_s[0], atol=1e-4)
        np.testing.assert_allclose(run.column("output_entropy")[rows], ref_h[0], atol=1e-4)
        assert np.isnan(run.column("input_surprise")[rows][0])


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batching_invariance(tiny_model, padding_side):
    one = sp.capture(tiny_model, TEXTS + [CONVERSATION], batch_size=1, progress=False)
    many = sp.capture(tiny_model, TEXTS + [CONVERSATION], batch_size=4, padding_side=padding_side, progress=False)
    for name, values in _columns(one).items():
        np.testing.assert_array_equal(values, _columns(many)[name])
    for name in ("input_surprise", "output_entropy"):
        np.testing.assert_allclose(one.column(name), many.column(name), atol=1e-4, equal_nan=True)
    for hook in one.hooks:
        np.testing.assert_allclose(one.activations(hook), many.activations(hook), atol=1e-4)


def test_only_requested_hooks_and_shapes(tiny_model):
    run = sp.capture(tiny_model, TEXTS[:2], hooks=["blocks.1.hook_resid_post"], progress=False)
    assert run.hooks == ["blocks.1.hook_resid_post"]
    # layers= always adds the embedding hook (fit's token-identity control), first
    layered = sp.capture(tiny_model, TEXTS[:1], layers=[1], progress=False)
    assert layered.hooks == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"]
    acts = run.activations("blocks.1.hook_resid_post")
    assert acts.shape == (run.n_tokens, tiny_model.cfg.d_model)
    with pytest.raises(KeyError, match="was not captured; captured hooks"):
        run.activations("blocks.0.hook_resid_post")
    default = sp.capture(tiny_model, TEXTS[:1], progress=False)
    assert default.hooks == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def test_conversation_scored_span(tiny_model):
    run = sp.capture(tiny_model, [CONVERSATION], progress=False)
    ids = run.column("token_ids")[run.column("scored")]
    assert tiny_model.tokenizer.decode(ids) == CONVERSATION[1]["content"]


def test_bad_hooks_and_layers(tiny_model):
    with pytest.raises(ValueError, match="layer 7 is out of range; this model has layers 0..1"):
        sp.capture(tiny_model, TEXTS, layers=[7], progress=False)
    with pytest.raises(ValueError, match="unknown hook 'blocks.5.hook_resid_post'"):
        sp.capture(tiny_model, TEXTS, hooks=["blocks.5.hook_resid_post"], progress=False)
    with pytest.raises(ValueError, match="pass hooks= or layers=, not both"):
        sp.capture(tiny_model, TEXTS, hooks=["blocks.0.hook_resid_post"], layers=[0], progress=False)
    with pytest.raises(ValueError, match="input 1 is empty text"):
        sp.capture(tiny_model, ["ok", ""], progress=False)


def test_stream_to_disk_equals_memory(tiny_hooked, tmp_path):
    memory = sp.capture(tiny_hooked, TEXTS, batch_size=2, progress=False)
    disk = sp.capture(tiny_hooked, TEXTS, batch_size=2, shard_size=2, out_dir=tmp_path / "run", progress=False)
    assert disk.n_shards == 3 and disk.n_tokens == memory.n_tokens
    reread = sp.load_capture(tmp_path / "run", verify=True)
    for hook in memory.hooks:
        np.testing.assert_array_equal(memory.activations(hook), reread.activations(hook))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["model_id"] == sp.model_id(tiny_hooked) and len(manifest["content_hash"]) == 64
    assert {"torch", "transformer_lens", "surprise_probe"} <= set(manifest["versions"])
    assert manifest["versions"]["transformer_lens"].startswith("3.")


def test_resume_after_interruption_matches_uninterrupted(tiny_hooked, tmp_path, monkeypatch):
    items = TEXTS * 3  # 15 sequences, 8 shards of 2
    reference = sp.capture(tiny_hooked, items, shard_size=2, out_dir=tmp_path / "full", progress=False)

    real_finish = ShardWriter.finish
    written = []

    def crash_after_three(writer, columns):  # killed after shard 3's files, before its rename
        if len(written) == 3:
            raise KeyboardInterrupt("simulated kill")
        written.append(writer.index)
        return real_finish(writer, columns)

    monkeypatch.setattr(ShardWriter, "finish", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        sp.capture(tiny_hooked, items, shard_size=2, out_dir=tmp_path / "resumed", progress=False)
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match=r"incomplete \(3 shard\(s\) written"):
        sp.load_capture(tmp_path / "resumed")
    # A half-written shard folder (killed mid-write) must be ignored and redone.
    assert (tmp_path / "resumed" / "shards" / ".tmp-000003").is_dir()
    monkeypatch.setattr(ShardWriter, "finish", real_finish)
    resumed = sp.capture(tiny_hooked, items, shard_size=2, out_dir=tmp_path / "resumed", progress=False)

    assert resumed.manifest["content_hash"] == reference.manifest["content_hash"]
    seq = resumed.column("sequence_ids")
    assert np.array_equal(np.unique(seq), np.arange(len(items)))
    assert np.array_equal(seq, reference.column("sequence_ids"))  # no duplicated sequences
    for hook in reference.hooks:
        np.testing.assert_array_equal(resumed.activations(hook), reference.activations(hook))
    assert not (tmp_path / "resumed" / "shards" / ".tmp-000003").exists() or sorted(
        p.name for p in (tmp_path / "resumed" / "shards").iterdir() if not p.name.startswith(".")
    ) == [f"{i:06d}" for i in range(8)]


def test_content_hash_depends_on_the_data_not_the_shard_size(tiny_hooked, tmp_path):
    items = [f"Text {i} says {'more ' * i}here." for i in range(6)]
    runs = {size: sp.capture(tiny_hooked, items, shard_size=size, batch_size=2, out_dir=tmp_path / f"s{size}",
                             progress=False) for size in (2, 4, 64)}
    assert [len(run.manifest["shards"]) for run in runs.values()] == [3, 2, 1]
    assert len({run.manifest["content_hash"] for run in runs.values()}) == 1
    for run in runs.values():
        sp.load_capture(run.path, verify=True)  # the per-sequence file digests verify
    # other data, another hash: one more text, or one changed byte (which verify also names)
    more = sp.capture(tiny_hooked, [*items, "One more."], shard_size=2, batch_size=2, out_dir=tmp_path / "more",
                      progress=False)
    assert more.manifest["content_hash"] != runs[2].manifest["content_hash"]
    hook = runs[2].hooks[-1]
    file = runs[2].path / "shards" / "000001" / f"{hook}.npy"
    data = bytearray(file.read_bytes())
    data[-1] ^= 1
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="000001.*does not match its manifest hash"):
        sp.load_capture(runs[2].path, verify=True)


def test_rerun_of_finished_run_is_a_no_op(tiny_hooked, tmp_path, monkeypatch):
    sp.capture(tiny_hooked, TEXTS, out_dir=tmp_path / "r", progress=False)
    monkeypatch.setattr(capture_module, "_capture_shard", lambda *a, **k: pytest.fail("recomputed"))
    again = sp.capture(tiny_hooked, TEXTS, out_dir=tmp_path / "r", progress=False)
    assert again.n_sequences == len(TEXTS)


def test_output_folder_of_another_run_is_refused(tiny_hooked, tmp_path):
    sp.capture(tiny_hooked, TEXTS, out_dir=tmp_path / "r", progress=False)
    with pytest.raises(FileExistsError, match=r"different capture \(differs in: .*hooks"):
        sp.capture(tiny_hooked, TEXTS, layers=[0], out_dir=tmp_path / "r", progress=False)
    replaced = sp.capture(tiny_hooked, TEXTS, layers=[0], out_dir=tmp_path / "r", overwrite=True, progress=False)
    assert replaced.hooks == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and holds no capture"):
        sp.capture(tiny_hooked, TEXTS, out_dir=tmp_path / "other", progress=False)
    shutil.rmtree(tmp_path / "other")


def test_token_metrics_facade(tiny_model):
    m = sp.token_metrics(tiny_model, "The quick brown fox.")
    assert len(m.tokens) == len(m.input_surprise) == len(m.output_entropy)
    assert np.isnan(m.input_surprise[0]) and np.isfinite(m.input_surprise[1:]).all()
    import torch

    logits = tiny_model(torch.tensor(m.token_ids)[None])
    s, h = surprise_and_entropy(logits, torch.tensor(m.token_ids)[None])
    np.testing.assert_allclose(m.output_entropy, h[0].detach().numpy(), atol=1e-5)
    assert "surprise" in m.table()
