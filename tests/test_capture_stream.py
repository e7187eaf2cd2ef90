"""Capture to disk streams each batch into its shard's files (ShardWriter): the files, hashes and
entries must be exactly those of writing the whole in-memory shard at once (write_shard)."""

import numpy as np
import pytest

import surprise_probe as sp
from surprise_probe.core.capture.store import ShardWriter, write_shard
from surprise_probe.core.utils.jsonio import read_json
from tests.conftest import TEXTS


@pytest.mark.parametrize("storage_dtype", ["float32", "float16"])
def test_streamed_shards_equal_whole_shard_writes(tiny_hooked, tmp_path, storage_dtype):
    items = TEXTS * 2  # 10 sequences of different lengths: padded batches, 3 shards of 4
    kwargs = dict(shard_size=4, batch_size=3, storage_dtype=storage_dtype, progress=False)
    streamed = sp.capture(tiny_hooked, items, out_dir=tmp_path / "streamed", **kwargs)
    in_memory = sp.capture(tiny_hooked, items, **kwargs)
    reference = [write_shard(tmp_path / "whole", shard) for shard in in_memory.shards()]

    assert [e["files"] for e in streamed.manifest["shards"]] == [e["files"] for e in reference]
    # the manifest leaves out the per-sequence digests; each shard.json keeps them, equal too
    assert streamed.manifest["shards"] == [{k: v for k, v in e.items() if k != "sequence_digests"} for e in reference]
    for entry in reference:
        assert len(entry["sequence_digests"]) == entry["n_sequences"]
        assert read_json(tmp_path / "streamed" / "shards" / entry["name"] / "shard.json") == entry
    for entry in reference:
        for name in entry["files"]:
            written = (tmp_path / "streamed" / "shards" / entry["name"] / name).read_bytes()
            assert written == (tmp_path / "whole" / "shards" / entry["name"] / name).read_bytes(), name
    for hook in in_memory.hooks:
        np.testing.assert_array_equal(streamed.activations(hook), in_memory.activations(hook))
    sp.store.verify_capture(sp.load_capture(tmp_path / "streamed"))


def test_shard_writer_refuses_missing_extra_or_misshaped_rows(tmp_path):
    columns = {"token_ids": np.zeros(3, np.int64), "sequence_ids": np.zeros(3, np.int64),
               "positions": np.arange(3), "input_surprise": np.zeros(3, np.float32),
               "output_entropy": np.zeros(3, np.float32), "scored": np.ones(3, bool)}
    with ShardWriter(tmp_path, 0, ["h"], n_tokens=3, d_model=4, dtype=np.float32) as writer:
        writer.add("h", np.ones((2, 4), np.float32))
        with pytest.raises(ValueError, match=r"more than the shard's 3 tokens"):
            writer.add("h", np.ones((2, 4), np.float32))
        with pytest.raises(ValueError, match=r"expected rows of \(4,\) float32, got \(1, 5\) float32"):
            writer.add("h", np.ones((1, 5), np.float32))
        with pytest.raises(ValueError, match=r"expected 3 tokens per hook, got \{'h': 2\}"):
            writer.finish(columns)
    assert not (tmp_path / "shards" / "000000").exists()  # nothing renamed into place
    with ShardWriter(tmp_path, 0, ["h"], n_tokens=3, d_model=4, dtype=np.float32) as writer:
        writer.add("h", np.arange(12, dtype=np.float32).reshape(3, 4))
        entry = writer.finish(columns)
    assert entry["n_tokens"] == 3 and entry["n_sequences"] == 1
    np.testing.assert_array_equal(np.load(tmp_path / "shards" / "000000" / "h.npy"),
                                  np.arange(12, dtype=np.float32).reshape(3, 4))
