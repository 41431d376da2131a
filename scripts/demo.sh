#!/usr/bin/env bash
# The README's demo command: set up, build, run `python -m paged_kv demo` (arguments pass through).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
"$PY" -m paged_kv demo "$@"
