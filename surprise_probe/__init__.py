"""surprise-probe: input surprise and output entropy inside TransformerLens models.

>>> import surprise_probe as sp
>>> model = sp.load_model("smollm2-135m-instruct")          # doctest: +SKIP
>>> m = sp.token_metrics(model, "Some text.")               # doctest: +SKIP
>>> run = sp.capture(model, ["a text", "another"], layers=[3, 7])  # doctest: +SKIP
"""

__version__ = "0.1.0"

# First, before transformers imports tqdm.auto: no "IProgress not found" warning in notebooks.
from surprise_probe.core.utils import progress as _progress  # noqa: F401

# Before torch loads OpenMP: idle threads sleep rather than spin for ~1 ms, so the toolkit shares a
# busy machine well (surprise_probe.core.utils.threads; your own OMP_WAIT_POLICY/GOMP_SPINCOUNT win).
from surprise_probe.core.utils import threads as _threads

_threads.prefer_passive_waiting()

# isort: split
from surprise_probe import _moved
from surprise_probe.core.capture.run import capture
from surprise_probe.core.capture.store import Capture, load_capture
from surprise_probe.core.forward.hooks import default_hooks, hook_depth, resolve_hooks
from surprise_probe.core.forward.metrics import input_surprise, output_entropy, surprise_and_entropy
from surprise_probe.core.forward.passes import token_metrics
from surprise_probe.core.models import distributed
from surprise_probe.core.models.loading import available_models, load_model, model_id
from surprise_probe.core.text.chat import encode_conversation
from surprise_probe.core.text.encoding import encode, pad_batch
from surprise_probe.core.utils.notebook import use_offline_plotly
from surprise_probe.core.utils.stats import MeanWithCI, bootstrap_mean
from surprise_probe.core.utils.threads import configure_threads

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
    "configure_threads",
]

_moved.install()
use_offline_plotly()  # in a notebook: figures as plotly JSON plus offline HTML (plotly.js embedded)


def __getattr__(name: str):
    # old module paths (surprise_probe.metrics, ...) for one release; see surprise_probe/_moved.py
    return _moved.attribute(name)
