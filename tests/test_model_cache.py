"""The processed-weights cache of embedded models, and handing freed memory back to the OS.

The embedded model is simulated by the tiny random Llama folder placed where the dequantized
SmolLM2 would be (``$SURPRISE_PROBE_CACHE/models/smollm2-135m-instruct`` with a complete marker),
so ``load_model("smollm2-135m-instruct")`` runs the real code path on it.
"""

import os
import shutil
import sys

import psutil
import pytest
import torch

import surprise_probe as sp
from surprise_probe.core.models import devices, hooked
from surprise_probe.core.models import embedded as embedded_models
from surprise_probe.core.models import loading as models
from surprise_probe.core.models.backends import hooked_transformer_available
from surprise_probe.core.models.basis import model_fingerprint

NAME = "smollm2-135m-instruct"

hooked_only = pytest.mark.skipif(
    not hooked_transformer_available(),
    reason="the HookedTransformer's cache (TransformerLens 3.x); the bridge's is tested by test_bridge_*",
)


@pytest.fixture
def embedded(tmp_path, monkeypatch, tiny_hf_folder):
    monkeypatch.setenv("SURPRISE_PROBE_CACHE", str(tmp_path))
    folder = tmp_path / "models" / NAME
    shutil.copytree(tiny_hf_folder, folder)
    embedded_models.write_marker(folder)
    return folder


def cache_files(folder):
    return sorted(folder.parent.glob(f"{NAME}.hooked-*.safetensors"))


def reference(folder, dtype):
    """The straightforward TransformerLens load (what load_model did before the cache); on
    TransformerLens 4.x, which has no HookedTransformer, the bridge from the folder, never cached."""
    if not hooked_transformer_available():
        return sp.load_model(str(folder), device="cpu", dtype=dtype, progress=False)
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    cfg = loading.get_pretrained_model_config(
        str(folder), hf_cfg=hf_model.config.to_dict(), fold_ln=True, device="cpu", n_devices=1,
        default_prepend_bos=False, dtype=dtype,
    )
    model = HookedTransformer(cfg, AutoTokenizer.from_pretrained(folder), move_to_device=False)
    model.load_and_process_state_dict(loading.get_pretrained_state_dict(str(folder), cfg, hf_model, dtype=dtype),
                                      fold_ln=True, center_writing_weights=True, center_unembed=True,
                                      fold_value_biases=True)
    return model


def assert_same_model(model, expected):
    if getattr(model, "_sp_forward_layout", False) and not getattr(expected, "_sp_forward_layout", False):
        # load_model stores a HookedTransformer's weights in its forward's layout (store_forward_layout):
        # the reference too, so strides and logits compare like for like
        hooked.store_forward_layout(expected)
        expected._sp_forward_layout = True
    ours, theirs = model.state_dict(), expected.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and ours[key].stride() == value.stride(), key
        assert torch.equal(ours[key], value), key  # bit for bit
    tokens = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        assert torch.equal(model(tokens), expected(tokens))


def refuse_hugging_face_model(monkeypatch):
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("the cached load built a Hugging Face model")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@hooked_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_load_is_bit_identical_to_converting(embedded, monkeypatch, dtype):
    expected = reference(embedded, dtype)
    first = sp.load_model(NAME, device="cpu", dtype=dtype, progress=False)  # converts, writes the cache
    files = cache_files(embedded)
    assert [path.name.split("-")[3] for path in files] == [str(dtype).removeprefix("torch.")]
    refuse_hugging_face_model(monkeypatch)
    second = sp.load_model(NAME, device="cpu", dtype=dtype, progress=False)  # reads it
    for model in (first, second):
        assert type(model).__name__ == "HookedTransformer"
        assert_same_model(model, expected)
    assert second.cfg.to_dict() == first.cfg.to_dict()
    assert model_fingerprint(second) == model_fingerprint(first)
    assert second.weight_processing_requested == first.weight_processing_requested
    assert sp.encode(second, "The quick brown fox.").token_ids.tolist() == \
        first.tokenizer("The quick brown fox.")["input_ids"]
    assert cache_files(embedded) == files


def test_cache_key_follows_what_decides_the_weights(embedded, tmp_path):
    key = hooked.hooked_cache_file(embedded, NAME, torch.float32)
    assert key.parent == tmp_path / "models"
    assert hooked.hooked_cache_file(embedded, NAME, torch.float32) == key
    assert hooked.hooked_cache_file(embedded, NAME, torch.bfloat16) != key
    config = embedded / "config.json"
    stat = config.stat()
    text = config.read_text()
    assert "true" in text
    config.write_text(text.replace("true", "null", 1))
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and time, other bytes
    other = hooked.hooked_cache_file(embedded, NAME, torch.float32)
    assert other != key
    weights = next(embedded.glob("*.safetensors"))
    os.utime(weights, ns=(stat.st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    assert hooked.hooked_cache_file(embedded, NAME, torch.float32) != other


@hooked_only
def test_a_changed_folder_replaces_its_stale_cache(embedded, monkeypatch):
    sp.load_model(NAME, device="cpu", progress=False)
    [old] = cache_files(embedded)
    weights = next(embedded.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    sp.load_model(NAME, device="cpu", progress=False)
    [new] = cache_files(embedded)
    assert new != old and not old.exists()


@hooked_only
def test_damaged_cache_is_ignored_and_rewritten(embedded, monkeypatch):
    expected = reference(embedded, torch.float32)
    sp.load_model(NAME, device="cpu", progress=False)
    [path] = cache_files(embedded)
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size - 100)
    with pytest.warns(UserWarning, match=r"ignoring the processed-weights cache .*truncated"):
        model = sp.load_model(NAME, device="cpu", progress=False)
    assert_same_model(model, expected)
    assert cache_files(embedded) == [path] and path.stat().st_size == size
    path.write_bytes(b"\xff" * 64)  # not a safetensors file at all
    with pytest.warns(UserWarning, match="not a safetensors file"):
        assert_same_model(sp.load_model(NAME, device="cpu", progress=False), expected)


@hooked_only
def test_cache_of_another_config_is_not_read(embedded, monkeypatch):
    """A file under the right name whose recorded config differs is converted over, silently."""
    sp.load_model(NAME, device="cpu", progress=False)
    [path] = cache_files(embedded)
    monkeypatch.setattr(hooked, "_config_signature", lambda cfg: "another config")
    calls = []
    convert = models._convert
    monkeypatch.setattr(models, "_convert", lambda *args: calls.append(1) or convert(*args))
    sp.load_model(NAME, device="cpu", progress=False)
    assert calls == [1]


def test_user_folders_are_not_cached(tiny_hf_folder, embedded):
    for backend in ("auto", "bridge"):
        sp.load_model(str(tiny_hf_folder), device="cpu", backend=backend, progress=False)
    assert list(tiny_hf_folder.parent.glob("*.safetensors")) == []


def bridge_files(folder):
    return sorted(folder.parent.glob(f"{NAME}.bridge-*.safetensors"))


def count_processing(monkeypatch) -> list:
    """Count TransformerLens' weight processing computations (what the bridge cache saves)."""
    from transformer_lens.weight_processing import ProcessWeights

    calls, compute = [], ProcessWeights.process_weights
    monkeypatch.setattr(ProcessWeights, "process_weights",
                        staticmethod(lambda *args, **kwargs: calls.append(1) or compute(*args, **kwargs)))
    return calls


def assert_same_bridge(model, expected):
    ours, theirs = model.state_dict(), expected.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key  # bit for bit
    tokens = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        assert torch.equal(model(tokens), expected(tokens))
        _, ours = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_resid_post"))
        _, theirs = expected.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_resid_post"))
    assert sorted(ours.keys()) == sorted(theirs.keys()) and len(ours.keys()) == 2
    for name in theirs.keys():
        assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bridge_cached_processing_is_bit_identical(embedded, tiny_hf_folder, monkeypatch, dtype):
    """The bridge's weight processing is computed once, cached beside the embedded model, then read:
    the same weights, logits and activations as processing (a user folder: never cached)."""
    calls = count_processing(monkeypatch)
    first = sp.load_model(NAME, device="cpu", dtype=dtype, backend="bridge", progress=False)
    assert calls == [1] and len(bridge_files(embedded)) == 1 and cache_files(embedded) == []
    cached = sp.load_model(NAME, device="cpu", dtype=dtype, backend="bridge", progress=False)
    assert calls == [1]  # read, not computed
    reference = sp.load_model(str(tiny_hf_folder), device="cpu", dtype=dtype, backend="bridge", progress=False)
    assert calls == [1, 1]
    assert_same_bridge(first, reference)
    assert_same_bridge(cached, reference)
    assert model_fingerprint(cached)["weights_sha256"] == model_fingerprint(reference)["weights_sha256"]


def test_bridge_cache_of_another_input_is_recomputed(embedded, monkeypatch):
    """A file under the right name whose recorded input (keys, shapes, config, flags) differs is not read."""
    from surprise_probe.core.models import bridge_cache

    sp.load_model(NAME, device="cpu", backend="bridge", progress=False)
    calls = count_processing(monkeypatch)
    monkeypatch.setattr(bridge_cache, "_signature", lambda *args: "another input")
    sp.load_model(NAME, device="cpu", backend="bridge", progress=False)
    assert calls == [1] and len(bridge_files(embedded)) == 1


def test_damaged_bridge_cache_warns_and_is_rewritten(embedded, tiny_hf_folder, monkeypatch):
    sp.load_model(NAME, device="cpu", backend="bridge", progress=False)
    [path] = bridge_files(embedded)
    path.write_bytes(b"not a safetensors file")
    calls = count_processing(monkeypatch)
    with pytest.warns(UserWarning, match="ignoring the processed-weights cache.*processing again"):
        model = sp.load_model(NAME, device="cpu", backend="bridge", progress=False)
    assert calls == [1] and bridge_files(embedded) == [path] and path.stat().st_size > 1000
    assert_same_bridge(model, sp.load_model(str(tiny_hf_folder), device="cpu", backend="bridge", progress=False))


def test_unwritable_bridge_cache_warns_and_loads(embedded, tiny_hf_folder, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("read-only file system")

    monkeypatch.setattr("safetensors.torch.save_file", refuse)
    with pytest.warns(UserWarning, match="could not cache the processed weights.*read-only"):
        model = sp.load_model(NAME, device="cpu", backend="bridge", progress=False)
    assert bridge_files(embedded) == [] and list(embedded.parent.glob(".*.tmp*")) == []
    assert_same_bridge(model, sp.load_model(str(tiny_hf_folder), device="cpu", backend="bridge", progress=False))


@hooked_only
def test_unwritable_cache_warns_and_loads(embedded, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("read-only file system")

    monkeypatch.setattr("safetensors.torch.save_file", refuse)
    with pytest.warns(UserWarning, match="could not cache the processed weights.*read-only"):
        model = sp.load_model(NAME, device="cpu", progress=False)
    assert_same_model(model, reference(embedded, torch.float32))
    assert cache_files(embedded) == [] and list(embedded.parent.glob(".*.tmp*")) == []


@pytest.mark.skipif(devices._malloc_trim() is None, reason="needs glibc's malloc_trim (Linux)")
def test_release_memory_hands_freed_heap_back():
    process = psutil.Process()
    blocks = [bytearray(100_000) for _ in range(2000)]  # 200 MB of heap (below the mmap threshold)
    keep = bytearray(100_000)  # above them on the heap, so free() alone cannot shrink it
    del blocks
    held = process.memory_info().rss
    assert devices.release_memory() is True
    assert held - process.memory_info().rss > 100e6
    del keep


def test_release_memory_elsewhere_only_collects(monkeypatch):
    devices._malloc_trim.cache_clear()
    monkeypatch.setattr(sys, "platform", "darwin")
    try:
        assert devices._malloc_trim() is None and devices.release_memory() is False
    finally:
        devices._malloc_trim.cache_clear()


# --- a damaged, unwritable or littered model cache ----------------------------------------------------

@pytest.fixture
def rebuilds(monkeypatch, tiny_hf_folder):
    """Rebuilding the cache copies the tiny model back (instead of dequantizing the real GGUF)."""
    calls = []

    def build(name, target, progress):
        calls.append(name)
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(tiny_hf_folder, target)
        embedded_models.write_marker(target)
        return target

    monkeypatch.setattr(embedded_models, "_build_embedded", build)
    return calls


def test_a_truncated_cache_file_is_found_by_its_size_and_rebuilt(embedded, rebuilds):
    expected = reference(embedded, torch.float32)
    weights = next(embedded.glob("*.safetensors"))
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(size // 2)  # what a disk filling up during the first load leaves
    with pytest.warns(UserWarning, match=rf"model cache .*{NAME} is damaged \(model.safetensors has {size // 2} "
                                         rf"bytes, {size} when it was built\); rebuilding it"):
        model = sp.load_model(NAME, device="cpu", progress=False)
    assert rebuilds == [NAME] and weights.stat().st_size == size
    assert_same_model(model, expected)


def test_a_cache_file_damaged_at_its_size_is_found_by_its_hash_and_rebuilt(embedded, rebuilds):
    expected = reference(embedded, torch.float32)
    weights = next(embedded.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\xff" * 32  # the header is no longer JSON; the size is unchanged
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"model.safetensors does not match the sha256 recorded when it was built"):
        model = sp.load_model(NAME, device="cpu", progress=False)
    assert rebuilds == [NAME]
    assert_same_model(model, expected)


def test_an_intact_cache_keeps_the_loading_error(embedded, rebuilds, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(models, "_load_folder", fail)
    with pytest.raises(RuntimeError, match="some other failure"):
        sp.load_model(NAME, device="cpu", progress=False)
    assert rebuilds == []


def test_a_killed_builds_temporary_folder_is_swept(embedded, rebuilds):
    stale = embedded.parent / f".tmp-{NAME}-abc123"
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "model.safetensors").write_bytes(b"half a model")
    sp.load_model(NAME, device="cpu", progress=False)
    assert not stale.exists() and rebuilds == []


def test_an_unwritable_cache_names_the_cache_and_how_to_move_it(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    monkeypatch.setenv("SURPRISE_PROBE_CACHE", str(tmp_path / "home" / "cache"))
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "home")):
            raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "home"))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(OSError, match=r"could not write the model cache .*home/cache/\.build-smollm2-135m-instruct"
                                      r"\.lock: the file system is read-only; set SURPRISE_PROBE_CACHE to another "
                                      r"folder") as error:
        embedded_models.embedded_folder(NAME, progress=False)
    assert "[Errno" not in str(error.value)
