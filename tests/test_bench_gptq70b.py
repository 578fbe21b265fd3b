"""scripts/bench_gptq70b.py: its CPU smoke run end to end (random GPTQ checkpoint -> offloaded runtime ->
timed passes -> cost model), its layer count from a RAM budget, and its acceptance-curve files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_gptq70b as bench  # noqa: E402
from random_gptq import LLAMA_70B, SMOKE, linear_shapes, streamed_layer_bytes  # noqa: E402

from specexec_cli.tuning import cost_model as cm  # noqa: E402


def test_cpu_smoke_run(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_gptq70b.py"), "--device", "cpu", "--layers", "2",
           "--smoke", "--out", str(out), "--workdir", str(tmp_path / "work")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| tokens | measured s |" in result.stdout and "expected tok/s" in result.stdout
    r = json.loads(out.read_text())
    assert r["smoke"] and r["layers_measured"] == 2 and r["layers_scaled_to"] == 80
    assert r["dequant_in_passes"] == "torch"  # CPU: never the Triton kernel
    tensors = 3 * len(linear_shapes(SMOKE)) + 2  # trivial g_idx is not streamed
    assert 0 <= r["layer_bytes"] - streamed_layer_bytes(SMOKE) <= 256 * tensors
    assert [p["tokens"] for p in r["passes"]] == [1, 8]
    for p in r["passes"]:
        assert p["seconds_80"] > p["seconds_measured"] > 0
        assert p["streamed_bytes_80"] == 80 * r["layer_bytes"]
        assert p["efficiency"] == pytest.approx(p["floor_seconds_80"] / p["seconds_80"])
    d = r["dequant_per_layer"]
    assert d["weights"] == 7 and d["torch_s"] > 0 and d["triton_s"] is None
    s = r["specexec"]
    assert "prior" in s["curve"] and [row["budget"] for row in s["rows"]] == [4, 16]
    for row in s["rows"]:
        assert row["tok_s"] == pytest.approx(row["G"] / (row["target_s"] + row["draft_s"] + s["host_s"]))


def test_70b_layer_size():
    # 856M weights at 4 bits + group-128 scales and zeros: ~0.44 GB per layer, ~35.6 GB for 80
    params = sum(o * i for _, o, i in linear_shapes(LLAMA_70B))
    assert params == 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672
    assert 0.44e9 < streamed_layer_bytes(LLAMA_70B) < 0.45e9


def test_layers_from_the_host_budget(tmp_path):
    args = bench.parse_args(["--host-gib", "1"])
    n, why = bench.choose_layers(args, 300 << 20, tmp_path)
    assert n == 3 and "host budget 1.0 GiB" in why
    assert bench.choose_layers(bench.parse_args(["--host-gib", "1000"]), 1 << 20, tmp_path)[0] == 80
    assert bench.choose_layers(bench.parse_args(["--layers", "5"]), 1 << 40, tmp_path)[0] == 5
    with pytest.raises(SystemExit, match="one layer needs"):
        bench.choose_layers(bench.parse_args(["--host-gib", "0.1"]), 1 << 30, tmp_path)


def test_curve_files(tmp_path):
    curve, label = bench.load_curve(None, None)
    assert curve == cm.AcceptanceCurve.prior() and "not measured" in label
    plain = tmp_path / "c.json"
    plain.write_text(json.dumps({"values": [1.0, 1.5, 2.0]}))
    assert bench.load_curve(str(plain), None)[0].values == (1.0, 1.5, 2.0)
    tuned = ROOT / "docs" / "data" / "bench_tune_cpu.json"
    curve, label = bench.load_curve(str(tuned), None)
    assert label.endswith("[qwen2.5-coder-0.5b]") and curve.at(16) > 2
    with pytest.raises(SystemExit, match="no curve for draft"):
        bench.load_curve(str(tuned), "nope")
