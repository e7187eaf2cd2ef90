"""Pre-response decoding: what the residual stream at the last prompt token says about the topic.

At every depth, a logit-lens readout of the topics' first tokens and a logistic probe for the modal
topic (folds grouped by prompt), beside a shuffled-label control and majority baselines.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float

from surprise_probe.analyses.intention.config import IntentionConfig
from surprise_probe.analyses.intention.prompts import _text_ids
from surprise_probe.core.forward.hooks import default_hooks
from surprise_probe.probes import cross_validate_classifier
from surprise_probe.probes.folds import assign_folds


def _hooks(model) -> list[str]:
    return default_hooks(model)


@torch.inference_mode()
def _last_token_residuals(model, prompt_ids: list[list[int]]) -> Float[np.ndarray, "rows depth d_model"]:
    hooks = _hooks(model)
    device = next(model.parameters()).device
    out = []
    for ids in prompt_ids:
        _, cache = model.run_with_cache(torch.tensor([ids], device=device), names_filter=lambda n: n in hooks)
        out.append(torch.stack([cache[h][0, -1] for h in hooks]).float().cpu().numpy())
        del cache
    return np.stack(out)


def _topic_token_ids(model, topic: str) -> list[int]:
    name = topic.replace("_", " ")
    ids = set()
    for form in (name, " " + name, name.capitalize(), " " + name.capitalize()):
        tokens = _text_ids(model, form)
        if tokens:
            ids.add(tokens[0])
    return sorted(ids)


@torch.inference_mode()
def _logit_lens(model, residuals: np.ndarray, prompts, rows, config: IntentionConfig) -> dict:
    """Per depth: accuracy of the topic whose first tokens get the most logit, vs the modal topic."""
    device = next(model.parameters()).device
    usable = [i for i, row in enumerate(rows) if row["modal_topic"] is not None]
    topic_ids = {t: _topic_token_ids(model, t) for p in prompts for t in p.topics}
    n_depths = residuals.shape[1]
    correct = np.zeros((n_depths, len(usable)))
    prob_of_mode = np.zeros((n_depths, len(usable)))
    predicted = np.empty((n_depths, len(usable)), dtype=object)
    for j, i in enumerate(usable):
        resid = torch.tensor(residuals[i], device=device, dtype=next(model.parameters()).dtype)[:, None]
        log_probs = torch.log_softmax(model.unembed(model.ln_final(resid))[:, 0].float(), -1)
        names = list(prompts[i].topics)
        scores = torch.stack([torch.logsumexp(log_probs[:, topic_ids[t]], -1) for t in names], -1)
        within = torch.softmax(scores, -1).cpu().numpy()
        mode = names.index(rows[i]["modal_topic"])
        correct[:, j] = within.argmax(-1) == mode
        prob_of_mode[:, j] = within[:, mode]
        predicted[:, j] = [names[a] for a in within.argmax(-1)]
    if not usable:
        return {"accuracy": [], "prob_of_mode": [], "shuffled_accuracy": [], "chance": None,
                "topic_token_ids": topic_ids}
    shuffled = np.zeros((config.n_shuffles, n_depths))
    modal = np.array([rows[i]["modal_topic"] for i in usable], dtype=object)
    lexicons = [tuple(prompts[i].topics) for i in usable]
    for s in range(config.n_shuffles):
        permuted = _shuffle_within(modal, lexicons, config.seed + 100 + s)
        shuffled[s] = (predicted == permuted[None]).mean(1)
    return {
        "accuracy": correct.mean(1).tolist(),
        "prob_of_mode": prob_of_mode.mean(1).tolist(),
        "shuffled_accuracy": shuffled.mean(0).tolist(),
        "chance": float(np.mean([1 / len(prompts[i].topics) for i in usable])),
        "topic_token_ids": topic_ids,
    }


def _shuffle_within(labels: np.ndarray, blocks: Sequence, seed: int) -> np.ndarray:
    """A permutation of ``labels`` within rows sharing a block (here: the same topic lexicon)."""
    rng = np.random.default_rng(seed)
    out = labels.copy()
    for block in dict.fromkeys(blocks):
        idx = np.array([i for i, b in enumerate(blocks) if b == block])
        out[idx] = labels[idx[rng.permutation(len(idx))]]
    return out


def _readout(model, prompts, prompt_ids, rows, groups, config: IntentionConfig) -> dict:
    residuals = _last_token_residuals(model, prompt_ids)
    depths = list(range(residuals.shape[1]))
    result = {"depths": depths, "hooks": _hooks(model),
              "logit_lens": _logit_lens(model, residuals, prompts, rows, config)}
    usable = [i for i, row in enumerate(rows) if row["modal_topic"] is not None]
    labels = np.array([rows[i]["modal_topic"] for i in usable], dtype=object)
    # A topic the probe can learn across prompts must be the mode of at least two prompt groups.
    groups_of = {t: {groups[i] for i, label in zip(usable, labels, strict=True) if label == t} for t in set(labels)}
    keep = [j for j, label in enumerate(labels) if len(groups_of[label]) >= 2]
    rows_used = [usable[j] for j in keep]
    labels = labels[keep].astype(str)
    row_groups = groups[rows_used]
    n_folds = min(config.n_folds, len(set(row_groups)))
    result.update({"n_rows": len(rows_used), "n_prompts": len(set(row_groups)), "n_folds": n_folds,
                   "classes": sorted(set(labels)), "rows": [prompts[i].id for i in rows_used]})
    if len(set(labels)) < 2 or n_folds < 2:
        result["skipped"] = (f"{len(set(labels))} modal topic(s) shared by >= 2 prompts over {len(set(row_groups))} "
                             "prompt(s); the probe needs 2 classes and 2 prompt groups")
        return result
    lexicons = [tuple(prompts[i].topics) for i in rows_used]
    probe, shuffled, lexicon_majority = [], [], []
    folds = assign_folds(row_groups, n_folds, config.seed)
    for depth in depths:
        X = residuals[rows_used, depth].astype(np.float64)
        try:
            real = cross_validate_classifier(X, labels, row_groups, n_folds=n_folds, seed=config.seed,
                                             n_boot=config.n_boot)
        except ValueError as error:  # a training fold with one class: report instead of failing
            result["skipped"] = f"probe at depth {depth}: {error}"
            return result
        controls = []
        for s in range(config.n_shuffles):
            permuted = _shuffle_within(labels.astype(object), lexicons, config.seed + 200 + s).astype(str)
            try:
                controls.append(cross_validate_classifier(X, permuted, row_groups, n_folds=n_folds, seed=config.seed,
                                                          n_boot=10)["accuracy"].value)
            except ValueError:
                continue
        acc, majority = real["accuracy"], real["majority_accuracy"]
        probe.append({"depth": depth, "accuracy": acc.value, "low": acc.low, "high": acc.high,
                      "majority": majority.value})
        shuffled.append({"depth": depth, "accuracy": float(np.mean(controls)) if controls else None,
                         "values": controls,
                         "p_value": (1 + sum(c >= acc.value for c in controls)) / (1 + len(controls))})
    for fold in range(n_folds):
        lexicon_majority.append(_lexicon_majority_hits(labels, lexicons, folds, fold))
    result.update({"probe": probe, "shuffled": shuffled,
                   "lexicon_majority": float(np.concatenate(lexicon_majority).mean())})
    return result


def _lexicon_majority_hits(labels, lexicons, folds, fold) -> np.ndarray:
    """Baseline: predict the training fold's most frequent topic among rows with the same lexicon."""
    train, test = folds != fold, np.flatnonzero(folds == fold)
    hits = []
    for j in test:
        same = [i for i in np.flatnonzero(train) if lexicons[i] == lexicons[j]]
        if not same:
            hits.append(0.0)
            continue
        values, counts = np.unique(labels[same], return_counts=True)
        hits.append(float(values[np.argmax(counts)] == labels[j]))
    return np.array(hits)
