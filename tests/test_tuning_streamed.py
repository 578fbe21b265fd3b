"""The tuner in the streamed regime (--max-memory): the streamed cost formula, a search against a target
whose pass costs about the same for 1 or 256 tokens, caps in the feasibility check, and a small real tune
on tiny models whose profile carries the placement generate loads again."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

pytest.importorskip("optuna")  # a core dependency; absent on the lent GPU machine (gpu_check)

from conftest import fake_probe  # noqa: E402

from specexec_cli.tuning import cost_model as cm  # noqa: E402
from specexec_cli.tuning.calibration import Calibration  # noqa: E402
from specexec_cli.tuning.search import run_search  # noqa: E402
from specexec_cli.tuning.space import NO_DRAFT, Candidate, SearchSpace  # noqa: E402

GiB = 1 << 30

# Qwen2.5-Coder 1.5B on a 2-core CPU: resident compute 0.39 s for 1 token, 1.4 s for 16, 3.6 s for 64.
COMPUTE = cm.LatencyCurve.from_points({1: 0.39, 17: 1.4, 65: 3.6, 257: 13.0})
LAYER_BYTES = 3.1e9 / 28  # float16 files
READ_BW = 1.0e9  # bytes/s from disk (page cache included)


def test_streamed_forward_is_the_slower_of_reading_and_computing():
    read = 24 * LAYER_BYTES / READ_BW  # 4 resident layers, 24 streamed: 2.66 s
    assert cm.streamed_forward_s(1, COMPUTE, LAYER_BYTES, 28, 4, READ_BW) == pytest.approx(read)
    assert cm.streamed_forward_s(65, COMPUTE, LAYER_BYTES, 28, 4, READ_BW) == pytest.approx(3.6)
    assert cm.streamed_forward_s(1, COMPUTE, LAYER_BYTES, 28, 28, READ_BW) == pytest.approx(0.39)  # resident
    more_resident = cm.streamed_forward_s(1, COMPUTE, LAYER_BYTES, 28, 14, READ_BW)
    assert more_resident == pytest.approx(14 * LAYER_BYTES / READ_BW)
    curve = cm.streamed_curve(COMPUTE, LAYER_BYTES, 28, 4, READ_BW, [1, 2, 5, 17, 33, 65, 257])
    assert curve.at(1) == curve.at(17) == pytest.approx(read)  # flat up to the compute knee
    assert curve.at(257) == pytest.approx(13.0)


def slow_target_calibration() -> Calibration:
    variant = "fp32@disk"
    target = cm.streamed_curve(COMPUTE, LAYER_BYTES, 28, 4, READ_BW, [1, 2, 3, 5, 9, 17, 33, 65, 129, 257])
    draft = cm.LatencyCurve.from_points({1: 0.1, 8: 0.12, 32: 0.3})
    acceptance = cm.AcceptanceCurve(tuple(1.0 + 0.9 * math.log2(1 + k / 2) for k in range(257)))
    from specexec_cli.tuning.measure import AcceptanceMeasurement

    measured = AcceptanceMeasurement(acceptance, 16, 0.02, 4.0, 30.0)
    return Calibration(
        target_curves={variant: target},
        draft_curves={("qwen2.5-coder-0.5b", variant): draft},
        acceptance={"qwen2.5-coder-0.5b": measured},
        host_s=0.02,
    )


def test_the_tuner_picks_speculation_when_the_target_streams(tmp_path):
    space = SearchSpace(
        drafts=(NO_DRAFT, "qwen2.5-coder-0.5b"),
        quantizations=("fp32",),
        budgets=tuple(2**i for i in range(9)),
        n_beams=(8, 32),
        beam_lens=(8, 16),
        offloads=("disk",),
    )
    calibration = slow_target_calibration()

    def measured(c: Candidate) -> float:  # "the machine": the model, 20 % optimistic past budget 8
        return calibration.predict(c) * (0.8 if c.budget > 8 else 1.0)

    calls = []
    result = run_search(
        space,
        lambda c: calls.append(c) or measured(c),
        study_name="streamed",
        storage=tmp_path / "s.db",
        n_trials=len(space.candidates()) // 3,
        predict=calibration.predict,
        progress=False,
    )
    best = result.best.candidate
    grid_best = max(measured(c) for c in space.candidates())
    assert not best.autoregressive and best.offload == "disk"
    assert result.best.tokens_per_s >= 0.9 * grid_best
    assert len(calls) <= len(space.candidates()) // 3
    plain = result.plain_baseline(best)
    assert plain.candidate == Candidate(NO_DRAFT, "fp32", offload="disk")
    assert result.best.tokens_per_s > 2 * plain.tokens_per_s
    assert "x plain decoding at equal memory (" in result.verdict()
    assert "offload=disk" in result.verdict()


def test_the_feasibility_check_honours_the_caps(tmp_path):
    import torch

    from specexec_cli.tuning.memory import memory_checker

    probe = fake_probe(tmp_path, 64 * GiB)
    cpu = torch.device("cpu")
    target, draft = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"
    free = memory_checker(target, probe, cpu, 200)
    capped = memory_checker(target, probe, cpu, 200, caps={"cpu": 4 * GiB}, plan_context=2304)
    resident = Candidate(NO_DRAFT, "fp32", offload="none")
    assert free(resident) is None
    assert "RAM" in capped(resident)  # 6 GB of float32 weights do not fit a 4 GiB cap
    assert capped(Candidate(NO_DRAFT, "fp32", offload="disk")) is None
    assert capped(Candidate(draft, "fp32", 32, 8, 8, offload="disk")) is None
    assert "needs" in memory_checker(target, probe, cpu, 200, caps={"cpu": GiB})(
        Candidate(draft, "fp32", 32, 8, 8, offload="disk")
    )


def placed_loads(report) -> list[tuple]:
    """(placement, planned for a draft, budget planned for) of every offloaded target the tune loaded."""
    keys = report.objective.pool.loaded.models
    return [(key[5], key[6] is not None, key[7]) for key in keys if key[0] == "target" and len(key) > 5]


def test_a_streamed_tune_on_tiny_models_writes_a_profile_generate_uses(tmp_path):
    from conftest import save_tiny_cli_pair

    from specexec_cli import profiles
    from specexec_cli.engine import Machine, resolve
    from specexec_cli.runtime.target import plan_target
    from specexec_cli.settings import EngineRequest
    from specexec_cli.tuning.options import TuneOptions
    from specexec_cli.tuning.tune import PLAN_CONTEXT, tune

    save_tiny_cli_pair(tmp_path)
    folder, draft_folder = tmp_path / "target", str(tmp_path / "draft")
    from specexec_cli.models.load import load_model

    draft, _ = load_model(draft_folder)
    full = plan_target(folder, device="cpu", quant="fp32", offload="none", budget=4, context_len=PLAN_CONTEXT,
                       draft=draft)
    cap = f"cpu={full.device_bytes - 1}"  # one byte short of holding every layer: some layers stream
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([[0, "w1 w5 w9 w2"], [1, "w7 w3 w3 w8 w1"]]))
    options = TuneOptions(
        target=str(folder), drafts=(draft_folder,), quantizations=("fp32",), budgets=(1, 4), n_beams=(4,),
        beam_lens=(4,), n_trials=3, n_prompts=2, prompts_file=prompts, max_new_tokens=6,
        calibration_iterations=2, storage=tmp_path / "tune.db", profiles_dir=tmp_path / "profiles",
        device="cpu", hopeless_ratio=0.0, progress=False, max_memory=(cap,), offload="disk",
    )
    probe = fake_probe(tmp_path, 64 * GiB)
    report = tune(options, probe=probe, target_key="tiny-target")

    assert report.space.offloads == ("disk",)
    placements = placed_loads(report)
    assert placements and all(p.offload == "disk" and p.max_memory == (cap,) for p, _, _ in placements)
    # speculation is planned for its draft and the largest budget; plain decoding alone (equal memory)
    assert {(budget, with_draft) for _, with_draft, budget in placements} <= {(4, True), (0, False)}
    result = report.result
    plain = result.best_autoregressive.candidate
    spec = result.best_speculative.candidate
    assert result.resident_layers[plain] >= result.resident_layers[spec]
    assert result.equal_streaming is not None and result.equal_streaming.of == spec
    assert result.equal_streaming.resident_layers == result.resident_layers[spec]
    assert "at equal memory" in result.verdict() and "streamed the same way" in result.verdict()
    assert "fp32@disk" in report.calibration.streamed  # timed at a few points, predicted by the formula
    assert all(e.candidate.offload == "disk" for e in report.result.evaluations)
    saved = profiles.load_profile(report.profile_path)
    settings = saved.settings
    assert settings["offload"] == "disk" and settings["max_memory"] == [cap]
    n_layers = 3
    if settings["method"] == "autoregressive":  # planned without the draft: its share holds every layer
        assert settings["resident_layers"] == n_layers
    else:
        assert 0 <= settings["resident_layers"] < n_layers and settings["buffers"] >= 2
    used, match = profiles.settings_for_generate("tiny-target", {}, directory=tmp_path / "profiles")
    assert match is not None and match.path == report.profile_path
    for key in ("offload", "buffers", "resident_layers", "max_memory", "quantization", "method"):
        assert used[key] == settings[key]
    # generate resolves the profile to the very spec the best trial ran, placement included
    measured = report.objective.pool.specs[result.best.candidate]
    assert resolve(EngineRequest(target=str(folder)), settings, Machine.here("cpu")) == measured


def test_the_verdict_names_equal_memory_and_reports_equal_streaming():
    from specexec_cli.tuning.results import EqualStreaming, Evaluation, SearchResult

    plain = Candidate(NO_DRAFT, "fp32", offload="disk")
    spec = Candidate("qwen2.5-coder-0.5b@int8", "fp32", 16, 16, 8, offload="disk")
    result = SearchResult([Evaluation(plain, 1.23), Evaluation(spec, 2.54)],
                          resident_layers={plain: 28, spec: 24})
    result.equal_streaming = EqualStreaming(spec, 1.10, 24)
    verdict = result.verdict()
    assert verdict.startswith("best: qwen2.5-coder-0.5b@int8 fp32 offload=disk budget=16")
    equal_memory = "2.07x plain decoding at equal memory (1.23 tok/s; planned without the draft: 28 resident"
    assert equal_memory + " layers)" in verdict
    assert "2.31x plain decoding streamed the same way (1.10 tok/s, 24 resident layers)" in verdict
    # plain decoding fastest at equal memory: said so, with the speculative figure against both
    result = SearchResult([Evaluation(plain, 3.0), Evaluation(spec, 2.54)], resident_layers={plain: 28})
    result.equal_streaming = EqualStreaming(spec, 1.10)
    verdict = result.verdict()
    assert verdict.startswith("plain autoregressive decoding is fastest at equal memory (3.00 tok/s; planned "
                              "without the draft: 28 resident layers)")
    assert "0.85x plain decoding at equal memory" in verdict and "2.31x plain decoding streamed" in verdict


def test_int8_drafts_are_searched_on_a_cpu_and_saved_as_draft_quant():
    import torch

    from specexec_cli.tuning.space import generate_draft_name, split_draft_quant
    from specexec_cli.tuning.tune import default_drafts

    cpu = default_drafts("qwen2.5-coder-1.5b", (4,), torch.device("cpu"))
    assert "qwen2.5-coder-0.5b" in cpu and "qwen2.5-coder-0.5b@int8" in cpu
    assert "qwen2.5-coder-0.5b@int8" not in default_drafts("qwen2.5-coder-1.5b", (4,), torch.device("cuda"))
    assert split_draft_quant("qwen2.5-coder-0.5b@int8") == ("qwen2.5-coder-0.5b", "int8")
    assert split_draft_quant("qwen2.5-coder-1.5b[:4]") == ("qwen2.5-coder-1.5b[:4]", None)
    assert generate_draft_name("qwen2.5-coder-0.5b@int8", "qwen2.5-coder-1.5b") == "qwen2.5-coder-0.5b"


def test_an_int8_draft_is_counted_smaller_by_the_feasibility_check(tmp_path):
    import torch

    from specexec_cli.tuning.memory import draft_weight_bytes, memory_checker, model_shape

    shape = model_shape("qwen2.5-coder-0.5b")
    assert draft_weight_bytes(shape, "fp32", "int8") < 0.5 * draft_weight_bytes(shape, "fp32", None)
    probe = fake_probe(tmp_path, 64 * GiB)
    check = memory_checker("qwen2.5-coder-1.5b", probe, torch.device("cpu"), 200, caps={"cpu": 3 * GiB},
                           plan_context=2304)
    fp32 = Candidate("qwen2.5-coder-0.5b", "fp32", 16, 16, 8, offload="disk")
    assert check(fp32) is not None  # 2 GB of float32 draft does not fit beside the target's head
    assert check(dataclasses.replace(fp32, draft="qwen2.5-coder-0.5b@int8")) is None
