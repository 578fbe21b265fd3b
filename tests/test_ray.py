"""`specexec generate --ray local` on a real local Ray cluster started by the command (2 CPU workers),
with tiny random models in folders: outputs equal the single-machine run (ids and text), a worker killed
mid-job loses and repeats nothing, Ctrl-C writes what finished and exits 130, a prompt that fails on every
worker is one line and exit 1. Every job here is bounded in prompts and time."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner
from conftest import save_tiny_cli_pair

from specexec_cli.cli import main

pytest.importorskip("ray")

JOB_TIMEOUT_S = 300
N_SMALL, N_LONG = 16, 120  # prompts of the short job and of the jobs interrupted mid-way
PIPE_BYTES = 4096  # the interrupted jobs' stdout pipe: about 10 result lines


def words(i: int, n: int) -> str:
    return " ".join(f"w{(i * 7 + j) % 50 + 2}" for j in range(n))


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """Tiny models (64 positions), prompt files, and the single-machine answers of the long file."""
    root = tmp_path_factory.mktemp("ray_job")
    save_tiny_cli_pair(root, positions=64)
    for name, count in (("small.jsonl", N_SMALL), ("long.jsonl", N_LONG)):
        with open(root / name, "w") as f:
            for i in range(count):
                f.write(json.dumps({"id": f"p{i}", "prompt": words(i, 1 + i % 5)}) + "\n")
    return root


def model_flags(root: Path, tokens: int) -> list[str]:
    return ["-t", str(root / "target"), "-d", str(root / "draft"), "-n", str(tokens), "--no-chat-template"]


def single_machine(root: Path, prompts: str, tokens: int, *flags: str) -> str:
    command = ["generate", "-f", str(root / prompts), *model_flags(root, tokens), *flags]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    return result.stdout


def ray_command(root: Path, prompts: str, tokens: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "specexec_cli", "generate", "-f", str(root / prompts),
            *model_flags(root, tokens), "--ray", "local", "--ray-workers", "2", *flags]


def by_id(lines: list[str]) -> dict[str, dict]:
    records = [json.loads(line) for line in lines]
    ids = [record["id"] for record in records]
    assert len(ids) == len(set(ids)), "a result was written twice"
    return {record["id"]: record for record in records}


@pytest.fixture(scope="module")
def long_reference(job: Path) -> dict[str, dict]:
    return by_id(single_machine(job, "long.jsonl", 24, "--json").splitlines())


@pytest.fixture(scope="module")
def small_reference(job: Path) -> dict[str, dict]:
    return by_id(single_machine(job, "small.jsonl", 16, "--json").splitlines())


def faulty_job(root: Path, faults: Path, *switches: str, **env: str) -> subprocess.CompletedProcess:
    """A greedy job of the small file with test-only fault switches on (specexec_cli/cluster/faults.py)."""
    faults.mkdir(exist_ok=True)
    for switch in switches:
        (faults / switch).touch()
    environment = {**os.environ, "SPECEXEC_TEST_FAULTS": str(faults), **env}
    return subprocess.run(ray_command(root, "small.jsonl", 16, "--json"), capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S, env=environment)


def ray_processes_since(start: float) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["name", "create_time", "cmdline"]):
        try:
            text = " ".join(process.info["cmdline"] or []) + " " + (process.info["name"] or "")
            if process.info["create_time"] >= start - 1 and re.search(r"raylet|gcs_server|ray::", text):
                found.append(process)
        except psutil.Error:
            continue
    return found


def default_sigint() -> None:
    """In the child: SIGINT as a terminal's program has it. A test run started in the background of a
    non-interactive shell (`pytest &`, as CI may do) ignores SIGINT, and the child would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class RayJob:
    """A `generate --ray local` job in a subprocess of its own session. Its stdout is a pipe of one page,
    read unbuffered line by line: while the test does not read, the driver blocks writing a result, sends
    no more work, and the job cannot run ahead of the test (on a fast machine it would finish before a
    signal arrives)."""

    def __init__(self, command: list[str], stderr: Path) -> None:
        self.started = time.time()
        self.stderr_path = stderr
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=open(stderr, "w"), bufsize=0,
                                        start_new_session=True, preexec_fn=default_sigint)
        fcntl.fcntl(self.process.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def worker_pids(self) -> list[int]:
        return [int(pid) for pid in re.findall(r"ray: worker w\d ready on \S+ \(actor \w+, pid (\d+)\)",
                                               self.stderr())]

    def read_until(self, lines: list[str], count: int) -> None:
        """Read result lines until `count` are in (the other worker may still be opening its engine)."""
        while len(lines) < count:
            line = self.process.stdout.readline()  # one byte at a time: nothing read ahead
            if not line:
                raise AssertionError("the job ended early:\n" + self.stderr())
            lines.append(line.decode())
            assert time.time() - self.started < JOB_TIMEOUT_S
        assert self.worker_pids(), self.stderr()

    def finish(self, lines: list[str]) -> int:
        lines += self.process.stdout.read().decode().splitlines(keepends=True)
        return self.process.wait(timeout=JOB_TIMEOUT_S)


def test_outputs_equal_the_single_machine_run_in_input_order(job: Path, tmp_path: Path) -> None:
    """Seeded sampling: every prompt draws as `generate --seed` draws it on one machine (greedy is checked
    by the tests below)."""
    sampling = ["--temperature", "0.9", "--seed", "7"]
    reference = single_machine(job, "small.jsonl", 16, "--json", *sampling).splitlines()
    result = subprocess.run(ray_command(job, "small.jsonl", 16, "--json", *sampling), capture_output=True,
                            text=True, timeout=JOB_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    expected = [json.loads(line) for line in reference]
    got = [json.loads(line) for line in lines]  # stdout holds only results: every line parses
    assert [r["id"] for r in got] == [r["id"] for r in expected]
    assert [r["text"] for r in got] == [r["text"] for r in expected]
    for record in got:
        assert set(record["worker"]) == {"node", "actor"} and record["worker"]["actor"]
    assert len({record["worker"]["actor"] for record in got}) == 2  # both workers finished prompts
    summary = re.search(rf"ray: {N_SMALL} of {N_SMALL} prompts on 2 worker\(s\) \(w1 (\d+), w2 (\d+)\)",
                        result.stderr)
    assert summary and int(summary.group(1)) + int(summary.group(2)) == N_SMALL, result.stderr
    assert int(summary.group(1)) > 0 and int(summary.group(2)) > 0


def test_text_output_without_a_prompt_that_fails_everywhere(job: Path, tmp_path: Path) -> None:
    """A prompt too long for the model fails on both workers: one error line, the others written in
    order as the single-machine run writes them, exit 1."""
    prompts = [{"id": f"q{i}", "prompt": words(i, 70 if i == 3 else 1 + i % 4)} for i in range(8)]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(p) + "\n" for p in prompts if p["id"] != "q3"))
    reference = CliRunner().invoke(main, ["generate", "-f", str(good), *model_flags(job, 12)])
    assert reference.exit_code == 0
    command = [sys.executable, "-m", "specexec_cli", "generate", "-f", str(tmp_path / "bad.jsonl"),
               *model_flags(job, 12), "--ray", "local", "--ray-workers", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert result.returncode == 1, result.stderr
    assert result.stdout == reference.stdout
    failures = [line for line in result.stderr.splitlines() if line.startswith("error: prompt q3 failed")]
    assert len(failures) == 1 and "exceeds the model's context of 64" in failures[0]
    assert "error: 1 of 8 prompts failed (q3)" in result.stderr


def test_a_worker_killed_mid_job_loses_and_repeats_nothing(job: Path, long_reference, tmp_path: Path) -> None:
    run = RayJob(ray_command(job, "long.jsonl", 24, "--json", "--unordered"), tmp_path / "stderr")
    lines: list[str] = []
    run.read_until(lines, 10)
    os.kill(run.worker_pids()[0], signal.SIGKILL)  # a worker with results out and prompts in hand
    assert run.finish(lines) == 0, run.stderr()
    got = by_id(lines)  # no id twice
    assert set(got) == set(long_reference)  # none lost
    assert all(got[key]["text"] == long_reference[key]["text"] for key in got)
    died = re.search(r"ray: worker w\d died \(.*\); replaced by w3; (\d+) unfinished prompt\(s\) go to the "
                     r"other workers", run.stderr())
    assert died and int(died.group(1)) >= 1, run.stderr()  # the retry path really ran
    assert len({record["worker"]["actor"] for record in got.values()}) >= 2  # w3 may have joined


@pytest.mark.slow  # a local cluster each, ~15 s: with the slow tests so the default suite stays near 8.5 min
def test_a_failed_exchange_call_is_sent_again_once(job: Path, small_reference, tmp_path: Path) -> None:
    """An exchange that raises (not the actor dying) is resent; the worker is not counted dead."""
    result = faulty_job(job, tmp_path / "faults", "exchange-error")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "faults" / "exchange-error").exists()  # the fault really fired
    resent = r"ray: an exchange with worker w\d failed \(.*injected: a transient error.*\); sending"
    assert re.search(resent, result.stderr), result.stderr
    assert "died" not in result.stderr and "this is a bug" not in result.stderr
    got = by_id(result.stdout.splitlines())
    assert list(got) == list(small_reference)
    assert all(got[key]["text"] == small_reference[key]["text"] for key in got)


@pytest.mark.slow  # a local cluster each, ~15 s: with the slow tests so the default suite stays near 8.5 min
def test_a_hung_worker_is_killed_and_replaced(job: Path, small_reference, tmp_path: Path) -> None:
    """One worker's engine pass sleeps (a stuck engine) while its exchange calls keep answering: past the
    hang bound (a floor of 3 s here) it is killed and replaced, and its prompts run on the others; every
    id once, texts equal to the single-machine run."""
    started = time.monotonic()
    result = faulty_job(job, tmp_path / "faults", "hang-pass", SPECEXEC_RAY_HUNG_S="3")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "faults" / "hang-pass").exists()  # the fault really fired
    hung = re.search(r"ray: worker (w\d) hung \(no pass finished in \d+ s, over its bound of 3 s\) and was "
                     r"killed; replaced by w3; (\d+) unfinished prompt\(s\) go to the other workers",
                     result.stderr)
    assert hung and int(hung.group(2)) >= 1, result.stderr
    assert f"ray: 1 worker(s) replaced ({hung.group(1)} hung); the job's limit is 4" in result.stderr
    got = by_id(result.stdout.splitlines())
    assert list(got) == list(small_reference)
    assert all(got[key]["text"] == small_reference[key]["text"] for key in got)
    assert time.monotonic() - started < 120  # not the hung pass's 600 s


@pytest.mark.slow  # a local cluster each, ~15 s: with the slow tests so the default suite stays near 8.5 min
def test_workers_that_always_crash_end_the_job_at_the_replacement_limit(job: Path, tmp_path: Path) -> None:
    """Every worker's process exits at its first pass: two are replaced (the limit set here), then the job
    ends with every prompt given up and one line saying why, exit 1, instead of a loop."""
    result = faulty_job(job, tmp_path / "faults", "crash-pass", SPECEXEC_RAY_MAX_REPLACEMENTS="2")
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len([line for line in lines if re.match(r"ray: worker w\d died .*; replaced by w\d", line)]) == 2
    assert any("not replaced (the job's limit of 2 is reached)" in line for line in lines), result.stderr
    assert re.search(r"\nray: no Ray worker left after 2 replacement\(s\), the job's limit; \d+ unfinished "
                     r"prompt\(s\) given up\n", result.stderr), result.stderr
    assert re.search(r"ray: 2 worker\(s\) replaced \(w\d died, w\d died\); the job's limit is 2",
                     result.stderr)
    assert any(line.startswith(f"error: {N_SMALL} of {N_SMALL} prompts failed (p0, ") for line in lines)


def test_ctrl_c_writes_what_finished_and_exits_130(job: Path, long_reference, tmp_path: Path) -> None:
    run = RayJob(ray_command(job, "long.jsonl", 24, "--json", "--unordered"), tmp_path / "stderr")
    lines: list[str] = []
    run.read_until(lines, 10)
    os.killpg(run.process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    assert run.finish(lines) == 130, run.stderr()
    got = by_id(lines)
    assert 10 <= len(got) < N_LONG // 2  # the pipe held the driver back
    assert all(got[key]["text"] == long_reference[key]["text"] for key in got)
    assert run.stderr().rstrip().endswith("interrupted")
    deadline = time.time() + 30
    while ray_processes_since(run.started) and time.time() < deadline:
        time.sleep(0.5)
    assert not ray_processes_since(run.started), "the local cluster outlived the driver"


def test_a_cluster_address_that_does_not_answer_is_one_line(job: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "specexec_cli", "generate", "-p", "w1",
                             *model_flags(job, 4), "--ray", "127.0.0.1:9"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "no Ray cluster answers at 127.0.0.1:9" in result.stderr


def test_workers_that_cannot_open_the_engine_end_the_job_in_one_line(job: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "specexec_cli", "generate", "-p", "w1", "-t",
                             str(job / "missing"), "-d", str(job / "draft"), "--ray", "local"],
                            capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert result.returncode == 2 and result.stdout == ""  # bad input on every worker: a usage error
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    missing = job / "missing"
    assert errors == [f"error: no Ray worker could open the engine: no such file or folder: {missing}"]


@pytest.mark.slow
def test_a_job_whose_worker_and_driver_are_killed_resumes_to_every_id_once(job: Path, tmp_path: Path) -> None:
    """`-o FILE` with --ray: a 2,000-prompt job loses a worker to SIGKILL, then the whole driver session
    (driver, its local cluster, its workers) is SIGKILLed; `--resume` finishes it: every id exactly once,
    in input order, texts equal to the single-machine run."""
    prompts = tmp_path / "many.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"m{i}", "prompt": words(i, 1 + i % 5)}) + "\n"
                               for i in range(2000)))
    out = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "specexec_cli", "generate", "-f", str(prompts), *model_flags(job, 4),
               "--ray", "local", "--ray-workers", "2", "-o", str(out)]
    stderr = tmp_path / "stderr"
    started = time.time()
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(stderr, "w"),
                              start_new_session=True)
    try:
        resume_after_kills(driver, command, out, stderr, prompts, job)
    finally:
        for process in ray_processes_since(started):  # a cluster the killed driver left behind
            with contextlib.suppress(psutil.Error):
                process.kill()


def resume_after_kills(driver: subprocess.Popen, command: list[str], out: Path, stderr: Path, prompts: Path,
                       job: Path) -> None:
    """Kill a worker, then the driver's whole session, mid-job; resume; check the output file."""

    def lines() -> int:
        return out.read_text().count("\n") if out.exists() else 0

    def wait_for(count: int) -> None:
        deadline = time.time() + JOB_TIMEOUT_S
        while lines() < count:
            assert driver.poll() is None, "the job ended early:\n" + stderr.read_text()
            assert time.time() < deadline, stderr.read_text()
            time.sleep(0.02)

    wait_for(50)
    pids = [int(pid) for pid in re.findall(r"ray: worker w\d ready on \S+ \(actor \w+, pid (\d+)\)",
                                           stderr.read_text())]
    os.kill(pids[0], signal.SIGKILL)
    wait_for(lines() + 50)
    os.killpg(driver.pid, signal.SIGKILL)  # the machine's view of a reboot: nothing of the job runs on
    driver.wait(30)
    done_before = lines()
    assert done_before < 2000, "the job must be killed mid-run"
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == ""
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [f"m{i}" for i in range(2000)]  # every id once, in input order
    alone = CliRunner().invoke(main, ["generate", "-f", str(prompts), *model_flags(job, 4), "--json"])
    assert alone.exit_code == 0
    assert [r["text"] for r in records] == [json.loads(x)["text"] for x in alone.stdout.splitlines()]
