"""weight_processing is measured once per model, and again after the weights change in place."""

from __future__ import annotations

import torch

from surprise_probe.core.models.backends import is_bridge
from surprise_probe.core.models.basis import weight_processing
from surprise_probe.testing import tiny_model


def test_centering_is_remeasured_after_an_in_place_change():
    model = tiny_model(seed=4)  # a HookedTransformer on TransformerLens 3.x, a bridge on 4.x
    if is_bridge(model):  # compatibility mode centred W_U at load (center_unembed): un-centre it, in place
        with torch.no_grad():
            model.W_U.add_(torch.linspace(0.0, 1.0, model.W_U.shape[-1]))
    assert weight_processing(model)["unembed_centered"] is False  # random W_U: not centred
    assert weight_processing(model)["unembed_centered"] is False  # the cached answer
    with torch.no_grad():
        model.W_U.sub_(model.W_U.mean(-1, keepdim=True))  # center_unembed, in place
    assert weight_processing(model)["unembed_centered"] is True
    with torch.no_grad():  # a replaced parameter
        if is_bridge(model):  # the bridge's W_U is a view of the Hugging Face lm_head's weight
            head = model.unembed.original_component
            head.weight = torch.nn.Parameter(head.weight + 1.0)
        else:
            model.unembed.W_U = torch.nn.Parameter(model.W_U + 1.0)
    assert weight_processing(model)["unembed_centered"] is False
