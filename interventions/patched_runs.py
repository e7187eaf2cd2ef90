"""The patched-run engine of activation patching: measured-span entropies of the source, the
destination and every patched condition, computing nothing twice.

A patch after block ``L`` changes only the blocks after it: patched runs start from the clean
destination's residual after block ``L``, patched, and run blocks ``L + 1 ...`` only, unembedded
only at the measured positions. A HookedTransformer also takes the tokens before the first patched
or measured one from a frozen key-value cache; a TransformerBridge starts its Hugging Face decoder
at the block (``interventions.suffix.bridge_from_layer``). Elsewhere each patched row is a full
forward. ``interventions.patching`` (the experiment, its controls and results) calls it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from surprise_probe.interventions.suffix import (
    bridge_can_start,
    bridge_from_layer,
    warn_whole_forwards,
)
from torch import Tensor

from surprise_probe.core.forward.edits import Patch, Touched, apply_all
from surprise_probe.core.forward.hooks import resid_post, resid_post_layer
from surprise_probe.core.forward.metrics import chunk_positions, output_entropy
from surprise_probe.core.forward.passes import (
    final_residual,
    forward_metrics,
    output_entropy_at,
    unembed,
)
from surprise_probe.core.models.backends import is_bridge, is_hooked_transformer
from surprise_probe.core.models.devices import model_device
from surprise_probe.core.text.encoding import pad_batch, pad_id

__all__ = ["patched_entropies", "resid_post_layers", "START_AFTER_PATCH"]

START_AFTER_PATCH = True
"""Whether patched runs start after the patched block where they can (``resid_post_layers``; a
switch for benchmarks: ``False`` runs every patched row as a full forward)."""

def _measured_entropy(entropy, positions: np.ndarray, row: int) -> float:
    """Mean output entropy of one row over the measured positions (from ``forward_metrics``,
    which never holds a whole batch's logits)."""
    return float(entropy[row, torch.as_tensor(positions, device=entropy.device)].mean())


def resid_post_layers(model, hooks: Sequence[str]) -> dict[str, int] | None:
    """``{hook: layer}`` when every hook is a ``blocks.{L}.hook_resid_post`` after which the model's
    forward can start (patched runs then start at block ``L + 1``): a HookedTransformer, or a
    TransformerBridge that can start at a block (``bridge_can_start``); else ``None``."""
    hooked = is_hooked_transformer(model)
    if not hooked and not (is_bridge(model) and bridge_can_start(model)):
        return None
    layers = {}
    for hook in hooks:
        layers[hook] = resid_post_layer(hook)
        if layers[hook] is None:
            return None
    return layers


@torch.no_grad()
def _bridge_patched(model, layer: int, destination_acts: dict, rows: Tensor, width: int, patches: list, batch,
                    columns: np.ndarray, measured: list[np.ndarray]) -> list[float]:
    """Measured mean entropies of a bridge's patched rows: the clean destination's residual after
    block ``layer`` patched by the hooks' own functions, then blocks ``layer + 1 ...`` only (after
    the last block, just the final norm and unembedding), the bridge's own logits as in its clean runs."""
    residual = destination_acts[resid_post(layer)][rows.to(model_device(model)), :width]
    for patch in patches:
        for name, hook_fn in patch.fwd_hooks(model, Touched()):
            residual = hook_fn(residual, model.hook_dict[name])
    with bridge_from_layer(model, layer + 1, residual):
        entropy = output_entropy_at(model, batch, columns.tolist())
    return [_measured_entropy(entropy, np.searchsorted(columns, positions), r) for r, positions in enumerate(measured)]


def _blocks_by_layer(rows: list, layer_of, per_block: int) -> list[list]:
    """``rows`` in blocks of at most ``per_block`` that each patch one layer (one block starts at one layer)."""
    rows = sorted(rows, key=layer_of)
    blocks, current = [], []
    for rc in rows:
        if current and (len(current) == per_block or layer_of(rc) != layer_of(current[0])):
            blocks.append(current)
            current = []
        current.append(rc)
    return blocks + ([current] if current else [])


@torch.no_grad()
def _entropy_at(model, residual, rows: Sequence[int], positions: Sequence[np.ndarray]) -> list[float]:
    """Mean output entropy of ``residual[rows[r], positions[r]]`` per r: the final norm and the
    unembedding run at those positions only, a bounded number of positions at a time."""

    device = residual.device
    row_index = torch.as_tensor(np.repeat(np.asarray(rows, dtype=np.int64), [len(p) for p in positions]),
                                device=device)
    pos_index = torch.as_tensor(np.concatenate([np.asarray(p, dtype=np.int64) for p in positions]), device=device)
    step = chunk_positions(1, int(model.cfg.d_vocab_out))
    entropy = torch.cat([
        output_entropy(unembed(model, residual[row_index[a : a + step], pos_index[a : a + step]]).unsqueeze(0))[0]
        for a in range(0, len(pos_index), step)
    ])
    bounds = np.cumsum([0] + [len(p) for p in positions])
    # the mean in float64: a patch moving the entropy by less than its float32 step (1e-6 nats
    # at 10 nats) is not rounded away
    return [float(entropy[a:b].double().mean()) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@torch.no_grad()
def _prefix_cache(model, batch, prefix: int):
    """The keys and values of the first ``prefix`` tokens of ``batch`` at every layer (a frozen
    TransformerLens cache), or ``None`` when ``prefix`` is 0."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache


    if prefix <= 0:
        return None
    device = model_device(model)
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, batch.tokens.shape[0])
    model(batch.tokens[:, :prefix].to(device), attention_mask=batch.attention_mask[:, :prefix].to(device),
          past_kv_cache=cache, stop_at_layer=int(model.cfg.n_layers))
    cache.freeze()
    return cache


def _rows_of(cache, rows: Tensor):
    """A frozen copy of ``cache`` holding the batch ``rows`` only (``None`` stays ``None``)."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    if cache is None:
        return None
    entries = [TransformerLensKeyValueCacheEntry(entry.past_keys[rows.to(entry.past_keys.device)],
                                                 entry.past_values[rows.to(entry.past_values.device)], frozen=True)
               for entry in cache.entries]
    return TransformerLensKeyValueCache(entries, cache.previous_attention_mask[rows.to(
        cache.previous_attention_mask.device)], frozen=True)


def patched_entropies(
    model,
    encoded: Sequence[tuple],
    alignments: dict,
    conditions: Sequence[tuple[str, str, str]],
    vectors: dict,
    pair_ids: Sequence[int],
    *,
    batch_size: int = 32,
    max_batch_tokens: int = 8192,
    bar=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Measured-span mean entropies of the source, the destination and every patched condition.

    ``encoded``: ``(source, destination)`` encodings; ``alignments[i, group]`` and
    ``alignments[i, "measured"]``: :func:`align_positions` of pair ``i``; ``conditions``:
    ``(component, hook, group)``, patching along ``vectors[component]`` (``None``: the whole
    activation). Returns ``(h_source (pairs,), h_destination (pairs,), h_patched (conditions,
    pairs))``, filled for ``pair_ids`` only (zeros elsewhere). Each forward has at most
    ``batch_size`` rows and ``max_batch_tokens`` tokens.

    On a HookedTransformer whose hooks are all ``hook_resid_post``, nothing is computed twice: a
    patch after block ``L`` changes only the blocks after it, so the patched run patches the clean
    destination's residual after block ``L`` and runs blocks ``L + 1 ...`` from there (rows grouped
    by layer) over the positions from the first patched or measured one only (the keys and values
    of the tokens before it are the clean destination's, computed once per pair); the final norm and
    unembedding run only at the measured positions (clean runs too). A TransformerBridge does the
    same from block ``L + 1`` on (``bridge_from_layer``) over every position; with other hooks each
    patched row is a full forward. Either way only the measured positions are unembedded.
    """

    hooks = list(dict.fromkeys(h for _, h, _ in conditions))
    groups = list(dict.fromkeys(g for _, _, g in conditions))
    layers = resid_post_layers(model, hooks) if START_AFTER_PATCH else None
    if START_AFTER_PATCH and all(resid_post_layer(h) is not None for h in hooks):
        warn_whole_forwards(model, hooks, "activation patching")
    bridge_layers, layers = (layers, None) if is_bridge(model) else (None, layers)
    layer_of = lambda rc: (layers or bridge_layers)[conditions[rc[1]][1]]  # noqa: E731 - the sort key, twice
    pad = pad_id(model)
    n_pairs = len(encoded)
    h_source, h_destination = np.zeros(n_pairs), np.zeros(n_pairs)
    h_patched = np.zeros((len(conditions), n_pairs))
    pairs_per_step = max(1, batch_size // max(1, len(conditions)))
    pair_ids = list(pair_ids)
    for start in range(0, len(pair_ids), pairs_per_step):
        chunk = pair_ids[start : start + pairs_per_step]
        source_batch = pad_batch([encoded[i][0] for i in chunk], pad)
        destination_batch = pad_batch([encoded[i][1] for i in chunk], pad)
        measured_dst = [alignments[i, "measured"][0] for i in chunk]
        measured_src = [alignments[i, "measured"][1] for i in chunk]
        rows = [(row, c) for row in range(len(chunk)) for c in range(len(conditions))]
        per_block = max(1, min(batch_size, max_batch_tokens // destination_batch.tokens.shape[1]))
        if layers is not None:
            with torch.no_grad():
                source_residual, source_acts = final_residual(model, source_batch, hooks)
                destination_residual, destination_acts = final_residual(model, destination_batch, hooks)
            everyone = list(range(len(chunk)))
            h_source[chunk] = _entropy_at(model, source_residual, everyone, measured_src)
            h_destination[chunk] = _entropy_at(model, destination_residual, everyone, measured_dst)
            # Tokens before the first patched or measured position are the clean destination's in
            # every patched run (causal): their keys and values are computed once, and the patched
            # runs cover only the positions from `prefix` on.
            prefix = min(min([int(alignments[i, g][0][0]) for g in groups if len(alignments[i, g][0])]
                             + [int(alignments[i, "measured"][0][0])]) for i in chunk)
            cache = _prefix_cache(model, destination_batch, prefix)
            blocks = _blocks_by_layer(rows, layer_of, per_block)
        else:
            with torch.no_grad():
                _, source_entropy, source_acts = forward_metrics(model, source_batch, hooks)
                _, destination_entropy, destination_acts = forward_metrics(
                    model, destination_batch, hooks if bridge_layers is not None else ())
            for row, i in enumerate(chunk):
                h_source[i] = _measured_entropy(source_entropy, measured_src[row], row)
                h_destination[i] = _measured_entropy(destination_entropy, measured_dst[row], row)
            if bridge_layers is not None:
                blocks = _blocks_by_layer(rows, layer_of, per_block)
            else:
                blocks = [rows[k : k + per_block] for k in range(0, len(rows), per_block)]
        for block in blocks:
            block_rows = torch.tensor([row for row, _ in block])
            if layers is None:
                batch = pad_batch([encoded[chunk[row]][1] for row, _ in block], pad)
            width = (destination_batch if layers is not None else batch).tokens.shape[1]
            patches = []
            for component, hook in dict.fromkeys((conditions[c][0], conditions[c][1]) for _, c in block):
                mask = torch.zeros(len(block), width, dtype=torch.bool)
                index = torch.zeros(len(block), width, dtype=torch.long)
                for r, (row, c) in enumerate(block):
                    if conditions[c][:2] != (component, hook):
                        continue
                    dst_pos, src_pos = alignments[chunk[row], conditions[c][2]]
                    mask[r, torch.as_tensor(dst_pos, dtype=torch.long)] = True
                    index[r, torch.as_tensor(dst_pos, dtype=torch.long)] = torch.as_tensor(src_pos, dtype=torch.long)
                skip = prefix if layers is not None else 0
                patches.append(Patch(hooks=hook, positions=mask[:, skip:], source=source_acts[hook][block_rows],
                                     source_index=index[:, skip:], direction=vectors[component]))
            if layers is not None:
                layer = layers[conditions[block[0][1]][1]]
                device = model_device(model)
                # the clean destination's residual after block `layer`, patched by the hooks' own
                # functions (as in a hooked forward), then blocks layer + 1 ... only
                residual = destination_acts[resid_post(layer)][block_rows.to(device), prefix:]
                with torch.no_grad():
                    for patch in patches:
                        for name, hook_fn in patch.fwd_hooks(model, Touched()):
                            residual = hook_fn(residual, model.hook_dict[name])
                    residual = model(residual, start_at_layer=layer + 1, stop_at_layer=int(model.cfg.n_layers),
                                     attention_mask=destination_batch.attention_mask[block_rows].to(device),
                                     past_kv_cache=_rows_of(cache, block_rows.to(device)))
                values = _entropy_at(model, residual, range(len(block)),
                                     [measured_dst[row] - prefix for row, _ in block])
            else:
                # only the measured positions are unembedded (the union over the block's rows)
                columns = np.unique(np.concatenate([measured_dst[row] for row, _ in block]))
                if bridge_layers is None:
                    with torch.no_grad(), apply_all(model, patches):
                        entropy = output_entropy_at(model, batch, columns.tolist())
                    values = [_measured_entropy(entropy, np.searchsorted(columns, measured_dst[row]), r)
                              for r, (row, _) in enumerate(block)]
                else:  # the clean destination after block `layer`, patched, then blocks layer + 1 ...
                    values = _bridge_patched(model, layer_of(block[0]), destination_acts, block_rows, width,
                                             patches, batch, columns, [measured_dst[row] for row, _ in block])
            for value, (row, c) in zip(values, block, strict=True):
                h_patched[c, chunk[row]] = value
            if bar is not None:
                bar.update(len(block))
    return h_source, h_destination, h_patched
