"""Faults that lose nothing: signals in a batch, killed or concurrent conversions and tuning runs,
concurrent profile writes, a full disk and a damaged model folder. Processes are real subprocesses
(`python -m specexec_cli`, tests/fault_drivers.py) where the fault is a signal or a race."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import save_tiny_cli_pair
from fault_drivers import FakeModel, fake_modules, folder_is_complete

from specexec_cli.cli import main
from specexec_cli.errors import SpecexecError

ROOT = Path(__file__).resolve().parents[1]
DRIVER = [sys.executable, str(Path(__file__).with_name("fault_drivers.py"))]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def start(command: list[str], **kwargs) -> subprocess.Popen:
    """A child with default SIGINT handling even when the test runner ignores SIGINT (background jobs)."""
    return subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def wait_for(condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_tiny_cli_pair(root)
    return root


# --- signals in the middle of a batch ---------------------------------------------------------


@pytest.mark.parametrize("signum,code,word", [(signal.SIGINT, 130, "interrupted"),
                                              (signal.SIGTERM, 143, "terminated")])
def test_signal_mid_batch_keeps_finished_results(model_dirs, tmp_path, signum, code, word):
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps({"id": i, "prompt": f"w{i + 4} w2"}) + "\n" for i in range(300)))
    child = start([sys.executable, "-m", "specexec_cli", "generate", "--target", str(model_dirs / "target"),
                   "--draft", str(model_dirs / "draft"), "--no-profile", "-n", "24", "--json",
                   "-f", str(batch)])
    first = child.stdout.readline()  # one result is out: the batch is running
    child.send_signal(signum)
    rest, stderr = child.communicate(timeout=120)
    lines = [first, *rest.splitlines(keepends=True)]
    records = [json.loads(line) for line in lines]
    assert child.returncode == code, stderr.decode()
    assert [r["id"] for r in records] == [str(i) for i in range(len(records))]
    assert 1 <= len(records) < 300 and all(line.endswith(b"\n") for line in lines)
    text = stderr.decode()
    assert "Traceback" not in text and text.strip().splitlines()[-1] == word


def test_sigterm_handler_is_installed_only_while_a_command_runs():
    before = signal.getsignal(signal.SIGTERM)
    import specexec_cli.run  # noqa: F401 - importing the library installs nothing

    assert signal.getsignal(signal.SIGTERM) is before
    assert CliRunner().invoke(main, ["models", "--json"]).exit_code == 0
    assert signal.getsignal(signal.SIGTERM) is before


# --- conversion: killed, concurrent, disk full -------------------------------------------------


def temp_dirs(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(".model.converting-")]


def test_conversion_killed_midway_leaves_no_half_folder(tmp_path):
    dest = tmp_path / "cache" / "model"
    slow = start([*DRIVER, "convert", str(dest), "0.5"])
    wait_for(lambda: dest.parent.is_dir() and any(any(p.iterdir()) for p in temp_dirs(dest.parent)),
             what="the conversion to start writing")
    slow.kill()
    slow.wait(timeout=30)
    assert not dest.exists() and temp_dirs(dest.parent)  # the half-written folder is only a temp dir
    again = subprocess.run([*DRIVER, "convert", str(dest), "0"], env=env(), capture_output=True, timeout=120)
    assert again.returncode == 0 and b"converted" in again.stdout, again.stderr.decode()
    assert folder_is_complete(dest) and temp_dirs(dest.parent) == []  # the dead process's leftovers went


def test_two_conversions_at_once_both_succeed(tmp_path):
    dest = tmp_path / "cache" / "model"
    children = [start([*DRIVER, "convert", str(dest), "0.2"]) for _ in range(2)]
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0 and b"converted" in out, err.decode()
    assert folder_is_complete(dest) and temp_dirs(dest.parent) == []


def test_disk_full_while_converting_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    from specexec_cli.models import bundled

    for name, module in fake_modules().items():
        if name != "torch":  # the real torch serves: its float32 and device("meta") are all convert uses
            monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(FakeModel, "fail_after", 1)
    dest = tmp_path / "cache" / "model"
    with pytest.raises(SpecexecError) as caught:
        bundled.convert_gguf(Path("/nonexistent"), "fake.gguf", dest, {"model": "fake"})
    message = str(caught.value)
    assert f"no space left in {dest.parent}" in message and "needs about" in message and "\n" not in message
    assert list(dest.parent.iterdir()) == []


# --- tuning: killed, concurrent profile writes, disk full -------------------------------------


def test_killed_tune_resumes_without_repeating_finished_trials(tmp_path):
    db, log = tmp_path / "tune.db", tmp_path / "calls.jsonl"
    first = start([*DRIVER, "tune", str(db), str(log), "0.3", "6"])
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 3, what="three trials")
    first.kill()
    first.wait(timeout=30)
    before = log.read_text().splitlines()
    resumed = subprocess.run([*DRIVER, "tune", str(db), str(log), "0", "6"], env=env(), capture_output=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr.decode()
    after = log.read_text().splitlines()[len(before):]
    # a trial whose result was logged may not have been committed when the kill came: at most the
    # last one is measured again; every earlier finished trial is never repeated
    assert not set(before[:-1]) & set(after)
    assert len(set(before) | set(after)) == 6  # the 6 trials asked for, of the space's 7 candidates


def test_concurrent_profile_saves_leave_one_valid_file(tmp_path):
    writers = [start([*DRIVER, "save-profile", str(tmp_path), str(budget), "150"]) for budget in (3, 5)]
    seen = set()
    while any(w.poll() is None for w in writers):
        for path in tmp_path.glob("*.json"):
            try:
                seen.add(json.loads(path.read_text())["settings"]["budget"])
            except FileNotFoundError:
                pass
    for writer in writers:
        assert writer.wait() == 0, writer.stderr.read().decode()
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and json.loads(files[0].read_text())["settings"]["budget"] in (3, 5)
    assert seen <= {3, 5} and seen


def test_disk_full_while_saving_a_profile_keeps_the_old_one(tmp_path, monkeypatch):
    from specexec_cli import hardware, profiles

    profile = profiles.Profile(target="fake", settings={"budget": 4}, fingerprint="abc123")
    path = profiles.save_profile(profile, tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hardware.json, "dump", full)
    with pytest.raises(SpecexecError, match=f"no space left in {tmp_path}: writing profile .* needs about"):
        profiles.save_profile(profiles.Profile(target="fake", settings={"budget": 8}, fingerprint="abc123"),
                              tmp_path)
    assert json.loads(path.read_text())["settings"]["budget"] == 4
    assert list(tmp_path.iterdir()) == [path]


# --- a damaged model folder -------------------------------------------------------------------


@pytest.mark.parametrize("converted", [False, True])
def test_truncated_weights_are_detected_at_load(model_dirs, tmp_path, converted):
    import shutil

    from specexec_cli.models.bundled import MARKER_FILE

    folder = tmp_path / "target"
    shutil.copytree(model_dirs / "target", folder)
    if converted:
        (folder / MARKER_FILE).write_text("{}")
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 1000)
    result = CliRunner().invoke(main, ["generate", "--target", str(folder), "--draft", "none", "--method",
                                       "autoregressive", "--no-profile", "-p", "w1"])
    assert result.exit_code == 1 and result.stdout == ""
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: model folder {folder} is damaged: model.safetensors")
    assert "truncated" in error
    assert ("rm -r" in error) == converted and "Traceback" not in result.stderr


def test_interrupted_batch_writes_every_finished_result(model_dirs, tmp_path):
    """--batch-size 4: results held back for input order are written when Ctrl-C stops the run."""
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps({"id": i, "prompt": " ".join(f"w{4 + (i + k) % 50}" for k in range(
        1 + i % 9))}) + "\n" for i in range(300)))
    child = start([sys.executable, "-m", "specexec_cli", "generate", "--target", str(model_dirs / "target"),
                   "--draft", str(model_dirs / "draft"), "--no-profile", "-n", "24", "--json",
                   "--batch-size", "4", "-f", str(batch)])
    first = child.stdout.readline()
    child.send_signal(signal.SIGINT)
    rest, stderr = child.communicate(timeout=120)
    lines = [first, *rest.splitlines(keepends=True)]
    ids = [int(json.loads(line)["id"]) for line in lines]
    assert child.returncode == 130, stderr.decode()
    assert ids == sorted(set(ids)) and 1 <= len(ids) < 300 and all(line.endswith(b"\n") for line in lines)
    text = stderr.decode()
    assert "Traceback" not in text and text.strip().splitlines()[-1] == "interrupted"
