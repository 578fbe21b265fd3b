"""The tuner plans its space before anything loads (tuning/space_plan.py), and loses no measurement:
the bundled pair's default space under a cap planned from registry shapes with nothing loaded, the
planner's verdicts against the runtime's own plan of a real checkpoint, a whole default-space tune on
tiny models under a cap that rules out some placements, and a tune interrupted during calibration that
resumes without measuring again what it had."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("optuna")  # a core dependency; absent on the lent GPU machine (gpu_check)

from conftest import fake_probe  # noqa: E402

from specexec_cli.errors import SpecexecError  # noqa: E402
from specexec_cli.tuning import memory  # noqa: E402
from specexec_cli.tuning.memory import PlacementPlanner  # noqa: E402
from specexec_cli.tuning.space import NO_DRAFT, variant_name  # noqa: E402
from specexec_cli.tuning.space_plan import plan_space  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
GiB = 1 << 30
TARGET, DRAFT = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"


def default_space(target: str, device: torch.device, **changes):
    from specexec_cli.tuning.options import TuneOptions
    from specexec_cli.tuning.tune import build_space

    return build_space(TuneOptions(target=target, max_memory=("cpu=5GiB",), **changes), target, device)


def test_the_bundled_default_space_under_a_cap_is_planned_without_loading(tmp_path, monkeypatch):
    """Registry drafts (float and int8), the early exit, fp32 and nf4, every tier, under cpu=5GiB: the
    plan keeps exactly the pairs whose plan fits, each at the largest budget that fits, and loads
    nothing (facts from the registry's shapes here: no checkpoint is read)."""
    import specexec_cli.models.load as load
    import specexec_cli.runtime.target as runtime

    def no_loading(*args, **kwargs):
        raise AssertionError("planning loaded weights")

    for module, name in ((load, "load_model"), (runtime, "load_offloaded_target"), (load, "local_source")):
        monkeypatch.setattr(module, name, no_loading)
    monkeypatch.setattr(memory, "_local_folder", lambda name, quant: None)
    monkeypatch.setattr(memory, "stored_float_bytes", lambda name: 2)  # the bundled files are float16
    cpu = torch.device("cpu")
    space = default_space(TARGET, cpu)
    assert set(space.drafts) == {NO_DRAFT, DRAFT, f"{DRAFT}@int8", f"{TARGET}[:4]"}
    assert set(space.quantizations) == {"fp32", "nf4"} and space.offloads == ("none", "ram", "disk")
    planner = PlacementPlanner(TARGET, fake_probe(tmp_path, 64 * GiB), cpu, {"cpu": 5 * GiB}, 2304)
    lines: list[str] = []
    planned = plan_space(space, planner, unified=True, log=lines.append)
    assert lines == [f"left out: {line}" for line in planned.left_out] and lines
    lines = planned.left_out

    for quant, offload in space.variants:
        variant = variant_name(quant, offload)
        for draft in space.drafts:
            pair = planned.pairs.get((draft, variant))
            said = [line for line in lines if line.startswith((f"{draft} on {variant}:", f"{variant}:"))]
            if pair is None:  # left out with one line saying why
                assert len(said) == 1, (draft, variant, lines)
                if offload == "ram":
                    assert "ram tier" in said[0]
                elif "keeps every layer resident" not in said[0]:  # else dominated by tier none
                    smallest = 0 if draft == NO_DRAFT else space.budgets[0]
                    with pytest.raises(SpecexecError):
                        planner.plan(draft, quant, offload, smallest)
                continue
            assert not said
            floor = pair.resident_floor
            assert planner.plan(draft, quant, offload, pair.max_budget, floor) is not None
            larger = [b for b in space.budgets if b > pair.max_budget]
            if draft != NO_DRAFT and larger:  # the next budget up does not fit: the largest is kept
                with pytest.raises(SpecexecError):
                    planner.plan(draft, quant, offload, larger[0], floor)
    # the float32 target cannot stay resident under 5 GiB, with or without a draft; streamed it can
    assert not any(v == "fp32@none" for _, v in planned.pairs)
    assert {(d, "fp32@disk") for d in space.drafts} <= set(planned.pairs)
    assert not any(v.endswith("@ram") for _, v in planned.pairs)  # a CPU's ram tier: never better
    # an early exit runs on the target's first 4 layers: planned with them resident
    early = planned.pairs[(f"{TARGET}[:4]", "fp32@disk")]
    assert early.plan is not None and early.plan.resident_layers >= 4
    restricted = planned.restrict(space)
    assert all(restricted.allows(c) for c in restricted.candidates())
    assert len(restricted.candidates()) < len(space.candidates())


def save_tiny(tmp_path, make_word_tokenizer):
    """A tiny 8-layer float16 target and a 1-layer float32 draft sharing its embeddings and head, saved as
    folders with their tokenizer (Llama: a qwen2 config would pick Qwen2's tokenizer class instead)."""
    from tiny_pairs import tiny_model

    tokenizer = make_word_tokenizer([f"w{i}" for i in range(124)])
    target = tiny_model("llama", 8, seed=0, dtype=torch.float32)
    draft = tiny_model("llama", 1, seed=1, dtype=torch.float32)
    draft.model.embed_tokens.load_state_dict(target.model.embed_tokens.state_dict())
    draft.lm_head.load_state_dict(target.lm_head.state_dict())
    folders = {}
    for name, model in (("target", target), ("draft", draft)):
        model.config.eos_token_id = 1
        model.to(torch.float16 if name == "target" else torch.float32).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        folders[name] = tmp_path / name
    return folders, draft.float(), target.float(), tokenizer


@pytest.mark.parametrize("offload", ["none", "ram", "disk"])
def test_the_planner_agrees_with_the_runtime_on_a_real_checkpoint(tmp_path, make_word_tokenizer, offload):
    """The pre-plan reads the runtime's own facts of a checkpoint (its float16 layers kept narrow where
    the tier streams): at every budget and under caps from generous to too small, it fits exactly when
    `plan_target` (the loader's plan, nothing loaded) fits, with the same resident layers."""
    from specexec_cli.runtime.target import plan_target
    from specexec_cli.tuning.memory import hardware_facts

    folders, draft, _, _ = save_tiny(tmp_path, make_word_tokenizer)
    probe = fake_probe(tmp_path, 64 * GiB)
    cpu = torch.device("cpu")
    full = plan_target(folders["target"], device="cpu", quant="fp32", offload="none", budget=64,
                       context_len=300, draft=draft, hardware=hardware_facts(probe, cpu, {}))
    agreed = refused = 0
    for cap in (full.device_bytes + (1 << 20), full.device_bytes - 20_000, full.device_bytes - 60_000,
                full.device_bytes // 2):
        planner = PlacementPlanner(str(folders["target"]), probe, cpu, {"cpu": cap}, 300)
        planner.count_draft("tiny-draft", draft)
        for draft_key, module in ((NO_DRAFT, None), ("tiny-draft", draft)):
            for budget in ((0,) if module is None else (1, 8, 64, 512)):
                try:
                    theirs = plan_target(folders["target"], device="cpu", quant="fp32", offload=offload,
                                         resident_layers=None, budget=budget, context_len=300, draft=module,
                                         hardware=hardware_facts(probe, cpu, {}), max_memory={"cpu": cap})
                except SpecexecError:
                    theirs = None
                try:
                    ours = planner.plan(draft_key, "fp32", offload, budget)
                except SpecexecError:
                    ours = None
                assert (ours is None) == (theirs is None), (cap, draft_key, budget)
                if ours is not None:
                    assert (ours.resident_layers, ours.buffers) == (theirs.resident_layers, theirs.buffers)
                    agreed += 1
                else:
                    refused += 1
    assert agreed and refused  # the caps cover both verdicts


def tiny_tune(tmp_path, make_word_tokenizer, **changes):
    """A default-space tune (drafts float and int8, the early exit; fp32 and nf4; tiers none, ram and
    disk) of the tiny saved target under a cap that holds every layer only without a draft."""
    from specexec_cli.runtime.target import plan_target
    from specexec_cli.tuning.options import TuneOptions
    from specexec_cli.tuning.tune import PLAN_CONTEXT

    folders, draft, _, _ = save_tiny(tmp_path, make_word_tokenizer)

    def device_bytes(offload: str, **kwargs) -> int:
        return plan_target(folders["target"], device="cpu", quant="fp32", offload=offload,
                           context_len=PLAN_CONTEXT, **kwargs).device_bytes

    streamed = device_bytes("disk", resident_layers=0, budget=16, draft=draft)
    assert device_bytes("none", budget=1, draft=draft) > streamed + 1000  # resident beside a draft: no
    cap = f"cpu={streamed + 1000}"  # the draft fits only beside a streamed target
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([[0, "w1 w5 w9 w2"], [1, "w7 w3 w3 w8 w1"]]))
    draft_folder = str(folders["draft"])
    options = TuneOptions(
        target=str(folders["target"]), drafts=(draft_folder, f"{draft_folder}@int8", "first-layers:2"),
        quantizations=("fp32", "nf4"), budgets=(1, 4, 16), n_beams=(4,), beam_lens=(4,), n_trials=6,
        n_prompts=2, prompts_file=prompts, max_new_tokens=6, calibration_iterations=2,
        storage=tmp_path / "tune.db", profiles_dir=tmp_path / "profiles", device="cpu", hopeless_ratio=0.0,
        progress=False, max_memory=(cap,), study="tiny", **changes)
    return options


def target_loads(report) -> list[tuple]:
    """(format, tier, planned with a separate draft) of every target the tune loaded and still holds,
    and of every placement it measured."""
    pool = report.objective.pool
    held = [(key[2], key[5].offload if len(key) > 5 else "", len(key) > 5 and key[6] is not None)
            for key in pool.loaded.models if key[0] == "target"]
    ran = [(spec.weight_format, spec.placement.offload if spec.placement else "", spec.draft is not None
            and spec.early_exit is None) for spec in pool.specs.values()]
    return held + ran


def test_a_default_space_tune_under_a_cap_leaves_out_what_cannot_run_and_saves_a_profile(
        tmp_path, make_word_tokenizer, capfd):
    from specexec_cli import profiles
    from specexec_cli.tuning.tune import tune

    options = tiny_tune(tmp_path, make_word_tokenizer)
    report = tune(options, probe=fake_probe(tmp_path, 64 * GiB), target_key="tiny-target")
    loads = target_loads(report)
    err = capfd.readouterr().err
    left = [line for line in err.splitlines() if "left out:" in line]
    assert any("fp32@none" in line for line in left)  # resident float32 beside a draft: over the cap
    assert any("fp32@ram" in line and "ram tier" in line for line in left)
    assert all(tier != "ram" for _, tier, _ in loads)  # nothing left out was loaded
    # resident float32 was loaded only without a separate draft (plain decoding, the early exit)
    assert all(not separate for fmt, tier, separate in loads if (fmt, tier) == ("fp32", "none"))
    assert not any("on fp32@disk" in line and "[:2]" in line for line in left)  # its layers stay resident
    space = report.space
    assert space.allowed is not None
    assert all(space.allows(e.candidate) for e in report.result.evaluations)
    assert report.result.evaluations and report.profile_path is not None
    saved = profiles.load_profile(report.profile_path)
    assert saved.settings["max_memory"] == list(options.max_memory)
    assert saved.settings["offload"] in ("none", "disk")
    assert report.calibration.covers(space)


def test_a_tune_interrupted_during_calibration_resumes_without_measuring_again(
        tmp_path, make_word_tokenizer, monkeypatch):
    """Ctrl-C (or a kill: every measurement is committed to the study's SQLite as it is made) in the
    middle of the acceptance measurements; the same command again measures only what was missing."""
    from specexec_cli.tuning import calibration
    from specexec_cli.tuning.tune import tune

    options = tiny_tune(tmp_path, make_word_tokenizer)
    probe = fake_probe(tmp_path, 64 * GiB)
    real_acceptance, real_curve = calibration.measure_acceptance, calibration.measure_forward_curve
    calls = {"acceptance": 0, "curves": 0, "streamed": 0}

    def acceptance(*args, **kwargs):
        calls["acceptance"] += 1
        if calls["acceptance"] == 2:  # the second draft's curve: the first one is already stored
            raise KeyboardInterrupt
        return real_acceptance(*args, **kwargs)

    def counted(name, real):
        def run(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(calibration, "measure_acceptance", acceptance)
    monkeypatch.setattr(calibration, "measure_forward_curve", counted("curves", real_curve))
    monkeypatch.setattr(calibration, "measure_streamed", counted("streamed", calibration.measure_streamed))
    with pytest.raises(KeyboardInterrupt):
        tune(options, probe=probe, target_key="tiny-target")
    from specexec_cli.tuning.study import open_study
    from specexec_cli.tuning.tune import stored_calibration

    stored = stored_calibration(open_study(options.storage, options.study))
    assert stored is not None and stored.target_curves and len(stored.acceptance) == 1
    timed = calls["curves"] + calls["streamed"]
    assert timed > 0

    calls.update(acceptance=0, curves=0, streamed=0)
    monkeypatch.setattr(calibration, "measure_acceptance", counted("acceptance", real_acceptance))
    report = tune(options, probe=probe, target_key="tiny-target")
    assert calls["curves"] == calls["streamed"] == 0  # every target and draft timing was kept
    first = next(iter(stored.acceptance))
    assert report.calibration.acceptance[first] == stored.acceptance[first]  # not measured again
    assert calls["acceptance"] == len(report.calibration.acceptance) - 1
    for variant, curve in stored.target_curves.items():
        assert report.calibration.target_curves[variant] == curve
    assert report.result.evaluations
