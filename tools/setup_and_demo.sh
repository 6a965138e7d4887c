#!/usr/bin/env bash
# The main job on a fresh machine: set up (idempotent), then `structure-ops demo` (arguments are passed on,
# e.g. --quick, --out DIR). A second run reuses the build and the demo's cached features.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
echo "==> main job: structure-ops demo $*"
$PY -m structure_ops demo "$@"
