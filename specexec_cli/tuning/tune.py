"""`specexec tune`: find the fastest configuration for one target on this machine, and save it.

Steps: probe the hardware (cached) -> build the search space (drafts sharing the target's tokenizer,
early-exit drafts, target quantizations) -> calibrate the cost model with short measurements (target
and draft forward times at a few batch sizes, the pair's acceptance curve from one large-budget run) ->
search (tuning.search: Optuna ask-and-tell in SQLite, objective = measured decode tokens/s on the
calibration prompts) -> save the best as a profile (profiles.save_profile).

Loaded models are kept in a `ModelPool` between trials (loads are the expensive part), and the search
evaluates several budgets per load.

With --max-memory (or --offload), each target variant loads through the offloaded runtime in an
offload tier under the caps; the planner keeps as many layers resident as the largest budget leaves
room for, so the searched placement is the tier. Streamed variants are predicted by the cost model's
streamed formula from a few timed passes, and the profile records the tier, buffers, resident layers
and the caps, which `specexec generate` then loads again.

With --batch-prompts, placed targets are planned for the caches of the largest batch size tried
(tuning.batch_workload), and after the search a batch stage measures the best configuration at each
batch size on those prompts (tuning.batch_stage); the fastest size goes into the profile.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from dataclasses import replace as dc_replace
from pathlib import Path

import torch

from specexec_cli import hardware, profiles
from specexec_cli.errors import SpecexecError
from specexec_cli.tuning import log
from specexec_cli.tuning.batch_stage import BatchChoice, run_batch_stage
from specexec_cli.tuning.batch_workload import BatchWorkload, space_tree
from specexec_cli.tuning.calibration import Calibration, calibrate
from specexec_cli.tuning.memory import PlacementPlanner, memory_checker
from specexec_cli.tuning.objective import GenerationObjective, TrialRecord
from specexec_cli.tuning.options import TuneOptions, caps_of, offload_tiers
from specexec_cli.tuning.pool import ALONE, ModelPool
from specexec_cli.tuning.profile_out import make_profile
from specexec_cli.tuning.prompt_set import Prompt, encode_prompt, packaged_prompts, read_prompts
from specexec_cli.tuning.results import EqualStreaming, SearchResult, format_results
from specexec_cli.tuning.search import run_search
from specexec_cli.tuning.space import (
    DEFAULT_PLACEMENT,
    INT8_SUFFIX,
    NO_DRAFT,
    Candidate,
    SearchSpace,
    early_exit_key,
    normalize_draft,
    variant_name,
)
from specexec_cli.tuning.space_plan import SpacePlan, plan_space
from specexec_cli.tuning.study import default_storage_path, open_study

# The context a placed target's memory plan holds: generate's (its default --max-new-tokens + 2048), so
# that the placement the tuner measures is one generate can load again.
PLAN_CONTEXT = 256 + 2048

# --- the space --------------------------------------------------------------------------------


def default_quantizations(target: str, device: torch.device) -> tuple[str, ...]:
    """16-bit (float32 on a CPU, where 16-bit is slow), NF4, and the 4-bit variants the registry knows
    (GPTQ, AWQ, compressed-tensors W4A16); a quantized folder or hub id only as it is stored."""
    from specexec_cli.models.load import quantized_format
    from specexec_cli.models.registry import resolve

    try:
        spec = resolve(target)
        stored = spec.quantization or (quantized_format(spec).variant if quantized_format(spec) else None)
    except SpecexecError:
        return ("fp16" if device.type == "cuda" else "fp32", "nf4")
    if stored:
        return (stored,)
    return ("fp16" if device.type == "cuda" else "fp32", "nf4", *spec.variants)


def default_drafts(target: str, early_exit_layers: tuple[int, ...] | None,
                   device: torch.device | None = None) -> tuple[str, ...]:
    """Plain decoding, the registry's drafts for the target (on a CPU each also in int8: less memory
    for the target's layers under a cap, and a faster draft pass), and early-exit drafts of the target."""
    from specexec_cli.models.registry import drafts_for, resolve
    from specexec_cli.runtime.int8_cpu import available

    spec = resolve(target)
    drafts = [NO_DRAFT]
    for draft in drafts_for(spec):
        drafts.append(draft.name)
        if device is not None and device.type == "cpu" and available():
            drafts.append(draft.name + INT8_SUFFIX)
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
        drafts = default_drafts(target_name, options.early_exit_layers, device)
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
        offloads=offload_tiers(options),
    )


# --- tune -------------------------------------------------------------------------------------


@dataclass
class TuneReport:
    result: SearchResult
    calibration: Calibration
    space: SearchSpace
    profile: profiles.Profile | None
    profile_path: Path | None
    objective: GenerationObjective
    batch: BatchChoice | None = None  # the batch stage, with --batch-prompts

    @property
    def records(self) -> dict[Candidate, TrialRecord]:
        return self.objective.records

    def summary(self) -> str:
        lines = [format_results(self.result)]
        if self.batch is not None:
            lines.append(self.batch.summary())
        if self.profile_path is not None:
            lines.append(f"profile saved to {self.profile_path}")
        return "\n".join(lines)


ATTR_CALIBRATION = "calibration"
ATTR_SETUP = "setup"


def check_same_setup(
    study, space: SearchSpace, options: TuneOptions, workload: BatchWorkload | None = None
) -> None:
    """A study keeps one search space and one measurement protocol; resuming with others would mix
    incomparable numbers (and Optuna refuses changed choices), so that is a clear error instead."""
    setup = {
        "space": {
            f.name: list(getattr(space, f.name)) for f in fields(space)
            if f.name != "allowed" and (f.name != "offloads" or space.offloads != (DEFAULT_PLACEMENT,))
        },
        "prompts": str(options.prompts_file or "packaged"),
        "n_prompts": options.n_prompts,
        "max_new_tokens": options.max_new_tokens,
        "temperature": options.temperature,
        "seed": options.seed,
        "max_branch_width": options.max_branch_width,
    }
    if options.max_memory:
        setup["max_memory"] = list(options.max_memory)
    if workload is not None and space.offloads != (DEFAULT_PLACEMENT,):  # placed for N caches
        setup["batch_plan"] = [str(options.batch_prompts_file), workload.largest, workload.new_tokens]
    stored = study.user_attrs.get(ATTR_SETUP)
    if stored is None:
        study.set_user_attr(ATTR_SETUP, setup)
    elif stored != setup:
        changed = ", ".join(k for k in setup if stored.get(k) != setup[k])
        raise SpecexecError(
            f"study {study.study_name!r} was run with other settings ({changed}); "
            "pass a new --study name to start a separate study"
        )


def stored_calibration(study) -> Calibration | None:
    """What a resumed study measured of its calibration so far (None: nothing, or unreadable)."""
    data = study.user_attrs.get(ATTR_CALIBRATION)
    if not isinstance(data, dict):
        return None
    try:
        return Calibration.from_dict(data)
    except (KeyError, TypeError, ValueError):
        return None


def study_name_for(target: str, fingerprint: str, options: TuneOptions | None = None) -> str:
    """target@fingerprint, plus the caps and the tier when given (another regime, another study)."""
    name = f"{profiles.slug(target)}@{fingerprint}"
    if options is not None and options.max_memory:
        name += "@max-memory=" + ",".join(options.max_memory)
    if options is not None and options.offload:
        name += f"@offload={options.offload}"
    if options is not None and options.batch_prompts_file and offload_tiers(options) != (DEFAULT_PLACEMENT,):
        name += f"@batch={max(options.batch_sizes)}"  # planned for the batch's caches: another study
    return name


def batch_workload(options: TuneOptions, space: SearchSpace, floor: int) -> BatchWorkload | None:
    """The workload of --batch-prompts (None without it), read and checked before anything loads."""
    if options.batch_prompts_file is None:
        return None
    tree = space_tree(space.budgets, space.n_beams, space.beam_lens)
    new_tokens = options.batch_new_tokens or options.max_new_tokens
    return BatchWorkload.read(options.batch_prompts_file, options.batch_sizes, new_tokens, tree, floor)


def load_tune_prompts(options: TuneOptions) -> list[Prompt]:
    prompts = read_prompts(options.prompts_file) if options.prompts_file else packaged_prompts()
    return prompts[: options.n_prompts]




def compare_placements(pool: ModelPool, objective: GenerationObjective, result: SearchResult) -> None:
    """Under caps: record each measured configuration's resident layers, and measure plain decoding once
    more on the best speculative configuration's placement (equal streaming; the search measured it at
    equal memory, planned without the draft)."""
    for evaluation in result.evaluations:
        plan = pool.plan_of(evaluation.candidate)
        if plan is not None:
            result.resident_layers[evaluation.candidate] = plan.resident_layers
    spec = result.best_speculative
    if spec is None:
        return
    candidate = spec.candidate
    log(f"equal streaming: plain decoding on the placement of {candidate.label()}")
    target = pool.target(candidate.variant, candidate.draft)
    plain = Candidate(NO_DRAFT, candidate.quantization, offload=candidate.offload)
    rate = objective.measure(plain, target, None, record=False)
    result.equal_streaming = EqualStreaming(candidate, rate, result.resident_layers.get(candidate))


def plan_the_space(space: SearchSpace, planner: PlacementPlanner, pool: ModelPool,
                   device: torch.device) -> SpacePlan:
    """Plan every pair before any target loads (tuning/space_plan.py). Placed pairs are planned twice:
    with the drafts' registry estimates, then, once the separate drafts of the pairs kept are loaded
    (small next to a target), with the bytes those drafts really hold; the second pass only adds lines."""
    unified = device.type != "cuda"
    first = plan_space(space, planner, unified, log)
    if all(not offload for _, offload in space.variants):
        return first
    drafts = {p.plan_for for p in first.pairs.values() if p.plan_for not in (ALONE, NO_DRAFT)}
    for key in sorted(drafts):
        planner.count_draft(key, pool.separate_draft(key))
    said = {line.partition(":")[0] for line in first.left_out}  # "draft on variant", or a variant

    def new_lines_only(line: str) -> None:
        if line.removeprefix("left out: ").partition(":")[0] not in said:
            log(line)

    return plan_space(space, planner, unified, new_lines_only)


def timing_pair(space_plan: SpacePlan, space: SearchSpace) -> Callable[[str], str]:
    """For each placed variant, the draft whose placement it is timed on: the one that keeps the fewest
    layers resident, so the measurement streams as much as any trial will (the cost model predicts the
    others from it)."""

    def choose(variant: str) -> str:
        pairs = [p for (d, v), p in space_plan.pairs.items() if v == variant]
        # unknown facts (no plan): a separate draft's placement, which holds the least of the target
        best = min(pairs, key=lambda p: (p.plan.resident_layers if p.plan else 0, p.plan_for == ALONE))
        return best.draft

    return choose


def plan_for_search(space_plan: SpacePlan, space: SearchSpace, calibration: Calibration,
                    planner: PlacementPlanner, hopeless_ratio: float) -> None:
    """Each placed speculative pair's placement planned for the largest budget the search may still
    measure on it (predicted >= hopeless_ratio x the best prediction), so its trials keep as many layers
    resident as those budgets leave room for."""
    predictions = {c: calibration.predict(c, space_plan.resident_layers(c.draft, c.variant))
                   for c in space.candidates()}
    best = max((p for p in predictions.values() if p is not None), default=None)
    for (draft, variant), pair in list(space_plan.pairs.items()):
        if draft == NO_DRAFT or pair.plan is None:
            continue
        scored = {c.budget: p for c, p in predictions.items()
                  if c.load_key == (draft, variant) and p is not None}
        if not scored or best is None:
            continue
        worth = [b for b, p in scored.items() if p >= hopeless_ratio * best]
        budget = max(worth) if worth else max(scored, key=scored.get)
        if budget == pair.plan_budget:
            continue
        quant, _, offload = variant.partition("@")
        plan = planner.plan(draft, quant, offload, budget, resident_layers=pair.resident_floor)
        space_plan.pairs[(draft, variant)] = dc_replace(pair, plan_budget=budget, plan=plan)


def tune(
    options: TuneOptions,
    probe: hardware.HardwareProbe | None = None,
    target_key: str | None = None,
    pool: ModelPool | None = None,
) -> TuneReport:
    """Run the whole tuner (see the module docstring). `probe` is injectable for tests; `target_key` is the
    name profiles are saved under (default: the registry's name for the target); `pool` lets a caller
    share loaded models with other measurements (the benchmark does). Every model opens through the
    engine (engine.load), as generate opens it."""
    from specexec_cli.engine import Machine, Workload

    start = time.perf_counter()
    options.validate()
    machine = Machine.here(options.device)
    device = torch.device(machine.device)
    if target_key is None:
        from specexec_cli.models.registry import resolve

        target_key = resolve(options.target).name
    probe = probe or hardware.cached_probe()
    space = build_space(options, options.target, device)
    tiers = f"; offload {', '.join(space.offloads)}" if space.offloads != (DEFAULT_PLACEMENT,) else ""
    log(
        f"search space: drafts {', '.join(space.drafts)}; quantizations {', '.join(space.quantizations)}"
        f"{tiers}; budgets {space.budgets[0]}..{space.budgets[-1]} ({len(space.candidates())} configurations)"
    )
    study_name = options.study or study_name_for(target_key, probe.fingerprint, options)
    storage = options.storage or default_storage_path()
    workload = batch_workload(options, space, PLAN_CONTEXT)
    study = open_study(storage, study_name, options.seed)
    check_same_setup(study, space, options, workload)
    prompt_texts = load_tune_prompts(options)
    caps = caps_of(options)
    plan_context = workload.plan_context if workload else PLAN_CONTEXT  # N caches for a batch workload
    pool = pool or ModelPool(options.target, machine, Workload.fixed(plan_context), tuple(options.max_memory),
                             max(space.budgets), options.max_branch_width,
                             first_variant=variant_name(*space.variants[0]))
    tokenizer = pool.tokenizer()
    planned_context = plan_context(tokenizer) if callable(plan_context) else plan_context
    planner = PlacementPlanner(options.target, probe, device, caps, planned_context)
    space_plan = plan_the_space(space, planner, pool, device)
    space = space_plan.restrict(space)
    pool.pair_keys = space_plan.key
    pairs = len(space.variants) * len(space.drafts)
    log(f"planned: {len(space_plan.pairs)} of {pairs} (format, tier, draft) pairs can run here "
        f"({len(space.candidates())} configurations)")
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
    stored = stored_calibration(study)
    if stored is not None and stored.covers(space):
        log(f"reusing the calibration stored with study {study_name}")
    elif stored is not None:
        log(f"resuming the calibration stored with study {study_name}")

    def save_calibration(cal: Calibration) -> None:
        study.set_user_attr(ATTR_CALIBRATION, cal.to_dict())

    calibration = calibrate(
        pool, space, objective, options.calibration_iterations, options.hopeless_ratio, stored=stored,
        save=save_calibration, timing_draft=timing_pair(space_plan, space),
        step_limit_s=options.calibration_step_s, progress=options.progress,
    )
    for name in calibration.left_out:  # pairs that failed to load or run while calibrating
        draft, _, variant = name.partition(" | ")
        space_plan.pairs.pop((draft, variant), None)
    if not space_plan.pairs:
        first = next(iter(calibration.left_out.values()))
        raise SpecexecError(f"nothing in the search space could run; {first}")
    space = space_plan.restrict(space)
    plan_for_search(space_plan, space, calibration, planner, options.hopeless_ratio)
    context = max(p.numel() for p in prompts) + options.max_new_tokens
    planned, lanes = PLAN_CONTEXT, 1
    if workload is not None:  # the largest batch's packed caches and its forest must fit too
        planned, lanes = workload.plan_context(tokenizer), workload.largest
        context = max(context, workload.caches_context(tokenizer))
    memory = memory_checker(options.target, probe, device, context, caps, planned, lanes, placements=planner)

    def infeasible(candidate: Candidate) -> str | None:
        if not space.allows(candidate):
            limit = space.pair_budget(candidate.draft, candidate.variant)
            if limit is None:
                return f"left out: {candidate.draft} on {candidate.variant} cannot run here"
            return f"budget {candidate.budget} does not fit (at most {limit} for this pair)"
        return memory(candidate)

    def predict(candidate: Candidate) -> float | None:
        return calibration.predict(candidate, space_plan.resident_layers(candidate.draft, candidate.variant))

    result = run_search(
        space,
        objective,
        study_name=study_name,
        storage=storage,
        n_trials=options.n_trials,
        timeout=None
        if options.timeout is None
        else max(1.0, options.timeout - (time.perf_counter() - start)),
        predict=predict,
        infeasible=infeasible,
        hopeless_ratio=options.hopeless_ratio,
        seed=options.seed,
        progress=options.progress,
        patience=options.patience,
    )
    if space.offloads != (DEFAULT_PLACEMENT,):
        compare_placements(pool, objective, result)
    profile = path = batch = None
    best = result.best
    if best is not None and workload is not None:
        batch = run_batch_stage(
            pool, best.candidate, workload, tokenizer, options.seed, options.max_branch_width
        )
    if best is not None:
        profile = make_profile(target_key, best.candidate, result, probe, options, pool, calibration, batch)
        if options.save:
            path = profiles.save_profile(profile, options.profiles_dir)
    return TuneReport(result, calibration, space, profile, path, objective, batch)
