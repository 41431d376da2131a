#!/usr/bin/env bash
# Creates .venv (if missing), installs what paged_kv needs and builds it in place.
# Sourced by scripts/test.sh and scripts/demo.sh; safe to run again (it rebuilds what changed).
#   PAGED_KV_TORCH   the torch requirement (default torch==2.14.1, a CUDA 13.0 build)
#   PAGED_KV_VENV    where the virtual environment lives (default .venv in the repository)
#   PAGED_KV_TRANSFORMERS  the transformers requirement (default transformers==5.17.0)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PAGED_KV_VENV:-$ROOT/.venv}"
TORCH_REQ="${PAGED_KV_TORCH:-torch==2.14.1}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "paged_kv: creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "$TORCH_REQ" numpy ninja setuptools wheel pytest hypothesis
# The Hugging Face integration (paged_kv.integrations.transformers), its tests and the demo (its plot).
"$PY" -m pip install -q "${PAGED_KV_TRANSFORMERS:-transformers==5.17.0}" matplotlib

# With no GPU visible, name the architectures explicitly (torch would otherwise probe for one).
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && ! "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TORCH_CUDA_ARCH_LIST="9.0a"
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
echo "paged_kv: building (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-from the GPU}, MAX_JOBS=$MAX_JOBS)"
mkdir -p "$ROOT/build"
LOG="$ROOT/build/build.log"
# -v so the log names every compiled source, the CUDA kernels among them.
if ! "$PY" -m pip install -v --no-build-isolation -e "$ROOT" >"$LOG" 2>&1; then
  tail -n 60 "$LOG"
  echo "paged_kv: build failed; full log in $LOG"
  exit 1
fi
grep -E "^paged_kv:|^ *paged_kv:" "$LOG" | sort -u || true
sed -nE 's/^ *\[([0-9]+\/[0-9]+)\].* -c ([^ ]+\.(cu|cpp)) -o .*/  [\1] compiled \2/p' "$LOG"
"$PY" -c "import paged_kv, sys; sys.exit(1 if paged_kv.LIBRARY_ERROR else 0)" || {
  "$PY" -c "import paged_kv; print(paged_kv.LIBRARY_ERROR)"; exit 1; }
