"""scripts/gpu_check.sh: lists its steps with --dry-run, and on a machine without CUDA stops after the
CPU checks with one 'no CUDA device' line and a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def test_dry_run_lists_every_step(tmp_path):
    result = run("--dry-run", str(tmp_path))
    assert result.returncode == 0, result.stderr
    steps = [line.split(":")[0].removeprefix("[dry-run] ") for line in result.stdout.splitlines()]
    assert steps == ["import", "cpu-cuda-logic", "exactness-16bit", "triton-dequant", "test-suite-cuda",
                     "bench-offload-fp16", "bench-gptq70b"]
    assert "--device cuda --dtype fp16" in result.stdout
    assert "SPECEXEC_REQUIRE_TRITON=1" in result.stdout and "tests/test_gptq_triton.py" in result.stdout
    assert "scripts/bench_gptq70b.py --device cuda" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_cuda_it_stops_with_one_line(tmp_path):
    result = run(str(tmp_path), GPU_CHECK_SKIP_CPU_TESTS="1")
    assert result.returncode == 3
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("gpu_check: no CUDA device") and "CPU checks passed" in last
    steps = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert [(s["step"], s["exit_code"]) for s in steps] == [("import", 0)]
