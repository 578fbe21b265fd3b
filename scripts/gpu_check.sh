#!/usr/bin/env bash
# One command for a CUDA machine with only this checkout (no model hub needed):
#   bash scripts/gpu_check.sh [--dry-run] [OUT_DIR]
# 1. CPU checks that need no GPU: the package imports, the CUDA-logic and host-sync tests.
# 2. Stops with "no CUDA device" (exit 3) when torch sees none.
# 3. The test suite on CUDA (SPECEXEC_TEST_DEVICE=cuda: device-parametrized tests run there too),
#    the bf16/fp16 near-tie exactness checks, the Triton GPTQ dequantization kernel against the torch
#    reference (bit for bit; triton must be installed: SPECEXEC_REQUIRE_TRITON=1 turns its skip into a
#    failure), scripts/bench_offload.py --device cuda --dtype fp16, and scripts/bench_gptq70b.py: a
#    Llama-70B-shaped GPTQ target (16 random layers, scaled to 80) streamed from pinned RAM, its
#    efficiency against the pinned H2D floor (goal >= 0.85) and SpecExec's expected tok/s from the
#    bundled pair's acceptance curve measured on CPU (OUT_DIR/bench_gptq70b.json).
# Each step's log goes to OUT_DIR (default gpu-check-out/); OUT_DIR/summary.md and summary.json hold
# one row per step: exit code and seconds. Budget: under 9 minutes on an H100.
# --dry-run prints the steps without running them; GPU_CHECK_SKIP_CPU_TESTS=1 skips the CPU pytest step
# (the test of this script uses it).
set -u
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT="${1:-gpu-check-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RESULTS="$OUT/results.tsv"
: > "$RESULTS"
FAILED=0

step() {  # step NAME TIMEOUT_S COMMAND...
    local name="$1" limit="$2"
    shift 2
    if [ "$DRY" = 1 ]; then echo "[dry-run] $name: $*"; return 0; fi
    echo "== $name: $*" >&2
    local start end rc
    start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    end=$(date +%s)
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((end - start))" >> "$RESULTS"
    if [ "$rc" != 0 ]; then FAILED=1; echo "   $name failed (exit $rc); tail of $OUT/$name.log:" >&2; tail -n 5 "$OUT/$name.log" >&2; fi
    return 0
}

summarize() {
    [ "$DRY" = 1 ] && return 0
    "$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [line.split("\t") for line in (out / "results.tsv").read_text().splitlines() if line]
steps = [{"step": n, "exit_code": int(rc), "seconds": int(s), "log": f"{n}.log"} for n, rc, s in rows]
(out / "summary.json").write_text(json.dumps({"steps": steps}, indent=2) + "\n")
lines = ["| step | result | seconds | log |", "| --- | --- | --- | --- |"]
lines += [f"| {s['step']} | {'ok' if s['exit_code'] == 0 else 'FAILED (' + str(s['exit_code']) + ')'} "
          f"| {s['seconds']} | {s['log']} |" for s in steps]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
}

# --- 1. what a CPU can check -------------------------------------------------------------------
step import 120 "$PY" -c "import specexec_cli.cli, specexec_cli.runtime.target, specexec_cli.decoding.generate"
if [ "${GPU_CHECK_SKIP_CPU_TESTS:-0}" != 1 ]; then
    step cpu-cuda-logic 300 "$PY" -m pytest -q -x tests/test_cuda_logic.py tests/test_host_syncs.py
fi

# --- 2. a CUDA device? ---------------------------------------------------------------------------
if [ "$DRY" = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    summarize > /dev/null
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); CPU checks $([ $FAILED = 0 ] && echo passed || echo FAILED), see $OUT/summary.md" >&2
    exit 3
fi

# --- 3. on the GPU -------------------------------------------------------------------------------
export SPECEXEC_TEST_DEVICE=cuda
step exactness-16bit 180 "$PY" -m pytest -q tests/test_exactness_16bit.py tests/test_tree_attention.py
step triton-dequant 120 env SPECEXEC_REQUIRE_TRITON=1 "$PY" -m pytest -q -rs tests/test_gptq_triton.py
step test-suite-cuda 240 "$PY" -m pytest -q -x tests
step bench-offload-fp16 120 "$PY" scripts/bench_offload.py --device cuda --dtype fp16 --shape tinyllama \
    --layers 0 --tokens 1,64,256,1024 --tiers none,ram --no-accelerate
step bench-gptq70b 180 "$PY" scripts/bench_gptq70b.py --device cuda --dtype fp16 --layers 16 \
    --curve docs/data/bench_tune_cpu.json --out "$OUT/bench_gptq70b.json"
summarize
exit "$FAILED"
