#!/usr/bin/env bash
# Set up the CPU environment (if needed) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
# Lint and format first: seconds, and a failure here names the file and line.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
export PYTHONWARNINGS=ignore
exec .venv/bin/python -m pytest -q --durations=25 tests "$@"
