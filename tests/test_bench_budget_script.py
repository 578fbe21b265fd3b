"""scripts/bench_budget.py without models: its table, resumable rows, the PNG and its usage errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

from specexec_cli.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_budget.py"


def row(dataset, method, budget, temperature, tokens_per_pass):
    return {"dataset": dataset, "method": method, "budget": budget, "temperature": temperature,
            "draft_cost": 0.0, "n_prompts": 2, "max_new_tokens": 16, "tokens_per_pass": tokens_per_pass,
            "new_tokens": 32, "target_passes": 8, "draft_passes_per_iteration": 5.0, "elapsed_s": 1.0,
            "settings": "", "target": "t", "draft": "d"}


ROWS = [row("mtbench", "specexec", 16, 0.0, 3.0), row("mtbench", "specinfer", 16, 0.0, 2.0),
        row("mtbench", "specexec", 64, 0.0, 4.5), row("prose", "specexec", 64, 0.6, 5.0)]


def test_table_pairs_the_methods_of_each_budget():
    table = load_script("bench_budget").format_table(ROWS)
    assert "| mtbench | 0 | 16 | 3.00 | 2.00 | 1.50 | 5.0 |" in table
    assert "| mtbench | 0 | 64 | 4.50 | - | - | 5.0 |" in table
    assert "| prose | 0.6 | 64 | 5.00 | - | - | 5.0 |" in table


def test_rows_are_appended_and_read_back(tmp_path):
    script = load_script("bench_budget")
    out = tmp_path / "rows.jsonl"
    assert script.read_rows(out) == []
    for r in ROWS[:2]:
        script.append_row(out, r)
    again = script.read_rows(out)
    assert again == ROWS[:2]
    assert {script.row_key(r) for r in again} == {script.row_key(r) for r in ROWS[:2]}  # what a rerun skips


def test_plot_only_draws_a_png_from_the_rows(tmp_path):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "rows.jsonl", tmp_path / "curve.png"
    out.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    done = subprocess.run([sys.executable, str(SCRIPT), "--plot-only", "--out", str(out), "--png", str(png)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| mtbench | 0 | 16 | 3.00 | 2.00 | 1.50 |" in done.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_usage_errors_are_one_line(tmp_path):
    script = load_script("bench_budget")
    with pytest.raises(UsageError, match="--draft-cost"):
        script.parse_draft_cost("cheap")
    assert script.parse_draft_cost("measured") is None and script.parse_draft_cost("0.5") == 0.5
    done = subprocess.run([sys.executable, str(SCRIPT), "--plot-only", "--out", str(tmp_path / "none.jsonl")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: no rows")
    assert len(done.stderr.strip().splitlines()) == 1
