"""The unembedding's near-null space: residual directions the logits barely read, and the MLP
neurons that write into them (Stolfo et al. 2024, "Confidence Regulation Neurons", arXiv 2406.16254).

A vector added to the residual stream changes the logits through two paths: directly, through
what the unembedding reads of it, and through the final norm, whose scale it changes (every
logit is divided by that scale: a temperature). A vector in the unembedding's null space has no
direct path; it can only act through the norm. *Entropy neurons* are MLP neurons of the last
layers whose output weights are large and lie mostly in that near-null space: they rescale the
logits without reordering them.

What the logits read (:func:`effective_unembedding`), ``M = C diag(w) W_U`` centred over the
vocabulary: ``w`` the final norm's weight where it is not folded into ``W_U`` (``LN`` / ``RMS``;
TransformerLens folds it for ``LNPre`` / ``RMSPre``, as for the embedded SmolLM2), ``C`` the
centring of a LayerNorm (identity for RMSNorm), and the centring over the vocabulary because the
softmax ignores a shift shared by every logit. The near-null space is spanned by the ``k``
left-singular vectors of ``M`` (in ``d_model``) with the smallest singular values, ``k`` = 1% of
``d_model`` by default. For a LayerNorm model the all-ones direction, which every LayerNorm
removes, is a trivial null direction and is left out of the basis. A random direction puts
``k / d_model`` of its squared norm there on average.

>>> import torch
>>> from surprise_probe.testing import tiny_model
>>> model = tiny_model()
>>> null = unembedding_null_space(model)                  # k = 1 for d_model 64
>>> null.k, round(float(null.share(null.basis[:, 0])), 6), null.expected_random_share
(1, 1.0, 0.015625)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "NullSpace",
    "EntropyNeuron",
    "effective_unembedding",
    "unembedding_null_space",
    "null_space_share",
    "neuron_geometry",
    "entropy_neurons",
    "random_neuron_sets",
    "DEFAULT_NULL_FRACTION",
]

DEFAULT_NULL_FRACTION = 0.01  # k = 1% of d_model smallest singular directions
_CENTRING = ("LN", "LNPre")  # norms that subtract the mean over d_model before scaling


def _norm_weight(model) -> Tensor | None:
    """The final norm's weight where the forward applies it (not folded into ``W_U``), else None."""
    if getattr(model.cfg, "normalization_type", None) not in ("LN", "RMS"):
        return None
    weight = getattr(model.ln_final, "w", None)
    if weight is None:
        return None
    weight = weight.detach().double().cpu()
    # Gemma-style RMSNorm on a TransformerBridge stores the weight as an offset from 1.
    offset = getattr(getattr(model.ln_final, "config", None), "rmsnorm_uses_offset", False)
    return 1.0 + weight if offset is True else weight


def effective_unembedding(model) -> Float[Tensor, "d_model d_vocab"]:
    """``C diag(w) W_U`` centred over the vocabulary, float64: the linear map from the residual
    stream (divided by the final norm's scale) to the logits, up to a shift shared by all logits."""
    matrix = model.W_U.detach().double().cpu()
    weight = _norm_weight(model)
    if weight is not None:
        matrix = weight[:, None] * matrix
    if getattr(model.cfg, "normalization_type", None) in _CENTRING:
        matrix = matrix - matrix.mean(0, keepdim=True)
    return matrix - matrix.mean(1, keepdim=True)


def null_space_share(
    vectors: Float[Tensor, "*batch d_model"], basis: Float[Tensor, "d_model k"]
) -> Float[Tensor, "*batch"]:
    """``||P v||^2 / ||v||^2`` with ``P`` the projection onto the orthonormal columns of ``basis``.

    >>> basis = torch.eye(4)[:, :1].double()
    >>> null_space_share(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 1.0, 0, 0]]), basis).tolist()
    [1.0, 0.0, 0.5]
    """
    vectors = torch.as_tensor(vectors).double()
    basis = basis.to(vectors.device, torch.float64)
    return (vectors @ basis).pow(2).sum(-1) / vectors.pow(2).sum(-1)


@dataclass(frozen=True)
class NullSpace:
    """The ``k`` least-read residual directions (orthonormal columns of ``basis``), with the
    singular values of the effective unembedding (ascending; for LayerNorm models without the
    all-ones direction)."""

    basis: Float[Tensor, "d_model k"]
    singular_values: Float[Tensor, " n"]
    k: int
    d_model: int
    normalization_type: str | None

    @property
    def expected_random_share(self) -> float:
        """What a uniformly random direction puts in the basis on average: ``k / d_model``."""
        return self.k / self.d_model

    def share(self, vectors: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch"]:
        """Each vector's share of squared norm in the near-null space."""
        return null_space_share(vectors, self.basis)

    def to_dict(self) -> dict:
        values = self.singular_values.tolist()
        return {"k": self.k, "d_model": self.d_model, "normalization_type": self.normalization_type,
                "expected_random_share": self.expected_random_share,
                "smallest_singular_values": values[: self.k], "next_singular_value": values[self.k],
                "largest_singular_value": values[-1]}


def unembedding_null_space(model, k: int | None = None, fraction: float = DEFAULT_NULL_FRACTION) -> NullSpace:
    """The near-null space of :func:`effective_unembedding`: its ``k`` smallest left-singular
    directions (default ``k = max(1, round(fraction * d_model))``)."""
    matrix = effective_unembedding(model)
    d_model = matrix.shape[0]
    centring = getattr(model.cfg, "normalization_type", None) in _CENTRING
    available = d_model - 1 if centring else d_model
    k = max(1, round(fraction * d_model)) if k is None else int(k)
    if not 1 <= k < available:
        raise ValueError(f"k must be between 1 and {available - 1} for d_model={d_model}, got {k}")
    gram = matrix @ matrix.T
    if centring:
        # The all-ones direction is null for every LayerNorm model (it is removed before scaling):
        # lift it above every other eigenvalue so that the basis spans real directions.
        ones = torch.full((d_model,), d_model**-0.5, dtype=torch.float64)
        gram = gram + (gram.trace() + 1.0) * torch.outer(ones, ones)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
    singular = eigenvalues[:available].clamp_min(0).sqrt()
    return NullSpace(eigenvectors[:, :k].contiguous(), singular, k, d_model,
                     getattr(model.cfg, "normalization_type", None))


@dataclass(frozen=True)
class EntropyNeuron:
    """An MLP neuron whose output weight is large and lies mostly in the near-null space."""

    layer: int
    index: int
    norm: float  # ||W_out[index]||
    share: float  # ||P_null W_out[index]||^2 / ||W_out[index]||^2
    score: float  # norm * share, the ranking
    norm_z: float  # z-scores within the layer's neurons
    share_z: float

    def to_dict(self) -> dict:
        return asdict(self)


def _w_out(model, layer: int) -> Tensor:
    mlp = model.blocks[layer].mlp
    weight = getattr(mlp, "W_out", None)
    if weight is None or weight.ndim != 2:
        raise ValueError(f"block {layer} has no dense MLP output weight W_out (d_mlp, d_model); entropy neurons "
                         "are defined for dense MLPs only")
    return weight.detach().double().cpu()


def neuron_geometry(model, layer: int, null: NullSpace) -> tuple[Float[np.ndarray, " d_mlp"], Float[np.ndarray, " d_mlp"]]:
    """Per neuron of ``layer``: the norm of its output weight and that weight's null-space share."""
    weight = _w_out(model, layer)
    norms = weight.norm(dim=-1)
    shares = torch.where(norms > 0, null.share(weight).nan_to_num(0.0), torch.zeros_like(norms))
    return norms.numpy(), shares.numpy()


def _z(values: np.ndarray) -> np.ndarray:
    spread = values.std()
    return (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)


def entropy_neurons(model, null: NullSpace, layers: Sequence[int] | None = None, n_neurons: int = 10) -> list[EntropyNeuron]:
    """The ``n_neurons`` neurons of ``layers`` (default: the last) with the largest
    ``||W_out[i]|| * share_i``, best first.

    The rule: a neuron can act as a temperature knob only if it writes a lot (norm) and mostly
    where the logits do not read (share); the product ranks both at once. Each neuron carries its
    norm and share z-scores within its layer, so a reader sees whether the chosen ones stand out
    (the paper's entropy neurons are outliers on both) or are merely the top of a flat distribution.
    """
    n_layers = int(model.cfg.n_layers)
    layers = [n_layers - 1] if layers is None else [int(layer) % n_layers for layer in layers]
    found = []
    for layer in layers:
        norms, shares = neuron_geometry(model, layer, null)
        norm_z, share_z = _z(norms), _z(shares)
        found += [EntropyNeuron(layer, int(i), float(norms[i]), float(shares[i]), float(norms[i] * shares[i]),
                                float(norm_z[i]), float(share_z[i])) for i in range(len(norms))]
    found.sort(key=lambda neuron: -neuron.score)
    return found[: max(0, int(n_neurons))]


def random_neuron_sets(
    model, neurons: Sequence[EntropyNeuron], n_sets: int, seed: int = 0
) -> list[list[tuple[int, int]]]:
    """``n_sets`` seeded sets of ``(layer, index)``, each as many neurons per layer as ``neurons``
    has, drawn from the same layers' other neurons."""
    rng = np.random.default_rng(seed)
    d_mlp = int(model.cfg.d_mlp)
    per_layer: dict[int, set[int]] = {}
    for neuron in neurons:
        per_layer.setdefault(neuron.layer, set()).add(neuron.index)
    sets = []
    for _ in range(n_sets):
        chosen = []
        for layer, taken in sorted(per_layer.items()):
            pool = np.setdiff1d(np.arange(d_mlp), sorted(taken))
            if len(pool) < len(taken):
                raise ValueError(f"layer {layer} has {len(pool)} neurons outside the {len(taken)} chosen; too few "
                                 "for a random set of the same size (use fewer neurons or no random sets)")
            chosen += [(layer, int(i)) for i in sorted(rng.choice(pool, size=len(taken), replace=False))]
        sets.append(chosen)
    return sets
