"""Starting profiles: cost-model settings for known targets on common hardware classes.

Nothing here is measured. For each hardware class (nominal bandwidths and throughput of a typical
machine of that class) and each known target, every (draft, quantization, budget, beam shape) is
scored with the cost model under the acceptance prior, checked against the memory planner
(runtime.plan), and the best is written as a profile of kind "starting" with its predicted tokens/s.
`specexec generate` uses one when no tuned profile exists; `specexec tune` replaces it with measured
settings. Regenerate the shipped files with `write_starting_profiles(Path("specexec_cli/data/profiles"))`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from specexec_cli import profiles
from specexec_cli.errors import SpecexecError
from specexec_cli.hardware import GIB
from specexec_cli.runtime import plan as planner
from specexec_cli.tuning import cost_model as cm
from specexec_cli.tuning.memory import model_facts
from specexec_cli.tuning.space import DEFAULT_BUDGETS, NO_DRAFT, UNCAPPED

CONTEXT = 1024  # prompt + new tokens the KV caches are planned for


@dataclass(frozen=True)
class HardwareClass:
    """Nominal figures for a class of machines (not a measurement)."""

    key: str
    label: str
    gpu_memory_gib: int  # 0: CPU only
    ram_gib: int
    h2d_bytes_per_s: float  # pinned host-to-device copies (PCIe)
    device_bytes_per_s: float  # memory bandwidth of the compute device
    flops: float  # achieved matmul throughput in the compute dtype
    pcie: str | None = None
    # Forward time of 2+ tokens as a multiple of 1 token, at least: on CPUs torch's matmul for 2+ rows
    # (GEMM) runs far below its 1-row path (GEMV); 1.0 where the roofline holds.
    multi_token_floor: float = 1.0

    def curve(self, seconds_at: dict[int, float]) -> cm.LatencyCurve:
        """A latency curve with the multi-token floor applied."""
        one = seconds_at[1]
        return cm.LatencyCurve.from_points(
            {b: s if b == 1 else max(s, self.multi_token_floor * one) for b, s in seconds_at.items()}
        )

    @property
    def has_gpu(self) -> bool:
        return self.gpu_memory_gib > 0

    def as_profile_hardware(self) -> dict:
        return {
            "label": self.label,
            "gpu_memory_gib": self.gpu_memory_gib,
            "ram_gib": self.ram_gib,
            "pcie": self.pcie,
            "assumed_h2d_gb_per_s": self.h2d_bytes_per_s / 1e9,
            "assumed_device_gb_per_s": self.device_bytes_per_s / 1e9,
            "assumed_tflops": self.flops / 1e12,
            "assumed_multi_token_floor": self.multi_token_floor,
        }


HARDWARE_CLASSES = (
    HardwareClass(
        "gpu24-pcie4x16-ram128",
        "24 GB GPU, PCIe 4.0 x16, 128 GB RAM (RTX 3090/4090 class)",
        24,
        128,
        25e9,
        900e9,
        70e12,
        "4.0 x16",
    ),
    HardwareClass(
        "gpu12-pcie4x16-ram64",
        "12 GB GPU, PCIe 4.0 x16, 64 GB RAM (RTX 3060/4070 class)",
        12,
        64,
        25e9,
        400e9,
        30e12,
        "4.0 x16",
    ),
    HardwareClass(
        "gpu80-pcie4x16-ram256",
        "80 GB GPU, PCIe 4.0 x16, 256 GB RAM (A100 80GB class)",
        80,
        256,
        25e9,
        1800e9,
        200e12,
        "4.0 x16",
    ),
    HardwareClass(
        "cpu-avx2-ram16",
        "CPU only (AVX2, 2+ cores), 16 GB RAM",
        0,
        16,
        0.0,
        15e9,
        50e9,
        multi_token_floor=3.0,
    ),
)

# Targets and the acceptance prior scale assumed for their drafts (the paper's Llama-2 7B/70B pair
# is 2.1; smaller drafts agree less with their target).
STARTING_TARGETS = (
    "llama-2-70b",
    "llama-3-70b",
    "llama-3.1-70b",
    "mixtral-8x7b",
    "qwen2.5-72b",
    "qwen2.5-coder-1.5b",
)
N_BEAMS = (8, 32, 128)
BEAM_LENS = (UNCAPPED, 8, 16, 32)  # UNCAPPED (first: it wins ties): no cap, the tree as deep as it pays


def prior_scale(draft_params: int, target_params: int) -> float:
    """Assumed acceptance-prior scale for a pair: 2.1 at the paper's 7B/70B size ratio (1/10),
    0.6 less per halving of the ratio, within [0.8, 2.1]: never better than the paper's pair."""
    ratio = draft_params / target_params
    return min(2.1, max(0.8, 2.1 + 0.6 * math.log2(ratio / 0.1)))


BATCHES = tuple(2**i for i in range(13))


def target_curve(
    shape: cm.ModelShape, quant: str, hw: HardwareClass, the_plan: planner.Plan
) -> cm.LatencyCurve:
    """Roofline target times: streamed layers at PCIe bandwidth, resident ones at device bandwidth."""
    if not hw.has_gpu or the_plan.resident_layers >= shape.n_layers:
        return hw.curve(
            {b: cm.roofline_forward_s(shape, quant, b, hw.device_bytes_per_s, hw.flops) for b in BATCHES}
        )
    return hw.curve(
        {
            b: cm.offloaded_forward_s(
                shape, quant, b, hw.h2d_bytes_per_s, hw.device_bytes_per_s, hw.flops, the_plan.resident_layers
            )
            for b in BATCHES
        }
    )


@dataclass(frozen=True)
class Choice:
    settings: dict
    predicted: float


def _plan(hw: HardwareClass, facts: planner.ModelFacts, budget: int, draft_bytes: int) -> planner.Plan | None:
    """The memory planner's decision for this class, or None when the run cannot fit."""
    hardware = planner.HardwareFacts(
        device_mem_free=int(hw.gpu_memory_gib * GIB * 0.95) if hw.has_gpu else int(hw.ram_gib * GIB * 0.8),
        host_ram_available=int(hw.ram_gib * GIB * 0.8),
        disk_free=10**13,
        unified=not hw.has_gpu,
    )
    request = planner.PlanRequest(
        offload="auto",
        buffers=2,
        resident_layers=None,
        budget=max(1, budget),
        context_len=CONTEXT,
        draft_bytes=draft_bytes,
        draft_kv_bytes_per_token=0,
        reserve_bytes=(1 << 30) if hw.has_gpu else 0,
    )
    try:
        return planner.plan(hardware, facts, request)
    except SpecexecError:
        return None


def best_settings(
    target: str, hw: HardwareClass, budgets: tuple[int, ...] = DEFAULT_BUDGETS
) -> Choice | None:
    """The configuration the cost model likes best for `target` on `hw`, or None if nothing fits."""
    from specexec_cli.models.registry import drafts_for, resolve
    from specexec_cli.tuning.memory import model_shape

    spec = resolve(target)
    shape = model_shape(target)
    float_quant = "fp16" if hw.has_gpu else "fp32"
    float_bytes = 2 if hw.has_gpu else 4
    quants = [float_quant]  # NF4 dequantizes slowly on CPUs (bitsandbytes): GPU classes only
    if hw.has_gpu:
        quants += [*spec.variants, "nf4"]  # 4-bit checkpoints first: they win ties
    drafts = [(d.name, model_shape(d.name), d.params) for d in drafts_for(spec)]
    choices: list[Choice] = []
    for quant in quants:
        facts = model_facts(shape, quant, float_bytes)
        plain_plan = _plan(hw, facts, 1, 0)
        if plain_plan is None:
            continue
        plain = cm.predict_tokens_per_s(cm.PairCosts(target_curve(shape, quant, hw, plain_plan)), 0)
        choices.append(Choice(_settings(NO_DRAFT, quant, 0, 0, 0, plain_plan), plain))
        for name, draft_shape, params in drafts:
            draft_bytes = int(draft_shape.weight_bytes(float_quant))
            draft = hw.curve(
                {
                    b: cm.roofline_forward_s(draft_shape, float_quant, b, hw.device_bytes_per_s, hw.flops)
                    for b in BATCHES
                }
            )
            acceptance = cm.AcceptanceCurve.prior(scale=prior_scale(params, spec.params))
            for budget in budgets:
                the_plan = _plan(hw, facts, budget, draft_bytes)
                if the_plan is None:
                    break  # larger budgets need more memory still
                costs = cm.PairCosts(target_curve(shape, quant, hw, the_plan), draft, acceptance, 0.01)
                for beams in N_BEAMS:
                    for length in BEAM_LENS:
                        speed = cm.predict_tokens_per_s(costs, budget, beams, length)
                        choices.append(Choice(_settings(name, quant, budget, beams, length, the_plan), speed))
    return max(choices, key=lambda c: c.predicted, default=None)


def _settings(draft: str, quant: str, budget: int, beams: int, length: int, the_plan: planner.Plan) -> dict:
    settings: dict = {"method": "autoregressive" if draft == NO_DRAFT else "specexec", "quantization": quant}
    if draft != NO_DRAFT:
        settings.update(
            draft=draft, budget=budget, max_n_beams=beams, max_branch_width=8
        )
        if length < budget:  # a cap at least the budget caps nothing: none is written
            settings["max_beam_len"] = length
    settings["offload"] = the_plan.offload
    if the_plan.offload != "none":
        settings.update(buffers=max(2, the_plan.buffers), resident_layers=the_plan.resident_layers)
    return settings


def starting_profile(target: str, hw: HardwareClass) -> profiles.Profile | None:
    choice = best_settings(target, hw)
    if choice is None:
        return None
    plain = best_settings_plain(target, hw)
    predicted = {"tokens_per_s": round(choice.predicted, 3)}
    if plain:
        predicted["autoregressive_tokens_per_s"] = round(plain, 3)
        predicted["speedup"] = round(choice.predicted / plain, 2)
    return profiles.Profile(
        target=target,
        settings=choice.settings,
        kind="starting",
        hardware={**hw.as_profile_hardware(), "class": hw.key},
        predicted=predicted,
        source="cost model (not measured): specexec_cli.tuning.presets with the acceptance prior",
        notes=["derived from the cost model, not measured; run `specexec tune` on your machine"],
    )


def best_settings_plain(target: str, hw: HardwareClass) -> float | None:
    choice = best_settings(target, hw, budgets=())
    return choice.predicted if choice else None


def write_starting_profiles(directory: Path) -> list[Path]:
    """Write one starting profile per (known target, hardware class) that fits; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for target in STARTING_TARGETS:
        for hw in HARDWARE_CLASSES:
            profile = starting_profile(target, hw)
            if profile is None or (not hw.has_gpu and profile.settings.get("offload") != "none"):
                continue  # a CPU-only machine streaming a 70B model from disk needs no preset
            path = directory / f"{profiles.slug(target)}@{hw.key}.json"
            path.write_text(json.dumps(profile.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
            written.append(path)
    return written
