#!/usr/bin/env bash
# Set up this checkout for use and tests, idempotently: the pinned dependencies of requirements-dev.txt,
# then the C++ extension, rebuilt only when it is missing, fails to load or is older than its sources.
# Sourced by setup_and_demo.sh and setup_and_test.sh; PYTHON selects the interpreter (default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}

echo "==> set-up 1/2: pinned dependencies (requirements-dev.txt)"
$PY -m pip install -q -r requirements-dev.txt

echo "==> set-up 2/2: the C++ extension"
if $PY tools/build_is_fresh.py; then
    echo "    already built for this torch and these sources"
else
    $PY -m pip install -q --no-build-isolation -e .
fi
