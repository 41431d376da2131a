#!/usr/bin/env bash
# GPU check: build against the installed torch, then run the chosen steps; logs and JSON go to
# OUTDIR.
#   usage: scripts/gpu_check.sh OUTDIR [STEP ...]
#   steps: tests     the whole test suite on the GPU
#          memcheck  the CUDA tests again under compute-sanitizer memcheck
#          tests:K/N, memcheck:K/N  the K-th of N shares of either (every N-th test from the
#                    K-th, pytest's --share of tests/conftest.py)
#          bench:N   bench/N.py --out OUTDIR (for example bench:attention)
#          demo      python -m paged_kv demo
#   default: tests memcheck bench:ceilings bench:attention demo
# The build runs first in every call, so the steps can be spread over calls on a machine that
# limits each command's time. On an H200: the build 1.1 minutes; the suite about 10, so a call of
# at most 10 minutes takes one of two shares (tests:1/2 and tests:2/2, 5 minutes each); memcheck
# about 4; bench:attention 4.
# FlashInfer, the attention benchmark's peer, is used when its wheel sits in .peers/ (it is
# installed there with --no-deps and put on PYTHONPATH).
# Runs with the machine's own python3 (no virtual environment), as on the GPU test machine.
set -uo pipefail
OUT="${1:?usage: scripts/gpu_check.sh OUTDIR [STEP ...]}"
shift
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(tests memcheck bench:ceilings bench:attention demo)
for s in "${STEPS[@]}"; do
  case "$s" in
    tests|memcheck|demo) ;;
    tests:*|memcheck:*) [[ "${s#*:}" =~ ^([0-9]+)/([0-9]+)$ ]] && [ "${BASH_REMATCH[1]}" -ge 1 ] \
               && [ "${BASH_REMATCH[1]}" -le "${BASH_REMATCH[2]}" ] \
               || { echo "step '$s': expected ${s%%:*}:K/N with 1 <= K <= N" >&2; exit 2; } ;;
    bench:?*) [ -f "$(dirname "${BASH_SOURCE[0]}")/../bench/${s#bench:}.py" ] || { echo "no benchmark bench/${s#bench:}.py" >&2; exit 2; } ;;
    *) echo "unknown step '$s': expected tests, memcheck, tests:K/N, memcheck:K/N, bench:NAME or demo" >&2; exit 2 ;;
  esac
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT"
cd "$ROOT"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
# A compiler wrapper that links libstdc++ statically gives the extension a second C++ runtime
# beside torch's, and iostreams (every TORCH_CHECK message) then crash in the locale code. Build
# with the system compiler, which links the shared libstdc++ that torch uses.
if [ -x /usr/bin/g++ ] && [ -z "${PAGED_KV_KEEP_CXX:-}" ]; then
  export CXX=/usr/bin/g++ CC=/usr/bin/gcc
fi
status=0
step() {  # step NAME COMMAND...: runs COMMAND, logs to OUT/NAME.log, records a failure
  local name="$1"; shift
  local t0=$SECONDS
  echo "== $name: $*"
  if "$@" >"$OUT/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - t0)) s)"
  else
    echo "   FAILED ($((SECONDS - t0)) s), last lines of $OUT/$name.log:"; tail -n 25 "$OUT/$name.log"; status=1
  fi
  grep -E "passed|failed|error" "$OUT/$name.log" | tail -n 2 | sed 's/^/   /'
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
step build python3 -m pip install -v --no-build-isolation -e .
if ldd paged_kv/_C*.so | grep -q libstdc++; then echo "   links the shared libstdc++"; else echo "   WARNING: libstdc++ is linked statically"; fi
step info python3 -m paged_kv info
[ $status -eq 0 ] || { echo "the build failed: no step runs"; exit 1; }

FILES=(tests)
SHARE=""
pick_share() {  # pick_share [K N]: FILES and SHARE for every test, or the K-th of N shares
  FILES=(tests) SHARE=""
  [ $# -eq 2 ] || return 0
  # Every N-th selected test from the K-th (--share, tests/conftest.py): shares of one size,
  # where shares of whole files were not (test_attention.py alone holds a third of the tests).
  FILES=(tests --share "$1/$2")
  SHARE="_$1_of_$2"
}
run_tests() {
  pick_share "$@"
  step "tests$SHARE" python3 -m pytest "${FILES[@]}" -q --maxfail=20 --durations=15
}
# memcheck over every CUDA-parametrised test and the CUDA-only ones (torch.compile excluded:
# its compiler subprocesses make the run long and add no kernel of ours; the soak test too:
# it runs for a set time and checks memory growth, which the instrumentation itself changes).
# API errors are not reported: libcufile's own cuFileDriverOpen frees an invalid pointer inside
# the library where GPUDirect Storage is not set up (the auto I/O backend opens it), which
# memcheck would count. paged_kv checks every CUDA call's status itself and the tests see those
# errors; memcheck's job here is the kernels' memory accesses.
memcheck_pytest() {  # pytest's exit 5 (no test selected: a share without CUDA tests) is no failure
  compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 7 --target-processes all \
    python3 -m pytest "$@" -q -k "cuda and not compiled and not bench and not soak" -p no:cacheprovider
  local rc=$?
  [ $rc -eq 5 ] && return 0
  return $rc
}
run_memcheck() {
  pick_share "$@"
  step "memcheck$SHARE" memcheck_pytest "${FILES[@]}"
}
run_bench() {
  local wheel
  wheel=$(ls .peers/flashinfer_python-*.whl 2>/dev/null | head -n 1)
  if [ -n "$wheel" ] && [ ! -d .peers/flashinfer/flashinfer ]; then
    step flashinfer_install python3 -m pip install --no-deps --target .peers/flashinfer "$wheel"
  fi
  if [ -d .peers/flashinfer/flashinfer ] && [[ ":${PYTHONPATH:-}:" != *":$ROOT/.peers/flashinfer:"* ]]; then
    export PYTHONPATH="$ROOT/.peers/flashinfer${PYTHONPATH:+:$PYTHONPATH}"
  fi
  step "bench_$1" python3 "bench/$1.py" --out "$OUT"
}
for s in "${STEPS[@]}"; do
  case "$s" in
    tests) run_tests ;;
    tests:*) k="${s#tests:}"; run_tests "${k%/*}" "${k#*/}" ;;
    memcheck:*) k="${s#memcheck:}"; run_memcheck "${k%/*}" "${k#*/}" ;;
    memcheck) run_memcheck ;;
    bench:*) run_bench "${s#bench:}" ;;
    demo) step demo python3 -m paged_kv demo ;;
  esac
done
exit $status
