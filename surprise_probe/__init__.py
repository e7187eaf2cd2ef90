"""surprise-probe: input surprise and output entropy inside TransformerLens models.

>>> import surprise_probe as sp
>>> model = sp.load_model("smollm2-135m-instruct")          # doctest: +SKIP
>>> m = sp.token_metrics(model, "Some text.")               # doctest: +SKIP
>>> run = sp.capture(model, ["a text", "another"], layers=[3, 7])  # doctest: +SKIP
"""

__version__ = "0.1.0"

from surprise_probe import distributed
from surprise_probe.capture import capture, default_hooks, resolve_hooks, token_metrics
from surprise_probe.chat import encode_conversation
from surprise_probe.inputs import encode, pad_batch
from surprise_probe.metrics import (
    input_surprise,
    output_entropy,
    surprise_and_entropy,
)
from surprise_probe.models import available_models, load_model, model_id
from surprise_probe.stats import MeanWithCI, bootstrap_mean
from surprise_probe.store import Capture, hook_depth, load_capture

__all__ = [
    "__version__",
    "load_model",
    "distributed",
    "model_id",
    "available_models",
    "token_metrics",
    "capture",
    "load_capture",
    "Capture",
    "hook_depth",
    "default_hooks",
    "resolve_hooks",
    "encode",
    "encode_conversation",
    "pad_batch",
    "input_surprise",
    "output_entropy",
    "surprise_and_entropy",
    "bootstrap_mean",
    "MeanWithCI",
]
