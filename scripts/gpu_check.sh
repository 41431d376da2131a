#!/usr/bin/env bash
# GPU check: build against the installed torch, run the tests on the GPU, run the CUDA tests
# again under compute-sanitizer memcheck, run the benchmarks; logs and JSON go to OUTDIR.
#   usage: scripts/gpu_check.sh OUTDIR [bench ...]   (default benches: ceilings attention)
# FlashInfer, the attention benchmark's peer, is used when its wheel sits in .peers/ (it is
# installed there with --no-deps and put on PYTHONPATH).
# Runs with the machine's own python3 (no virtual environment), as on the GPU test machine.
set -uo pipefail
OUT="${1:?usage: scripts/gpu_check.sh OUTDIR [bench ...]}"
shift
BENCHES=("$@")
[ ${#BENCHES[@]} -eq 0 ] && BENCHES=(ceilings attention)
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
step tests python3 -m pytest tests -q --maxfail=20
# memcheck over every CUDA-parametrised test and the CUDA-only ones (torch.compile excluded:
# its compiler subprocesses make the run long and add no kernel of ours; the soak test too:
# it runs for a set time and checks memory growth, which the instrumentation itself changes).
# API errors are not reported: libcufile's own cuFileDriverOpen frees an invalid pointer inside
# the library where GPUDirect Storage is not set up (the auto I/O backend opens it), which
# memcheck would count. paged_kv checks every CUDA call's status itself and the tests see those
# errors; memcheck's job here is the kernels' memory accesses.
step memcheck compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 7 \
  --target-processes all \
  python3 -m pytest tests -q -k "cuda and not compiled and not bench and not soak" -p no:cacheprovider
wheel=$(ls .peers/flashinfer_python-*.whl 2>/dev/null | head -n 1)
if [ -n "$wheel" ] && [ ! -d .peers/flashinfer/flashinfer ]; then
  step flashinfer_install python3 -m pip install --no-deps --target .peers/flashinfer "$wheel"
fi
[ -d .peers/flashinfer/flashinfer ] && export PYTHONPATH="$ROOT/.peers/flashinfer${PYTHONPATH:+:$PYTHONPATH}"
for b in "${BENCHES[@]}"; do
  step "bench_$b" python3 "bench/$b.py" --out "$OUT"
done
step demo python3 -m paged_kv demo
exit $status
