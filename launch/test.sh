#!/usr/bin/env bash
# Set up the CPU environment (if needed) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
# Lint and format first: seconds, and a failure here names the file and line.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
export PYTHONWARNINGS=ignore
# Two files at a time: a test mostly waits on one process at a time (imports, a single rank's
# work, timeouts), so one worker keeps about one core of two busy (measured: 1.06 cores over the
# whole suite). A file stays on one worker (its module fixtures run once); GSPO_TEST_WORKERS=1
# runs them one after another.
exec .venv/bin/python -m pytest -q -n "${GSPO_TEST_WORKERS:-2}" --dist loadfile --durations=25 tests "$@"
