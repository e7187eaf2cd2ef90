"""The toolkit's one sampler: batched, KV-cached, seeded, keeping the exact sampled ids.

Every place that samples text from a model (``surprise-probe generate``, steered generation,
the policy gap, the intention analyzer) calls :func:`sample`. It takes prompts as **token ids**
(build them with :func:`chat_prompt_ids` or any tokenizer call) so a caller can continue from any
prefix, e.g. ``prompt_ids + revealed_prefix_ids`` for N continuations of a prefilled start.

- **Batched with a KV cache.** Rows (prompt x sample) are sorted by length and cut into batches
  of ``batch_size`` rows, left-padded. A ``HookedTransformer`` uses TransformerLens' own
  key-value cache; a ``TransformerBridge`` passes the wrapped Hugging Face model's
  ``past_key_values`` through the bridge's forward (so bridge hooks still fire). The prompt is
  read once, then each new token costs one single-position forward. Only the last position is
  unembedded. A ``HookedTransformer``'s attention runs as one fused kernel where that is the
  same computation (:mod:`surprise_probe.core.models.attention`; with a hook on the attention, TransformerLens'
  own runs): 0.85-0.88x Hugging Face ``generate``'s tokens/s on SmolLM2 (0.77-0.80x with
  TransformerLens' attention; docs/benchmarks.md).
- **Seeded per row, independent of batching.** Row ``(prompt, sample j)`` draws its uniforms from
  its own generator, seeded from ``(seed, j, the prompt's ids)``, and samples by inverse CDF. So the
  same seed gives the same ids whatever the batch size, the row order or the other prompts in the
  call (up to float rounding differences between padded batch shapes, which can flip a draw only
  when it falls within ~1e-6 of a token boundary). Two identical prompts get identical samples.
  Generators and masks live on the model's device.
- **Exact ids.** Each :class:`Sampled` keeps the prompt ids and the sampled ids as drawn; reading
  ``token_ids`` back with ``scored`` over the response is an on-policy read (re-tokenizing the
  decoded text is not the identity).
- **Stops at end-of-turn.** A row ends at the first id in ``stop_ids`` (default
  :func:`end_of_turn_ids`: the tokenizer's EOS plus ``<|im_end|>``, ``<end_of_turn>``,
  ``<|eot_id|>``, ``<|endoftext|>`` when present); the stop id is kept in ``response_ids`` and
  ``ended`` is True; it is not part of ``content_ids``/``scored``.
- ``temperature=0`` is greedy (argmax, lowest id on ties).
- ``forward_context(phase)`` wraps every forward in a caller's context manager
  (``phase`` is ``"prefill"`` for the prompt pass, ``"step"`` for each one-token pass): that is how
  steered generation applies interventions while sampling without this module knowing about them.

>>> from surprise_probe.testing import tiny_model
>>> model = tiny_model()
>>> ids = chat_prompt_ids(model, "Hello world")
>>> a = sample(model, [ids], n_samples=2, max_new_tokens=5, seed=1)
>>> b = sample(model, [ids, ids[:3]], n_samples=2, max_new_tokens=5, seed=1, batch_size=1)
>>> [s.response_ids for s in a] == [s.response_ids for s in b[:2]]
True
>>> a[0].token_ids[: len(ids)] == list(ids), len(a[0].scored) == len(a[0].token_ids)
(True, True)
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from surprise_probe.core.forward.passes import unembed
from surprise_probe.core.models.attention import fused_attention
from surprise_probe.core.models.backends import is_hooked_transformer
from surprise_probe.core.models.hooked import store_forward_layout
from surprise_probe.core.text.chat import encode_conversation
from surprise_probe.core.text.encoding import encode, pad_id
from surprise_probe.core.utils.progress import tqdm

__all__ = ["Sampled", "sample", "decoding_layout", "end_of_turn_ids", "chat_prompt_ids", "plain_prompt_ids", "PLAIN_FORMAT", "row_seed",
           "bridge_cache_argument", "bridge_cache_shim"]

FUSE_ATTENTION = True
"""Whether a HookedTransformer samples with ``surprise_probe.core.models.attention.fused_attention`` (where
it is the same computation; a switch for benchmarks and debugging)."""

# The documented prompt format for models read or sampled without a chat template (base models).
PLAIN_FORMAT = "Question: {prompt}\nAnswer:"

END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>")


@dataclass(frozen=True)
class Sampled:
    """One sampled continuation, with the exact ids drawn."""

    prompt_ids: list[int]
    response_ids: list[int]  # as sampled; ends with the stop id when ``ended``
    ended: bool  # stopped at an end-of-turn id (False: ran into max_new_tokens)
    prompt_index: int  # index of the prompt in the call
    sample_index: int  # j of n_samples
    seed: int  # this row's generator seed

    @property
    def content_ids(self) -> list[int]:
        """The response without its stop id (what is scored)."""
        return self.response_ids[:-1] if self.ended else list(self.response_ids)

    @property
    def token_ids(self) -> list[int]:
        """Prompt + response ids: the sequence to read back for an on-policy read."""
        return [*self.prompt_ids, *self.response_ids]

    @property
    def scored(self) -> list[bool]:
        """True on the response content (not the prompt, not the stop id)."""
        n_content = len(self.content_ids)
        return [False] * len(self.prompt_ids) + [True] * n_content + [False] * (len(self.response_ids) - n_content)

    def text(self, tokenizer) -> str:
        """The response content decoded (for display and for other models to read)."""
        return tokenizer.decode(self.content_ids)


def end_of_turn_ids(model) -> set[int]:
    """The tokenizer's EOS id plus the common end-of-turn tokens it knows."""
    tokenizer = model.tokenizer
    ids = {tokenizer.eos_token_id}
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab:
            ids.add(vocab[token])
    return {int(i) for i in ids if i is not None}


def chat_prompt_ids(model, prompt: str | Sequence[dict]) -> list[int]:
    """A user message (or a conversation) rendered with the chat template + assistant header."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return encode_conversation(model.tokenizer, messages, add_generation_prompt=True).token_ids.tolist()


def plain_prompt_ids(model, prompt: str) -> list[int]:
    """``PLAIN_FORMAT`` filled with ``prompt``, tokenized as plain text (the model's BOS included).

    >>> from surprise_probe.testing import tiny_model
    >>> model = tiny_model()
    >>> model.tokenizer.decode(plain_prompt_ids(model, "Hi?"))
    '<|endoftext|>Question: Hi?\\nAnswer:'
    """

    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"expected a non-empty prompt string, got {prompt!r:.60}")
    return encode(model, PLAIN_FORMAT.format(prompt=prompt)).token_ids.tolist()


def row_seed(seed: int, sample_index: int, prompt_ids: Sequence[int]) -> int:
    """The generator seed of one row: a hash of the call's seed, the sample index and the prompt ids."""
    digest = hashlib.sha256(f"{int(seed)}:{int(sample_index)}:".encode() + np.asarray(prompt_ids, np.int64).tobytes())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def _next_tokens(
    logits: Float[Tensor, "batch vocab"], uniforms: Float[Tensor, " batch"], temperature: float
) -> Int[Tensor, " batch"]:
    # -inf is a masked token (probability 0); NaN, +inf or a fully masked row cannot be sampled.
    if torch.isnan(logits).any() or torch.isposinf(logits).any() or torch.isneginf(logits).all(-1).any():
        raise ValueError(
            "the model produced non-finite logits while sampling (with an intervention: use a smaller strength)"
        )
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1).double()
    cdf = probs.cumsum(-1)
    # Inverse CDF: the first token whose cumulative probability exceeds u (tokens of probability 0
    # have no interval, so they are never drawn).
    picked = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return picked.clamp_(max=logits.shape[-1] - 1)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def sample(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    n_samples: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    stop_ids: set[int] | Sequence[int] | None = None,
    batch_size: int = 16,
    forward_context: Callable[[str], AbstractContextManager] | None = None,
    progress: bool = False,
) -> list[Sampled]:
    """Sample ``n_samples`` continuations of each prompt (token ids); prompt-major order.

    Returns ``len(prompts) * n_samples`` :class:`Sampled`, ``[p0 s0, p0 s1, ..., p1 s0, ...]``.
    ``stop_ids=None`` uses :func:`end_of_turn_ids`; pass ``()`` to never stop early.
    """
    if temperature < 0 or not np.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if max_new_tokens < 1 or n_samples < 1 or batch_size < 1:
        raise ValueError(
            f"max_new_tokens, n_samples and batch_size must be >= 1, got {max_new_tokens}, {n_samples}, {batch_size}"
        )
    prompts = [[int(t) for t in p] for p in prompts]
    n_ctx = int(model.cfg.n_ctx)
    for i, ids in enumerate(prompts):
        if not ids:
            raise ValueError(f"prompt {i} has no tokens")
        if len(ids) + max_new_tokens > n_ctx:
            raise ValueError(
                f"prompt {i} ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds n_ctx {n_ctx}"
            )
    stop = end_of_turn_ids(model) if stop_ids is None else {int(i) for i in stop_ids}
    rows = [(p, j) for p in range(len(prompts)) for j in range(n_samples)]
    # Similar lengths together: less padding, and the seeds make the order irrelevant to results.
    order = sorted(range(len(rows)), key=lambda r: (len(prompts[rows[r][0]]), r))
    results: dict[int, Sampled] = {}
    bar = tqdm(total=len(rows), desc="sample", unit="resp", disable=not progress, leave=False)
    with decoding_layout(model), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            seeds = [row_seed(seed, rows[r][1], prompts[rows[r][0]]) for r in chunk]
            new = _sample_batch(
                model, [prompts[rows[r][0]] for r in chunk], seeds, max_new_tokens, temperature, stop,
                forward_context,
            )
            for r, row_ids, s in zip(chunk, new, seeds, strict=True):
                p, j = rows[r]
                ended = False
                for k, token in enumerate(row_ids):
                    if token in stop:
                        row_ids, ended = row_ids[: k + 1], True
                        break
                results[r] = Sampled(prompts[p], row_ids, ended, p, j, s)
            bar.update(len(chunk))
    bar.close()
    return [results[r] for r in range(len(rows))]


def _sample_batch(model, prompts, seeds, max_new_tokens, temperature, stop, forward_context) -> list[list[int]]:
    device = _device(model)
    batch, width = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((batch, width), pad_id(model), dtype=torch.long, device=device)
    mask = torch.zeros((batch, width), dtype=torch.long, device=device)
    for row, ids in enumerate(prompts):
        tokens[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long, device=device)
        mask[row, width - len(ids) :] = 1
    uniforms = torch.stack(
        [
            torch.rand(max_new_tokens, generator=torch.Generator(device=device).manual_seed(s),
                       device=device, dtype=torch.float64)
            for s in seeds
        ]
    )
    stop_tensor = torch.tensor(sorted(stop), dtype=torch.long, device=device)
    context = forward_context or (lambda phase: contextlib.nullcontext())
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    out = []
    step = _cached_stepper(model, tokens, mask, context)
    hooked = is_hooked_transformer(model)
    with contextlib.nullcontext() if hooked else bridge_cache_shim(model):
        logits = step(None)
        for t in range(max_new_tokens):
            next_token = _next_tokens(logits, uniforms[:, t], temperature)
            out.append(next_token)
            done |= torch.isin(next_token, stop_tensor)
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            logits = step(next_token)
    return torch.stack(out, 1).tolist()


@contextlib.contextmanager
def decoding_layout(model):
    """Store a ``HookedTransformer``'s weights in the memory order its forward asks for, then restore.

    Values are unchanged (every forward gives the same numbers); only the per-step weight copies
    disappear. Attention with split inputs (``use_split_qkv_input``/``use_attn_in``) is left as is.
    Any other model passes through untouched. Re-entrant: inside another ``decoding_layout`` of the
    same model it changes nothing, so a caller that samples in many calls (one per chunk, for
    resuming) wraps them once and pays the two copies of the weights once (0.46 s on SmolLM2).
    A HookedTransformer from ``load_model`` is stored this way from its load on
    (``core.models.hooked.store_forward_layout``), so for it this changes nothing.
    """
    if not is_hooked_transformer(model) or getattr(model, "_sp_forward_layout", False):
        yield model
        return
    changed = store_forward_layout(model)  # none for attention with split inputs
    model._sp_forward_layout = True
    try:
        yield model
    finally:
        model._sp_forward_layout = False
        with torch.inference_mode(False), torch.no_grad():
            for param in changed:
                param.data = param.data.contiguous()


def _cached_stepper(model, tokens, mask, context):
    """A function: ``None`` -> last-position logits of the prompt; a new token -> its logits."""
    if is_hooked_transformer(model):
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, tokens.shape[0])

        n_layers = int(model.cfg.n_layers)

        def hooked_step(next_token):
            # The step's tokens are all real: an explicit mask, or TransformerLens would guess
            # padding from the pad id (which can be a sampled token).
            if next_token is None:
                step_tokens, step_mask = tokens, mask
            else:
                step_tokens = next_token[:, None]
                step_mask = torch.ones_like(step_tokens)
            # Inside the caller's context, so a hook it adds on the attention keeps the model's own.
            with context("prefill" if next_token is None else "step"), \
                    fused_attention(model, range(n_layers) if FUSE_ATTENTION else ()):
                residual = model(step_tokens, attention_mask=step_mask, past_kv_cache=cache,
                                 padding_side="left", stop_at_layer=n_layers)
                # Only the last position is unembedded: the prompt's other logits are never used.
                return unembed(model, residual[:, -1]).float()

        return hooked_step

    from transformers import DynamicCache

    state = {"cache": DynamicCache(config=model.original_model.config), "mask": mask}
    cache_name = bridge_cache_argument(model)

    def bridge_step(next_token):
        # The bridge forwards these to the wrapped Hugging Face model; it derives position ids from
        # the (left-padded) mask, and logits_to_keep=1 unembeds only the last position.
        with context("prefill" if next_token is None else "step"):
            if next_token is not None:
                state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], 1)
            step_tokens = tokens if next_token is None else next_token[:, None]
            logits = model(step_tokens, attention_mask=state["mask"], use_cache=True,
                           logits_to_keep=1, **{cache_name: state["cache"]})
        return logits[:, -1].float()

    return bridge_step


def bridge_cache_argument(model) -> str:
    """The name under which a bridge's Hugging Face model takes its key-value cache: ``cache`` in
    transformers >= 5.2x (``past_key_values`` is deprecated there, to be removed in 5.40), else
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.original_model.forward).parameters else "past_key_values"


@contextlib.contextmanager
def bridge_cache_shim(model):
    """Hand the key-value cache to TransformerLens' bridge attention under the name it reads.

    transformers >= 5.2x passes the cache to attention as ``cache=``; TransformerLens 3.9's bridge
    attention reads only ``past_key_values``/``layer_past`` and otherwise silently skips the cache
    (every cached step would then ignore the prompt: measured, logits off by 0.3 on a tiny Llama).
    Tested against a full forward per token in tests/test_sampling.py.
    """

    def rename(module, args, kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            kwargs["past_key_values"] = kwargs["cache"]
        return args, kwargs

    handles = [
        module.register_forward_pre_hook(rename, with_kwargs=True)
        for module in model.modules()
        if hasattr(module, "_layer_idx") and hasattr(module, "_update_kv_cache")
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
