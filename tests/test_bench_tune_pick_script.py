"""scripts/bench_tune_pick.py without running models: held-out prompts leave out the tuner's calibration
prompts, and the grid around a profile holds plain decoding and every draft candidate at budgets /4 ..
x4 of the pick, under the profile's caps and placement tier, with no profile applied."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_script

pytest.importorskip("optuna")  # the script reads the tuner's default space


def test_held_out_prompts_are_not_calibration_prompts(tmp_path):
    bench = load_script("bench_tune_pick")
    from specexec_cli.tuning.prompt_set import packaged_prompts

    calibration = [p.text for p in packaged_prompts()]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one.write_text(json.dumps([[0, calibration[0]], [1, "a new question"], [2, calibration[2]],
                               [3, "another one"]]))
    two.write_text(json.dumps([[0, "first of two"], [1, calibration[1]], [2, "second of two"]]))
    assert bench.held_out_prompts([one, two], 3) == ["a new question", "first of two", "another one"]
    with pytest.raises(SystemExit):
        bench.held_out_prompts([one, two], 5)


def test_the_grid_surrounds_the_pick_under_the_same_caps():
    bench = load_script("bench_tune_pick")
    from specexec_cli import profiles

    assert bench.budgets_around(16) == [4, 8, 16, 32, 64] and bench.budgets_around(2) == [1, 2, 4, 8]
    settings = {"method": "specexec", "draft": "qwen2.5-coder-0.5b", "draft_quant": "int8", "budget": 32,
                "max_n_beams": 16, "quantization": "fp32", "offload": "disk", "max_memory": ["cpu=5GiB"]}
    profile = profiles.Profile("qwen2.5-coder-1.5b", settings)
    points = bench.grid("qwen2.5-coder-1.5b", settings, profile, torch.device("cpu"))
    assert points[0].request.method == "autoregressive"
    spec = points[1:]
    drafts = {(p.request.draft, p.request.draft_quant) for p in spec}
    assert drafts == {("qwen2.5-coder-0.5b", "none"), ("qwen2.5-coder-0.5b", "int8"),
                      ("first-layers:4", "none")}
    assert sorted({p.request.budget for p in spec}) == [8, 16, 32, 64, 128]
    assert len(spec) == 3 * 5
    for point in points:
        request = point.request
        assert request.max_memory == ("cpu=5GiB",) and request.offload == "disk" and not request.use_profile
        assert request.quant == "fp32" and request.batch_size == 1
    assert all(p.request.max_n_beams == 16 for p in spec)
    # plain decoding picked: the grid centres on the best speculative budget the tune measured
    plain = {"method": "autoregressive", "quantization": "fp32", "offload": "disk",
             "max_memory": ["cpu=5GiB"]}
    measured = {"best_speculative": {"draft": "qwen2.5-coder-0.5b@int8", "budget": 8, "max_n_beams": 8}}
    points = bench.grid("qwen2.5-coder-1.5b", plain, profiles.Profile("t", plain, measured=measured),
                        torch.device("cpu"))
    assert sorted({p.request.budget for p in points[1:]}) == [2, 4, 8, 16, 32]
