#!/usr/bin/env bash
# Prepare the one-command GPU check (scripts/gpu_check.py) for a GPU machine that can fetch nothing:
# wheels for what its image lacks (transformer_lens 3.9 and its small dependencies, plotly) and a
# wheel of this toolkit, into .whl/ (ignored by git, carried by the device tool). Then, there:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --out "$OUT/gpu_check.json"
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
py=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
# What the GPU image (Python 3.12; torch, transformers, numpy, scipy, sklearn, einops, jaxtyping, tqdm,
# pandas, pyarrow, fsspec, xxhash, narwhals, ... per the device tool's KINDS.md) lacks but the check
# imports: transformer_lens 3.9 and its small dependencies, and plotly. --no-deps: each is named.
python3 -m pip download -q --no-deps "${py[@]}" -d .whl \
  transformer_lens==3.9.0 better-abc==0.0.3 datasets dill multiprocess plotly 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation . -w .whl
rm -rf build
du -sh .whl
ls .whl
