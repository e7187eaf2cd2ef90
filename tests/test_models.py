import socket

import numpy as np
import pytest
import torch

import surprise_probe as sp
from surprise_probe.core.models.backends import hooked_transformer_available
from surprise_probe.core.models.loading import available_models
from tests.conftest import needs_hooked_transformer


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test: loading must never reach for a hub."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_load_local_folder_matches_hugging_face(tiny_hf_folder, backend, no_network):
    from transformers import AutoModelForCausalLM

    if backend == "hooked":
        needs_hooked_transformer()
    model = sp.load_model(str(tiny_hf_folder), backend=backend, progress=False)
    expected = "HookedTransformer" if backend == "hooked" else "TransformerBridge"
    assert type(model).__name__ == expected
    assert sp.model_id(model) == tiny_hf_folder.name
    hf = AutoModelForCausalLM.from_pretrained(tiny_hf_folder).eval()
    ids = sp.encode(model, "The quick brown fox jumps.").token_ids
    # Plain text is tokenized exactly as the HF tokenizer does: no extra BOS from TransformerLens.
    assert ids.tolist() == model.tokenizer("The quick brown fox jumps.")["input_ids"]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor(ids)[None]).logits, -1)
        ours = torch.log_softmax(model(torch.tensor(ids)[None]), -1)
    assert (ref - ours).abs().max() < 1e-4


def test_auto_backend_prefers_hooked_transformer(tiny_hf_folder):
    """backend='auto': HookedTransformer where this TransformerLens has it (3.x), else the bridge (4.x)."""
    expected = "HookedTransformer" if hooked_transformer_available() else "TransformerBridge"
    assert type(sp.load_model(str(tiny_hf_folder), progress=False)).__name__ == expected


def test_hooked_backend_needs_transformer_lens_3(tiny_hf_folder):
    """On TransformerLens 4.x (no HookedTransformer) backend='hooked' is refused and says what to use."""
    if hooked_transformer_available():
        pytest.skip("TransformerLens 3.x has HookedTransformer: backend='hooked' loads (tested above)")
    with pytest.raises(ValueError, match="backend='hooked' needs TransformerLens 3.x"):
        sp.load_model(str(tiny_hf_folder), backend="hooked", progress=False)


def test_unknown_model_lists_what_is_available(no_network):
    with pytest.raises(ValueError, match=r"unknown model 'no-such/model'.*smollm2-135m-instruct.*surprise-probe models"):
        sp.load_model("no-such/model")


def test_bad_names(tmp_path):
    with pytest.raises(ValueError, match="backend must be"):
        sp.load_model("x", backend="jax")
    with pytest.raises(ValueError, match="has no config.json"):
        sp.load_model(str(tmp_path))


def test_available_models_lists_embedded():
    names = {row["name"]: row for row in available_models()}
    assert set(names) == {"smollm2-135m-instruct", "gemma-3-270m"}
    assert names["smollm2-135m-instruct"]["kind"] == "post-trained"
    assert names["gemma-3-270m"]["kind"] == "base"


def test_embedded_cache_is_written_atomically(tmp_path, monkeypatch):
    """A failed first load leaves no folder that looks complete."""
    from surprise_probe.core.models import embedded

    monkeypatch.setenv("SURPRISE_PROBE_CACHE", str(tmp_path))
    spec = embedded.EMBEDDED_MODELS["smollm2-135m-instruct"]
    fake_pkg = tmp_path / "pkg"
    fake_pkg.mkdir()
    (fake_pkg / spec.gguf_file).write_bytes(b"not a gguf file")
    monkeypatch.setattr(embedded, "_package_folder", lambda _spec: fake_pkg)
    with pytest.raises(ValueError, match="GGUF"):
        embedded.embedded_folder("smollm2-135m-instruct", progress=False)
    leftovers = [p.name for p in (tmp_path / "models").iterdir()]
    assert leftovers == [] and not embedded._is_complete(tmp_path / "models" / "smollm2-135m-instruct")


def test_capture_cli_on_local_model(tiny_hf_folder, tmp_path, capsys):
    from surprise_probe.app.cli import main

    texts = tmp_path / "in.txt"
    texts.write_text("The quick brown fox.\nHello world, how are you?\n")
    code = main(["capture", "--model", str(tiny_hf_folder), "--input", str(texts), "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert code == 0 and "2 texts (one per line)" in out and "blocks.1.hook_resid_post" in out
    run = sp.load_capture(tmp_path / "o")
    assert run.n_sequences == 2 and np.isfinite(run.column("output_entropy")).all()
    # A different run into the same folder is refused with a clear message and exit code 2.
    code = main(["capture", "--model", str(tiny_hf_folder), "--input", str(texts), "--out", str(tmp_path / "o"),
                 "--layers", "0"])
    assert code == 2 and "layers=None, not layers=[0]" in capsys.readouterr().err


def test_old_cache_marker_is_rebuilt(tmp_path, monkeypatch):
    """A cache written before the tokenizer check (plain-text marker) does not count as complete."""
    from surprise_probe.core.models import embedded

    monkeypatch.setenv("SURPRISE_PROBE_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / ".complete").write_text("dequantized from SmolLM2-135M-Instruct.Q4_1.gguf in 17.6s\n")
    assert not embedded._is_complete(folder)
    (folder / ".complete").write_text('{"cache_format": 1}')
    assert not embedded._is_complete(folder)
    (folder / ".complete").write_text(f'{{"cache_format": {embedded.CACHE_FORMAT - 1}}}')
    assert not embedded._is_complete(folder)  # the format before files were recorded
    (folder / "config.json").write_text("{}")
    embedded.write_marker(folder)
    assert embedded._is_complete(folder)


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_loaded_model_keeps_the_original_tokenizer(tiny_hf_folder, backend):
    """TransformerLens swaps in an add_bos_token=True copy; load_model must put the original back."""
    from transformers import AutoTokenizer

    if backend == "hooked":
        needs_hooked_transformer()
    original = AutoTokenizer.from_pretrained(tiny_hf_folder)
    bos_adding = AutoTokenizer.from_pretrained(tiny_hf_folder, add_bos_token=True)
    text = "The quick brown fox."
    # The check can fail: a BOS-adding copy tokenizes this text differently.
    assert bos_adding(text)["input_ids"] != original(text)["input_ids"]
    model = sp.load_model(str(tiny_hf_folder), backend=backend, progress=False)
    assert model.tokenizer(text)["input_ids"] == original(text)["input_ids"], backend
    assert sp.encode(model, text).token_ids.tolist() == original(text)["input_ids"], backend
    assert model.to_tokens(text)[0].tolist() == original(text)["input_ids"], backend


def _random_hf_folder(root, tokenizer, architecture: str):
    """A seeded random Hugging Face model with non-trivial norms and biases (folding shows)."""
    import transformers

    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    config_class, model_class, extra = {
        "Llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"num_key_value_heads": 2}),
        "Qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"num_key_value_heads": 2}),
        "GPTNeoX": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM, {}),
    }[architecture]
    torch.manual_seed(0)
    model = model_class(config_class(**common, **extra))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):  # unit norms and zero biases would fold trivially
                parameter.add_(0.3 * torch.randn_like(parameter))
    folder = root / "random-lm"  # not the architecture: TransformerLens reads meaning into 'llama' in a name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("architecture", ["Llama", "Qwen2", "GPTNeoX"])
def test_block_by_block_processing_is_transformer_lens_bit_for_bit(tmp_path, tiny_tokenizer, architecture, dtype):
    """RMSNorm with grouped-query attention (Llama), value biases under GQA (Qwen2), and LayerNorm
    with biases and parallel attention/MLP (GPT-NeoX): the weights load_model gets block by block
    are exactly those of TransformerLens' whole-state-dict processing."""
    import copy

    needs_hooked_transformer("this checks HookedTransformer's own block-by-block weight processing, "
                             "which a bridge does not use")
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    from surprise_probe.core.models.hooked import _PROCESSING, _hooked_config, _load_processed

    folder, hf_model = _random_hf_folder(tmp_path, tiny_tokenizer, architecture)
    cfg = _hooked_config(folder, hf_model.config.to_dict(), "cpu", dtype, 1)
    assert cfg.normalization_type == ("LNPre" if architecture == "GPTNeoX" else "RMSPre")
    state_dict = loading.get_pretrained_state_dict(str(folder), cfg, hf_model.to(dtype), dtype=dtype)
    ours = HookedTransformer(copy.deepcopy(cfg), tiny_tokenizer, move_to_device=False)
    _load_processed(ours, dict(state_dict), center_unembed=True)
    theirs = HookedTransformer(copy.deepcopy(cfg), tiny_tokenizer, move_to_device=False)
    theirs.load_and_process_state_dict(dict(state_dict), center_unembed=True, **_PROCESSING)
    a, b = ours.state_dict(), theirs.state_dict()
    assert sorted(a) == sorted(b)
    for key in b:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key
    assert a["blocks.1.attn.W_Q"].dtype == dtype
    # The processing did something: the folded weights differ from the unprocessed ones.
    assert not torch.equal(a["blocks.1.attn.W_Q"], state_dict["blocks.1.attn.W_Q"].to(dtype))
    tokens = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        assert torch.equal(ours(tokens), theirs(tokens))


def test_block_by_block_processing_leaves_unfoldable_configs_to_transformer_lens(tmp_path, tiny_tokenizer,
                                                                                  monkeypatch):
    import copy

    needs_hooked_transformer("this checks HookedTransformer's own block-by-block weight processing, "
                             "which a bridge does not use")
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformer_lens.weight_processing import ProcessWeights

    from surprise_probe.core.models.hooked import _hooked_config, _load_processed

    folder, hf_model = _random_hf_folder(tmp_path, tiny_tokenizer, "Llama")
    cfg = _hooked_config(folder, hf_model.config.to_dict(), "cpu", torch.float32, 1)
    state_dict = loading.get_pretrained_state_dict(str(folder), cfg, hf_model, dtype=torch.float32)
    calls = []
    original = ProcessWeights.process_weights
    monkeypatch.setattr(ProcessWeights, "process_weights",
                        lambda sd, cfg, **kw: calls.append(cfg.n_layers) or original(sd, cfg, **kw))
    _load_processed(HookedTransformer(copy.deepcopy(cfg), tiny_tokenizer, move_to_device=False), dict(state_dict),
                    center_unembed=True)
    assert calls == [1, 1, 1, 0]  # three blocks, then embeddings/final norm/unembedding
    calls.clear()
    no_norms = {k: v for k, v in state_dict.items() if not k.endswith((".ln1.w", ".ln2.w", "ln_final.w"))}
    _load_processed(HookedTransformer(copy.deepcopy(cfg), tiny_tokenizer, move_to_device=False), no_norms,
                    center_unembed=True)
    assert calls == [3]  # TransformerLens' own path, on the whole state dict
