"""Activation patching between paired runs, along a direction or of the whole activation.

A pair is a *source* and a *destination* encoding of (usually) the same prompt, e.g. the model
reading its own response (source) and another source's response (destination). For each hook
(layer) and position group, the source activation is patched into the destination run (only its
component along ``d``, or all of it), and we report the fraction of the entropy difference the
patch closes::

    fraction = mean_pairs(H_patched - H_destination) / mean_pairs(H_source - H_destination)

where each ``H`` is the mean output entropy over the *measured span*: the first ``m`` response
(scored) tokens, ``m = min(source, destination response lengths)``. 1 means the patch moves the
destination all the way to the source; 0 means no effect.

Position alignment (texts may differ in length): positions are aligned per group from the start
of the response span (the first scored token), truncating to the shorter run:

- ``response``: the k-th response token of the destination gets the k-th of the source,
  for k < m;
- ``first{K}`` (e.g. ``first4``): the same, for k < min(K, m);
- ``prompt``: the tokens before the response, aligned backwards from the response start (the last
  prompt token with the last prompt token, ...), truncated to the shorter prompt. With identical
  prompts the two runs agree there (causal attention), so this patch should close ~0: a check.

A pair where either run has no scored (response) tokens is refused with an error naming the pair.
A group with no positions in any pair (e.g. ``prompt`` for plain-text pairs, which have no prompt
before the scored span) is reported as n/a (``None``), not as a fraction of 0.

**Random-direction control** (``random_directions=k``): the ``direction`` patch is repeated along
``k`` seeded random unit directions at every hook and group; the result reports their fractions,
mean and std, and ``z = (fraction along d - mean) / std`` per cell. With fewer than 10 random
directions or 10 pairs the result carries a warning (``warnings``) saying so.

>>> from surprise_probe.testing import tiny_model
>>> from surprise_probe.core.forward.directions import SteeringDirection, random_directions
>>> model = tiny_model()
>>> d = SteeringDirection(random_directions(model.cfg.d_model, 1, seed=1)[0], "blocks.0.hook_resid_post", 1.0)
>>> pairs = [("The cat sat on the mat.", "A dog ran in the park."),
...          ("Rain fell all night long.", "The sun was out early.")]
>>> result = activation_patching(model, pairs, hooks=["blocks.0.hook_resid_post"], groups=["prompt", "response"],
...                              direction=d, random_directions=3, n_boot=50, progress=False)
>>> result.fraction["all"][0]  # plain texts have no prompt before the scored span: n/a
[None, 1.0]
>>> len(result.random_fraction[0][1]), result.warnings[0][:31]
(3, 'z from 3 random directions: its')
>>> result.table()[1]["group"], sorted(result.to_dict())[:3]
('response', ['components', 'direction_hook', 'entropy_destination'])
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from surprise_probe.interventions.patched_runs import patched_entropies

from surprise_probe.core.forward.directions import from_probe
from surprise_probe.core.forward.directions import random_directions as make_random
from surprise_probe.core.forward.hooks import (
    hook_layer,
    resolve_hooks,
)
from surprise_probe.core.models import distributed
from surprise_probe.core.text.encoding import Encoded, InputTooLong, encode
from surprise_probe.core.utils.notebook import NotebookView, TableRows, ci_text, number_text
from surprise_probe.core.utils.progress import tqdm
from surprise_probe.core.utils.stats import bootstrap_sums, small_sample_warnings, zscore

__all__ = ["PatchingResult", "activation_patching", "align_positions", "parse_group", "patched_entropies"]

_FIRST = re.compile(r"^first(\d+)$")


def parse_group(name: str) -> tuple[str, int | None]:
    """``"prompt"``, ``"response"`` or ``"first{K}"`` -> (kind, K).

    >>> parse_group("first4"), parse_group("response")
    (('first', 4), ('response', None))
    """
    if name in ("prompt", "response"):
        return name, None
    match = _FIRST.match(name)
    if match and int(match.group(1)) > 0:
        return "first", int(match.group(1))
    raise ValueError(f"unknown position group {name!r}; expected 'prompt', 'response' or 'first<K>' (e.g. 'first4')")


def _response_positions(encoded, pair: int, side: str) -> np.ndarray:
    positions = np.flatnonzero(encoded.scored)
    if len(positions) == 0:
        raise ValueError(
            f"pair {pair}: the {side} has no scored (response) tokens, so its response span cannot be "
            "aligned; give both runs a response (e.g. an assistant turn)"
        )
    return positions


def align_positions(source, destination, group: str, pair: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(destination_positions, source_positions)`` aligned for ``group`` (see module doc).

    >>> from types import SimpleNamespace
    >>> source = SimpleNamespace(scored=np.array([0, 0, 1, 1, 1], bool))       # response at 2..4
    >>> destination = SimpleNamespace(scored=np.array([0, 0, 0, 1, 1], bool))  # response at 3..4
    >>> [p.tolist() for p in align_positions(source, destination, "response")]
    [[3, 4], [2, 3]]
    >>> [p.tolist() for p in align_positions(source, destination, "prompt")]  # backwards from the response
    [[1, 2], [0, 1]]
    """
    kind, k = parse_group(group)
    src, dst = _response_positions(source, pair, "source"), _response_positions(destination, pair, "destination")
    m = min(len(src), len(dst))
    if kind == "response":
        return dst[:m], src[:m]
    if kind == "first":
        n = min(k, m)
        return dst[:n], src[:n]
    n = min(src[0], dst[0])  # prompt tokens before the response start, aligned backwards
    return np.arange(dst[0] - n, dst[0]), np.arange(src[0] - n, src[0])


@dataclass(repr=False)
class PatchingResult(NotebookView):
    """Fractions of the entropy difference closed, ``[component][hook][group]``.

    A cell is ``None`` (n/a) when its group has no positions in any pair. ``random_fraction``
    ``[hook][group][k]`` holds the random-direction controls of the ``direction`` component,
    ``random_mean`` / ``random_std`` / ``z`` ``[hook][group]`` their summary. ``table()`` gives
    one plain row per hook x group; ``to_dict()`` is the JSON.
    """

    hooks: list[str]
    groups: list[str]
    components: list[str]  # "direction" (component along d) and/or "all" (whole activation)
    fraction: dict[str, list[list[float | None]]]
    fraction_ci: dict[str, list[list[tuple[float, float] | None]]]
    entropy_patched: dict[str, list[list[float | None]]]  # mean over pairs of the measured-span mean
    entropy_source: float
    entropy_destination: float
    per_pair_gap: list[float]  # H_source - H_destination per pair
    n_pairs: int
    n_measured_tokens: int
    direction_hook: str | None
    level: float
    group_positions: dict[str, int] = field(default_factory=dict)  # patched positions per group, all pairs
    random_directions: int = 0
    random_fraction: list[list[list[float] | None]] = field(default_factory=list)  # [hook][group][k]
    random_mean: list[list[float | None]] = field(default_factory=list)
    random_std: list[list[float | None]] = field(default_factory=list)
    z: list[list[float | None]] = field(default_factory=list)  # direction vs random, [hook][group]
    warnings: list[str] = field(default_factory=list)
    # H_patched - H_destination per pair (measured-span means, nats), [component][hook][group][pair]
    per_pair_moved: dict[str, list[list[list[float] | None]]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> list[dict]:
        """One plain dict per hook x group: fraction [CI] per component, random mean/std and z."""
        rows = []
        for h, hook in enumerate(self.hooks):
            for g, group in enumerate(self.groups):
                row = {"hook": hook, "layer": hook_layer(hook), "group": group,
                       "positions": self.group_positions.get(group)}
                for component in self.components:
                    ci = self.fraction_ci[component][h][g]
                    row[f"fraction_{component}"] = self.fraction[component][h][g]
                    row[f"fraction_{component}_low"] = None if ci is None else ci[0]
                    row[f"fraction_{component}_high"] = None if ci is None else ci[1]
                if self.random_directions:
                    row["random_mean"] = self.random_mean[h][g]
                    row["random_std"] = self.random_std[h][g]
                    row["z_vs_random"] = self.z[h][g]
                row["n_pairs"] = self.n_pairs
                rows.append(row)
        return TableRows(rows)

    def _view(self) -> tuple[str, list[tuple[str, str]]]:
        rows = [("sample", f"{self.n_pairs} pairs, {self.n_measured_tokens} measured tokens"),
                ("mean entropy", f"source {number_text(self.entropy_source)}, destination "
                                 f"{number_text(self.entropy_destination)} nats"),
                ("patched", f"{len(self.hooks)} hooks x groups {', '.join(self.groups)}")]
        best = ""
        for component in self.components:
            cells = [(value, h, g) for h, row in enumerate(self.fraction[component])
                     for g, value in enumerate(row) if value is not None]
            if not cells:
                continue
            value, h, g = max(cells, key=lambda cell: cell[0])
            ci = self.fraction_ci[component][h][g]
            text = f"{ci_text(value, *(ci or (None, None)))} at {self.hooks[h]}, {self.groups[g]}"
            rows.append((f"most of the gap closed ({component})", text))
            best = best or f"{component} {text}"
        if self.random_directions:
            rows.append(("random directions", f"{self.random_directions} (control for 'direction'; .table() has z)"))
        rows += [("warning", note if len(note) <= 200 else note[:197] + "...") for note in self.warnings[:3]]
        return f"{self.n_pairs} pairs, {len(self.hooks)} hooks; most gap closed: {best or 'n/a'}", rows


def activation_patching(
    model,
    pairs: Sequence[tuple],
    *,
    hooks: Sequence[str],
    groups: Sequence[str] = ("prompt", "response", "first4"),
    direction=None,
    components: Sequence[str] = ("direction", "all"),
    batch_size: int = 32,
    max_batch_tokens: int = 8192,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    random_directions: int = 0,
    progress: bool = True,
) -> PatchingResult:
    """Patch source into destination per hook x group x component; see the module doc.

    ``pairs``: ``(source, destination)`` items (texts / conversations / ``Encoded``).
    ``direction``: a probe direction (``probes.ProbeDirection`` or ``SteeringDirection``); needed
    for the ``"direction"`` component. ``random_directions``: how many seeded random unit
    directions to patch along as controls for it (``seed`` seeds them). Every forward has at most ``batch_size`` rows and
    ``max_batch_tokens`` tokens, and entropy comes from position-chunked logits, so memory does
    not grow with the number of conditions or the vocabulary.
    """

    hooks = resolve_hooks(model, hooks=list(hooks))
    components = list(components)
    vector, direction_hook = _check_patching(model, pairs, groups, components, direction, random_directions)
    encoded, alignments = _encode_pairs(model, pairs, groups)
    n_pairs = len(encoded)
    group_positions = {group: int(sum(len(alignments[i, group][0]) for i in range(n_pairs))) for group in groups}
    vectors = {"direction": vector, "all": None}
    controls = [f"random{k}" for k in range(random_directions)]
    if controls:
        vectors.update(zip(controls, make_random(int(model.cfg.d_model), random_directions, seed=seed), strict=True))
    # a group with no positions in any pair is n/a: nothing to patch, so it is not run
    conditions = [(c, h, g) for c in components + controls for h in hooks for g in groups if group_positions[g]]
    mine = distributed.split(n_pairs, "pairs")  # under torchrun: pairs rank, rank + world, ...
    with tqdm(total=len(mine) * len(conditions), desc="patching", unit="run",
              disable=not (progress and distributed.is_main())) as bar:
        h_source, h_destination, h_patched = patched_entropies(
            model, encoded, alignments, conditions, vectors, mine, batch_size=batch_size,
            max_batch_tokens=max_batch_tokens, bar=bar)
    # each rank filled only its own pairs (zeros elsewhere), so summing over ranks gathers them
    h_source, h_destination, h_patched = distributed.all_reduce_sum([h_source, h_destination, h_patched])
    gap = h_source - h_destination
    if np.abs(gap.mean()) < 1e-12:
        raise ValueError(
            "source and destination have the same mean entropy over the measured span (gap "
            f"{gap.mean():.3g} nats), so the fraction of the gap a patch closes is undefined"
        )
    moved = h_patched - h_destination  # (n_cond, n_pairs)
    fractions, low, high = _gap_fractions(moved, gap, n_boot, level, seed)

    def grid(values):
        return {component: [[_cell(values, conditions, component, h, g) for g in groups] for h in hooks]
                for component in components}

    random_fraction, random_mean, random_std, z = _random_controls(fractions, conditions, hooks, groups,
                                                                   group_positions, controls)
    notes = small_sample_warnings(random_directions=random_directions or None, units=n_pairs, unit_name="pairs")
    notes += [f"group {g!r} has no positions in any pair; reported as n/a" for g in groups if not group_positions[g]]

    return PatchingResult(
        hooks=list(hooks),
        groups=list(groups),
        components=components,
        fraction=grid([float(f) for f in fractions]),
        fraction_ci=grid([(float(a), float(b)) for a, b in zip(low, high, strict=False)]),
        entropy_patched=grid([float(v) for v in h_patched.mean(1)]),
        group_positions=group_positions,
        random_directions=random_directions,
        random_fraction=random_fraction,
        random_mean=random_mean,
        random_std=random_std,
        z=z,
        warnings=notes,
        per_pair_moved=grid([[float(v) for v in row] for row in moved]),
        entropy_source=float(h_source.mean()),
        entropy_destination=float(h_destination.mean()),
        per_pair_gap=gap.tolist(),
        n_pairs=n_pairs,
        n_measured_tokens=int(sum(len(alignments[i, "measured"][0]) for i in range(n_pairs))),
        direction_hook=direction_hook,
        level=level,
    )


# --- activation_patching's steps --------------------------------------------------------------------

def _check_patching(model, pairs, groups, components: list[str], direction, random_directions: int):
    """Arguments checked before any forward; returns the direction's unit vector and hook (or Nones)."""
    for group in groups:
        parse_group(group)
    for component in components:
        if component not in ("direction", "all"):
            raise ValueError(f"unknown patch component {component!r}; expected 'direction' or 'all'")
    if random_directions < 0:
        raise ValueError(f"random_directions must be >= 0, got {random_directions}")
    if random_directions and "direction" not in components:
        raise ValueError("random directions are controls for the 'direction' component; include it in components")
    vector, direction_hook = None, None
    if "direction" in components:
        if direction is None:
            raise ValueError("the 'direction' component needs a direction (probe); pass direction= or use components=('all',)")
        steering = from_probe(model, direction)
        vector, direction_hook = steering.direction, steering.hook
    if not pairs:
        raise ValueError("no pairs given; expected at least one (source, destination) pair")
    return vector, direction_hook


def _encode_pairs(model, pairs, groups) -> tuple[list[tuple[Encoded, Encoded]], dict]:
    """Each pair encoded (never truncated) and its positions aligned per group and for the measured span."""

    def enc(item, where):
        if isinstance(item, Encoded):
            return item
        try:
            return encode(model, item, index=where)
        except InputTooLong as error:
            raise ValueError(
                f"{where} has {error.n_tokens} tokens, more than the model context of {error.limit}; patching "
                "does not truncate (a cut source or destination would no longer align with its partner), so "
                "shorten that pair in the pairs file"
            ) from None

    encoded = [(enc(s, f"pair {i} source"), enc(d, f"pair {i} destination")) for i, (s, d) in enumerate(pairs)]
    alignments = {}
    for i, (src, dst) in enumerate(encoded):
        for group in groups:
            alignments[i, group] = align_positions(src, dst, group, i)
        alignments[i, "measured"] = align_positions(src, dst, "response", i)
    return encoded, alignments


def _gap_fractions(moved: np.ndarray, gap: np.ndarray, n_boot: int, level: float, seed: int):
    """Per condition: mean over pairs of the entropy moved / mean gap (a ratio of sums), with its CI."""
    if not len(moved):
        return np.zeros(0), np.zeros(0), np.zeros(0)
    fractions, low, high = bootstrap_sums(np.divide, moved, gap, n_boot=n_boot, level=level, seed=seed)
    return tuple(np.atleast_1d(v) for v in (fractions, low, high))


def _cell(values, conditions: list, component: str, hook: str, group: str):
    key = (component, hook, group)
    return values[conditions.index(key)] if key in conditions else None


def _random_controls(fractions, conditions, hooks, groups, group_positions, controls):
    """Per hook x group: the random directions' fractions, their mean and std, and the probe's z."""
    random_fraction, random_mean, random_std, z = [], [], [], []
    if not controls:
        return [[] for _ in hooks], [[] for _ in hooks], [[] for _ in hooks], [[] for _ in hooks]
    for h in hooks:
        per_group = [None if not group_positions[g] else [float(_cell(fractions, conditions, c, h, g))
                                                          for c in controls] for g in groups]
        random_fraction.append(per_group)
        random_mean.append([None if v is None else float(np.mean(v)) for v in per_group])
        random_std.append([None if v is None or len(v) < 2 else float(np.std(v, ddof=1)) for v in per_group])
        z.append([None if v is None or len(v) < 2
                  else zscore(float(_cell(fractions, conditions, "direction", h, g)), np.asarray(v))
                  for g, v in zip(groups, per_group, strict=True)])
    return random_fraction, random_mean, random_std, z
