"""`specexec tune`: find the fastest configuration for one target on this machine, and save it.

Steps: probe the hardware (cached) -> build the search space (drafts sharing the target's tokenizer,
early-exit drafts, target quantizations) -> calibrate the cost model with short measurements (target
and draft forward times at a few batch sizes, the pair's acceptance curve from one large-budget run) ->
search (tuning.search: Optuna ask-and-tell in SQLite, objective = measured decode tokens/s on the
calibration prompts) -> save the best as a profile (profiles.save_profile).

Loaded models are kept in a `ModelPool` between trials (loads are the expensive part), and the search
evaluates several budgets per load.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil
import torch

from specexec_cli import hardware, profiles
from specexec_cli.decoding.config import GenerationConfig, SamplingConfig, TreeConfig
from specexec_cli.decoding.generate import generate
from specexec_cli.errors import SpecexecError, UsageError
from specexec_cli.tuning import cost_model as cm
from specexec_cli.tuning.calibration import (
    AcceptanceMeasurement,
    Prompt,
    encode_prompt,
    measure_acceptance,
    measure_forward_curve,
    packaged_prompts,
    read_prompts,
)
from specexec_cli.tuning.search import (
    DEFAULT_BUDGETS,
    NO_DRAFT,
    Candidate,
    SearchResult,
    SearchSpace,
    default_storage_path,
    early_exit_key,
    format_results,
    generate_draft_name,
    normalize_draft,
    open_study,
    parse_early_exit,
    run_search,
)

FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
WEIGHT_QUANTS = ("nf4", "int8", "gptq")

LoadFn = Callable[[str, str, torch.device], tuple[Any, Any]]


def log(message: str) -> None:
    print(f"specexec: {message}", file=sys.stderr, flush=True)


# --- options ----------------------------------------------------------------------------------


@dataclass
class TuneOptions:
    """Everything `specexec tune` takes; None means "decide from the registry and the hardware"."""

    target: str
    drafts: tuple[str, ...] | None = None  # draft names; "none" and early-exit keys allowed
    quantizations: tuple[str, ...] | None = None
    early_exit_layers: tuple[int, ...] | None = None  # early-exit drafts from the target
    budgets: tuple[int, ...] = DEFAULT_BUDGETS
    n_beams: tuple[int, ...] = (8, 32, 128)
    beam_lens: tuple[int, ...] = (8, 16, 32)
    max_branch_width: int = 8
    n_trials: int = 24
    timeout: float | None = None  # seconds for the whole run; at least one trial runs after calibration
    prompts_file: Path | None = None
    n_prompts: int = 2
    max_new_tokens: int = 32
    temperature: float = 0.0
    seed: int = 0
    study: str | None = None
    storage: Path | None = None
    device: str | None = None
    profiles_dir: Path | None = None
    save: bool = True
    trial_time_limit_s: float | None = None  # stop a slow measurement early (rate over what was made)
    calibration_iterations: int = 4  # SpecExec iterations per prompt for the acceptance curve
    hopeless_ratio: float = 0.5  # rule out trials predicted below this x the best measured (0: never)
    progress: bool = True

    def validate(self) -> None:
        if self.n_trials < 1:
            raise UsageError(f"--trials must be >= 1, got {self.n_trials}")
        if self.timeout is not None and self.timeout <= 0:
            raise UsageError(f"--timeout must be > 0, got {self.timeout}")
        if self.max_new_tokens < 2:
            raise UsageError(f"--max-new-tokens must be >= 2 for tuning, got {self.max_new_tokens}")
        if self.n_prompts < 1:
            raise UsageError(f"--n-prompts must be >= 1, got {self.n_prompts}")
        for name in ("budgets", "n_beams", "beam_lens"):
            values = getattr(self, name)
            if not values or min(values) < 1 or max(values) > 4096:
                raise UsageError(f"{name.replace('_', ' ')} must lie in 1..4096")
        for quant in self.quantizations or ():
            if quant not in FLOAT_DTYPES and quant not in WEIGHT_QUANTS:
                known = ", ".join([*FLOAT_DTYPES, *WEIGHT_QUANTS])
                raise UsageError(f"unknown quantization {quant!r}; choose from {known}")


# --- models -----------------------------------------------------------------------------------


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(quant: str, device: torch.device) -> torch.dtype:
    """The float dtype a quantization computes in on `device`."""
    if quant in FLOAT_DTYPES:
        return FLOAT_DTYPES[quant]
    return torch.float16 if device.type == "cuda" else torch.float32


def load_variant(name: str, quant: str, device: torch.device) -> tuple[Any, Any]:
    """(model, tokenizer) of `name` in quantization `quant` on `device`.

    Float variants load resident. 4-bit / int8 variants load through the offloaded runtime, which
    plans the tier (resident, host RAM or disk) and buffers; on a CPU they stay resident.
    """
    from specexec_cli.models.load import load_model, load_tokenizer, local_source
    from specexec_cli.models.registry import resolve

    if quant in FLOAT_DTYPES:
        return load_model(name, device=device, dtype=FLOAT_DTYPES[quant])
    from specexec_cli.runtime.offload import load_offloaded_target

    spec = resolve(name)
    if quant == "gptq":
        spec = spec.gptq_variant()
    source = local_source(spec) or spec.source
    offload = "none" if device.type == "cpu" else "auto"
    model = load_offloaded_target(
        source, device=device, quant=quant, offload=offload, resident_layers=None, buffers=2
    )
    return model, load_tokenizer(spec)


class ModelPool:
    """Loads the target per quantization and drafts per key on first use, and keeps them.

    Early-exit drafts ("name[:n]") share the weights of the model they are cut from: from the target
    variant of the trial when cut from the target, else from the full model in float.
    Before a load, models the current trial does not need are dropped if RAM runs short.
    """

    def __init__(self, target: str, device: torch.device, load_fn: LoadFn = load_variant) -> None:
        self.target_name, self.device, self.load_fn = target, device, load_fn
        self.models: dict[tuple[str, str], Any] = {}
        self.plans: dict[str, Any] = {}
        self._tokenizer = None
        self.load_seconds = 0.0

    @property
    def float_quant(self) -> str:
        return "fp16" if self.device.type == "cuda" else "fp32"

    def _load(self, name: str, quant: str, keep: set[tuple[str, str]]) -> Any:
        key = (name, quant)
        if key not in self.models:
            self._make_room(keep)
            log(f"loading {name} ({quant})")
            start = time.perf_counter()
            model, tokenizer = self.load_fn(name, quant, self.device)
            self.load_seconds += time.perf_counter() - start
            if name == self.target_name:
                self._tokenizer = self._tokenizer or tokenizer
            else:  # a draft must map text to the same ids as the target
                from specexec_cli.models.load import check_compatible

                check_compatible(self.tokenizer(), tokenizer)
            self.models[key] = model
        else:  # most recently used last
            self.models[key] = self.models.pop(key)
        return self.models[key]

    def _make_room(self, keep: set[tuple[str, str]], min_free_fraction: float = 0.25) -> None:
        memory = psutil.virtual_memory()
        for key in list(self.models):
            if memory.available >= min_free_fraction * memory.total:
                return
            if key not in keep:
                del self.models[key]
                gc.collect()
                memory = psutil.virtual_memory()

    def tokenizer(self):
        if self._tokenizer is None:
            self.target(self.float_quant)
        return self._tokenizer

    def target(self, quant: str) -> Any:
        model = self._load(self.target_name, quant, {(self.target_name, quant)})
        engine = getattr(model, "offload_engine", None)
        if engine is not None and engine.plan is not None:
            self.plans[quant] = engine.plan
        return model

    def draft_variant(self, key: str, quant: str) -> str:
        """The weights a draft is made from for a trial on target variant `quant`: an early exit of the
        target is cut from that variant when it is a float one; every other draft (and an early exit
        of a 4-bit / int8 target, whose layers are bound only while the runtime runs them) comes from
        float weights."""
        early = parse_early_exit(key)
        if early is not None and early[0] == self.target_name and quant in FLOAT_DTYPES:
            return quant
        return self.float_quant

    def draft(self, key: str, quant: str) -> Any | None:
        if key == NO_DRAFT:
            return None
        variant = self.draft_variant(key, quant)
        early = parse_early_exit(key)
        if early is None:
            return self._load(key, variant, {(self.target_name, quant), (key, variant)})
        base, n_layers = early
        if (key, variant) not in self.models:
            from specexec_cli.models.load import make_early_exit_draft

            source = self._load(base, variant, {(self.target_name, quant), (base, variant)})
            self.models[(key, variant)] = make_early_exit_draft(source, n_layers)
        return self.models[(key, variant)]

    def offload_settings(self, quant: str) -> dict:
        plan = self.plans.get(quant)
        if plan is None:
            return {"offload": "none"}
        settings = {"offload": plan.offload}
        if plan.offload != "none":
            settings.update(buffers=max(2, plan.buffers), resident_layers=plan.resident_layers)
        return settings


# --- the space --------------------------------------------------------------------------------


def default_quantizations(target: str, device: torch.device) -> tuple[str, ...]:
    """16-bit (float32 on a CPU, where 16-bit is slow), NF4, and GPTQ where a variant is known."""
    from specexec_cli.models.registry import resolve

    quants = ["fp16" if device.type == "cuda" else "fp32", "nf4"]
    try:
        if resolve(target).gptq_hub_id:
            quants.append("gptq")
    except SpecexecError:
        pass
    return tuple(quants)


def default_drafts(target: str, early_exit_layers: tuple[int, ...] | None) -> tuple[str, ...]:
    """Plain decoding, the registry's drafts for the target, and early-exit drafts of the target."""
    from specexec_cli.models.registry import drafts_for, resolve

    spec = resolve(target)
    drafts = [NO_DRAFT, *(d.name for d in drafts_for(spec))]
    n_layers = spec.n_layers
    if early_exit_layers is None and n_layers:
        early_exit_layers = (max(1, n_layers // 7),)
    for n in early_exit_layers or ():
        drafts.append(early_exit_key(target, n))  # keyed by the name the target is loaded by
    return tuple(dict.fromkeys(drafts))


def build_space(options: TuneOptions, target_name: str, device: torch.device) -> SearchSpace:
    if options.drafts:
        drafts = tuple(normalize_draft(d, target_name) for d in options.drafts)
    else:
        drafts = default_drafts(target_name, options.early_exit_layers)
    if options.drafts and options.early_exit_layers:
        drafts = (*drafts, *(early_exit_key(target_name, n) for n in options.early_exit_layers))
    if NO_DRAFT not in drafts:
        drafts = (NO_DRAFT, *drafts)  # plain decoding is always a candidate
    quants = options.quantizations or default_quantizations(target_name, device)
    return SearchSpace(
        drafts=tuple(dict.fromkeys(drafts)),
        quantizations=tuple(dict.fromkeys(quants)),
        budgets=tuple(sorted(set(options.budgets))),
        n_beams=tuple(sorted(set(options.n_beams))),
        beam_lens=tuple(sorted(set(options.beam_lens))),
    )


# --- the objective ----------------------------------------------------------------------------


class _TimeUp(Exception):
    pass


@dataclass
class TrialRecord:
    """What one measured candidate did (for the benchmark's predicted-vs-measured report)."""

    tokens_per_s: float
    tokens: int
    seconds: float
    tokens_per_pass: float | None = None  # decode tokens per target pass (prefill iteration excluded)
    draft_passes_per_iteration: float | None = None
    host_s_per_iteration: float | None = None
    truncated: bool = False


def generation_config(
    candidate: Candidate, max_new_tokens: int, temperature: float, seed: int, max_branch_width: int
) -> GenerationConfig:
    """The GenerationConfig that runs `candidate` (no EOS: every run makes exactly max_new_tokens)."""
    tree = TreeConfig()
    if not candidate.autoregressive:
        tree = TreeConfig(candidate.budget, candidate.max_n_beams, candidate.max_beam_len, max_branch_width)
    return GenerationConfig(
        method="autoregressive" if candidate.autoregressive else "specexec",
        max_new_tokens=max_new_tokens,
        sampling=SamplingConfig(temperature=temperature),
        tree=tree,
        eos_token_ids=(),
        seed=seed,
    )


class GenerationObjective:
    """Measured decode tokens/s of a candidate: real generation on the calibration prompts, same seed,
    fixed new-token count. The prompt's prefill (the first iteration) is not timed: it is the same
    work for every configuration of a target and would only blur the differences."""

    def __init__(
        self,
        pool: ModelPool,
        prompts: list[torch.Tensor],
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        max_branch_width: int = 8,
        time_limit_s: float | None = None,
    ) -> None:
        self.pool, self.prompts = pool, prompts
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.max_branch_width, self.time_limit_s = max_branch_width, time_limit_s
        self.records: dict[Candidate, TrialRecord] = {}
        self._warm: set[tuple[str, str]] = set()

    def config(self, candidate: Candidate, max_new_tokens: int | None = None) -> GenerationConfig:
        return generation_config(
            candidate,
            max_new_tokens or self.max_new_tokens,
            self.temperature,
            self.seed,
            self.max_branch_width,
        )

    def _models(self, candidate: Candidate):
        target = self.pool.target(candidate.quantization)
        draft = self.pool.draft(candidate.draft, candidate.quantization)
        if candidate.load_key not in self._warm:  # first use after a load: warm allocator and caches
            generate(target, draft, self.prompts[0], self.config(candidate, 2))
            self._warm.add(candidate.load_key)
        return target, draft

    def _run(self, target, draft, ids: torch.Tensor, config: GenerationConfig, limit: float | None):
        """(decode tokens, decode seconds, decode iterations, result or None when cut at `limit`)."""
        marks: list[tuple[float, int]] = []
        start = time.perf_counter()

        def tick(token_ids: list[int]) -> str:  # called by generate after every iteration
            now = time.perf_counter()
            marks.append((now, len(token_ids)))
            if limit is not None and now - start > limit and len(marks) >= 3:
                raise _TimeUp
            return ""

        try:
            result = generate(target, draft, ids, config, decode=tick, on_text=lambda _: None)
        except _TimeUp:
            result = None
        (t0, n0), (t1, n1) = marks[0], marks[-1]
        iterations = len({n for _, n in marks}) - 1  # every iteration adds a token; the last tick repeats
        if n1 <= n0 or t1 <= t0:  # one iteration made everything: time it whole
            t0, n0, iterations = start, 0, 1
        return n1 - n0, t1 - t0, iterations, result

    def __call__(self, candidate: Candidate) -> float:
        target, draft = self._models(candidate)
        config = self.config(candidate)
        tokens, seconds, iterations = 0, 0.0, 0
        draft_passes, host, stats_iterations, truncated = 0, 0.0, 0, False
        limit = self.time_limit_s / len(self.prompts) if self.time_limit_s else None
        for ids in self.prompts:
            n, s, k, result = self._run(target, draft, ids, config, limit)
            tokens, seconds, iterations = tokens + n, seconds + s, iterations + k
            if result is None:
                truncated = True
            else:
                draft_passes += result.stats.draft_passes
                stats_iterations += result.stats.iterations
                host += result.host_s
        rate = tokens / seconds
        self.records[candidate] = TrialRecord(
            tokens_per_s=rate,
            tokens=tokens,
            seconds=seconds,
            tokens_per_pass=tokens / iterations if iterations else None,
            draft_passes_per_iteration=draft_passes / stats_iterations if stats_iterations else None,
            host_s_per_iteration=host / stats_iterations if stats_iterations else None,
            truncated=truncated,
        )
        return rate


# --- calibration ------------------------------------------------------------------------------


@dataclass
class Calibration:
    """The measured cost-model inputs for one target on this machine."""

    target_curves: dict[str, cm.LatencyCurve] = field(default_factory=dict)
    draft_curves: dict[tuple[str, str], cm.LatencyCurve] = field(default_factory=dict)
    acceptance: dict[str, AcceptanceMeasurement] = field(default_factory=dict)
    host_s: float = cm.DEFAULT_HOST_OVERHEAD_S
    seconds: float = 0.0

    def costs(self, candidate: Candidate) -> cm.PairCosts | None:
        target = self.target_curves.get(candidate.quantization)
        if target is None:
            return None
        if candidate.autoregressive:
            return cm.PairCosts(target, host_s=self.host_s)
        draft = self.draft_curves.get(candidate.load_key)
        measured = self.acceptance.get(candidate.draft)
        if draft is None:
            return None
        host = measured.host_s_per_iteration if measured else self.host_s
        return cm.PairCosts(target, draft, measured.curve if measured else None, host)

    def predict(self, candidate: Candidate) -> float | None:
        """Predicted decode tokens/s: from the measured acceptance curve, or from the optimistic prior
        for a draft that was not worth measuring (so the search can still rule it out)."""
        costs = self.costs(candidate)
        if costs is None:
            return None
        if not candidate.autoregressive and costs.acceptance is None:
            costs = cm.PairCosts(costs.target, costs.draft, optimistic_prior(), costs.host_s)
        return cm.predict_tokens_per_s(costs, candidate.budget, candidate.max_n_beams, candidate.max_beam_len)

    def to_dict(self) -> dict:
        return {
            "target_latency": {q: c.to_dict() for q, c in self.target_curves.items()},
            "draft_latency": [
                {"draft": d, "quantization": q, **c.to_dict()} for (d, q), c in self.draft_curves.items()
            ],
            "acceptance": {d: m.to_dict() for d, m in self.acceptance.items()},
            "host_s": self.host_s,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(
            target_curves={q: cm.LatencyCurve.from_dict(c) for q, c in data["target_latency"].items()},
            draft_curves={
                (c["draft"], c["quantization"]): cm.LatencyCurve.from_dict(c) for c in data["draft_latency"]
            },
            acceptance={d: AcceptanceMeasurement.from_dict(m) for d, m in data["acceptance"].items()},
            host_s=float(data["host_s"]),
            seconds=float(data["seconds"]),
        )

    def covers(self, space: SearchSpace) -> bool:
        """Whether every target variant and (draft, variant) pair of `space` has its curves."""
        pairs = {(d, q) for d in space.speculative_drafts for q in space.quantizations}
        return set(space.quantizations) <= set(self.target_curves) and pairs <= set(self.draft_curves)


def optimistic_prior() -> cm.AcceptanceCurve:
    """1.5x the paper-level prior: a pair this good is rare, so it bounds what a draft could do."""
    prior = cm.AcceptanceCurve.prior()
    return cm.AcceptanceCurve(tuple(1.0 + 1.5 * (g - 1.0) for g in prior.values))


def target_batches(budgets: tuple[int, ...]) -> list[int]:
    """Batch sizes to time the target at: 1 and every budget + 1 (what a trial's pass holds)."""
    return sorted({1, *(b + 1 for b in budgets)})


def draft_batches(n_beams: tuple[int, ...]) -> list[int]:
    """Batch sizes to time a draft at: powers of two up to the widest pass, and each max_n_beams."""
    widest = max(n_beams)
    return sorted({*(2**i for i in range(widest.bit_length()) if 2**i <= widest), *n_beams})


def calibration_budget(
    cal: Calibration, space: SearchSpace, draft: str, quant: str, ratio: float
) -> int | None:
    """The largest budget at which `draft` could still reach `ratio` x plain decoding under the
    optimistic prior with a single draft pass; None when no budget could."""
    plain = max(1.0 / (c.at(1) + cal.host_s) for c in cal.target_curves.values())
    target, draft_curve = cal.target_curves[quant], cal.draft_curves[(draft, quant)]
    prior = optimistic_prior()
    hopeful = [
        b
        for b in space.budgets
        if prior.at(b) / (draft_curve.at(1) + target.at(b + 1) + cal.host_s) >= ratio * plain
    ]
    return max(hopeful) if hopeful else None


def calibrate(
    pool: ModelPool,
    space: SearchSpace,
    objective: GenerationObjective,
    iterations_per_prompt: int = 4,
    hopeless_ratio: float = 0.5,
) -> Calibration:
    """Time the target variants and the drafts, then measure each draft's acceptance curve with the
    fastest target variant, at the largest budget that could still pay off. A draft that could not
    get near plain decoding even then is not measured (its predictions use the optimistic prior)."""
    start = time.perf_counter()
    cal = Calibration()
    for quant in space.quantizations:
        log(f"calibrating: target {quant} forward times")
        cal.target_curves[quant] = measure_forward_curve(pool.target(quant), target_batches(space.budgets))
    for draft in space.speculative_drafts:
        curves: dict[str, cm.LatencyCurve] = {}  # per weights variant the draft is made from
        for quant in space.quantizations:
            variant = pool.draft_variant(draft, quant)
            if variant not in curves:
                log(f"calibrating: draft {draft} ({variant}) forward times")
                model = pool.draft(draft, quant)
                curves[variant] = measure_forward_curve(
                    model, draft_batches(space.n_beams), time_limit_s=10.0
                )
            cal.draft_curves[(draft, quant)] = curves[variant]
    quant = min(space.quantizations, key=lambda q: cal.target_curves[q].at(1))
    widest = Candidate(NO_DRAFT, quant, 0, max(space.n_beams), max(space.beam_lens))
    for draft in space.speculative_drafts:
        budget = calibration_budget(cal, space, draft, quant, hopeless_ratio)
        if budget is None:
            log(f"calibrating: {draft} cannot get near plain decoding at any budget; not measured")
            continue
        log(f"calibrating: acceptance curve of {draft} at budget {budget}")
        config = objective.config(replace(widest, draft=draft, budget=budget))
        cal.acceptance[draft] = measure_acceptance(
            pool.target(quant), pool.draft(draft, quant), objective.prompts, config, iterations_per_prompt
        )
    cal.seconds = time.perf_counter() - start
    return cal


# --- memory -----------------------------------------------------------------------------------


def model_shape(name: str) -> cm.ModelShape | None:
    """The shape of a registry model, or of an early-exit draft of one; None when unknown."""
    from specexec_cli.models.registry import resolve

    early = parse_early_exit(name)
    base = early[0] if early else name
    try:
        spec = resolve(base)
    except SpecexecError:
        return None
    if None in (spec.n_layers, spec.hidden_size, spec.intermediate_size, spec.vocab_size, spec.n_heads):
        return None
    shape = cm.ModelShape(
        n_layers=spec.n_layers,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        vocab_size=spec.vocab_size,
        n_heads=spec.n_heads,
        n_kv_heads=spec.n_kv_heads or spec.n_heads,
        head_dim=spec.head_dim or spec.hidden_size // spec.n_heads,
        tied_embeddings=bool(spec.tie_word_embeddings),
        n_experts=spec.n_experts,
        experts_per_token=spec.experts_per_token,
    )
    return shape.truncated(early[1]) if early else shape


def memory_checker(
    target: str, probe: hardware.HardwareProbe, device: torch.device, context: int
) -> Callable[[Candidate], str | None]:
    """The feasibility test the search runs before loading anything (cost_model.memory_problem)."""
    target_shape = model_shape(target)
    gpu_free = max((g.memory_free for g in probe.gpus), default=None) if device.type == "cuda" else None
    budget_mem = cm.MemoryBudget(device_free=gpu_free, host_available=probe.host.ram_available)
    float_quant = "fp16" if device.type == "cuda" else "fp32"

    def check(candidate: Candidate) -> str | None:
        if target_shape is None:
            return None
        target_bytes = target_shape.weight_bytes(candidate.quantization)
        early = parse_early_exit(candidate.draft)
        draft_bytes = 0.0
        if not candidate.autoregressive and not (early and early[0] == target):
            draft_shape = model_shape(early[0] if early else candidate.draft)
            draft_bytes = draft_shape.weight_bytes(float_quant) if draft_shape else 0.0
        activations = cm.tree_activation_bytes(target_shape, candidate.budget, context)
        offloaded = gpu_free is not None and target_bytes > 0.8 * gpu_free
        buffers = 2 * target_shape.layer_bytes(candidate.quantization)
        return cm.memory_problem(budget_mem, target_bytes, draft_bytes, activations, offloaded, buffers)

    return check


# --- tune -------------------------------------------------------------------------------------


@dataclass
class TuneReport:
    result: SearchResult
    calibration: Calibration
    space: SearchSpace
    profile: profiles.Profile | None
    profile_path: Path | None
    objective: GenerationObjective

    @property
    def records(self) -> dict[Candidate, TrialRecord]:
        return self.objective.records

    def summary(self) -> str:
        lines = [format_results(self.result)]
        if self.profile_path is not None:
            lines.append(f"profile saved to {self.profile_path}")
        return "\n".join(lines)


ATTR_CALIBRATION = "calibration"
ATTR_SETUP = "setup"


def check_same_setup(study, space: SearchSpace, options: TuneOptions) -> None:
    """A study keeps one search space and one measurement protocol; resuming with others would mix
    incomparable numbers (and Optuna refuses changed choices), so that is a clear error instead."""
    setup = {
        "space": {k: list(v) for k, v in space.__dict__.items()},
        "prompts": str(options.prompts_file or "packaged"),
        "n_prompts": options.n_prompts,
        "max_new_tokens": options.max_new_tokens,
        "temperature": options.temperature,
        "seed": options.seed,
        "max_branch_width": options.max_branch_width,
    }
    stored = study.user_attrs.get(ATTR_SETUP)
    if stored is None:
        study.set_user_attr(ATTR_SETUP, setup)
    elif stored != setup:
        changed = ", ".join(k for k in setup if stored.get(k) != setup[k])
        raise SpecexecError(
            f"study {study.study_name!r} was run with other settings ({changed}); "
            "pass a new --study name to start a separate study"
        )


def stored_calibration(study, space: SearchSpace) -> Calibration | None:
    """The calibration a resumed study saved, when it covers the space; None otherwise."""
    data = study.user_attrs.get(ATTR_CALIBRATION)
    if not isinstance(data, dict):
        return None
    try:
        calibration = Calibration.from_dict(data)
    except (KeyError, TypeError, ValueError):
        return None
    return calibration if calibration.covers(space) else None


def study_name_for(target: str, fingerprint: str) -> str:
    return f"{profiles.slug(target)}@{fingerprint}"


def load_tune_prompts(options: TuneOptions) -> list[Prompt]:
    prompts = read_prompts(options.prompts_file) if options.prompts_file else packaged_prompts()
    return prompts[: options.n_prompts]


def make_profile(
    target: str,
    best: Candidate,
    result: SearchResult,
    probe: hardware.HardwareProbe,
    options: TuneOptions,
    pool: ModelPool,
    calibration: Calibration,
) -> profiles.Profile:
    settings: dict = {"method": "autoregressive" if best.autoregressive else "specexec"}
    settings["quantization"] = best.quantization
    if not best.autoregressive:
        settings.update(
            draft=generate_draft_name(best.draft, options.target),
            budget=best.budget,
            max_n_beams=best.max_n_beams,
            max_beam_len=best.max_beam_len,
            max_branch_width=options.max_branch_width,
        )
    settings.update(pool.offload_settings(best.quantization))
    evaluation = next(e for e in result.evaluations if e.candidate == best)
    plain = result.best_autoregressive
    measured = {"tokens_per_s": evaluation.tokens_per_s, "trials": len(result.evaluations)}
    if plain is not None:
        measured["autoregressive_tokens_per_s"] = plain.tokens_per_s
        measured["speedup"] = evaluation.tokens_per_s / plain.tokens_per_s
    measured.update(
        max_new_tokens=options.max_new_tokens, prompts=options.n_prompts, temperature=options.temperature
    )
    predicted = {"tokens_per_s": evaluation.predicted} if evaluation.predicted is not None else {}
    return profiles.Profile(
        target=target,
        settings=settings,
        fingerprint=probe.fingerprint,
        hardware=hardware.identity(probe.gpus, probe.host, probe.torch_version),
        measured=measured,
        predicted=predicted,
        probe={**probe.to_dict(), "calibration": calibration.to_dict()},
        source=f"specexec tune (study {result.study_name})",
        notes=[result.verdict()],
    )


def tune(
    options: TuneOptions,
    load_fn: LoadFn = load_variant,
    probe: hardware.HardwareProbe | None = None,
    target_key: str | None = None,
    pool: ModelPool | None = None,
) -> TuneReport:
    """Run the whole tuner (see the module docstring). `load_fn` and `probe` are injectable for tests;
    `target_key` is the name profiles are saved under (default: the registry's name for the target);
    `pool` lets a caller share loaded models with other measurements (the benchmark does)."""
    start = time.perf_counter()
    options.validate()
    device = torch.device(options.device) if options.device else default_device()
    if target_key is None:
        from specexec_cli.models.registry import resolve

        target_key = resolve(options.target).name
    probe = probe or hardware.cached_probe()
    space = build_space(options, options.target, device)
    log(
        f"search space: drafts {', '.join(space.drafts)}; quantizations {', '.join(space.quantizations)}; "
        f"budgets {space.budgets[0]}..{space.budgets[-1]} ({len(space.candidates())} configurations)"
    )
    study_name = options.study or study_name_for(target_key, probe.fingerprint)
    storage = options.storage or default_storage_path()
    study = open_study(storage, study_name, options.seed)
    check_same_setup(study, space, options)
    prompt_texts = load_tune_prompts(options)
    pool = pool or ModelPool(options.target, device, load_fn)
    tokenizer = pool.tokenizer()
    prompts = [encode_prompt(tokenizer, p.text) for p in prompt_texts]
    objective = GenerationObjective(
        pool,
        prompts,
        options.max_new_tokens,
        options.temperature,
        options.seed,
        options.max_branch_width,
        options.trial_time_limit_s,
    )
    calibration = stored_calibration(study, space)
    if calibration is None:
        calibration = calibrate(
            pool, space, objective, options.calibration_iterations, options.hopeless_ratio
        )
        study.set_user_attr(ATTR_CALIBRATION, calibration.to_dict())
    else:
        log(f"reusing the calibration stored with study {study_name}")
    context = max(p.numel() for p in prompts) + options.max_new_tokens
    result = run_search(
        space,
        objective,
        study_name=study_name,
        storage=storage,
        n_trials=options.n_trials,
        timeout=None
        if options.timeout is None
        else max(1.0, options.timeout - (time.perf_counter() - start)),
        predict=calibration.predict,
        infeasible=memory_checker(options.target, probe, device, context),
        hopeless_ratio=options.hopeless_ratio,
        seed=options.seed,
        progress=options.progress,
    )
    profile = path = None
    best = result.best
    if best is not None:
        profile = make_profile(target_key, best.candidate, result, probe, options, pool, calibration)
        if options.save:
            path = profiles.save_profile(profile, options.profiles_dir)
    return TuneReport(result, calibration, space, profile, path, objective)
