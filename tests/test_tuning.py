"""Cost model and tuner search, against deterministic synthetic objectives (fast, no models)."""

from __future__ import annotations

import json
import math

import pytest

optuna = pytest.importorskip("optuna")  # a core dependency; absent on the lent GPU machine (gpu_check)

from specexec_cli.errors import SpecexecError  # noqa: E402
from specexec_cli.tuning import cost_model as cm  # noqa: E402
from specexec_cli.tuning import memory  # noqa: E402
from specexec_cli.tuning.results import format_results  # noqa: E402
from specexec_cli.tuning.search import run_search  # noqa: E402
from specexec_cli.tuning.space import (  # noqa: E402
    NO_DRAFT,
    Candidate,
    SearchSpace,
    early_exit_key,
    parse_early_exit,
)
from specexec_cli.tuning.study import open_study, study_result  # noqa: E402

# --- cost model -------------------------------------------------------------------------------

QWEN_15B = cm.ModelShape(
    n_layers=28,
    hidden_size=1536,
    intermediate_size=8960,
    vocab_size=151936,
    n_heads=12,
    n_kv_heads=2,
    head_dim=128,
    tied_embeddings=True,
)


def test_model_shape_counts_parameters_like_the_real_model():
    # Qwen2.5-1.5B has 1.54 B parameters (biases aside).
    assert QWEN_15B.params == pytest.approx(1.54e9, rel=0.02)
    assert QWEN_15B.weight_bytes("fp32") == pytest.approx(4 * QWEN_15B.params, rel=1e-9)
    assert QWEN_15B.weight_bytes("nf4") < QWEN_15B.weight_bytes("fp16") < QWEN_15B.weight_bytes("fp32")
    early = QWEN_15B.truncated(4)
    assert early.n_layers == 4 and early.vocab_size == QWEN_15B.vocab_size
    with pytest.raises(ValueError):
        QWEN_15B.truncated(29)
    with pytest.raises(ValueError):
        cm.bytes_per_param("fp8-imaginary")


def test_model_shape_from_hf_config():
    from transformers import Qwen2Config

    config = Qwen2Config(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    )
    assert cm.ModelShape.from_hf_config(config) == QWEN_15B


def test_roofline_is_flat_then_linear():
    curve = cm.LatencyCurve.roofline(QWEN_15B, "fp16", bandwidth=25e9, flops=10e12)
    t1 = curve.at(1)
    assert t1 == pytest.approx(QWEN_15B.weight_bytes("fp16") / 25e9, rel=0.05)
    assert curve.at(64) == pytest.approx(t1, rel=1e-6)  # memory-bound: flat
    assert curve.at(4096) > 2 * t1  # compute-bound: grows
    assert 256 <= curve.knee() < 4096


def test_latency_curve_interpolates_and_extrapolates():
    curve = cm.LatencyCurve.from_points({1: 0.4, 8: 0.6, 64: 3.6})
    assert curve.at(1) == 0.4
    assert curve.at(0) == 0.4
    assert curve.at(8) == 0.6
    assert curve.at(36) == pytest.approx(0.6 + 3.0 * 28 / 56)
    assert curve.at(128) == pytest.approx(3.6 + 3.0 / 56 * 64)
    assert curve.knee() == 1
    assert cm.LatencyCurve.from_dict(curve.to_dict()) == curve
    with pytest.raises(ValueError):
        cm.LatencyCurve((4, 2), (1.0, 2.0))


def test_acceptance_curve_from_iterations_pads_short_trees():
    curve = cm.AcceptanceCurve.from_iterations([[1.5, 2.0, 2.25], [1.0]], depth_curves=[[1, 2, 2], [1]])
    assert curve.values == (1.0, 1.25, 1.5, 1.625)
    assert curve.at(100) == 1.625  # flat beyond the measured range
    assert curve.depth_at(3) == 1.5
    assert cm.AcceptanceCurve.from_dict(curve.to_dict()) == curve
    with pytest.raises(ValueError):
        cm.AcceptanceCurve((2.0, 3.0))


def test_prior_passes_through_the_paper_figures():
    prior = cm.AcceptanceCurve.prior()
    assert prior.at(0) == 1.0
    assert prior.at(128) == pytest.approx(12.1, rel=0.1)
    assert prior.at(2048) == pytest.approx(20.6, rel=0.1)
    assert all(a <= b for a, b in zip(prior.values, prior.values[1:], strict=False))


def test_draft_passes_bounds():
    assert cm.draft_passes(0, 32, 16) == 0
    assert cm.draft_passes(1, 32, 16) == 1
    assert cm.draft_passes(8, 32, 16) == 8  # no depth known: as deep as allowed
    assert cm.draft_passes(1024, 32, 16) == 16
    assert cm.draft_passes(1024, 32, 64, depth=5.0) == 16  # expansion bound: 1024 / 2 / 32
    assert cm.draft_passes(64, 32, 16, depth=3.0) == 3.0


def test_a_depth_cap_is_worth_the_tree_no_deeper_than_it():
    """A tree capped at c levels is worth G at the largest budget whose tree is at most c deep: with the
    prior that flattens capped trees (the old fixed cap of 8 or 16 passes) while an uncapped one keeps
    rising to budget 2048, as the paper measured (18-21.6 tokens per pass at budgets 1024-2048)."""
    prior = cm.AcceptanceCurve.prior()
    assert prior.budget_within_depth(2048, 2048) == 2048
    within = prior.budget_within_depth(2048, 16)
    assert prior.depth_at(within) <= 16 < prior.depth_at(within + 1)
    assert prior.budget_within_depth(5, 16) == 5  # a small tree is shallower than the cap anyway
    unknown = cm.AcceptanceCurve(tuple(1.0 + k for k in range(9)))
    assert unknown.budget_within_depth(8, 2) == 8  # no depths measured: nothing to go by
    # GPU-like costs: draft passes nearly free against a flat streamed target pass
    target = cm.LatencyCurve.from_points({1: 1.4, 4096: 1.5})
    draft = cm.LatencyCurve.from_points({1: 0.004, 128: 0.006})
    costs = cm.PairCosts(target, draft, prior, host_s=0.01)

    def tokens_per_pass(budget, cap):
        seconds = cm.draft_time_s(costs, budget, 32, cap) + target.at(budget + 1) + 0.01
        return cm.predict_tokens_per_s(costs, budget, 32, cap) * seconds

    uncapped = [tokens_per_pass(b, None) for b in (256, 512, 1024, 2048)]
    capped = [tokens_per_pass(b, 16) for b in (256, 512, 1024, 2048)]
    assert all(a < b for a, b in zip(uncapped, uncapped[1:], strict=False)) and uncapped[-1] > 18
    assert max(capped) == min(capped) < 10
    # and the best budget under that model is large and uncapped
    assert cm.best_budget(costs, [2**i for i in range(13)], 32, None)[0] >= 1024


def test_predict_matches_the_formula_and_plain_decoding():
    target = cm.LatencyCurve.from_points({1: 0.39, 64: 3.6})
    draft = cm.LatencyCurve.from_points({1: 0.1, 64: 0.9})
    acceptance = cm.AcceptanceCurve(tuple(1.0 + 0.6 * math.log2(1 + k) for k in range(65)))
    costs = cm.PairCosts(target, draft, acceptance, host_s=0.01)
    assert cm.predict_tokens_per_s(costs, 0) == pytest.approx(1 / 0.40)
    k = 4
    expected = acceptance.at(k) / (k * draft.at(4) + target.at(k + 1) + 0.01)
    assert cm.predict_tokens_per_s(costs, k, max_n_beams=8, max_beam_len=8) == pytest.approx(expected)
    budget, speed = cm.best_budget(costs, [1, 2, 4, 8, 16, 32, 64], 8, 8)
    assert speed == max(cm.predict_tokens_per_s(costs, b, 8, 8) for b in [1, 2, 4, 8, 16, 32, 64])
    assert speed > cm.predict_tokens_per_s(costs, 0)
    # The CPU case from the issue: a weak pair with a costly draft loses to plain decoding.
    weak = cm.AcceptanceCurve(tuple(1.0 + 0.25 * math.log2(1 + k) for k in range(65)))
    _, weak_speed = cm.best_budget(cm.PairCosts(target, draft, weak, 0.01), [1, 2, 4, 8, 16, 32, 64], 8, 8)
    assert weak_speed < cm.predict_tokens_per_s(costs, 0)


def test_offloaded_target_prefers_large_budgets():
    # 70B-like target streamed over PCIe: 5.5 s per pass, flat to a high knee.
    target = cm.LatencyCurve.from_points({1: 5.5, 1024: 5.6, 4096: 9.0})
    draft = cm.LatencyCurve.from_points({1: 0.02, 128: 0.03})
    costs = cm.PairCosts(target, draft, cm.AcceptanceCurve.prior())
    budget, speed = cm.best_budget(costs, [2**i for i in range(13)], 128, 32)
    assert budget >= 512
    assert speed > 10 * cm.predict_tokens_per_s(costs, 0)


def test_memory_problem():
    cpu = memory.MemoryBudget(device_free=None, host_available=int(24e9))
    assert memory.memory_problem(cpu, 6.2e9, 2e9, 1e9) is None
    assert "RAM" in memory.memory_problem(cpu, 20e9, 2e9, 1e9)
    gpu = memory.MemoryBudget(device_free=int(24e9), host_available=int(128e9))
    assert memory.memory_problem(gpu, 36e9, 14e9, 2e9, offloaded=True, buffer_bytes=1e9) is None
    assert "host RAM" in memory.memory_problem(gpu, 137e9, 14e9, 2e9, offloaded=True)
    assert "GPU" in memory.memory_problem(gpu, 36e9, 14e9, 2e9, offloaded=False)
    big = memory.tree_activation_bytes(QWEN_15B, 4096, 512)
    assert big > 4097 * QWEN_15B.vocab_size * 4
    assert memory.tree_activation_bytes(QWEN_15B, 1, 512) < big / 100
    assert cm.is_hopeless(1.0, 3.0) and not cm.is_hopeless(2.0, 3.0) and not cm.is_hopeless(0.1, None)


# --- search space -----------------------------------------------------------------------------

SPACE = SearchSpace(
    drafts=(NO_DRAFT, "small", "tiny", early_exit_key("target", 4)),
    quantizations=("fp32", "nf4"),
    budgets=tuple(2**i for i in range(9)),  # 1 .. 256
    n_beams=(8, 32),
    beam_lens=(8, 16),
)


def test_early_exit_keys():
    from specexec_cli.tuning.space import generate_draft_name, normalize_draft

    assert parse_early_exit(early_exit_key("org/model-1.5b", 6)) == ("org/model-1.5b", 6)
    assert normalize_draft("first-layers:4", "t") == "t[:4]" and normalize_draft("d", "t") == "d"
    assert generate_draft_name("t[:4]", "t") == "first-layers:4"
    assert generate_draft_name("d[:4]", "t") == "d[:4]" and generate_draft_name("d", "t") == "d"
    assert parse_early_exit("qwen2.5-coder-0.5b") is None
    assert parse_early_exit("x[:y]") is None


def test_canonical_collapses_equivalent_beam_shapes():
    c = SPACE.canonical(Candidate("small", "fp32", 4, 32, 16))
    assert c == Candidate("small", "fp32", 4, 8, 8)
    assert SPACE.canonical(Candidate("small", "fp32", 64, 32, 16)) == Candidate("small", "fp32", 64, 32, 16)
    assert SPACE.canonical(Candidate(NO_DRAFT, "nf4", 64, 32, 16)) == Candidate(NO_DRAFT, "nf4")
    grid = SPACE.candidates()
    assert len(grid) == len(set(grid))
    assert grid[:2] == [Candidate(NO_DRAFT, "fp32"), Candidate(NO_DRAFT, "nf4")]
    assert all(SPACE.canonical(c) == c for c in grid)
    # per pair: budgets 1..8 collapse both beam knobs (one shape each); 16..256 keep 2 x 2 shapes
    assert len(grid) == 2 + 3 * 2 * (4 + 4 * 5)


def test_params_round_trip_through_optuna(tmp_path):
    study = open_study(tmp_path / "s.db", "roundtrip")
    for candidate in SPACE.candidates()[:12]:
        study.enqueue_trial(SPACE.params(candidate))
        trial = study.ask()
        assert SPACE.suggest(trial) == candidate
        study.tell(trial, 1.0)


def test_neighbours_stay_on_the_same_load():
    c = Candidate("small", "nf4", 32, 8, 16)
    around = SPACE.neighbours(c)
    assert Candidate("small", "nf4", 64, 8, 16) in around
    assert Candidate("small", "nf4", 16, 8, 16) in around
    assert Candidate("small", "nf4", 32, 32, 16) in around
    assert Candidate("small", "nf4", 32, 8, 8) in around
    assert all(n.load_key == c.load_key and n != c for n in around)
    assert SPACE.neighbours(Candidate(NO_DRAFT, "fp32")) == []


# --- synthetic objective ----------------------------------------------------------------------

QUALITY = {"small": 1.0, "tiny": 0.55, early_exit_key("target", 4): 0.7}
DRAFT_COST = {"small": 0.12, "tiny": 0.03, early_exit_key("target", 4): 0.06}
TARGET_T1 = {"fp32": 0.40, "nf4": 0.55}


def synthetic(candidate: Candidate) -> float:
    """A smooth, deterministic tokens/s landscape shaped like the real one (one interior optimum)."""
    t1 = TARGET_T1[candidate.quantization]
    if candidate.autoregressive:
        return 1.0 / t1
    k = candidate.budget
    accept = 1.0 + 1.6 * QUALITY[candidate.draft] * math.log2(1.0 + k / 2.0)
    depth = min(k, candidate.max_beam_len, 1 + math.log2(1 + k))
    passes = max(depth, k / candidate.max_n_beams)
    seconds = t1 * (1 + k / 48) + passes * DRAFT_COST[candidate.draft] * (
        1 + min(k, candidate.max_n_beams) / 64
    )
    return accept / seconds


def biased(candidate: Candidate) -> float:
    """A cost model that is right in shape but off in scale, per pair (as real ones are)."""
    scale = {"small": 1.25, "tiny": 0.8}.get(candidate.draft, 1.1)
    return synthetic(candidate) * scale


class Counter:
    def __init__(self, fn=synthetic, interrupt_at: int | None = None, fail: set | None = None):
        self.fn, self.calls, self.interrupt_at, self.fail = fn, [], interrupt_at, fail or set()

    def __call__(self, candidate: Candidate) -> float:
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            self.interrupt_at = None
            raise KeyboardInterrupt
        self.calls.append(candidate)
        if candidate in self.fail:
            raise RuntimeError("out of memory (synthetic)")
        return self.fn(candidate)


def grid_best() -> tuple[Candidate, float]:
    return max(((c, synthetic(c)) for c in SPACE.candidates()), key=lambda cv: cv[1])


def test_search_finds_the_grid_optimum_with_a_third_of_the_evaluations(tmp_path):
    best_candidate, best_value = grid_best()
    budget = len(SPACE.candidates()) // 3
    objective = Counter()
    result = run_search(
        SPACE,
        objective,
        study_name="synthetic",
        storage=tmp_path / "s.db",
        n_trials=budget,
        predict=biased,
        progress=False,
    )
    assert len(objective.calls) == len(set(objective.calls)) <= budget
    assert result.best.tokens_per_s >= 0.9 * best_value
    assert result.best_autoregressive is not None  # plain decoding is always measured
    assert objective.calls[0].autoregressive
    assert result.speedup(result.best) == pytest.approx(result.best.tokens_per_s / (1 / 0.40))
    table = format_results(result)
    assert result.best.candidate.label() in table and "x plain decoding" in table


def test_search_without_a_cost_model_still_gets_close(tmp_path):
    _, best_value = grid_best()
    objective = Counter()
    result = run_search(
        SPACE,
        objective,
        study_name="blind",
        storage=tmp_path / "s.db",
        n_trials=len(SPACE.candidates()) // 3,
        progress=False,
    )
    assert result.best.tokens_per_s >= 0.9 * best_value
    assert len(set(objective.calls)) == len(objective.calls)


def test_search_evaluates_several_budgets_per_load(tmp_path):
    objective = Counter()
    run_search(
        SPACE,
        objective,
        study_name="loads",
        storage=tmp_path / "s.db",
        n_trials=12,
        predict=biased,
        progress=False,
    )
    spec = [c for c in objective.calls if not c.autoregressive]
    switches = sum(1 for a, b in zip(spec, spec[1:], strict=False) if a.load_key != b.load_key)
    assert switches < len(spec) / 2


def test_infeasible_and_hopeless_trials_are_never_measured(tmp_path):
    def predict(c: Candidate) -> float:
        return 0.1 if c.draft == "tiny" else biased(c)  # the model thinks "tiny" is useless

    seeds = [
        Candidate(NO_DRAFT, "fp32"),
        Candidate("small", "fp32", 128, 32, 16),
        Candidate("tiny", "fp32", 8, 8, 8),
    ]
    objective = Counter()
    result = run_search(
        SPACE,
        objective,
        study_name="prune",
        storage=tmp_path / "s.db",
        n_trials=15,
        predict=predict,
        seeds=seeds,
        infeasible=lambda c: "needs 99 GB of RAM" if c.budget > 64 else None,
        progress=False,
    )
    assert len(objective.calls) == 15
    assert all(c.budget <= 64 and c.draft != "tiny" for c in objective.calls)
    pruned = dict(result.pruned)
    assert pruned[seeds[1]] == "needs 99 GB of RAM"
    assert pruned[seeds[2]].startswith("hopeless: predicted 0.10 tok/s < 0.5 x best ")


def test_one_speculative_candidate_is_measured_even_when_all_look_hopeless(tmp_path):
    """The CPU case: the model predicts every tree loses; the verdict must rest on a measurement."""

    def slow_speculation(c: Candidate) -> float:
        return 2.5 if c.autoregressive else 0.3 * synthetic(c)

    def predict(c: Candidate) -> float:
        return 2.4 if c.autoregressive else 0.2 * synthetic(c)

    objective = Counter(slow_speculation)
    result = run_search(
        SPACE,
        objective,
        study_name="cpu",
        storage=tmp_path / "s.db",
        n_trials=20,
        predict=predict,
        progress=False,
    )
    spec = [c for c in objective.calls if not c.autoregressive]
    assert len(spec) == 1 and spec[0] == max(
        (c for c in SPACE.candidates() if not c.autoregressive), key=lambda c: (predict(c), -c.budget)
    )
    assert result.stop_reason.startswith("the cost model predicts every remaining candidate hopeless")
    assert len(objective.calls) == 3
    assert result.verdict().startswith(
        "plain autoregressive decoding is fastest on this machine (2.50 tok/s)"
    )


def test_plain_decoding_wins_and_the_verdict_says_so(tmp_path):
    def slow_speculation(c: Candidate) -> float:
        return 2.5 if c.autoregressive else 0.4 * synthetic(c)

    result = run_search(
        SPACE,
        Counter(slow_speculation),
        study_name="plain",
        storage=tmp_path / "s.db",
        n_trials=8,
        progress=False,
    )
    assert result.best.candidate.autoregressive
    assert result.verdict().startswith("plain autoregressive decoding is fastest on this machine")


def test_failed_trials_are_recorded_and_the_search_goes_on(tmp_path):
    seeds = [
        Candidate(NO_DRAFT, "fp32"),
        Candidate("small", "fp32", 16, 8, 16),
        Candidate("tiny", "fp32", 8, 8, 8),
    ]
    objective = Counter(fail={seeds[1]})
    result = run_search(
        SPACE,
        objective,
        study_name="fail",
        storage=tmp_path / "s.db",
        n_trials=5,
        seeds=seeds,
        progress=False,
    )
    assert [c for c, _ in result.failed] == [seeds[1]]
    assert "out of memory" in result.failed[0][1]
    assert len(result.evaluations) == 5


def test_all_trials_failing_is_a_clear_error(tmp_path):
    def broken(c: Candidate) -> float:
        raise RuntimeError("no models installed")

    with pytest.raises(SpecexecError, match="every trial failed.*no models installed"):
        run_search(SPACE, broken, study_name="broken", storage=tmp_path / "s.db", n_trials=3, progress=False)


def test_study_resumes_after_ctrl_c_without_repeating_finished_trials(tmp_path):
    db = tmp_path / "s.db"
    first = Counter(interrupt_at=5)
    with pytest.raises(KeyboardInterrupt):
        run_search(SPACE, first, study_name="resume", storage=db, n_trials=12, predict=biased, progress=False)
    assert len(first.calls) == 5
    second = Counter()
    result = run_search(
        SPACE, second, study_name="resume", storage=db, n_trials=12, predict=biased, progress=False
    )
    assert not set(first.calls) & set(second.calls)
    assert len(first.calls) + len(second.calls) == 12 == len(result.evaluations)
    assert result.new_evaluations == 7
    # The interrupted trial is measured first on resume and is not reported as a failure.
    assert not result.failed
    # A third run with the same target is already done.
    third = Counter()
    again = run_search(SPACE, third, study_name="resume", storage=db, n_trials=12, progress=False)
    assert third.calls == [] and len(again.evaluations) == 12


def test_study_resumes_after_a_crash_that_left_a_trial_running(tmp_path):
    db = tmp_path / "s.db"
    run_search(SPACE, Counter(), study_name="crash", storage=db, n_trials=4, predict=biased, progress=False)
    study = open_study(db, "crash")
    crashed = Candidate("tiny", "nf4", 4, 8, 8)
    study.enqueue_trial(SPACE.params(crashed))
    trial = study.ask()
    trial.set_user_attr("candidate", crashed.to_dict())  # killed here: the trial stays RUNNING
    resumed = Counter()
    result = run_search(
        SPACE, resumed, study_name="crash", storage=db, n_trials=6, predict=biased, progress=False
    )
    assert resumed.calls[0] == crashed
    assert len(result.evaluations) == 6 and not result.failed
    states = {t.state for t in optuna.load_study(study_name="crash", storage=f"sqlite:///{db}").get_trials()}
    assert optuna.trial.TrialState.RUNNING not in states


def test_timeout_stops_the_search(tmp_path):
    import time

    def slow(c: Candidate) -> float:
        time.sleep(0.3)
        return synthetic(c)

    result = run_search(
        SPACE, slow, study_name="timeout", storage=tmp_path / "s.db", n_trials=50, timeout=0.5, progress=False
    )
    assert result.stop_reason == "timeout"
    assert 1 <= len(result.evaluations) <= 3


def test_a_tiny_space_is_exhausted_cleanly(tmp_path):
    space = SearchSpace(drafts=(NO_DRAFT, "small"), quantizations=("fp32",), budgets=(1, 2))
    objective = Counter()
    result = run_search(
        space, objective, study_name="tiny", storage=tmp_path / "s.db", n_trials=10, progress=False
    )
    assert sorted(objective.calls) == sorted(space.candidates())
    assert result.stop_reason == "space exhausted"


def test_study_result_reads_a_study_back(tmp_path):
    db = tmp_path / "s.db"
    run_search(SPACE, Counter(), study_name="read", storage=db, n_trials=5, predict=biased, progress=False)
    result = study_result(open_study(db, "read"))
    assert len(result.evaluations) == 5
    assert all(e.predicted == pytest.approx(biased(e.candidate)) for e in result.evaluations)


# --- one small real tune (tiny random models, real generation) ---------------------------------


def test_a_small_real_tune_on_tiny_models(tmp_path):
    """A whole tune of a tiny saved pair, opened through the engine as generate opens it: each model
    loads once, and the profile gives generate the spec the best trial measured."""
    import json

    from conftest import save_tiny_cli_pair

    from specexec_cli import hardware, profiles
    from specexec_cli.engine import Machine, resolve
    from specexec_cli.settings import EngineRequest
    from specexec_cli.tuning.options import TuneOptions
    from specexec_cli.tuning.tune import tune

    save_tiny_cli_pair(tmp_path)
    target, draft = str(tmp_path / "target"), str(tmp_path / "draft")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([[0, "[INST] w1 w5 w9 w2 [/INST]"], [1, "w7 w3 w3 w8 w1"]]))
    options = TuneOptions(
        target=target,
        drafts=(draft, "first-layers:1"),  # the CLI's spelling of the target's early exit
        quantizations=("fp32",),
        budgets=(1, 4),
        n_beams=(4,),
        beam_lens=(4,),
        n_trials=3,
        n_prompts=2,
        prompts_file=prompts,
        max_new_tokens=8,
        calibration_iterations=2,
        storage=tmp_path / "tune.db",
        profiles_dir=tmp_path / "profiles",
        device="cpu",
        hopeless_ratio=0.0,  # tiny models: the draft costs as much as the target; measure anyway
        progress=False,
    )
    probe = hardware.probe(tmp_path / "weights", run_measurements=False)
    report = tune(options, probe=probe, target_key="tiny-target")

    loaded = report.objective.pool.loaded.models
    assert sorted(key[0] for key in loaded) == ["draft", "target"]  # each loaded once
    result = report.result
    assert len(result.evaluations) == 3 and result.best_autoregressive is not None
    assert set(report.calibration.target_curves) == {"fp32"}
    assert all(e.predicted is not None and e.predicted > 0 for e in result.evaluations)
    assert all(report.records[e.candidate].tokens_per_s == e.tokens_per_s for e in result.evaluations)
    saved = profiles.load_profile(report.profile_path)
    assert saved.target == "tiny-target" and saved.fingerprint == probe.fingerprint
    assert saved.measured["tokens_per_s"] == result.best.tokens_per_s
    assert saved.settings["method"] in ("specexec", "autoregressive")
    assert saved.settings.get("draft") in (None, draft, "first-layers:1")
    assert f"{target}[:1]" in report.space.drafts
    assert "x plain decoding" in report.summary() or "plain autoregressive" in report.summary()
    # what generate resolves from the saved profile is the spec the best trial ran
    measured = report.objective.pool.specs[result.best.candidate]
    assert resolve(EngineRequest(target=target), saved.settings, Machine.here("cpu")) == measured
    # Resuming the same study measures nothing new.
    again = tune(options, probe=probe, target_key="tiny-target")
    assert again.result.new_evaluations == 0 and len(again.result.evaluations) == 3


# --- calibration prompts and starting profiles ------------------------------------------------


def test_packaged_prompts_are_clean_and_mixed():
    from specexec_cli.tuning.prompt_set import packaged_prompts

    prompts = packaged_prompts()
    assert len(prompts) >= 8
    assert {p.id.split("-")[0] for p in prompts[:2]} == {"mtbench", "oasst"}
    for p in prompts:
        assert p.text and "[INST]" not in p.text and "<<SYS>>" not in p.text and "ASSISTANT:" not in p.text


def test_prompt_files_in_every_accepted_format(tmp_path):
    from specexec_cli.tuning.prompt_set import read_prompts

    shared = tmp_path / "shared.json"
    oasst = "[INST] <<SYS>>\nBe nice.\n<</SYS>\n\n\nWhat is a Dyson Sphere? [\\INST]\n"
    shared.write_text(json.dumps([[3, "[INST]Hi there[/INST]\n\nASSISTANT:"], [4, oasst]]))
    assert [(p.id, p.text) for p in read_prompts(shared)] == [
        ("3", "Hi there"),
        ("4", "What is a Dyson Sphere?"),
    ]
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps(["one", "two"]))
    assert [p.text for p in read_prompts(strings)] == ["one", "two"]
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"id": "a", "prompt": "[INST] first [/INST]"}\n{"prompt": "second"}\n')
    assert [(p.id, p.text) for p in read_prompts(lines)] == [("a", "first"), ("2", "second")]
    plain = tmp_path / "p.txt"
    plain.write_text("Write a poem.\n")
    assert [p.text for p in read_prompts(plain)] == ["Write a poem."]
    for bad, message in (("{", "not valid JSON"), ('{"prompts": []}', "schema"), ('[{"x": 1}]', "not an")):
        path = tmp_path / "bad.json"
        path.write_text(bad)
        with pytest.raises(SpecexecError, match=message):
            read_prompts(path)
    with pytest.raises(SpecexecError, match="cannot read prompts"):
        read_prompts(tmp_path / "missing.json")


def test_starting_profiles_follow_the_cost_model():
    from specexec_cli.tuning import presets

    gpu24 = next(h for h in presets.HARDWARE_CLASSES if h.key == "gpu24-pcie4x16-ram128")
    profile = presets.starting_profile("llama-2-70b", gpu24)
    settings = profile.settings
    # 137 GB of fp16 weights do not fit 128 GB of RAM: a 4-bit target streamed from RAM, big tree.
    assert settings["quantization"] in ("gptq", "nf4") and settings["offload"] == "ram"
    assert settings["method"] == "specexec" and settings["budget"] >= 128
    assert profile.kind == "starting" and "cost model" in profile.source
    assert profile.predicted["speedup"] > 3
    assert presets.prior_scale(7, 70) == pytest.approx(2.1)
    assert presets.prior_scale(1, 70) < presets.prior_scale(3, 70) < 2.1
