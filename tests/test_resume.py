"""`generate -f PROMPTS -o FILE --resume`: a job SIGKILLed mid-run and resumed ends with every input id
exactly once, in input order, with the texts of an uninterrupted run; a torn last line is redone; a file
that already holds results is not overwritten without --resume; ids must be unique; Batch API lines
resume too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from conftest import save_tiny_cli_pair

from specexec_cli.cli import main

N_PROMPTS = 200
FLAGS = ["--no-chat-template", "-n", "6", "--budget", "8", "--max-n-beams", "4", "--no-profile"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_models")
    save_tiny_cli_pair(root, positions=64)
    return root


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume_prompts") / "prompts.jsonl"
    lines = [json.dumps({"id": f"p{i:04d}", "prompt": f"w{i % 50 + 1} w{(7 * i) % 61 + 1}"})
             for i in range(N_PROMPTS)]
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(models, *args: str):
    return CliRunner().invoke(main, ["generate", "-t", str(models / "target"), "-d", str(models / "draft"),
                                     *FLAGS, *args])


def texts(path) -> list[tuple[str, str]]:
    return [(r["id"], r["text"]) for r in map(json.loads, path.read_text().splitlines())]


@pytest.fixture(scope="module")
def reference(models, prompts) -> list[tuple[str, str]]:
    """The uninterrupted run, on stdout."""
    result = cli(models, "-f", str(prompts), "--json")
    assert result.exit_code == 0, result.stderr
    return [(r["id"], r["text"]) for r in map(json.loads, result.stdout.splitlines())]


def test_a_job_killed_mid_run_resumes_to_every_id_once_in_input_order(models, prompts, reference, tmp_path):
    out = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "specexec_cli", "generate", "-t", str(models / "target"), "-d",
               str(models / "draft"), *FLAGS, "-f", str(prompts), "-o", str(out)]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 20):
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait(30)
    assert job.stdout.read() == b""  # results go to the file only
    done_before = out.read_text().count("\n")
    assert 20 <= done_before < N_PROMPTS, "the job must be killed mid-run"
    with open(out, "a") as file:  # what a kill during a write leaves: a torn last line
        file.write('{"id": "p9999", "text": "half')
    refused = cli(models, "-f", str(prompts), "-o", str(out))
    assert refused.exit_code == 2 and "--resume" in refused.stderr  # nothing overwritten
    resumed = cli(models, "-f", str(prompts), "-o", str(out), "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert "incomplete" in resumed.stderr and f"{done_before} of {N_PROMPTS}" in resumed.stderr
    assert resumed.stdout == ""
    assert texts(out) == reference  # every id once, in input order, the same texts
    again = cli(models, "-f", str(prompts), "-o", str(out), "--resume")  # a finished job runs nothing
    assert again.exit_code == 0 and "loading" not in again.stderr and texts(out) == reference


def test_unordered_output_keeps_the_finishing_order_and_ids_must_be_unique(models, tmp_path):
    source = tmp_path / "p.jsonl"
    source.write_text('{"id": "a", "prompt": "w1"}\n{"id": "b", "prompt": "w2"}\n')
    out = tmp_path / "o.jsonl"
    result = cli(models, "-f", str(source), "-o", str(out), "--unordered")
    assert result.exit_code == 0, result.stderr
    assert sorted(i for i, _ in texts(out)) == ["a", "b"]
    source.write_text('{"id": "a", "prompt": "w1"}\n{"id": "a", "prompt": "w2"}\n')
    duplicate = cli(models, "-f", str(source), "-o", str(tmp_path / "d.jsonl"))
    assert duplicate.exit_code == 2 and "repeated: 'a'" in duplicate.stderr
    assert cli(models, "-p", "w1", "--resume").exit_code == 2  # --resume needs -o


def test_batch_api_lines_resume_by_custom_id(models, tmp_path):
    def line(key: str, word: str) -> str:
        return json.dumps({"custom_id": key, "method": "POST", "url": "/v1/completions",
                           "body": {"model": "tiny", "prompt": word, "max_tokens": 4, "temperature": 0}})

    source = tmp_path / "batch.jsonl"
    source.write_text("\n".join(line(f"r{i}", f"w{i + 1}") for i in range(4)) + "\n")
    whole = cli(models, "-f", str(source))
    assert whole.exit_code == 0, whole.stderr
    expected = [json.loads(x)["response"]["body"]["choices"][0]["text"] for x in whole.stdout.splitlines()]
    out = tmp_path / "out.jsonl"
    first = json.loads(whole.stdout.splitlines()[1])  # as if the job had finished r1 before it was killed
    out.write_text(json.dumps(first) + "\n")
    resumed = cli(models, "-f", str(source), "-o", str(out), "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["custom_id"] for r in records] == ["r0", "r1", "r2", "r3"]
    assert [r["response"]["body"]["choices"][0]["text"] for r in records] == expected
