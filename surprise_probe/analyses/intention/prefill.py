"""The prefill-violation test: output entropy after a prefilled start naming the model's own modal
topic vs an equally long start (same token count) naming another topic, paired per prompt.
"""

from __future__ import annotations

import unicodedata

import numpy as np
import torch

from surprise_probe.analyses.intention.prompts import IntentionPrompt, _text_ids
from surprise_probe.analyses.intention.samples import _reference
from surprise_probe.analyses.intention.topics import Labeller, TopicLabel
from surprise_probe.core.forward.metrics import output_entropy
from surprise_probe.core.forward.sampling import sample
from surprise_probe.core.utils.stats import bootstrap_mean


def _replacement(word: str, matched: str) -> str:
    word = word.replace("_", " ")
    if matched[:1].isupper():
        word = word[:1].upper() + word[1:]
    if matched.lower().endswith("s") and not word.lower().endswith("s"):
        word += "s"  # keep a plural a plural ("apples" -> "bananas")
    return word


def _prefill_pair(model, prompt: IntentionPrompt, labeller: Labeller, record: dict, seed: int) -> dict | None:
    """The own-topic start of ``record`` and an equally long (in tokens) start naming another topic.

    The other start replaces the matched word by another topic's name, or, only when its own stems do
    not match the name (e.g. a topic ``"city_1"`` with stems ``["paris"]``), by one of its stems.
    """
    label = TopicLabel(**{**record["label"], "candidates": tuple(record["label"]["candidates"])})
    text = unicodedata.normalize("NFC", record["text"])
    own_text = text[: label.start + len(label.matched)]
    own_ids = _text_ids(model, own_text)
    others = [t for t in prompt.topics if t != label.label]
    order = np.random.default_rng(seed).permutation(len(others))
    for o in order:
        # Stems (often not whole words, like "strawberr") only when the name itself is not labelled.
        named = labeller(_replacement(others[o], label.matched)).label == others[o]
        for word in [others[o]] if named else list(prompt.topics[others[o]]):
            other_text = text[: label.start] + _replacement(word, label.matched)
            other_ids = _text_ids(model, other_text)
            if len(other_ids) == len(own_ids) and labeller(other_text).label == others[o]:
                return {"own_topic": label.label, "other_topic": others[o], "own_start": own_text,
                        "other_start": other_text, "own_ids": own_ids, "other_ids": other_ids}
    return None


@torch.inference_mode()
def _mean_entropy_after(model, sequences: list[list[int]], starts: list[int], n_read: list[int],
                        batch_size: int) -> list[float]:
    """Mean output entropy at positions ``start-1 .. start-1+n-1`` (the next ``n`` tokens' distributions)."""
    device = next(model.parameters()).device
    pad = int(getattr(model.tokenizer, "pad_token_id", None) or 0)
    means = []
    for begin in range(0, len(sequences), batch_size):
        chunk = sequences[begin : begin + batch_size]
        width = max(len(s) for s in chunk)
        # Right padding: causal attention means the real positions never see the pads.
        tokens = torch.full((len(chunk), width), pad, dtype=torch.long, device=device)
        for row, ids in enumerate(chunk):
            tokens[row, : len(ids)] = torch.tensor(ids, device=device)
        logits = model(tokens)
        for row in range(len(chunk)):
            start, n = starts[begin + row], n_read[begin + row]
            entropy = output_entropy(logits[row : row + 1, start - 1 : start - 1 + n])
            means.append(float(entropy.mean()))
        del logits
    return means


def _prefill(model, prompts, prompt_ids, rows, per_row, followups, groups, labellers, config, cache, progress) -> dict:
    pairs = {}
    skipped = {"no_modal_topic": 0, "no_equal_length_alternative": 0}
    for i in followups:
        modal_topic = rows[i]["modal_topic"]
        if modal_topic is None:
            skipped["no_modal_topic"] += 1
            continue
        record = _reference(per_row[i], modal_topic)
        pair = _prefill_pair(model, prompts[i], labellers[i], record, config.seed + i)
        if pair is None:
            skipped["no_equal_length_alternative"] += 1
            continue
        pairs[i] = pair
    if not pairs:
        return {"skipped": f"no usable prompt ({skipped})", **skipped, "n_pairs": 0}
    order = sorted(pairs)
    stage_data = cache.get("prefill")
    if stage_data is None:
        starts = [prompt_ids[i] + pairs[i][side] for i in order for side in ("own_ids", "other_ids")]
        samples = sample(model, starts, n_samples=config.prefill_samples, max_new_tokens=config.prefill_tokens,
                         temperature=config.temperature, seed=config.seed + 1000, batch_size=config.batch_size,
                         progress=progress)
        sequences = [s.token_ids for s in samples]
        entropies = _mean_entropy_after(model, sequences, [len(s.prompt_ids) for s in samples],
                                        [len(s.response_ids) for s in samples], max(1, config.batch_size // 4))
        stage_data = [{"start": s.prompt_index, "sample": s.sample_index, "response_ids": s.response_ids,
                       "text": s.text(model.tokenizer), "mean_entropy": e} for s, e in zip(samples, entropies, strict=True)]
        cache.put("prefill", stage_data)
    own, other = [], []
    for n, i in enumerate(order):
        for side, bucket in ((0, own), (1, other)):
            values = [r["mean_entropy"] for r in stage_data if r["start"] == 2 * n + side]
            bucket.append(float(np.mean(values)))
        pairs[i].update({"own_entropy": own[-1], "other_entropy": other[-1], "id": prompts[i].id,
                         "continuations": {
                             side: [r["text"] for r in stage_data if r["start"] == 2 * n + k]
                             for k, side in enumerate(("own", "other"))}})
    own, other = np.array(own), np.array(other)
    pair_groups = groups[order]

    def ci(values):
        return bootstrap_mean(values, pair_groups, n_boot=config.n_boot, level=config.level, seed=config.seed).to_dict()

    return {
        "n_pairs": len(order), "n_prompts": len(set(pair_groups)), **skipped,
        "prefill_tokens": config.prefill_tokens, "samples_per_start": config.prefill_samples,
        "own": ci(own), "other": ci(other), "difference": ci(other - own),
        "n_other_higher": int((other > own).sum()),
        "pairs": [{k: v for k, v in pairs[i].items() if not k.endswith("_ids")} for i in order],
    }
