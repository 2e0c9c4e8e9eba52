#!/usr/bin/env bash
# The one prepared script for a lent GPU (an H200 lease of 15 minutes): the test suite on
# CUDA, then the quick benchmark suite, then the ahead-of-time C library (built for this
# GPU's arch on the CPUs while the GPU steps run) checked against the Python package. Sized for < 8 minutes
# so it can be rerun once inside a lease; every step has its own timeout so one hang cannot
# eat the lease. Writes at most 8 files under ${OUT:-out}:
#   env.txt tests.log (the C-library check appended) bench.log results_cuda.json table_cuda.md
#   time_vs_m_cuda.png speedup_cuda.png memory_cuda.png
# and 4 under ${OUT}/qlora: bench.log results_cuda.json table_cuda.md qlora_memory_cuda.json
# Usage (repo root, no install needed): bash benchmarks/gpu_check.sh
# Exit status: 0 when every step passed, else the first failing step's status.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
# the package is not installed in the GPU image: run from the checkout
# (fastlora.triton_backend loads kernels/ as fastlora.kernels when it is not installed)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET FASTLORA_BACKEND FASTLORA_STRATEGY
export PYTHONUNBUFFERED=1

T_TESTS="${T_TESTS:-200}"   # seconds for the CUDA test suite
T_BENCH="${T_BENCH:-200}"   # seconds for the quick suite (it stops starting cases at 120 s)
T_CANDS="${T_CANDS:-90}"    # seconds for the candidate table (12 cases x every candidate)
T_QLORA="${T_QLORA:-60}"  # seconds for the QLoRA rows (the MiniLM memory step has 60 more)
T_AOT="${T_AOT:-60}"        # seconds for the C-library comparison once its build is done
status=0
step() {  # step NAME RC: remember the first failure, keep going
    if [ "$2" -ne 0 ]; then
        echo "== $1: FAILED (rc=$2$([ "$2" -eq 124 ] && echo ', timed out'))"
        [ "$status" -ne 0 ] || status=$2
    else
        echo "== $1: ok"
    fi
}

start=$(date +%s)
{
    date -u '+%Y-%m-%d %H:%M UTC'
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    python - <<'PY'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("triton", "peft", "transformers", "matplotlib", "tqdm", "pytest", "hypothesis"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, "MISSING:", exc)
PY
    git rev-parse --short HEAD 2>/dev/null || true
    git status --short 2>/dev/null | head -n 30 || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# the AOT build needs only CPUs: run it beside the GPU steps
mkdir -p build
ARCH=$(python -c "import torch; M, m = torch.cuda.get_device_capability(); print(M * 10 + m)")
( timeout -k 10 400 cmake -S . -B build/aot-gpu -DFASTLORA_CUDA_ARCHS="$ARCH" \
    && timeout -k 10 400 cmake --build build/aot-gpu -j"$(nproc)" ) > build/aot-gpu.log 2>&1 &
aot_pid=$!

rc=0
timeout -k 10 "$T_TESTS" python -m pytest tests -q -x -p no:cacheprovider > "$OUT/tests.log" 2>&1 || rc=$?
tail -n 15 "$OUT/tests.log"
step "tests on CUDA ($(( $(date +%s) - start )) s so far)" "$rc"

rc=0
timeout -k 10 "$T_BENCH" python -m benchmarks --quick --device cuda --out "$OUT" --budget-s 120 \
    > "$OUT/bench.log" 2>&1 || rc=$?
grep -v -e 'case/s' -e '^benchmarks:' "$OUT/bench.log" | tail -n 80 || true
step "quick benchmark suite ($(( $(date +%s) - start )) s so far)" "$rc"

# every dispatch candidate per direction (the dispatcher's own timing and rule), the pick,
# and the pick's fwd+bwd over the frozen cuBLAS layer and over PEFT: 4096x4096,
# 4096x11008, 11008x4096; M 2048 and 8192; r 16; p 0 and 0.1; bf16
rc=0
timeout -k 10 "$T_CANDS" python -m benchmarks.candidates --device cuda --out "$OUT" \
    > "$OUT/candidates.log" 2>&1 || rc=$?
tail -n 90 "$OUT/candidates.log"
step "candidate table ($(( $(date +%s) - start )) s so far)" "$rc"

# QLoRA rows: an NF4 Linear4bit base (frozen Linear4bit, fastlora fused/strategy, PEFT's
# QLoRA), then one training step of the 4-bit MiniLM (peak memory, fastlora vs PEFT)
rc=0
mkdir -p "$OUT/qlora"
{ timeout -k 10 "$T_QLORA" python -m benchmarks --device cuda --base nf4 --shapes 4096x4096 \
    --m 4096 --r 16 --dropout 0,0.1 --providers linear,fastlora,peft --out "$OUT/qlora" \
    --no-plots && HF_HUB_OFFLINE=1 timeout -k 10 60 python -m benchmarks.qlora_memory \
    --device cuda --out "$OUT/qlora"; } > "$OUT/qlora/bench.log" 2>&1 || rc=$?
grep -v -e 'case/s' -e '^benchmarks:' "$OUT/qlora/bench.log" | tail -n 40 || true
step "QLoRA rows and 4-bit MiniLM memory ($(( $(date +%s) - start )) s so far)" "$rc"

rc=0
wait "$aot_pid" || rc=$?
if [ "$rc" -eq 0 ]; then
    # called directly: a skip (exit 77) must fail here, where a GPU is present
    timeout -k 5 "$T_AOT" python aot/tests/gpu_compare.py --lib build/aot-gpu/libfastlora_kernels.so \
        >> build/aot-gpu.log 2>&1 || rc=$?
fi
{ echo; echo "== C library (build + gpu_compare)"; tail -n 40 build/aot-gpu.log; } >> "$OUT/tests.log"
tail -n 12 build/aot-gpu.log
step "C library vs the Python package on sm_$ARCH" "$rc"

echo "== done in $(( $(date +%s) - start )) s; files in $OUT:"
ls -l "$OUT"
exit "$status"
