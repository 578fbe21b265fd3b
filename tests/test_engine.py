"""One engine for every front door: generate, serve, a Ray worker, bench and a tune trial resolve the same
EngineSpec for the same flags and profile (on a CPU, and for a CUDA device passed in as the machine: no
GPU needed to compare specs), the spec a tune trial measured is what generate resolves from the profile
it saved, and the engine settings table makes the flags, the request and the profile schema."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from conftest import save_tiny_cli_pair

from specexec_cli import engine as engine_module
from specexec_cli.engine import EngineSpec, Machine, Placement, resolve
from specexec_cli.settings import SETTINGS, EngineRequest, profile_types

CPU = Machine("cpu", bf16=False, int8_cpu=True)
GPU = Machine("cuda", bf16=True, int8_cpu=False)


class Resolved(BaseException):  # noqa: N818 - not an error: the front doors' error handling lets it through
    """Raised by the patched loader: the spec is what the test wanted, no weights load."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec


@pytest.fixture
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_tiny_cli_pair(root)
    return root


@pytest.fixture(params=["cpu", "cuda"])
def machine(request, monkeypatch) -> Machine:
    """The machine every front door resolves on: this CPU, or a CUDA device passed in."""
    chosen = CPU if request.param == "cpu" else GPU
    monkeypatch.setattr(engine_module.Machine, "here", classmethod(lambda cls, device=None: chosen))
    return chosen


@pytest.fixture
def captured(monkeypatch) -> list[EngineSpec]:
    """Every spec a front door hands to engine.load (which then stops the front door)."""
    specs: list[EngineSpec] = []

    def load(spec, workload, models=None):
        specs.append(spec)
        raise Resolved(spec)

    monkeypatch.setattr(engine_module, "load", load)
    return specs


def flags_of(models, *extra: str) -> list[str]:
    return ["-t", str(models / "target"), "-d", str(models / "draft"), "--budget", "16", "--max-n-beams", "4",
            "--max-branch-width", "4", *extra]


def run_generate(args: list[str]) -> None:
    from specexec_cli.cli import main

    with pytest.raises(Resolved):  # a BaseException: CliRunner lets it through
        CliRunner().invoke(main, ["generate", *args, "--no-chat-template", "-n", "4", "-p", "w1 w2"])


def run_serve(args: list[str]) -> None:
    from specexec_cli.cli import main

    with pytest.raises(Resolved):
        CliRunner().invoke(main, ["serve", *args, "--port", "0", "--max-batch", "1"])


def run_ray_worker(args: list[str], workers_per_node: int = 1) -> None:
    """What `generate --ray` sends a worker (its Job), opened as the worker opens it."""
    from specexec_cli.cli import engine_request, generate
    from specexec_cli.cluster.driver import plan_prompts
    from specexec_cli.cluster.worker import Job, open_job_engine
    from specexec_cli.decoding.config import SamplingConfig
    from specexec_cli.prompts import Prompt

    context = generate.make_context("generate", [*args, "-p", "w1"])
    engine = {k: v for k, v in context.params.items() if k in {s.name for s in SETTINGS} | {"no_profile"}}
    prompts = [Prompt("0", "w1 w2")]
    job = Job(engine_request(engine, None), 4, SamplingConfig(), (), None, None, False, plan_prompts(prompts),
              1, workers_per_node=workers_per_node)
    with pytest.raises(Resolved):
        open_job_engine(job)


def run_bench(args: list[str]) -> None:
    from specexec_cli.cli import main

    with pytest.raises(Resolved):
        CliRunner().invoke(main, ["bench", *[a for a in args if a not in ("--budget", "16")],
                                  "--budgets", "16", "--methods", "specexec,autoregressive",
                                  "--no-assisted", "--n-prompts", "1", "-n", "4"])


def test_every_front_door_resolves_the_same_spec(models, machine, captured, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # no tuned profile
    draft_quant = "int8" if machine is CPU else "none"
    args = flags_of(models, "--draft-quant", draft_quant, "--no-profile")
    run_generate(args)
    run_serve(args)
    run_ray_worker(args)
    run_bench([a for a in args if a != "--no-profile"])  # bench never applies a profile
    from specexec_cli.tuning.pool import trial_spec
    from specexec_cli.tuning.space import UNCAPPED, Candidate

    key = str(models / "draft") + ("@int8" if draft_quant == "int8" else "")
    fmt = "fp32" if machine is CPU else "bf16"
    captured.append(trial_spec(Candidate(key, fmt, 16, 4, UNCAPPED), str(models / "target"), machine, (), 4,
                               None))
    generate_spec = captured[0]
    # the batch size is each front door's own: serve's --max-batch 1, bench's one prompt at a time
    assert [s.lanes for s in captured] == [None, 1, None, 1, None]
    same = [dataclasses.replace(s, lanes=None) for s in captured]
    assert same == [same[0]] * 5
    assert generate_spec.device == machine.device and generate_spec.compute_dtype == fmt
    assert generate_spec.draft_format == draft_quant and generate_spec.placement is None


def test_ray_workers_on_one_node_plan_a_share_of_its_host_memory(models, machine, captured, tmp_path,
                                                                 monkeypatch):
    import psutil

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    gib = 1 << 30
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=64 * gib))
    offloaded = flags_of(models, "--no-profile", "--offload", "disk", "--max-memory", "cpu=40GiB")
    run_ray_worker(offloaded, workers_per_node=4)
    run_ray_worker(offloaded, workers_per_node=1)
    run_ray_worker(flags_of(models, "--no-profile"), workers_per_node=4)  # resident: no host plan to share
    shared, alone, resident = captured
    assert shared.placement.max_memory == ("cpu=16GiB",)  # a quarter of the node's 64 GiB free
    assert alone.placement.max_memory == ("cpu=40GiB",)
    assert resident.placement is None


def test_the_profile_applies_alike_at_every_front_door_and_flags_win(models, machine, captured, tmp_path,
                                                                     monkeypatch):
    from specexec_cli import hardware, profiles

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    settings = {"method": "specexec", "draft": str(models / "draft"), "budget": 32, "max_n_beams": 8,
                "draft_quant": "none", "offload": "disk", "buffers": 3, "resident_layers": 1,
                "max_memory": ["cpu=3GiB"], "quantization": "fp32" if machine is CPU else "bf16"}
    profiles.save_profile(profiles.Profile(target="target", settings=settings,
                                           fingerprint=hardware.fingerprint()))
    args = ["-t", str(models / "target"), "--max-n-beams", "4"]  # a flag on top of the profile
    run_generate(args)
    run_serve(args)
    run_ray_worker(args)
    generate_spec, serve_spec, ray_spec = captured
    assert dataclasses.replace(serve_spec, lanes=None) == generate_spec == ray_spec
    assert generate_spec.tree.budget == 32 and generate_spec.tree.max_n_beams == 4  # the flag wins
    assert generate_spec.placement == Placement("disk", 3, 1, None, ("cpu=3GiB",))
    assert generate_spec.draft_format == "none"


def test_a_tune_trial_measured_what_generate_resolves_from_its_profile(models):
    """A placed trial's spec with the placement its plan pinned, saved as a profile, resolves to itself."""
    from specexec_cli.tuning.pool import trial_spec
    from specexec_cli.tuning.space import Candidate

    for machine in (CPU, GPU):
        fmt = "fp32" if machine is CPU else "fp16"
        draft = str(models / "draft") + ("@int8" if machine is CPU else "")
        for candidate in (Candidate(draft, fmt, 32, 8, 4, "disk"), Candidate("none", fmt, offload="disk"),
                          Candidate(f"{models / 'target'}[:1]", fmt, 16, 4, 4096, "disk")):
            spec = trial_spec(candidate, str(models / "target"), machine, ("cpu=2GiB",), 8, None)
            placement = dataclasses.replace(spec.placement, resident_layers=2, offload="disk")
            pinned = dataclasses.replace(spec, placement=placement)
            again = resolve(EngineRequest(target=str(models / "target")), pinned.profile_settings(), machine)
            assert again == pinned, candidate


def test_one_rule_chooses_the_compute_dtype():
    from specexec_cli.engine import compute_dtype

    assert compute_dtype(CPU, "gptq") == "fp32" and compute_dtype(GPU, "gptq") == "bf16"
    assert compute_dtype(dataclasses.replace(GPU, bf16=False), "nf4") == "fp16"
    assert compute_dtype(GPU, "fp16") == "fp16" and compute_dtype(CPU, "bf16") == "bf16"  # a float format
    assert compute_dtype(GPU, "awq", "fp16") == "fp16"  # --dtype for a quantized target


def test_the_settings_table_makes_the_flags_the_request_and_the_profile_schema():
    from specexec_cli import profiles
    from specexec_cli.cli import generate, serve

    names = {s.name for s in SETTINGS}
    assert {f.name for f in dataclasses.fields(EngineRequest)} == names | {"batch_size", "use_profile"}
    for command in (generate, serve):
        options = {p.name for p in command.params}
        assert names <= options, names - options
    assert profiles.SETTING_TYPES == profile_types()
    assert {s.profile for s in SETTINGS if s.profile} | {"batch_size"} == set(profiles.SETTING_TYPES)
