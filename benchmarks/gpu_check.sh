#!/usr/bin/env bash
# One prepared GPU check (issue 15 item 8, issue 16): < 8 min on one H100/H200.
#
#   benchmarks/gpu_check.sh [OUTPUT_DIR]     (default: $OUT if set, else gpu_check_out/)
#
# Steps, each under `timeout`, each continuing past a failure, summarised at the end:
#   1. CUDA tests of the generated kernels against SDPA (tests/kernels/test_cuda_triton.py)
#   2. the simulated ring with Triton kernels on CUDA (same file, -k simulated)
#   3. FlexAttention training through the rewritten op (tests marked with "flex" and "cuda"; skipped if none)
#   4. benchmarks/triton_gpu.py: TFLOP/s against SDPA-flash and FlexAttention, fwd and fwd+bwd
# Everything (logs, JUnit XML, the benchmark JSON, summary.txt) goes under OUTPUT_DIR.
# Without CUDA it exits at once (status 2) with a message saying so.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
OUT_DIR="${1:-${OUT:-gpu_check_out}}"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check.sh: no CUDA GPU visible to torch ($PY); this check needs one H100/H200. Nothing was run." >&2
    exit 2
fi
mkdir -p "$OUT_DIR"
unset TRITON_INTERPRET
"$PY" - > "$OUT_DIR/environment.txt" 2>&1 <<'PYEOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton missing:", exc)
print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
PYEOF

declare -a NAMES STATUS
step() {  # step NAME SECONDS command...
    local name="$1" secs="$2"; shift 2
    local start=$SECONDS
    echo "== $name (timeout ${secs}s)"
    timeout --kill-after=10 "$secs" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    local verdict=PASS
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="TIMEOUT"
    elif [ $rc -eq 5 ]; then verdict="SKIPPED (no tests collected)"
    elif [ $rc -ne 0 ]; then verdict="FAIL (exit $rc)"; fi
    NAMES+=("$name"); STATUS+=("$verdict, $((SECONDS - start))s")
    echo "   $verdict; log: $OUT_DIR/$name.log"
}

step 1-kernels-vs-sdpa 150 "$PY" -m pytest -q -rA -p no:cacheprovider tests/kernels/test_cuda_triton.py \
    -k "not simulated" --junitxml "$OUT_DIR/1-kernels-vs-sdpa.xml"
step 2-simulated-ring-cuda 60 "$PY" -m pytest -q -rA -p no:cacheprovider tests/kernels/test_cuda_triton.py \
    -k simulated --junitxml "$OUT_DIR/2-simulated-ring-cuda.xml"
step 3-flex-training-cuda 60 "$PY" -m pytest -q -rA -p no:cacheprovider tests -k "flex and cuda" \
    --junitxml "$OUT_DIR/3-flex-training-cuda.xml"
step 4-triton-gpu-bench 180 "$PY" benchmarks/triton_gpu.py --out "$OUT_DIR/triton_gpu.json"

{
    echo "gpu_check summary ($(date -u +%FT%TZ))"
    cat "$OUT_DIR/environment.txt"
    for i in "${!NAMES[@]}"; do echo "${NAMES[$i]}: ${STATUS[$i]}"; done
} | tee "$OUT_DIR/summary.txt"
grep -q "FAIL\|TIMEOUT" "$OUT_DIR/summary.txt" && exit 1
exit 0
