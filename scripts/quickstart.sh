#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job on the embedded default model.
# Outputs go to runs/quickstart (a rerun resumes; pass --overwrite to start again).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/surprise-probe study --model smollm2-135m-instruct --out runs/quickstart "$@"
