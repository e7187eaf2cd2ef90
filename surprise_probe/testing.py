"""Tiny, offline, seeded models for tests, docs examples and quick experiments.

``tiny_tokenizer`` trains a byte-level BPE on a few sentences in-process (no download) and gives it a
ChatML chat template like SmolLM2's. ``tiny_hooked_transformer`` and ``tiny_bridge`` build random
2-layer models around it, one per TransformerLens backend, so code can be tested on both;
``tiny_model`` picks the one this TransformerLens has (HookedTransformer on 3.x, the bridge on 4.x).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

from surprise_probe.core.models.backends import (
    hooked_transformer_available,
    transformer_lens_version,
)

__all__ = [
    "tiny_llama_folder", "tiny_tokenizer", "tiny_hooked_transformer", "tiny_bridge", "tiny_model",
    "TINY_CORPUS"]

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, how are you today?",
    "A cat sat on the mat and looked at the moon.",
    "Rivers flow to the sea; mountains rise to the sky.",
    "Numbers like 12, 345 and 6789 appear in text too.",
    "You are a helpful assistant. Answer the question briefly.",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(folder: str | Path | None = None, vocab_size: int = 400):
    """A byte-level BPE tokenizer saved to ``folder`` (TransformerLens reloads tokenizers by path)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(TINY_CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    folder = Path(folder or tempfile.mkdtemp(prefix="sp-tiny-tok-"))
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def tiny_hooked_transformer(
    n_layers: int = 2, d_model: int = 64, n_ctx: int = 64, seed: int = 0, tokenizer=None
):
    """A random ``HookedTransformer`` (rotary, LayerNorm) with BOS prepended to plain text.

    TransformerLens 3.x only (4.x has no HookedTransformer): use :func:`tiny_bridge` there.
    """
    if not hooked_transformer_available():
        raise RuntimeError(f"tiny_hooked_transformer needs TransformerLens 3.x; this is "
                           f"{transformer_lens_version()}, which has only TransformerBridge: use tiny_bridge()")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    tokenizer = tokenizer or tiny_tokenizer()
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=4,
        d_head=d_model // 4,
        d_mlp=4 * d_model,
        n_ctx=n_ctx,
        d_vocab=len(tokenizer),
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="rotary",
        default_prepend_bos=True,
        seed=seed,
        model_name=f"tiny-hooked-{n_layers}l-{d_model}d-s{seed}",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg, tokenizer)
    return model.eval()


def tiny_llama_folder(
    folder: str | Path,
    tokenizer=None,
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_ctx: int = 64,
    seed: int = 0,
    pad: bool = False,
    **config,
):
    """Save a random Llama (seeded) and its tokenizer as a Hugging Face folder; return ``(folder, model)``.

    ``pad=True`` also sets ``pad_token_id`` (which zeroes that embedding row); ``config`` overrides
    any other ``LlamaConfig`` field (e.g. ``initializer_range``).

    >>> import tempfile
    >>> folder, model = tiny_llama_folder(tempfile.mkdtemp(), n_layers=1, d_model=32)
    >>> (folder / "config.json").exists(), model.config.num_hidden_layers
    (True, 1)
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    tokenizer = tokenizer or tiny_tokenizer(folder)
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=n_ctx,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    if pad:
        settings["pad_token_id"] = tokenizer.pad_token_id
    model = LlamaForCausalLM(LlamaConfig(**{**settings, **config})).eval()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar from a test helper (a notebook shows it)
    try:
        model.save_pretrained(folder)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(folder)
    return folder, model


def tiny_bridge(n_layers: int = 2, d_model: int = 64, n_ctx: int = 64, seed: int = 0, tokenizer=None,
                dtype: torch.dtype = torch.float32, **config):
    """A random Llama model wrapped as a ``TransformerBridge`` in compatibility mode (any TransformerLens).

    ``config`` overrides ``LlamaConfig`` fields (e.g. ``initializer_range=0.3`` for sharp, far from
    uniform next-token distributions).
    """
    from transformer_lens.model_bridge import TransformerBridge

    folder = Path(tempfile.mkdtemp(prefix="sp-tiny-bridge-"))
    tokenizer = tokenizer or tiny_tokenizer(folder)
    folder, hf_model = tiny_llama_folder(folder, tokenizer, n_layers=n_layers, d_model=d_model, n_ctx=n_ctx,
                                         seed=seed, pad=True, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(
            str(folder), hf_model=hf_model.to(dtype), tokenizer=tokenizer, device="cpu", dtype=dtype
        )
        bridge.enable_compatibility_mode()
    bridge.cfg.model_name = f"tiny-bridge-{n_layers}l-{d_model}d-s{seed}"
    bridge.hf_model_for_tests = hf_model
    return bridge.eval()


def tiny_model(n_layers: int = 2, d_model: int = 64, n_ctx: int = 64, seed: int = 0, tokenizer=None):
    """A tiny random model on whichever backend this TransformerLens has, for version-agnostic examples.

    :func:`tiny_hooked_transformer` on TransformerLens 3.x (exactly it: same weights, same numbers),
    :func:`tiny_bridge` on 4.x, which has no ``HookedTransformer``.

    >>> from surprise_probe.core.models.backends import backend_name, hooked_transformer_available
    >>> model = tiny_model(n_layers=1, d_model=32)
    >>> model.cfg.n_layers, model.cfg.d_model
    (1, 32)
    >>> backend_name(model) == ("HookedTransformer" if hooked_transformer_available() else "TransformerBridge")
    True
    """
    make = tiny_hooked_transformer if hooked_transformer_available() else tiny_bridge
    return make(n_layers=n_layers, d_model=d_model, n_ctx=n_ctx, seed=seed, tokenizer=tokenizer)
