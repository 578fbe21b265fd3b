"""`specexec tune --batch-prompts`: the batch sizes tried, the context the memory plan holds for N packed
caches, the batch stage's choice from (synthetic) timings, and the profile's batch size that `generate`
then uses; on tiny models."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

pytest.importorskip("optuna")  # a core dependency; absent on the lent GPU machine (gpu_check)

from conftest import fake_probe  # noqa: E402

from specexec_cli.errors import SpecexecError, UsageError  # noqa: E402
from specexec_cli.tuning import batch_stage  # noqa: E402
from specexec_cli.tuning.batch_stage import BatchMeasurement, measure_batches, pick_batch  # noqa: E402
from specexec_cli.tuning.batch_workload import (  # noqa: E402
    GENERATE_NEW_TOKENS,
    BatchWorkload,
    batch_context,
    batch_sizes_to_try,
)

pytestmark = pytest.mark.usefixtures("one_thread")
GiB = 1 << 30
WORDS = [f"w{i}" for i in range(124)]


def prompt_file(tmp_path, n: int) -> object:
    """JSON Lines prompts of different lengths."""
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": " ".join(f"w{1 + (i + k) % 90}"
                                                                          for k in range(2 + i % 4))})
                            + "\n" for i in range(n)))
    return path


# --- the workload -------------------------------------------------------------------------------


def test_batch_sizes_are_capped_by_the_prompts():
    assert batch_sizes_to_try((1, 2, 4, 8, 16), 5) == (1, 2, 4, 5)
    assert batch_sizes_to_try((16, 1, 4), 100) == (1, 4, 16)
    assert batch_sizes_to_try((4,), 1) == (1,)
    for bad in ((), (0, 2), (2, 10**6)):
        with pytest.raises(UsageError):
            batch_sizes_to_try(bad, 10)


def test_the_plan_context_counts_n_packed_caches(tmp_path, make_word_tokenizer):
    from specexec_cli.decoding.config import TreeConfig, tree_headroom
    from specexec_cli.prompts import encode_prompt

    assert batch_context([5, 9, 2, 7], 2, 10, 3) == 9 + 7 + 2 * 10 + 3
    assert batch_context([5], 4, 10, 0) == 5 + 10  # fewer prompts than lanes: one cache
    tokenizer = make_word_tokenizer(WORDS)
    tree = TreeConfig(2, 8, 4)
    workload = BatchWorkload.read(prompt_file(tmp_path, 9), (1, 2, 4, 8, 16), 4, tree)
    assert workload.sizes == (1, 2, 4, 8, 9) and workload.largest == 9
    lengths = sorted((len(encode_prompt(tokenizer, p.text, None, True)) for p in workload.prompts),
                     reverse=True)
    expected = sum(lengths[:9]) + 9 * GENERATE_NEW_TOKENS + tree_headroom(tree)
    assert workload.plan_context(tokenizer) == expected
    alone = lengths[0] + 256 + tree_headroom(tree)
    assert dataclasses.replace(workload, sizes=(1,)).plan_context(tokenizer) == alone
    assert dataclasses.replace(workload, floor=10**5).plan_context(tokenizer) == 10**5
    assert len(workload.encoded(tokenizer)) == 9
    with pytest.raises(UsageError):
        BatchWorkload.read(tmp_path / "missing.jsonl", (1,), 4, tree)


def test_the_resident_memory_estimate_counts_the_batch(tmp_path):
    from specexec_cli.tuning import memory
    from specexec_cli.tuning.space import Candidate

    shape = memory.model_shape("qwen2.5-coder-1.5b")
    one = memory.tree_activation_bytes(shape, 64, 300)
    assert memory.tree_activation_bytes(shape, 64, 300, lanes=16) > one
    probe = fake_probe(tmp_path, 7 * GiB)  # 6.2 GB of float32 weights leave ~0.1 GB of the usable RAM
    cpu = torch.device("cpu")
    candidate = Candidate("qwen2.5-coder-0.5b", "fp32", 64, 8, 8)
    alone = memory.memory_checker("qwen2.5-coder-1.5b", probe, cpu, 300)
    batched = memory.memory_checker("qwen2.5-coder-1.5b", probe, cpu, 16 * 2600, lanes=16)
    assert alone(Candidate("none", "fp32")) is None
    assert batched(Candidate("none", "fp32")) is not None
    assert "RAM" in batched(candidate)


# --- the stage --------------------------------------------------------------------------------


def fake_runs(monkeypatch, seconds: dict[int, float], fail_at: int | None = None, real: bool = False):
    """generate_many and the stage's clock replaced: a run at batch size N takes seconds[N]; with
    `real`, the real generation runs too (its own time is not counted)."""
    now = [0.0]
    calls = []
    original = batch_stage.generate_many

    def run(target, draft, prompts, config, on_result, batch_size=1, **kwargs):
        calls.append((len(prompts), batch_size))
        if batch_size == fail_at:
            raise torch.OutOfMemoryError("CUDA out of memory")
        if real:
            original(target, draft, prompts, config, on_result, batch_size=batch_size, **kwargs)
        else:
            from specexec_cli.decoding.generate import GenerationResult

            for i in range(len(prompts)):
                on_result(i, GenerationResult([1] * config.max_new_tokens, None, "length", 0.0))
        now[0] += seconds[batch_size]

    monkeypatch.setattr(batch_stage, "generate_many", run)
    monkeypatch.setattr(batch_stage, "clock", lambda: now[0])
    return calls


def test_the_stage_picks_the_fastest_batch_size(monkeypatch):
    from specexec_cli.decoding.config import GenerationConfig

    calls = fake_runs(monkeypatch, {1: 1.0, 2: 1.2, 4: 1.5, 8: 6.0})
    target = torch.nn.Linear(1, 1)
    target.device = torch.device("cpu")
    prompts = [torch.tensor([1, 2, 3])] * 8
    config = GenerationConfig(method="autoregressive", max_new_tokens=5, eos_token_ids=())
    choice = pick_batch(measure_batches(target, None, prompts, config, (8, 1, 4, 2)))
    assert calls == [(1, 1), (2, 2), (4, 4), (8, 8)]  # N prompts at batch size N, smallest first
    assert [m.tokens for m in choice.measurements] == [5, 10, 20, 40]
    assert choice.best.batch_size == 4 and choice.best.tokens_per_s == pytest.approx(20 / 1.5)
    assert choice.speedup(choice.best) == pytest.approx((20 / 1.5) / 5)
    table = choice.table()
    assert "<- chosen" in table.splitlines()[3] and "2.67x" in table


def test_out_of_memory_ends_the_stage_and_the_smaller_sizes_count(monkeypatch):
    from specexec_cli.decoding.config import GenerationConfig

    calls = fake_runs(monkeypatch, {1: 1.0, 2: 1.0, 4: 1.0}, fail_at=4)
    target = torch.nn.Linear(1, 1)
    target.device = torch.device("cpu")
    config = GenerationConfig(method="autoregressive", max_new_tokens=3, eos_token_ids=())
    measured = measure_batches(target, None, [torch.tensor([1, 2])] * 8, config, (1, 2, 4, 8))
    assert [c[1] for c in calls] == [1, 2, 4]  # 8 never tried
    assert measured[-1] == BatchMeasurement(4, error="out of memory")
    choice = pick_batch(measured)
    assert choice.best.batch_size == 2 and "failed" in choice.table()
    with pytest.raises(SpecexecError, match="no batch size"):
        pick_batch([BatchMeasurement(1, error="out of memory")])


# --- tune end to end --------------------------------------------------------------------------


def tiny_tune_options(tmp_path, **changes):
    """A small tune of the tiny pair saved in tmp_path/target and tmp_path/draft."""
    from conftest import save_tiny_cli_pair

    from specexec_cli.tuning.options import TuneOptions

    if not (tmp_path / "target").exists():
        save_tiny_cli_pair(tmp_path)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([[0, "w1 w5 w9 w2"], [1, "w7 w3 w3 w8 w1"]]))
    options = TuneOptions(
        target=str(tmp_path / "target"), drafts=(str(tmp_path / "draft"),), quantizations=("fp32",),
        budgets=(1, 4), n_beams=(4,), beam_lens=(4,), n_trials=2, n_prompts=2, prompts_file=prompts,
        max_new_tokens=4, calibration_iterations=2, storage=tmp_path / "tune.db",
        profiles_dir=tmp_path / "profiles", device="cpu", hopeless_ratio=0.0, progress=False,
    )
    return dataclasses.replace(options, **changes)


def test_a_batch_tune_saves_the_fastest_batch_size_and_generate_uses_it(tmp_path, monkeypatch):
    from specexec_cli import hardware, profiles
    from specexec_cli.tuning.tune import tune

    # batch 2 is the fastest on the synthetic clock; the real generation runs all the same
    calls = fake_runs(monkeypatch, {1: 1.0, 2: 1.0, 4: 4.0, 5: 10.0}, real=True)
    options = tiny_tune_options(tmp_path, batch_prompts_file=prompt_file(tmp_path, 5),
                                batch_sizes=(1, 2, 4, 8), batch_new_tokens=3)
    probe = hardware.probe(tmp_path / "weights", run_measurements=False)
    report = tune(options, probe=probe, target_key="tiny-target")

    assert calls == [(1, 1), (2, 2), (4, 4), (5, 5)]  # 8 capped by the 5 prompts
    assert [m.tokens for m in report.batch.measurements] == [3, 6, 12, 15]  # real tokens, 3 a prompt
    saved = profiles.load_profile(report.profile_path)
    assert saved.settings["batch_size"] == 2
    assert saved.measured["batch_size"] == 2 and saved.measured["batch_speedup"] == pytest.approx(2.0)
    assert "batch size 2" in report.summary()
    used, match = profiles.settings_for_generate("tiny-target", {"batch_size": None},
                                                 directory=tmp_path / "profiles")
    assert match is not None and used["batch_size"] == 2
    assert profiles.settings_for_generate("tiny-target", {"batch_size": 1},
                                          directory=tmp_path / "profiles")[0]["batch_size"] == 1

    # Resuming measures no trial again; the cheap batch stage runs again. Without --batch-prompts the
    # same study resumes and the profile carries no batch size.
    again = tune(options, probe=probe, target_key="tiny-target")
    assert again.result.new_evaluations == 0 and again.batch.best.batch_size == 2
    plain = tune(dataclasses.replace(options, batch_prompts_file=None), probe=probe, target_key="tiny-target")
    assert plain.result.new_evaluations == 0 and plain.batch is None
    assert "batch_size" not in profiles.load_profile(plain.profile_path).settings
    # No batch size runs at all: the search's profile is still saved, without a batch size.
    fake_runs(monkeypatch, {}, fail_at=1)
    failed = tune(options, probe=probe, target_key="tiny-target")
    assert failed.batch is None and "batch_size" not in profiles.load_profile(failed.profile_path).settings


def test_a_streamed_batch_tune_plans_the_target_for_n_caches(tmp_path, monkeypatch):
    from specexec_cli import profiles
    from specexec_cli.decoding.config import tree_headroom
    from specexec_cli.models.load import load_model, load_tokenizer
    from specexec_cli.prompts import encode_prompt
    from specexec_cli.runtime.target import plan_target
    from specexec_cli.tuning.batch_workload import read_batch_prompts, space_tree
    from specexec_cli.tuning.tune import PLAN_CONTEXT, tune

    options = tiny_tune_options(tmp_path)
    folder = tmp_path / "target"
    tokenizer = load_tokenizer(str(folder))
    draft, _ = load_model(str(tmp_path / "draft"))
    batch_prompts = prompt_file(tmp_path, 12)
    texts = [p.text for p in read_batch_prompts(batch_prompts)]
    lengths = sorted((len(encode_prompt(tokenizer, text, None, True)) for text in texts), reverse=True)
    expected = sum(lengths) + 12 * GENERATE_NEW_TOKENS + tree_headroom(space_tree((1, 4), (4,), (4,)))
    assert expected > PLAN_CONTEXT  # twelve caches need more than one prompt's plan
    full = plan_target(folder, device="cpu", quant="fp32", offload="none", budget=4, context_len=expected,
                       draft=draft)
    cap = f"cpu={full.device_bytes - 1}"  # one byte short of every layer with twelve caches: some stream

    fake_runs(monkeypatch, {1: 1.0, 12: 2.0}, real=True)
    options = dataclasses.replace(options, max_memory=(cap,), offload="disk",
                                  batch_prompts_file=batch_prompts, batch_sizes=(1, 16), batch_new_tokens=2)
    report = tune(options, probe=fake_probe(tmp_path, 64 * GiB), target_key="tiny-target")

    contexts = {key[8] for key in report.objective.pool.loaded.models if key[0] == "target"}
    assert contexts == {expected}  # every placed target planned for the twelve caches
    assert "@batch=16" in report.result.study_name
    assert [m.batch_size for m in report.batch.measurements] == [1, 12]
    settings = profiles.load_profile(report.profile_path).settings
    assert settings["batch_size"] == 12 and settings["offload"] == "disk"
    n_layers = 3
    if settings["method"] == "autoregressive":  # planned without the draft: its share holds every layer
        assert settings["resident_layers"] == n_layers
    else:
        assert 0 <= settings["resident_layers"] < n_layers


# --- generate and the profile's batch size ----------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from conftest import save_tiny_cli_pair

    root = tmp_path_factory.mktemp("models")
    save_tiny_cli_pair(root)
    return root


def test_generate_takes_the_profile_batch_size_but_streams_one_at_a_time(model_dirs, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from specexec_cli import hardware, profiles
    from specexec_cli.cli import main

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    profiles.save_profile(profiles.Profile(target="target", settings={"method": "specexec", "batch_size": 3},
                                           fingerprint=hardware.fingerprint()))
    base = ["generate", "--target", str(model_dirs / "target"), "--draft", str(model_dirs / "draft"),
            "--no-chat-template", "-n", "4", "-p", "w1 w2", "-p", "w3", "-p", "w4 w5", "-p", "w6"]
    batched = CliRunner().invoke(main, base)
    assert batched.exit_code == 0, batched.stderr
    assert "up to 3 per target pass" in batched.stderr and "batch=3" in batched.stderr
    streamed = CliRunner().invoke(main, [*base, "--stream"])
    assert streamed.exit_code == 0, streamed.stderr
    assert "per target pass" not in streamed.stderr
    explicit = CliRunner().invoke(main, [*base, "--batch-size", "2"])
    assert "up to 2 per target pass" in explicit.stderr


def test_tune_help_documents_the_batch_workload():
    from click.testing import CliRunner

    from specexec_cli.cli import main

    result = CliRunner().invoke(main, ["tune", "--help"])
    assert result.exit_code == 0
    for flag in ("--batch-prompts", "--batch-sizes", "--batch-new-tokens"):
        assert flag in result.stdout
