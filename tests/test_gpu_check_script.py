"""scripts/gpu_check.py on a CPU: every step at toy sizes without the optional packages the GPU machine
lacks, the deadline (a step that would overrun is skipped, a running one is stopped, the full run's
estimates fit it), a report rewritten on SIGTERM, at most 8 output files, a clean exit 3 without CUDA;
and the accelerate baseline's device_map for a CUDA device, built without one."""

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
from conftest import load_script

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


def absent_packages_env(folder: Path) -> dict[str, str]:
    """An environment in which optuna, platformdirs, gguf and bitsandbytes are unimportable, as on the
    lent GPU machine: a sitecustomize in `folder` puts a meta-path finder first that refuses them."""
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        f"ABSENT = {set(ABSENT_ON_GPU)!r}\n"
        "class Absent:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ABSENT:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Absent())\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)])}


def test_every_smoke_step_passes_without_the_packages_the_gpu_machine_lacks(tmp_path):
    """The whole check at toy sizes, as the GPU machine would run it (no optuna, platformdirs, gguf or
    bitsandbytes): every step ok, a summary, every goal measured, at most 8 files. Its cuda-tests step
    collects the whole tests folder, so a test module that imports one of those packages without
    skipping fails here."""
    site, out = tmp_path / "site", tmp_path / "out"
    site.mkdir()
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--device", "cpu", "--smoke",
                             "--workdir", str(tmp_path / "work")], capture_output=True, text=True,
                            timeout=600, cwd=ROOT, env=absent_packages_env(site))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    names = [s.name for s in gpu_check_module().build_steps(gpu_check_module().parse_args([]), out)]
    assert statuses(out) == dict.fromkeys(names, "ok")
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES and {"summary.md", "summary.json", "log.txt"} <= set(files)
    data = summary(out)
    assert data["finished"] and data["probe"]["torch"] == torch.__version__
    for name in ABSENT_ON_GPU:  # really absent in the children (the finder makes find_spec raise)
        assert data["probe"][name] is None or "No module named" in data["probe"][name]
    # the toy run measures every goal the GPU run judges (their verdicts mean nothing at toy sizes)
    assert all(g["measured"] != "not measured" for g in data["goals"])
    md = (out / "summary.md").read_text()
    assert "SMOKE" in md and "## GPTQ 70B-shaped" in md and "## RAM tier" in md and "measured: host" in md
    log = (out / "log.txt").read_text()
    assert "== gptq70b: ok" in log and "== ram-tier: ok" in log  # each step's output lands in one log
    # the benchmarks' checkpoints stay in the work folder for a rerun
    assert any((tmp_path / "work" / "ram_tier").iterdir()) and any((tmp_path / "work" / "gptq70b").iterdir())


def gpu_check_module():
    return load_script("gpu_check")


def test_the_full_run_fits_the_deadline_with_the_cuda_only_tests_before_the_benchmarks():
    script = gpu_check_module()
    args = script.parse_args(["--out", "unused"])
    steps = script.build_steps(args, Path("unused"))
    names = [s.name for s in steps]
    assert args.deadline == 420
    assert sum(s.estimate_s for s in steps) <= args.deadline - 30  # margin for estimates that run long
    assert names.index("cuda-tests") < names.index("gptq70b") and names.index("cuda-tests") < names.index(
        "ram-tier")
    assert names[-2:] == ["gptq70b", "ram-tier"]  # the longest steps last
    for step in steps:  # both benchmarks write into the shared work folder, and keep what they wrote
        if step.name in ("gptq70b", "ram-tier"):
            assert "--workdir" in step.command and args.workdir in " ".join(step.command)


@pytest.mark.parametrize("shape", ["tinyllama", "qwen2-1.5b", "smoke"])
@pytest.mark.parametrize("device,home,execute", [("cuda", "cpu", 0), ("cuda:1", "cpu", 1),
                                                  ("cpu", "disk", "cpu")])
def test_accelerate_device_map_puts_every_module_on_a_real_device(shape, device, home, execute):
    """The baseline's device_map for `cuda` with no index (what --device cuda passes) names GPU 0, not
    None: built here without a GPU, then checked by accelerate against the model's own modules."""
    import transformers
    from accelerate import init_empty_weights
    from accelerate.utils import check_device_map

    bench = load_script("bench_offload")
    cls_name, kw = bench.SHAPES[shape]
    config = getattr(transformers, cls_name)(**{**kw, "num_hidden_layers": 3})
    device_map = bench.accelerate_device_map(config, torch.device(device))
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config)
    check_device_map(model, device_map)  # every parameter is placed
    assert {k for k, v in device_map.items() if v == home} == {f"model.layers.{i}" for i in range(3)}
    others = {k: v for k, v in device_map.items() if not k.startswith("model.layers.")}
    assert {"model.embed_tokens", "model.norm", "lm_head"} <= set(others)
    assert set(others.values()) == {execute}


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
