"""The study's verdicts: one answer per question, computed from the saved results by a stated rule.

Each function takes the JSON a stage saved (the same dict its report section reads) and returns a
:class:`Verdict`: the question, the answer, the rule in words (printed on the page beside the
answer) and the numbers the rule used, with their sample sizes. Nothing is hard-coded: change a
number in the JSON and the answer follows the rule.

Answers: ``"yes"``, ``"no"``, ``"mixed"`` (the rule's parts disagree; the numbers say which), and
``"not tested at this size"`` where the sample is below the toolkit's own minimums
(:data:`~surprise_probe.core.utils.stats.MIN_UNITS` units for a bootstrap CI,
:data:`~surprise_probe.core.utils.stats.MIN_RANDOM_DIRECTIONS` random directions for a z-score):
the same counts below which the commands print a warning. A stage that did not produce results
gives ``"not run"`` (:func:`not_run`). The rules are conservative: a "yes" needs the effect's 95% CI
to clear its control, not just its point estimate.

>>> sweep = {"best_hook": "h", "n_sequences": 60, "n_tokens": 9000, "controls": {},
...          "hooks": [{"hook": "h", "r2": {"value": 0.6, "low": 0.55, "high": 0.65},
...                     "shuffle_r2": [0.0] * 20, "shuffle_r2_max": 0.001, "shuffle_p": 1 / 21}]}
>>> decodable(sweep).answer, decodable({**sweep, "n_sequences": 6}).answer
('yes', 'not tested at this size')
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from surprise_probe.analyses.intention.plots import readout_skip_reason
from surprise_probe.analyses.policy.plots import describe_source
from surprise_probe.core.utils.stats import MIN_RANDOM_DIRECTIONS, MIN_UNITS, permutation_p_text
from surprise_probe.report.values import _fmt

__all__ = ["Verdict", "Question", "QUESTIONS", "decodable", "causal", "direct_effect", "patching", "policy_gap",
           "cached_intention", "not_run", "YES", "NO", "MIXED", "NOT_TESTED", "NOT_RUN", "ANSWERS_EXPLAINED"]

YES, NO, MIXED, NOT_TESTED, NOT_RUN = "yes", "no", "mixed", "not tested at this size", "not run"
ANSWERS_EXPLAINED = (
    "Each answer is computed from this study's saved results by the rule printed beside it, never written by hand. "
    f'"not tested at this size": the sample is below the toolkit\'s own minimum for that rule ({MIN_UNITS} units '
    f"for a bootstrap CI, {MIN_RANDOM_DIRECTIONS} random directions for a z-score: the counts below which the "
    'commands warn); rerun with larger sizes to test it. "not run": the stage produced no results. "mixed": the '
    "rule's parts disagree (the numbers say which).")
Z_MIN = 2.0  # |z| against random directions that counts as "beyond them"
P_MAX = 0.05  # permutation p that counts as "beyond shuffled labels"
MIN_SHUFFLES = int(round(1 / P_MAX))  # the smallest p is 1 / (1 + shuffles): 20 shuffles reach 0.048


@dataclass(frozen=True)
class Verdict:
    """One question's answer, the rule that gave it (in words) and the numbers the rule used."""

    question: str
    answer: str
    rule: str
    numbers: str
    key: str = ""  # the question's key in QUESTIONS
    section: str = ""  # the report section it was judged from (the page links to it)


def _finite(value) -> float | None:
    """A float, or None for a missing / null / NaN value (JSON writes NaN as null)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _ci_text(estimate: Mapping | None) -> str:
    if not estimate:
        return "n/a"
    value = estimate.get("value", estimate.get("mean"))
    low, high = _finite(estimate.get("low")), _finite(estimate.get("high"))
    interval = f" [{_fmt(low)}, {_fmt(high)}]" if low is not None and high is not None else " (no CI)"
    return f"{_fmt(value)}{interval}"


# --- 1. decodable -----------------------------------------------------------------------------------

DECODABLE_RULE = (
    f"yes if the best layer's held-out R² has its 95% CI lower bound above the upper bound of every control "
    f"(token-type mean, embedding-layer probe, bigram, position, and the largest shuffled-label R² at that layer) "
    f"and the shuffled-label p < {P_MAX}; otherwise no. Not tested with fewer than {MIN_UNITS} sequences or "
    f"{MIN_SHUFFLES} shuffles (below that p cannot reach {P_MAX}).")

_CONTROL_NAMES = (("token_mean_r2", "token-type mean"), ("embedding_r2", "embedding-layer probe"),
                  ("bigram_r2", "bigram"), ("position_r2", "position"))


def decodable(sweep: Mapping) -> Verdict:
    """From ``fit_surprise/sweep.json``: is the target decodable beyond its controls?"""
    question = QUESTIONS["decodable"]
    best = next((row for row in sweep.get("hooks", []) if row["hook"] == sweep.get("best_hook")), None)
    n = f"n = {sweep.get('n_sequences')} sequences, {sweep.get('n_tokens')} tokens"
    if best is None:
        return question.verdict(NOT_RUN, f"no best layer in the sweep; {n}")
    controls = sweep.get("controls") or {}
    bounds, parts = [], []
    for key, name in _CONTROL_NAMES:
        estimate = controls.get(key)
        if isinstance(estimate, Mapping) and _finite(estimate.get("value")) is not None:
            bound = _finite(estimate.get("high"))
            bounds.append(bound if bound is not None else _finite(estimate["value"]))
            parts.append(f"{name} {_ci_text(estimate)}")
    shuffles = best.get("shuffle_r2") or []
    shuffle_max, p = _finite(best.get("shuffle_r2_max")), _finite(best.get("shuffle_p"))
    if shuffle_max is not None:
        bounds.append(shuffle_max)
    p_text = permutation_p_text(p, len(shuffles)) if p is not None else "n/a"
    parts.append(f"shuffled labels max {_fmt(shuffle_max)} " + (f"(p {p_text})" if p_text.startswith("<=")
                                                                  else f"(p = {p_text}, {len(shuffles)} shuffles)"))
    numbers = f"best layer {best['hook']}: R² {_ci_text(best['r2'])}; controls: {'; '.join(parts)}; {n}"
    if (sweep.get("n_sequences") or 0) < MIN_UNITS or len(shuffles) < MIN_SHUFFLES:
        return question.verdict(NOT_TESTED, numbers)
    low = _finite(best["r2"].get("low"))
    beyond = low is not None and all(low > bound for bound in bounds) and p is not None and p < P_MAX
    return question.verdict(YES if beyond else NO, numbers)


# --- 2. causal --------------------------------------------------------------------------------------

CAUSAL_RULE = (
    f"yes if the entropy slope along the probe direction (nats per std of its projection) has a 95% CI excluding 0 "
    f"and |z| >= {Z_MIN:g} against random directions of the same norm; otherwise no. Not tested with fewer than "
    f"{MIN_RANDOM_DIRECTIONS} random directions or {MIN_UNITS} sequences (the toolkit's own warning thresholds).")


def _random_count(labels: Sequence[str]) -> int:
    return sum(1 for label in labels if label.startswith("random"))


def causal(steer: Mapping) -> Verdict:
    """From ``steer/steer.json``: does steering along the direction move entropy beyond random directions?"""
    question = QUESTIONS["causal"]
    dose = steer["dose_response"]
    k, n_seq = _random_count(dose.get("labels", [])), dose.get("n_sequences") or 0
    slope, z = _finite(dose.get("probe_slope")), _finite(dose.get("z_score"))
    low, high = (_finite(v) for v in (dose.get("probe_slope_ci") or [None, None]))
    numbers = (f"slope {_fmt(slope)} [{_fmt(low)}, {_fmt(high)}] nats/std at {dose.get('hook')}; {k} random "
               f"directions {_fmt(dose.get('random_slope_mean'))} ± {_fmt(dose.get('random_slope_std'))}, "
               f"z = {_fmt(z)}; n = {n_seq} sequences, {dose.get('n_tokens')} tokens")
    if k < MIN_RANDOM_DIRECTIONS or n_seq < MIN_UNITS:
        return question.verdict(NOT_TESTED, numbers)
    excludes_zero = low is not None and high is not None and (low > 0 or high < 0)
    beyond = z is not None and abs(z) >= Z_MIN
    return question.verdict(YES if excludes_zero and beyond else NO, numbers)


# --- 2b. direct effect (the norm control) -----------------------------------------------------------

DIRECT_RULE = (
    f"yes if, with the final norm's scale frozen at its clean value, the entropy slope along the direction has a 95% "
    f"CI excluding 0 on the same side as the slope with the norms free, and |z| >= {Z_MIN:g} against random "
    f"directions under the same freezing; otherwise no (the effect passes through the norm). Not tested with fewer "
    f"than {MIN_RANDOM_DIRECTIONS} random directions or {MIN_UNITS} sequences.")


def direct_effect(norm: Mapping) -> Verdict:
    """From ``norm/norm_control.json``: does the steering effect survive freezing the final norm?"""
    question = QUESTIONS["direct"]
    total, frozen = norm["effects"]["total"], norm["effects"]["final_norm_frozen"]
    k, n_seq = len(frozen.get("random_slopes") or []), norm.get("n_sequences") or 0
    low, high = (_finite(v) for v in (frozen.get("probe_slope_ci") or [None, None]))
    slope, z, free = _finite(frozen.get("probe_slope")), _finite(frozen.get("z_score")), _finite(total.get("probe_slope"))
    share = (norm.get("direct_share") or {}).get("final_norm_frozen") or {}
    numbers = (f"slope with the final norm frozen {_fmt(slope)} [{_fmt(low)}, {_fmt(high)}] nats/std, z = {_fmt(z)} "
               f"against {k} random directions; with the norms free {_fmt(free)} [{_fmt(total['probe_slope_ci'][0])}, "
               f"{_fmt(total['probe_slope_ci'][1])}]; share of the free slope {_ci_text(share)}; at {norm.get('hook')}, "
               f"n = {n_seq} sequences, {norm.get('n_tokens')} tokens")
    if k < MIN_RANDOM_DIRECTIONS or n_seq < MIN_UNITS:
        return question.verdict(NOT_TESTED, numbers)
    same_side = free is not None and low is not None and high is not None and (
        (free > 0 and low > 0) or (free < 0 and high < 0))
    beyond = z is not None and abs(z) >= Z_MIN
    return question.verdict(YES if same_side and beyond else NO, numbers)


# --- 3. patching ------------------------------------------------------------------------------------

PATCHING_RULE = (
    f"at the probe's own layer (or the nearest patched one), all response positions: yes if the fraction of the "
    f"entropy gap closed by patching the component along the direction has a 95% CI above 0 and z >= {Z_MIN:g} "
    f"against random directions patched the same way; otherwise no. Not tested with fewer than {MIN_UNITS} pairs "
    f"or {MIN_RANDOM_DIRECTIONS} random directions.")


def _layer_of(hook: str) -> int | None:
    parts = hook.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None


def patching_cell(result: Mapping) -> tuple[int, int]:
    """(hook index, group index) the patching verdict reads: the probe's hook (or the patched hook
    nearest to it) and the ``response`` group (or the first group)."""
    hooks, groups = result["hooks"], result["groups"]
    target = _layer_of(result.get("direction_hook") or "")
    if result.get("direction_hook") in hooks or target is None:
        h = hooks.index(result["direction_hook"]) if result.get("direction_hook") in hooks else 0
    else:
        h = min(range(len(hooks)), key=lambda i: abs((_layer_of(hooks[i]) or 0) - target))
    return h, groups.index("response") if "response" in groups else 0


def patching(patch: Mapping) -> Verdict:
    """From ``patch/patch.json``: does patching the direction close the on/off-policy entropy gap?"""
    question = QUESTIONS["patching"]
    result = patch.get("patching", patch)
    h, g = patching_cell(result)
    fraction = _finite(result["fraction"]["direction"][h][g])
    low, high = (_finite(v) for v in result["fraction_ci"]["direction"][h][g])
    k, n_pairs = result.get("random_directions") or 0, result.get("n_pairs") or 0
    z = _finite(result["z"][h][g]) if k and result.get("z") else None
    random = (f"{k} random directions {_fmt(result['random_mean'][h][g])} ± {_fmt(result['random_std'][h][g])}, "
              f"z = {_fmt(z)}" if k else "no random directions")
    gaps = [_finite(v) for v in result.get("per_pair_gap", [])]
    gaps = [v for v in gaps if v is not None]
    gap = f"; mean gap {_fmt(sum(gaps) / len(gaps))} nats" if gaps else ""
    numbers = (f"{result['hooks'][h]}, {result['groups'][g]}: fraction closed {_fmt(fraction)} "
               f"[{_fmt(low)}, {_fmt(high)}]; {random}{gap}; n = {n_pairs} pairs")
    if n_pairs < MIN_UNITS or k < MIN_RANDOM_DIRECTIONS:
        return question.verdict(NOT_TESTED, numbers)
    closes = low is not None and low > 0 and z is not None and z >= Z_MIN
    return question.verdict(YES if closes else NO, numbers)


# --- 4. the on/off-policy gap -----------------------------------------------------------------------

GAP_RULE = (
    "per off-policy source, read by the post-trained model in the format it sampled in: a gap where the off/on "
    "ratio of mean entropy has its 95% CI above 1 (reversed where below 1). yes if every source shows a gap, no if "
    f"none does, mixed otherwise (the sources with a gap are named). Not tested with fewer than {MIN_UNITS} prompts. "
    "The claim under test is a 3-4x gap for a post-trained reader and none for a base reader.")


def _gap_rows(data: Mapping, model: Mapping) -> list[Mapping]:
    fmt = model.get("sampling_format")
    fmt = fmt if fmt in model.get("formats_read", []) else (model.get("formats_read") or [None])[0]
    return [row for row in data["summary"]["comparisons"]
            if row["reader"] == model["name"] and row["format"] == fmt and row["span"].get("n_prompts")]


def _gap_reading(row: Mapping) -> tuple[str, str]:
    """(``"gap"`` / ``"reversed"`` / ``"none"`` / ``"no CI"``, the row as text)."""
    ratio = row["span"]["ratio_off_on"]
    low, high = _finite(ratio.get("low")), _finite(ratio.get("high"))
    reading = ("no CI" if low is None or high is None else "gap" if low > 1 else "reversed" if high < 1 else "none")
    return reading, f"{describe_source(row['source'])}: {_ci_text(ratio)} ({reading})"


def policy_gap(gap: Mapping) -> Verdict:
    """From ``gap/gap.json``: is the reader's own text read at lower entropy, and against which source?"""
    question = QUESTIONS["gap"]
    models = gap["models"]
    readers = [m for m in models if m.get("post_trained")] or [m for m in models if m.get("post_trained") is None]
    if not readers:
        return question.verdict(NOT_TESTED, "no post-trained reader in this run")
    reader = readers[0]
    rows = _gap_rows(gap, reader)
    readings = [_gap_reading(row) for row in rows]
    kind = "post-trained" if reader.get("post_trained") else "kind not recorded"
    lines = [f"{reader['name']} ({kind}, {rows[0]['format'] if rows else '?'} format): "
             + ("; ".join(text for _, text in readings) or "no comparison")]
    for base in [m for m in models if m.get("post_trained") is False]:
        lines.append(f"base reader {base['name']}: " + "; ".join(_gap_reading(row)[1] for row in _gap_rows(gap, base)))
    n_prompts = min((row["span"]["n_prompts"] for row in rows), default=0)
    numbers = " | ".join(lines) + f"; n = {n_prompts} prompts"
    if n_prompts < MIN_UNITS or not readings or any(reading == "no CI" for reading, _ in readings):
        return question.verdict(NOT_TESTED, numbers)
    with_gap = [row["source"] for row, (reading, _) in zip(rows, readings, strict=True) if reading == "gap"]
    if len(with_gap) == len(rows):
        return question.verdict(YES, numbers)
    if not with_gap:
        return question.verdict(NO, numbers)
    return question.verdict(MIXED, f"a gap only for {', '.join(with_gap)}. {numbers}")


# --- 5. cached intention ----------------------------------------------------------------------------

INTENTION_RULE = (
    "three tests, each informative only where its sample allows: (a) topic entropy before the first token has its "
    "95% CI below the uniform reference, with at least half of the samples naming a lexicon topic (else the low "
    "entropy only says that most samples name no topic); (b) the pre-response topic probe's accuracy at its best "
    "depth has a 95% CI above both its shuffled-label control and the majority class; (c) an other-topic prefill "
    f"raises entropy over an own-topic one (paired difference CI above 0, at least {MIN_UNITS} pairs). yes if every "
    "informative test supports a cached choice and at least two are informative; no if none does; mixed otherwise. "
    f"Not tested with fewer than {MIN_UNITS} prompt groups or no informative test.")


def _entropy_test(model: Mapping) -> tuple[bool | None, str]:
    te, uniform = model["topic_entropy"], _finite(model.get("uniform_reference"))
    shares = model.get("bucket_shares") or {}
    unnamed = (_finite(shares.get("other")) or 0.0) + (_finite(shares.get("ambiguous")) or 0.0)
    text = (f"(a) topic entropy at k = 0 {_ci_text(te)} vs uniform {_fmt(uniform)}, {unnamed:.0%} of samples "
            "name no lexicon topic")
    high = _finite(te.get("high"))
    if high is None or uniform is None:
        return None, text + " (no CI: not informative)"
    if unnamed > 0.5:
        return None, text + " (so the low entropy is the 'other' bucket: not informative)"
    return high < uniform, text + (" (below uniform: supports)" if high < uniform else " (not below uniform)")


def _probe_test(model: Mapping) -> tuple[bool | None, str]:
    readout = model.get("readout") or {}
    probe = readout.get("probe")
    if not probe:
        return None, f"(b) topic probe not fitted: {readout_skip_reason(readout)}"
    i = max(range(len(probe)), key=lambda j: probe[j]["accuracy"])
    best, shuffled = probe[i], _finite((readout.get("shuffled") or [{}] * len(probe))[i].get("accuracy"))
    control = max(v for v in (shuffled, _finite(best.get("majority")), 0.0) if v is not None)
    text = (f"(b) probe accuracy at depth {best['depth']} {_ci_text({'value': best['accuracy'], **best})} vs "
            f"shuffled {_fmt(shuffled)}, majority {_fmt(best.get('majority'))}, {readout.get('n_prompts')} prompt "
            "groups")
    if (readout.get("n_prompts") or 0) < MIN_UNITS:
        return None, text + " (too few prompt groups: not informative)"
    low = _finite(best.get("low"))
    return (low is not None and low > control), text + (" (supports)" if low is not None and low > control
                                                        else " (at its controls)")


def _prefill_test(model: Mapping) -> tuple[bool | None, str]:
    prefill = model.get("prefill") or {}
    difference, n_pairs = prefill.get("difference"), prefill.get("n_pairs") or 0
    if not difference:
        return None, f"(c) prefill: no usable pair ({n_pairs} pairs)"
    text = (f"(c) prefill other - own entropy {_ci_text(difference)} nats, other higher in "
            f"{prefill.get('n_other_higher')} of {n_pairs} pairs")
    if n_pairs < MIN_UNITS:
        return None, text + " (too few pairs: not informative)"
    low = _finite(difference.get("low"))
    return (low is not None and low > 0), text + (" (supports)" if low is not None and low > 0 else " (no rise)")


def cached_intention(intention: Mapping) -> Verdict:
    """From ``intention/intention.json`` (its first model, the study's): a topic chosen before writing?"""
    question = QUESTIONS["intention"]
    model = intention["models"][0]
    tests = [_entropy_test(model), _probe_test(model), _prefill_test(model)]
    n_prompts = model["topic_entropy"].get("n_prompts") or 0
    numbers = f"{model.get('model_id')}: " + "; ".join(text for _, text in tests) + f"; n = {n_prompts} prompt groups"
    informative = [result for result, _ in tests if result is not None]
    if n_prompts < MIN_UNITS or not informative:
        return question.verdict(NOT_TESTED, numbers)
    if all(informative) and len(informative) >= 2:
        return question.verdict(YES, numbers)
    return question.verdict(NO if not any(informative) else MIXED, numbers)


# --- the questions, in the order of the study --------------------------------------------------------

@dataclass(frozen=True)
class Question:
    """A question the study answers: its text, its rule, the file it reads and the function that judges."""

    key: str
    text: str
    rule: str
    file: str
    judge: Callable[[Mapping], Verdict]

    def verdict(self, answer: str, numbers: str) -> Verdict:
        return Verdict(self.text, answer, self.rule, numbers, key=self.key)


QUESTIONS: dict[str, Question] = {q.key: q for q in (
    Question("decodable", "Is input surprise linearly decodable beyond its controls?", DECODABLE_RULE,
             "sweep.json", decodable),
    Question("causal", "Does adding the surprise direction move output entropy more than random directions do?",
             CAUSAL_RULE, "steer.json", causal),
    Question("direct", "Does the surprise direction still move entropy with the final norm frozen (not via the norm)?",
             DIRECT_RULE, "norm_control.json", direct_effect),
    Question("patching", "Does patching the surprise direction close the on/off-policy entropy gap?",
             PATCHING_RULE, "patch.json", patching),
    Question("gap", "Is there an on/off-policy entropy gap, and for which source?", GAP_RULE, "gap.json",
             policy_gap),
    Question("intention", "Has the model chosen its topic before writing (cached intention)?", INTENTION_RULE,
             "intention.json", cached_intention),
)}


def not_run(key: str, reason: str) -> Verdict:
    """The verdict of a question whose stage produced nothing to judge (failed, skipped, not run)."""
    return QUESTIONS[key].verdict(NOT_RUN, reason)
