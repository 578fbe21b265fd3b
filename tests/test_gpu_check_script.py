"""scripts/gpu_check.py on a CPU: its steps at toy sizes, the deadline (a step that would overrun is
skipped, a running one is stopped), a report rewritten on SIGTERM, at most 8 output files, a clean exit 3
without CUDA, and a test collection that survives the optional packages the GPU machine lacks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
MAX_FILES = 8  # what the device tool brings back from $OUT
ABSENT_ON_GPU = ("optuna", "platformdirs", "gguf", "bitsandbytes")


def gpu_check(out: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def statuses(out: Path) -> dict[str, str]:
    return {s["step"]: s["status"] for s in summary(out)["steps"]}


def test_smoke_steps_write_results_a_summary_and_at_most_8_files(tmp_path):
    result = gpu_check(tmp_path, "--device", "cpu", "--smoke", "--steps", "probe,gptq70b,ram-tier")
    assert result.returncode == 0, result.stderr[-2000:]
    assert statuses(tmp_path) == {"probe": "ok", "gptq70b": "ok", "ram-tier": "ok"}
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= MAX_FILES and {"summary.md", "summary.json", "log.txt"} <= set(files)
    data = summary(tmp_path)
    assert data["finished"] and data["probe"]["torch"] == torch.__version__
    goals = {g["goal"]: g for g in data["goals"]}
    # the toy run measures every goal the GPU run judges (their verdicts mean nothing at toy sizes)
    assert all(g["measured"] != "not measured" for name, g in goals.items() if "near-ties" not in name)
    md = (tmp_path / "summary.md").read_text()
    assert "SMOKE" in md and "## GPTQ 70B-shaped" in md and "## RAM tier" in md
    log = (tmp_path / "log.txt").read_text()
    assert "== gptq70b: ok" in log and "== ram-tier: ok" in log  # each step's output lands in one log


def test_a_step_that_would_overrun_the_deadline_is_skipped(tmp_path):
    # full-size estimates (no --smoke): the probe fits 40 s, the 70B benchmark's ~150 s does not
    result = gpu_check(tmp_path, "--device", "cpu", "--steps", "probe,gptq70b", "--deadline", "40")
    assert result.returncode == 0, result.stderr[-2000:]
    steps = {s["step"]: s for s in summary(tmp_path)["steps"]}
    assert steps["probe"]["status"] == "ok"
    assert steps["gptq70b"]["status"] == "skipped" and "s left" in steps["gptq70b"]["detail"]


def test_a_step_running_at_the_deadline_is_stopped(tmp_path):
    # the probe takes a few seconds, the kernel tests ~15 s: the deadline comes while they run
    result = gpu_check(tmp_path, "--device", "cpu", "--smoke", "--steps", "probe,gptq-kernel",
                       "--deadline", "12")
    assert result.returncode == 1
    assert statuses(tmp_path) == {"probe": "ok", "gptq-kernel": "timeout"}
    assert summary(tmp_path)["finished"]


def test_sigterm_rewrites_the_summary_with_the_running_step_killed(tmp_path):
    args = ["--out", str(tmp_path), "--device", "cpu", "--smoke", "--steps", "probe,gptq-kernel,host-syncs"]
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        limit = time.time() + 120
        while time.time() < limit:
            if (tmp_path / "summary.json").exists() and statuses(tmp_path).get("gptq-kernel") == "running":
                break
            time.sleep(0.2)
        else:
            pytest.fail("gptq-kernel never started")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert statuses(tmp_path) == {"probe": "ok", "gptq-kernel": "killed", "host-syncs": "not run"}
    assert "| gptq-kernel | killed |" in (tmp_path / "summary.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_cuda_it_stops_after_the_probe_with_exit_3(tmp_path):
    result = gpu_check(tmp_path, "--steps", "probe,gptq-kernel")
    assert result.returncode == 3
    assert result.stderr.strip().splitlines()[-1].startswith("gpu_check: no CUDA device")
    steps = {s["step"]: s for s in summary(tmp_path)["steps"]}
    assert steps["probe"]["detail"] == "no CUDA device" and steps["gptq-kernel"]["status"] == "not run"


def test_the_tests_collect_without_the_packages_the_gpu_machine_lacks(tmp_path):
    """A meta-path finder makes optuna, platformdirs, gguf and bitsandbytes unimportable, as they are
    on the lent GPU machine: collection must skip what needs them, never error."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        f"ABSENT = {set(ABSENT_ON_GPU)!r}\n"
        "class Absent:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ABSENT:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Absent())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    # platformdirs' own pytest plugin is absent there too
    def collect(marks: str) -> subprocess.CompletedProcess:
        args = ["--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:platformdirs", "-m", marks,
                "tests"]
        return subprocess.run([sys.executable, "-m", "pytest", *args], capture_output=True, text=True,
                              timeout=300, cwd=ROOT, env=env)

    result = collect("not slow")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "error" not in result.stdout.splitlines()[-1].lower()
    cuda = collect("cuda")
    assert cuda.returncode == 0
    assert "test_exactness_16bit.py" in cuda.stdout and "test_host_syncs.py" in cuda.stdout
