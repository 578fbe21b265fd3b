"""The one-command check for a lent CUDA machine: offline, within a deadline, its report surviving a kill.

    python scripts/gpu_check.py --out "$OUT" --deadline 420  # on the GPU machine (timeout_s 500)
    python scripts/gpu_check.py --device cpu --smoke --out d  # the same steps at toy sizes on a CPU

It installs nothing and needs no network: only the checkout (on PYTHONPATH) and what the machine has
(torch, triton, transformers, accelerate, safetensors, pytest; optuna, platformdirs, gguf and
bitsandbytes may be absent: the tests that need them skip). Every child runs with PYTHONUNBUFFERED=1
and HF_HUB_OFFLINE=1. The steps, in the order they run (cheap and CUDA-only checks first):

  probe           imports of the package, the CUDA device, versions, which optional packages exist
  cuda-tests      every other test marked `cuda`: the offload engine's copy streams, pinned RAM store
                  and the disk tier's pinned staging, against the resident model (tests/test_offload.py)
  gptq-kernel     the Triton GPTQ kernel bit for bit against the torch reference on the GPU, trivial
                  and act-order g_idx (tests/test_gptq_triton.py, triton required)
  exactness-16bit bf16/fp16 greedy SpecExec and SpecInfer == plain decoding under the near-tie rule, on
                  tiny pairs trained to peaked logits: resident, RAM-streamed and GPTQ targets
                  (tests/test_exactness_16bit.py, tree attention)
  host-syncs      the decoding loop's host-sync budget counted by torch's CUDA sync debug mode
  gptq70b         a Llama-70B-shaped GPTQ target (8 random layers, scaled to 80) streamed from pinned
                  RAM: H2D floor (cudaHostRegister, as the engine pins; pin_memory beside it), pass time,
                  efficiency, torch vs Triton dequant per layer, SpecExec's predicted tok/s
                  (scripts/bench_gptq70b.py)
  ram-tier        fp16 RAM-tier pass at 1..4096 tokens vs its H2D floor, and accelerate's offloaded
                  forward of the same checkpoint in the same process (scripts/bench_offload.py)

The benchmarks write their random checkpoints into --workdir (default $TMPDIR/specexec-gpu-check) and
reuse them, so a rerun of failed steps on the same machine (`--steps gptq70b,ram-tier`) skips the build.

One overall deadline (--deadline, default 420 s): a step whose estimate no longer fits is recorded as
skipped, and a running step is stopped when the deadline comes. summary.md and summary.json are
rewritten when each step starts and ends, and on SIGTERM / SIGINT (the running step is then "killed"),
so a run cut short still reports what it did. The output folder holds at most 8 files: summary.md,
summary.json, log.txt (every step's output, as it is written), probe.json, gptq70b.json, ram_tier.json.
Exit code: 0 when every step that ran passed, 1 when one failed or was cut short, 3 without a CUDA
device (--device cuda), 143 on SIGTERM, 130 on SIGINT.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_FILES = ("summary.md", "summary.json", "log.txt", "probe.json", "gptq70b.json", "ram_tier.json")
UMBRELLA_TOK_S = 8.6  # UMbreLLa, Llama-3.1-70B AWQ greedy on an RTX 4090 (PCIe 4, ~25 GB/s)
UMBRELLA_LINK = 25e9
EXIT_NO_CUDA = 3
GPTQ_GOAL = "GPTQ 70B-shaped pass within 1/0.85 of streamed bytes / pinned H2D"
RAM_GOAL = "fp16 RAM-tier pass within 1/0.85 of its H2D floor, 1 to 256 tokens"
ACCELERATE_GOAL = ">= 3x faster than accelerate's offloaded forward on the same bytes"
EXACT_GOAL = "bf16/fp16 greedy SpecExec == plain decoding except at near-ties"
PREDICTION = "SpecExec tok/s predicted for a 70B GPTQ target, beside UMbreLLa's 8.6 tok/s (link-scaled)"

PROBE = r"""
import importlib.util, json, sys, platform
import torch
import specexec_cli.cli, specexec_cli.runtime.target, specexec_cli.decoding.generate  # the package imports
info = {"python": platform.python_version(), "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(), "cuda_version": torch.version.cuda}
for name in ("transformers", "accelerate", "triton", "safetensors", "hypothesis", "scipy", "click",
             "optuna", "platformdirs", "gguf", "bitsandbytes"):
    try:
        module = __import__(name) if importlib.util.find_spec(name) else None
    except Exception as exc:
        module, info[name] = None, f"broken: {exc}"
    if module is not None:
        info[name] = getattr(module, "__version__", "present")
    info.setdefault(name, None)
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                multiprocessors=props.multi_processor_count, memory_total=total, memory_free=free,
                bf16=torch.cuda.is_bf16_supported())
import shutil
info["c_compiler"] = shutil.which("cc") or shutil.which("gcc")  # Triton builds its launcher with it
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info, indent=2))
sys.exit(0 if info["cuda_available"] or sys.argv[2] == "cpu" else 3)
"""


@dataclass
class Step:
    name: str
    estimate_s: int  # expected seconds on an H100; the step is skipped when this no longer fits
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    status: str = "pending"  # pending | running | ok | failed | timeout | skipped | killed | not run
    exit_code: int | None = None
    seconds: float | None = None
    detail: str = ""


def pytest_command(py: str, device: str, *targets: str) -> list[str]:
    return [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--device", device, *targets]


def build_steps(args: argparse.Namespace, out: Path) -> list[Step]:
    """The steps in the order they run: the cheap checks first, the CUDA-only runtime tests (copy
    streams, pinned staging) before the long benchmarks, so a run cut short loses the least. Estimates
    are seconds on an H100 with a warm page cache, pytest's start (~10 s) included; together they fit
    the issue's 420 s deadline with margin. The benchmarks' random checkpoints are written once into
    --workdir and reused by a rerun on the same machine."""
    py, dev = sys.executable, args.device
    cuda = dev == "cuda"
    workdir = Path(args.workdir)
    ran_alone = ["tests/test_gptq_triton.py", "tests/test_exactness_16bit.py",
                 "tests/test_tree_attention.py", "tests/test_host_syncs.py"]
    gptq70b = [py, "scripts/bench_gptq70b.py", "--device", dev, "--dtype", "fp16" if cuda else "fp32",
               "--curve", "docs/data/bench_tune_cpu.json", "--out", str(out / "gptq70b.json"),
               "--workdir", str(workdir / "gptq70b"), "--keep"]
    gptq70b += ["--layers", "8"] if not args.smoke else ["--layers", "2", "--smoke"]
    ram_tier = [py, "scripts/bench_offload.py", "--device", dev, "--tiers", "ram",
                "--out", str(out / "ram_tier.json"), "--workdir", str(workdir / "ram_tier")]
    if args.smoke:
        ram_tier += ["--shape", "smoke", "--layers", "4", "--tokens", "1,16", "--accelerate-tokens", "1",
                     "--repeats", "1"]
    else:
        ram_tier += ["--dtype", "fp16", "--shape", "llama-7b", "--layers", "8",
                     "--tokens", "1,16,64,256,1024,4096", "--accelerate-tokens", "1,256"]
    steps = [
        Step("probe", 15, [py, "-c", PROBE, str(out / "probe.json"), dev]),
        # the offload engine's CUDA-only paths: copy streams, the pinned RAM store, the disk tier's
        # pinned staging (tests/test_offload.py) and any other test marked `cuda`
        Step("cuda-tests", 45, pytest_command(py, dev, "-m", "cuda", "tests",
                                              *[f"--ignore={t}" for t in ran_alone])),
        Step("gptq-kernel", 45, pytest_command(py, dev, "tests/test_gptq_triton.py"),
             {"SPECEXEC_REQUIRE_TRITON": "1"} if cuda else {}),
        # the trained tiny pairs are built once per pytest process and shared by every case
        Step("exactness-16bit", 60, pytest_command(py, dev, "tests/test_exactness_16bit.py",
                                                   "tests/test_tree_attention.py")),
        Step("host-syncs", 25, pytest_command(py, dev, "tests/test_host_syncs.py")),
        # 8 random 70B-shaped GPTQ layers (3.6 GB) written, registered, streamed ~20 passes
        Step("gptq70b", 90, gptq70b),
        # a random 8-layer Llama-7B-shaped fp16 checkpoint (3.7 GB); ours, then accelerate's, forward
        Step("ram-tier", 100, ram_tier),
    ]
    if args.steps:
        wanted = args.steps.split(",")
        unknown = sorted(set(wanted) - {s.name for s in steps})
        if unknown:
            names = ", ".join(s.name for s in steps)
            sys.exit(f"gpu_check: unknown step(s) {', '.join(unknown)}; the steps: {names}")
        steps = [s for s in steps if s.name in wanted]
    if args.smoke:
        for step in steps:
            step.estimate_s = 1
    return steps


# --- reading the results ------------------------------------------------------------------------------


def pytest_detail(log_text: str) -> str:
    """The last pytest summary line of a step's output ('12 passed, 2 skipped in 3.1s')."""
    lines = [line.strip("= ") for line in log_text.splitlines()
             if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    return lines[-1] if lines else ""


def load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def judge(out: Path, steps: list[Step]) -> list[dict]:
    """Each goal of the GPU check as met / not met / not measured, from the steps' JSON results."""
    goals = []

    def goal(name: str, met: bool | None, measured: str) -> None:
        goals.append({"goal": name, "met": met, "measured": measured})

    g70 = load_json(out / "gptq70b.json")
    if g70 and g70.get("passes"):
        first = g70["passes"][0]
        goal(GPTQ_GOAL, first["efficiency"] >= 0.85,
             f"{first['tokens']} token(s): {first['seconds_80']:.3f} s for 80 layers, floor "
             f"{first['floor_seconds_80']:.3f} s, efficiency {first['efficiency']:.0%}")
    else:
        goal(GPTQ_GOAL, None, "not measured")
    ram = load_json(out / "ram_tier.json")
    ours = [r for r in (ram or {}).get("rows", []) if r["runtime"] == "specexec" and r["tier"] == "ram"]
    upto256 = [r for r in ours if r["tokens"] <= 256]
    if upto256:
        worst = min(upto256, key=lambda r: r["efficiency"])
        goal(RAM_GOAL, all(r["efficiency"] >= 0.85 for r in upto256),
             ", ".join(f"{r['tokens']}: {r['efficiency']:.0%}" for r in upto256)
             + f" (worst at {worst['tokens']})")
    else:
        goal(RAM_GOAL, None, "not measured")
    speed = (ram or {}).get("speedup_vs_accelerate") or []
    if speed:
        goal(ACCELERATE_GOAL, all(r["speedup"] >= 3 for r in speed),
             ", ".join(f"{r['tokens']} tokens: {r['speedup']:.1f}x" for r in speed))
    else:
        goal(ACCELERATE_GOAL, None, "not measured")
    exact = next((s for s in steps if s.name == "exactness-16bit"), None)
    if exact is not None and exact.status in ("ok", "failed"):
        goal(EXACT_GOAL, exact.status == "ok", exact.detail)
    else:
        goal(EXACT_GOAL, None, "not measured")
    if g70 and g70.get("specexec", {}).get("rows"):
        best = max(g70["specexec"]["rows"], key=lambda r: r["tok_s"])
        scaled = UMBRELLA_TOK_S * g70["h2d_bandwidth"] / UMBRELLA_LINK
        goal(PREDICTION, None,
             f"{best['tok_s']:.2f} tok/s at budget {best['budget']} "
             f"(acceptance: {g70['specexec']['curve']}); "
             f"UMbreLLa scaled to {g70['h2d_bandwidth'] / 1e9:.1f} GB/s: {scaled:.1f} tok/s")
    return goals


# --- the report -----------------------------------------------------------------------------------------


class Report:
    """summary.json and summary.md, rewritten atomically whenever something changes."""

    def __init__(self, out: Path, args: argparse.Namespace, steps: list[Step]) -> None:
        self.out, self.args, self.steps = out, args, steps
        self.started = time.time()

    def write(self, finished: bool = False) -> None:
        probe = load_json(self.out / "probe.json") or {}
        data = {
            "device": self.args.device, "smoke": self.args.smoke, "deadline_s": self.args.deadline,
            "elapsed_s": round(time.time() - self.started, 1), "finished": finished, "probe": probe,
            "steps": [{"step": s.name, "status": s.status, "exit_code": s.exit_code,
                       "seconds": None if s.seconds is None else round(s.seconds, 1),
                       "estimate_s": s.estimate_s, "detail": s.detail} for s in self.steps],
            "goals": judge(self.out, self.steps),
        }
        atomic_write(self.out / "summary.json", json.dumps(data, indent=2) + "\n")
        atomic_write(self.out / "summary.md", markdown(data, self.out))


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def md_table(header: list[str], rows: list[list[object]]) -> list[str]:
    """The lines of a markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def rates(result: dict) -> str:
    """Every copy rate a benchmark measured ('cudaHostRegister 24.1 GB/s, pin_memory 23.0 GB/s')."""
    measured = result.get("copy_bandwidths") or {}
    return "measured: " + ", ".join(f"{kind} {rate / 1e9:.2f} GB/s" for kind, rate in measured.items())


def markdown(data: dict, out: Path) -> str:
    probe = data["probe"]
    where = probe.get("device") or ("no CUDA device" if data["device"] == "cuda" else "CPU")
    lines = [f"# GPU check: {where}{' (SMOKE: toy sizes)' if data['smoke'] else ''}", "",
             f"torch {probe.get('torch')} (CUDA {probe.get('cuda_version')}), triton {probe.get('triton')}, "
             f"transformers {probe.get('transformers')}, accelerate {probe.get('accelerate')}; "
             f"{data['elapsed_s']} s of a {data['deadline_s']} s deadline"
             f"{'' if data['finished'] else ' (still running, or cut short)'}", ""]
    lines += md_table(["step", "status", "seconds", "detail"],
                      [[s["step"], s["status"], "-" if s["seconds"] is None else s["seconds"],
                        s["detail"] or ""] for s in data["steps"]])
    verdict = {True: "yes", False: "NO", None: "-"}
    lines += ["", "## Goals", ""]
    lines += md_table(["goal", "met", "measured"],
                      [[g["goal"], verdict[g["met"]], g["measured"]] for g in data["goals"]])
    g70 = load_json(out / "gptq70b.json")
    if g70 and g70.get("passes"):
        lines += ["", f"## GPTQ 70B-shaped, streamed from pinned RAM ({g70['layers_measured']} layers "
                  f"scaled to {g70['layers_scaled_to']}; floor from {g70['bandwidth_kind']} "
                  f"{g70['h2d_bandwidth'] / 1e9:.2f} GB/s; {rates(g70)}; dequant in passes: "
                  f"{g70['dequant_in_passes']})", ""]
        lines += md_table(["tokens", "pass s (80 layers)", "floor s", "efficiency"],
                          [[p["tokens"], f"{p['seconds_80']:.3f}", f"{p['floor_seconds_80']:.3f}",
                            f"{p['efficiency']:.0%}"] for p in g70["passes"]])
        d = g70["dequant_per_layer"]
        triton = f"{d['triton_s'] * 1e3:.2f} ms" if d.get("triton_s") is not None else "n/a"
        lines += ["", f"Dequantization per layer: torch {d['torch_s'] * 1e3:.2f} ms, Triton {triton}, "
                  f"same bits: {d.get('triton_equals_torch')}", ""]
        lines += md_table(["budget", "G(K)", "target s", "draft s", "predicted tok/s"],
                          [[r["budget"], f"{r['G']:.2f}", f"{r['target_s']:.3f}", f"{r['draft_s']:.3f}",
                            f"{r['tok_s']:.2f}"] for r in g70["specexec"]["rows"]])
    ram = load_json(out / "ram_tier.json")
    if ram and ram.get("rows"):
        lines += ["", f"## RAM tier ({ram['shape']}, {ram['layers']} layers, {ram['dtype']}; "
                  f"floor from {ram['copy_kind']} {ram['copy_bandwidth'] / 1e9:.2f} GB/s; {rates(ram)})", ""]
        rows = []
        for r in ram["rows"]:
            floor = f"{r['floor_seconds']:.3f}" if r.get("floor_seconds") is not None else "-"
            eff = f"{r['efficiency']:.0%}" if r.get("efficiency") is not None else "-"
            name = f"{r['runtime']} {r['tier']}" + (f" ({r['case']})" if r.get("case") else "")
            rows.append([name, r["tokens"], f"{r['seconds']:.3f}", floor, eff])
        lines += md_table(["runtime", "tokens", "forward s", "floor s", "efficiency"], rows)
    return "\n".join(lines) + "\n"


# --- running ----------------------------------------------------------------------------------------------


class Stopped(Exception):
    def __init__(self, signum: int) -> None:
        self.signum = signum


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in OUT_FILES:  # a previous run's files would be read as this run's results
        (out / name).unlink(missing_ok=True)
    steps = build_steps(args, out)
    report = Report(out, args, steps)
    deadline = report.started + args.deadline
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": path}
    if args.device == "cuda":
        env["SPECEXEC_TEST_DEVICE"] = "cuda"
    # Triton's compiled kernels go into the work folder: writable whatever the home folder is, and
    # kept for a rerun on the same machine
    env.setdefault("TRITON_CACHE_DIR", str(Path(args.workdir) / "triton-cache"))
    child: list[subprocess.Popen] = []

    def stop(signum, _frame):
        raise Stopped(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    report.write()
    failed = False
    with open(out / "log.txt", "a", buffering=1) as log:
        try:
            for i, step in enumerate(steps):
                left = deadline - time.time()
                if step.estimate_s > left:
                    step.status = "skipped"
                    step.detail = f"needs ~{step.estimate_s} s, {max(0, int(left))} s left"
                    report.write()
                    continue
                log.write(f"\n== {step.name}: {' '.join(step.command)[:400]}\n")
                step.status, start = "running", time.time()
                report.write()
                proc = subprocess.Popen(step.command, cwd=ROOT, env={**env, **step.env}, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                child[:] = [proc]
                try:
                    step.exit_code = proc.wait(timeout=max(1.0, left))
                    step.status = "ok" if step.exit_code == 0 else "failed"
                except subprocess.TimeoutExpired:
                    kill(proc)
                    step.status, step.detail = "timeout", "stopped at the deadline"
                child.clear()
                step.seconds = time.time() - start
                log.flush()
                if step.status != "timeout":
                    step.detail = pytest_detail(tail(out / "log.txt", start_marker=f"== {step.name}:"))
                failed |= step.status != "ok"
                if step.name == "probe" and step.exit_code == EXIT_NO_CUDA:
                    step.detail = "no CUDA device"
                    for later in steps[i + 1:]:
                        later.status, later.detail = "not run", "no CUDA device"
                    report.write(finished=True)
                    print("gpu_check: no CUDA device (torch.cuda.is_available() is False); see "
                          f"{out / 'summary.md'}", file=sys.stderr)
                    return EXIT_NO_CUDA
                report.write()
                log.write(f"== {step.name}: {step.status} in {step.seconds:.1f} s\n")
        except Stopped as stopped:
            for proc in child:
                kill(proc)
            for step in steps:
                if step.status == "running":
                    step.status, step.detail = "killed", f"signal {stopped.signum}"
                elif step.status == "pending":
                    step.status = "not run"
            report.write(finished=True)
            return 128 + stopped.signum
    report.write(finished=True)
    print((out / "summary.md").read_text())
    return 1 if failed else 0


def kill(proc: subprocess.Popen) -> None:
    """Stop a step and everything it started (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def tail(path: Path, start_marker: str) -> str:
    text = path.read_text(errors="replace")
    at = text.rfind(start_marker)
    return text[at:] if at >= 0 else text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu-check-out", help="output folder (at most 8 files) [gpu-check-out]")
    p.add_argument("--deadline", type=float, default=420, help="seconds for the whole check [420]")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "specexec-gpu-check"),
                   help="where the benchmarks' random checkpoints are written and reused [$TMPDIR/"
                   "specexec-gpu-check]")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--smoke", action="store_true", help="toy sizes (with --device cpu: the script's test)")
    p.add_argument("--steps", default=None, help="comma-separated subset of the steps, in their order")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run(parse_args()))
