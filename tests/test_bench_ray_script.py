"""scripts/bench_ray.py: the driver's summary line it reads and its table (no Ray), and a whole run with
1 and 2 workers on tiny models (slow: two local clusters)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script, save_tiny_cli_pair

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_ray.py"


def test_the_summary_line_of_the_driver_is_read() -> None:
    stderr = ("ray: worker w1 ready ...\nray: 16 of 16 prompts on 2 worker(s), 493 new tokens in 87.56 s "
              "from the first worker ready (5.63 tok/s)\n")
    script = load_script("bench_ray")
    assert script.parse_summary(stderr) == {"finished": 16, "prompts": 16, "workers_ready": 2,
                                            "new_tokens": 493, "seconds": 87.56}
    with_counts = stderr.replace("2 worker(s),", "2 worker(s) (w1 9, w2 7),")
    assert script.parse_summary(with_counts) == script.parse_summary(stderr)
    with pytest.raises(RuntimeError, match="no summary line"):
        script.parse_summary("ray: starting 2 worker(s)\n")


def test_the_table_gives_ratios_against_the_first_count() -> None:
    rows = [{"workers": 1, "prompts": 4, "prompts_per_worker": [4], "new_tokens": 40, "seconds": 10.0,
             "tokens_per_s": 4.0, "wall_s": 30.0},
            {"workers": 2, "prompts": 4, "prompts_per_worker": [2, 2], "new_tokens": 40, "seconds": 5.0,
             "tokens_per_s": 8.0, "wall_s": 20.0}]
    table = load_script("bench_ray").table(rows)
    assert "| 2 | 4 | 2/2 | 40 | 5.0 | 8.00 | 2.00 | 20.0 | 1.50 |" in table


@pytest.mark.slow
def test_a_whole_run_on_tiny_models(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    save_tiny_cli_pair(tmp_path, positions=512)
    out = tmp_path / "rows.jsonl"
    result = subprocess.run([sys.executable, str(SCRIPT), "--workers", "1,2", "--n-prompts", "4",
                             "--max-new-tokens", "6", "--out", str(out), "--", "-t", str(tmp_path / "target"),
                             "-d", str(tmp_path / "draft"), "--no-chat-template"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["workers"] for row in rows] == [1, 2]
    assert all(row["finished"] == 4 and row["same_outputs"] for row in rows)
    assert sum(rows[1]["prompts_per_worker"]) == 4
    assert result.stdout.startswith("| workers |")
