"""The one progress bar: tqdm's notebook bar where ipywidgets can draw it, its text bar elsewhere.

``tqdm.auto`` warns ("IProgress not found") on import in a Jupyter kernel without ipywidgets, and
transformers and huggingface_hub import it. Importing it here first, with that warning silenced
(``surprise_probe/__init__.py`` imports this module before anything else), makes every later
import reuse the same choice, silently: the text bar, which a notebook shows as it updates.
Every bar of the project is this ``tqdm``, created with ``disable=not progress``.

>>> bar = tqdm(total=3, disable=True)
>>> bar.update(3); bar.close()
"""

from __future__ import annotations

import warnings

from tqdm import TqdmWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", TqdmWarning)
    from tqdm.autonotebook import tqdm

__all__ = ["tqdm"]
