#!/usr/bin/env bash
# The README's test command: set up, build (CUDA sources included when nvcc is present), run
# every test. GPU tests skip cleanly without a GPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
"$PY" -m paged_kv info
"$PY" -m pytest tests -q "$@"
