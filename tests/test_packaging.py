"""The installed package works anywhere: a wheel built from this checkout, installed into a folder of its
own, runs `specexec bench` (on tiny models) from an empty directory, with its prompt sets and starting
profiles coming from the package itself, not from the checkout or a sibling `shared/` folder."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import save_tiny_cli_pair

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_runs_bench_from_an_empty_directory(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("specexec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"specexec_cli/data/prompts/mtbench.json", "specexec_cli/data/prompts/oasst.json"} <= set(names)
    assert any(n.startswith("specexec_cli/data/profiles/") and n.endswith(".json") for n in names)
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                              str(site), str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    save_tiny_cli_pair(tmp_path / "models", positions=512)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1",
           "XDG_CONFIG_HOME": str(tmp_path / "config")}
    where = subprocess.run([sys.executable, "-c", "import specexec_cli; print(specexec_cli.__file__)"],
                           capture_output=True, text=True, cwd=empty, env=env, timeout=120)
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr  # not the checkout
    models = tmp_path / "models"
    bench = subprocess.run([sys.executable, "-m", "specexec_cli", "bench", "-t", str(models / "target"), "-d",
                            str(models / "draft"), "--n-prompts", "1", "-n", "4", "--budgets", "4",
                            "--methods", "specexec,autoregressive", "--no-assisted", "--temperature", "0",
                            "--draft-quant", "none"],
                           capture_output=True, text=True, cwd=empty, env=env, timeout=600)
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert "mtbench.json" in bench.stdout and "| specexec | 4 |" in bench.stdout
    assert "1/1" in bench.stdout  # SpecExec's greedy output equals plain decoding's
