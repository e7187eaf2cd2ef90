"""weight_processing is measured once per model, and again after the weights change in place."""

from __future__ import annotations

import torch

from surprise_probe.core.models.basis import weight_processing
from surprise_probe.testing import tiny_hooked_transformer


def test_centering_is_remeasured_after_an_in_place_change():
    model = tiny_hooked_transformer(seed=4)
    assert weight_processing(model)["unembed_centered"] is False  # random W_U: not centred
    assert weight_processing(model)["unembed_centered"] is False  # the cached answer
    with torch.no_grad():
        model.W_U.sub_(model.W_U.mean(-1, keepdim=True))  # center_unembed, in place
    assert weight_processing(model)["unembed_centered"] is True
    with torch.no_grad():
        model.unembed.W_U = torch.nn.Parameter(model.W_U + 1.0)  # a replaced parameter
    assert weight_processing(model)["unembed_centered"] is False
