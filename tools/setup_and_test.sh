#!/usr/bin/env bash
# The test-suite on a fresh machine: set up (idempotent), then `python -m pytest -q tests` (arguments are
# passed on to pytest, e.g. -x or -k train). This is what CI runs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
echo "==> tests: pytest -q tests $*"
$PY -m pytest -q tests "$@"
