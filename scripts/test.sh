#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run lint + the whole test suite, real-model tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check surprise_probe probes interventions scripts tests
.venv/bin/python -m pytest -q "$@"
