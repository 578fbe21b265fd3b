"""One engine for every front door: `resolve` turns a request into an `EngineSpec`, `load` opens it.

    spec = resolve(request, profile_settings, Machine.here(request.device))   # no weights read
    engine = load(spec, workload)                                              # the loaded pair

`specexec generate`, `specexec serve`, Ray workers, `specexec bench`, the tuner's trials and
calibration, and the scripts all build an `EngineRequest` (specexec_cli/settings.py, one field per
engine setting; None leaves it to the profile, then to the defaults) and call these two, so what the
tuner measured is what the others run.

The spec is every decision that changes what runs: target, draft, method, tree, the weight format and
the compute dtype of each model, the placement of the target's layers and the prompts per pass. It is
frozen and comparable: two front doors given the same flags and profile resolve equal specs, and the
spec a loaded engine reports (`Engine.spec`) pins the placement the memory plan chose, which is what
a profile saves and `generate` resolves again.

Defaults are the fastest exact choice per device: float32 on a CPU (bf16 is several times slower
there), bf16 on a GPU that has it, else fp16; the draft in int8 on a CPU where torch has the dynamic
int8 GEMM (the output is still exactly the target's); the tree of decoding.config.TreeConfig.

`load` plans the target's memory for what the workload's KV caches must hold (prompt lengths and new
tokens) before any weight is read; plain decoding is planned with no draft and no tree (a 1-token pass),
so under a memory cap it gets the memory a draft and a tree would take for resident target layers: the
"equal memory" comparison (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from specexec_cli.decoding.config import GenerationConfig, SamplingConfig, TreeConfig, tree_headroom
from specexec_cli.errors import DoesNotFit, UsageError
from specexec_cli.settings import DEFAULT_TARGET, DRAFT_QUANTS, FLOAT_FORMATS, EngineRequest

DEFAULT_BATCH = 8  # prompts per pass by default when the target is offloaded
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
__all__ = ["EngineRequest", "EngineSpec", "Engine", "Machine", "Placement", "Workload", "load", "resolve"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the machine ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """What the defaults depend on: the compute device, whether it computes bf16, and whether torch's
    dynamic int8 linear runs on this CPU (a GPU device is given as a string, so specs for a GPU can be
    resolved without one)."""

    device: str = "cpu"
    bf16: bool = False
    int8_cpu: bool = False

    @classmethod
    def here(cls, device: str | None = None) -> Machine:
        """This machine, computing on `device` (checked) or its default device."""
        from specexec_cli.devices import check_device
        from specexec_cli.runtime.int8_cpu import available

        device = check_device(device) or ("cuda" if torch.cuda.is_available() else "cpu")
        bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        return cls(device, bf16, available())

    @property
    def cpu(self) -> bool:
        return self.device.startswith("cpu")


def compute_dtype(machine: Machine, weight_format: str, asked: str | None = None) -> str:
    """The one rule for the dtype a model computes in: a float format computes in itself; a quantized
    one (gptq, awq, w4a16, nf4, int8) in `asked`, else float32 on a CPU, bf16 on a GPU that has it,
    else fp16."""
    if weight_format in FLOAT_FORMATS:
        return weight_format
    if asked is not None:
        return asked
    if machine.cpu:
        return "fp32"
    return "bf16" if machine.bf16 else "fp16"


def default_format(machine: Machine) -> str:
    """A float target's weight format when nothing asks for one: float32 on a CPU, else the GPU's."""
    return compute_dtype(machine, "gptq")


# --- the spec -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where the target's layers live (runtime/offload.py): the tier (auto: the first that fits), ring
    buffers, resident layers (None: as many as fit), the disk tier's folder and the memory caps, and the
    budget the plan makes room for (None: the tree's)."""

    offload: str = "auto"
    buffers: int = 2
    resident_layers: int | None = None
    offload_dir: str | None = None
    max_memory: tuple[str, ...] = ()
    plan_budget: int | None = None


@dataclass(frozen=True)
class EngineSpec:
    """Everything that decides what runs (see the module docstring)."""

    target: str
    draft: str | None  # a model, "first-layers:N", or None for plain decoding
    method: str
    tree: TreeConfig
    weight_format: str  # the target's: fp32 | fp16 | bf16 | gptq | awq | w4a16 | nf4 | int8
    compute_dtype: str  # the target's: fp32 | fp16 | bf16
    draft_format: str  # "none" (float, in draft_dtype) or "int8"
    draft_dtype: str
    device: str
    placement: Placement | None  # None: resident, loaded by transformers
    lanes: int | None = None  # prompts per target pass asked for; None: planned from the workload
    lanes_from_profile: bool = False  # (then one at a time when streaming text)
    prefill_chunk: int | None = None  # joining prompt tokens per pass (decoding/prefill.py); None: measured

    @property
    def early_exit(self) -> int | None:
        from specexec_cli.models.registry import early_exit_layers

        return early_exit_layers(self.draft) if self.draft else None

    def profile_settings(self) -> dict[str, Any]:
        """The settings a profile saves so that `resolve` gives this spec back on this machine."""
        settings: dict[str, Any] = {"method": self.method, "quantization": self.weight_format}
        if self.method != "autoregressive":
            tree = self.tree
            settings.update(draft=self.draft, budget=tree.budget, max_n_beams=tree.max_n_beams,
                            max_branch_width=tree.max_branch_width, draft_quant=self.draft_format)
            if tree.max_beam_len is not None:
                settings["max_beam_len"] = tree.max_beam_len
            if tree.draft_cost is not None:
                settings["draft_cost"] = tree.draft_cost
        place = self.placement
        if place is None:
            settings["offload"] = "none"
        else:
            settings["offload"] = place.offload
            if place.offload != "none":
                settings.update(buffers=place.buffers)
                if place.resident_layers is not None:
                    settings["resident_layers"] = place.resident_layers
            if place.max_memory:
                settings["max_memory"] = list(place.max_memory)
        if self.lanes is not None:
            settings["batch_size"] = self.lanes
        return settings


def default_draft_name(target_name: str) -> str:
    from specexec_cli.models.registry import drafts_for

    drafts = drafts_for(target_name)
    if not drafts:
        raise UsageError(f"no known draft for {target_name!r}; pass --draft NAME or --draft first-layers:N")
    return drafts[0].name


def layer_count(spec: Any) -> int | None:
    """Decoder layers of a model, from the registry or a local config.json, without loading weights."""
    if spec.n_layers is not None:
        return spec.n_layers
    if spec.kind == "local" and spec.path is not None:
        try:
            config = json.loads((spec.path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        count = config.get("num_hidden_layers") if isinstance(config, dict) else None
        return count if isinstance(count, int) else None
    return None


def _check_names(target_name: str, draft_name: str | None) -> None:
    """Fail on an unknown model name or an early-exit draft deeper than the target before any load."""
    from specexec_cli.models.registry import early_exit_layers, resolve

    target = resolve(target_name)
    early = early_exit_layers(draft_name) if draft_name else None
    if draft_name is not None and early is None:
        resolve(draft_name)
    total = layer_count(target) if early is not None else None
    if total is not None and early > total:
        raise UsageError(f"--draft first-layers:{early}: the target has {total} layers (use 1..{total})")


def _draft_format(asked: str | None, machine: Machine, draft: str | None, early: bool) -> str:
    """The draft's weights: what was asked (checked), else int8 for a separate draft on a CPU where
    torch's int8 GEMM runs (less than half the memory, faster, the same output), else none."""
    if draft is None:
        return "none"
    if asked is None:
        return "int8" if machine.cpu and machine.int8_cpu and not early else "none"
    if asked not in DRAFT_QUANTS:
        raise UsageError(f"--draft-quant must be one of {', '.join(DRAFT_QUANTS)}; got {asked!r}")
    if asked == "int8":
        if not machine.cpu:
            raise UsageError("--draft-quant int8 runs on a CPU (fbgemm's int8 GEMM); on a GPU the draft "
                             "computes in bf16/fp16: drop --draft-quant")
        if not machine.int8_cpu:
            raise UsageError("--draft-quant int8: this torch build has no dynamic int8 linear")
        if early:
            raise UsageError("--draft-quant int8 needs a separate draft: an early-exit draft shares the "
                             "target's own layers")
    return asked


def _merge(request: EngineRequest, profile: Mapping[str, Any] | None) -> dict[str, Any]:
    """Each setting: the request's value, else the profile's (under its profile key), else None."""
    from specexec_cli.settings import SETTINGS

    merged = {}
    for setting in SETTINGS:
        value = getattr(request, setting.name)
        if (value is None or value == ()) and profile and setting.profile in profile:
            value = profile[setting.profile]
            value = tuple(value) if setting.multiple else value
        merged[setting.name] = value
    return merged


def resolve(request: EngineRequest, profile: Mapping[str, Any] | None = None,
            machine: Machine | None = None) -> EngineSpec:
    """The spec `request` asks for, with `profile`'s settings (a profile's `settings`, or None) under
    it and the defaults under both; every check that can fail before weights load fails here
    (UsageError for bad knobs and names)."""
    from specexec_cli.models.load import is_quantized
    from specexec_cli.models.registry import early_exit_layers
    from specexec_cli.models.registry import resolve as resolve_model
    from specexec_cli.runtime.caps import parse_caps

    machine = machine or Machine.here(request.device)
    got = _merge(request, profile)
    target = got["target"] or DEFAULT_TARGET
    method = got["method"] or "specexec"
    draft = got["draft"]
    if method == "autoregressive":
        draft = None
    elif draft == "none":
        raise UsageError(f"method {method!r} needs a draft; drop --draft none or use --method autoregressive")
    elif draft is None:
        draft = default_draft_name(target)  # a missing draft fails before any weights load
    _check_names(target, draft)
    defaults = TreeConfig()
    tree = defaults
    if draft is not None:
        tree = TreeConfig(budget=got["budget"] or defaults.budget,
                          max_n_beams=got["max_n_beams"] or defaults.max_n_beams,
                          max_beam_len=got["max_beam_len"],
                          max_branch_width=got["max_branch_width"] or defaults.max_branch_width,
                          draft_cost=got["draft_cost"])
    tree.validate()  # a bad tree knob fails before any load
    if got["prefill_chunk"] is not None and got["prefill_chunk"] < 0:
        raise UsageError(f"--prefill-chunk must be >= 0 (0: off), got {got['prefill_chunk']}")
    stored = resolve_model(target).quantization
    quantized_checkpoint = bool(stored) or is_quantized(target)
    # an explicit --quant or --dtype wins over the profile's format
    weight_format = request.quant or request.dtype or got["quant"]
    if quantized_checkpoint and (weight_format is None or weight_format in FLOAT_FORMATS):
        from specexec_cli.models.load import quantized_format

        fmt = quantized_format(resolve_model(target))
        weight_format = stored or (fmt.variant if fmt is not None else None) or weight_format
    weight_format = weight_format or default_format(machine)
    dtype = compute_dtype(machine, weight_format, request.dtype)
    if machine.cpu and dtype != "fp32" and weight_format not in FLOAT_FORMATS:
        dtype = "fp32"  # a quantized target dequantizes to float32 on a CPU, whatever --dtype says
    early = draft is not None and early_exit_layers(draft) is not None
    draft_format = _draft_format(got["draft_quant"], machine, draft, early)
    caps = tuple(got["max_memory"] or ())
    parse_caps(caps)  # a bad size fails before any weights load
    offloaded = (weight_format not in FLOAT_FORMATS or quantized_checkpoint
                 or got["offload"] not in (None, "none") or got["buffers"] is not None
                 or got["resident_layers"] is not None or bool(got["offload_dir"]) or bool(caps))
    placement = None
    if offloaded:
        if got["offload_dir"]:
            from specexec_cli.fsutil import check_writable_dir

            check_writable_dir(got["offload_dir"], "--offload-dir")
        placement = Placement(got["offload"] or "auto", got["buffers"] or 2, got["resident_layers"],
                              got["offload_dir"], caps)
    profile_lanes = (profile or {}).get("batch_size") if request.batch_size is None else None
    return EngineSpec(target=target, draft=draft, method=method, tree=tree, weight_format=weight_format,
                      compute_dtype=dtype, draft_format=draft_format, draft_dtype=dtype,
                      device=machine.device, placement=placement, lanes=request.batch_size or profile_lanes,
                      lanes_from_profile=profile_lanes is not None, prefill_chunk=got["prefill_chunk"])


def profile_settings_for(request: EngineRequest) -> dict[str, Any] | None:
    """The settings of the best profile for the request's target on this machine (tuned, else a
    shipped starting profile), said on stderr with the flags on top; None with --no-profile or when
    no profile applies."""
    if not request.use_profile:
        return None
    from specexec_cli.models.registry import resolve as resolve_model
    from specexec_cli.profiles import describe_settings, settings_for_generate

    settings, match = settings_for_generate(resolve_model(request.target or DEFAULT_TARGET).name, {})
    if match is None:
        return None
    origin = match.path.name if match.path else f"starting profile for {match.profile.target}"
    explicit = ", ".join(f"{k}={v}" for k, v in request.__dict__.items()
                         if v not in (None, ()) and k not in ("use_profile", "target"))
    on_top = f"; flags on top: {explicit}" if explicit else ""
    log(f"profile: {origin}: {describe_settings(match.profile.settings)}{on_top}")
    if match.warning:
        log(f"warning: {match.warning}")
    return settings


def resolve_request(request: EngineRequest, machine: Machine | None = None) -> EngineSpec:
    """`resolve` with the best profile for this machine (`profile_settings_for`)."""
    return resolve(request, profile_settings_for(request), machine or Machine.here(request.device))


# --- the workload ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What the KV caches must hold: each prompt's token count (known once the tokenizer is loaded) with
    `max_new_tokens` for each. A server passes its per-request limits (`uniform`)."""

    prompt_lengths: Callable[[Any], Sequence[int]]  # tokenizer -> token count of each prompt
    max_new_tokens: int
    n_prompts: int
    streaming: bool = False  # text printed as it comes: one prompt at a time
    planned_context: Callable[[Any], int] | None = None  # a fixed context for the caches (`fixed`)

    @classmethod
    def fixed(cls, context: int | Callable[[Any], int], n_prompts: int = 1) -> Workload:
        """Caches planned for `context` tokens (or a function of the tokenizer), whatever the tree or
        the batch: the tuner plans every trial of a placement for the same context, so they share it."""
        of = context if callable(context) else (lambda _tokenizer: context)
        return cls(lambda _tokenizer: [], 0, n_prompts, planned_context=of)

    @classmethod
    def of_prompts(cls, prompts: Sequence[Any], max_new_tokens: int, system: str | None,
                   chat_template: bool, streaming: bool = False) -> Workload:
        """The workload of `generate`'s prompts (specexec_cli.prompts.Prompt), encoded as it encodes them."""
        from specexec_cli.prompts import encode

        cache: list[int] = []

        def lengths(tokenizer: Any) -> list[int]:
            if not cache:  # encoded once, on the first call
                cache.extend(len(encode(tokenizer, p, system, chat_template)) for p in prompts)
            return cache

        return cls(lengths, max_new_tokens, len(prompts), streaming)

    @classmethod
    def uniform(cls, prompt_tokens: int, max_new_tokens: int, n_prompts: int) -> Workload:
        """`n_prompts` prompts of at most `prompt_tokens` tokens each (a server's limits)."""
        return cls(lambda _tokenizer: [prompt_tokens] * n_prompts, max_new_tokens, n_prompts)

    def context(self, tokenizer: Any, lanes: int, headroom: int) -> int:
        """Tokens the packed caches of `lanes` prompts hold: the longest ones, each with its new tokens,
        plus `headroom` for the draft's tree (decoding/config.tree_headroom)."""
        if self.planned_context is not None:
            return int(self.planned_context(tokenizer))
        longest = sorted(self.prompt_lengths(tokenizer), reverse=True)[: max(1, lanes)] or [1]
        return sum(longest) + len(longest) * self.max_new_tokens + headroom


def default_lanes(n_prompts: int, offloaded: bool, streaming: bool) -> int:
    """Prompts per pass when neither the request nor the profile sets it: up to DEFAULT_BATCH share each
    pass when the target is offloaded (a pass then costs about the same for one prompt or several); one
    at a time when resident, or when streaming text."""
    if streaming or not offloaded:
        return 1
    return max(1, min(DEFAULT_BATCH, n_prompts))


# --- the engine -----------------------------------------------------------------------------------


@dataclass
class ModelPair:
    """The loaded models and what generation needs from the tokenizer."""

    target: torch.nn.Module
    draft: torch.nn.Module | None
    tokenizer: Any
    eos_token_ids: tuple[int, ...]


@dataclass
class Engine:
    """An opened engine: the spec it runs (its placement pinned to what the memory plan chose), the
    loaded pair and how many prompts share a pass."""

    spec: EngineSpec
    pair: ModelPair
    lanes: int  # prompts per target pass the memory plan admitted

    @property
    def method(self) -> str:
        return self.spec.method

    @property
    def tree(self) -> TreeConfig:
        return self.spec.tree

    @property
    def device(self) -> str:
        return self.spec.device

    @property
    def offloaded(self) -> bool:
        return self.spec.placement is not None

    @property
    def plan(self) -> Any | None:
        engine = getattr(self.pair.target, "offload_engine", None)
        return engine.plan if engine is not None else None

    def config(self, max_new_tokens: int, sampling: SamplingConfig | None = None,
               stop_strings: tuple[str, ...] = (), seed: int | None = None) -> GenerationConfig:
        """The GenerationConfig of one request, validated (a bad value is a UsageError); greedy when
        `sampling` is None."""
        config = GenerationConfig(method=self.method, max_new_tokens=max_new_tokens,
                                  sampling=sampling or SamplingConfig(), tree=self.tree,
                                  eos_token_ids=self.pair.eos_token_ids, stop_strings=tuple(stop_strings),
                                  seed=seed, prefill_chunk=self.spec.prefill_chunk)
        config.validate()
        return config

    def close(self) -> None:
        """Stop the offload engine's loader threads and free its buffers; the target cannot run after."""
        engine = getattr(self.pair.target, "offload_engine", None)
        if engine is not None:
            engine.close()


@dataclass
class LoadedModels:
    """Models a caller keeps between loads (the tuner's trials), keyed by what they are: `load` takes
    the ones it needs from here and puts what it loads here. The caller decides what to drop."""

    models: dict[tuple, Any] = field(default_factory=dict)
    seconds: float = 0.0  # spent loading

    def get(self, key: tuple) -> Any | None:
        if key in self.models:
            self.models[key] = self.models.pop(key)  # most recently used last
        return self.models.get(key)

    def drop_placed_targets(self, keep: Placement) -> None:
        """Close and forget every offloaded target loaded in another placement than `keep` (under a cap
        one fits at a time)."""
        for key in list(self.models):
            if key[0] == "target" and len(key) > 5 and key[5] != keep:
                engine = getattr(self.models.pop(key), "offload_engine", None)
                if engine is not None:
                    engine.close()


def draft_key(spec: EngineSpec) -> tuple:
    return ("draft", spec.draft, spec.draft_format, spec.draft_dtype, spec.device)


def target_key(spec: EngineSpec, context: int | None = None, lanes: int | None = None) -> tuple:
    """A loaded target's identity: its format and dtype, and for an offloaded one the placement, what its
    plan made room for (the draft, the budget, the context) and its batch."""
    base = ("target", spec.target, spec.weight_format, spec.compute_dtype, spec.device)
    if spec.placement is None:
        return base
    planned_for = None if spec.method == "autoregressive" or spec.early_exit else draft_key(spec)
    budget = 0 if spec.method == "autoregressive" else (spec.placement.plan_budget or spec.tree.budget)
    return (*base, spec.placement, planned_for, budget, context, lanes, spec.early_exit)


def load(spec: EngineSpec, workload: Workload, models: LoadedModels | None = None) -> Engine:
    """Open `spec` for `workload`: the draft first (so the target's memory plan counts it), then the target
    (resident, or offloaded under the plan; a batch size left to the planner shrinks until the batch's
    caches fit), then an early-exit draft cut from it. Raises DoesNotFit / SpecexecError (one line)
    when the run cannot fit, before any weights load where the plan can tell."""
    from specexec_cli.models.load import check_compatible, eos_token_ids, make_early_exit_draft

    if workload.streaming and spec.lanes_from_profile:
        spec = replace(spec, lanes=None, lanes_from_profile=False)
    lanes = spec.lanes or default_lanes(workload.n_prompts, spec.placement is not None, workload.streaming)
    if workload.streaming and lanes > 1:
        raise UsageError("--stream prints one prompt at a time: drop --batch-size or set it to 1")
    lanes = min(lanes, max(1, workload.n_prompts))
    models = models if models is not None else LoadedModels()
    draft, draft_tokenizer = load_draft(spec, models) if spec.draft and not spec.early_exit else (None, None)
    target, tokenizer, spec, lanes = _load_target(spec, workload, draft, lanes, models)
    if draft_tokenizer is not None:
        check_compatible(tokenizer, draft_tokenizer)
    if spec.early_exit:
        log(f"draft: the target's first {spec.early_exit} layers")
        draft = make_early_exit_draft(target, spec.early_exit)
    return Engine(spec, ModelPair(target, draft, tokenizer, eos_token_ids(target, tokenizer)), lanes)


def load_draft(spec: EngineSpec, models: LoadedModels) -> tuple[Any, Any]:
    """(draft, tokenizer) of `spec`, from `models` when it is there (and put there when loaded)."""
    import time

    from specexec_cli.models.load import load_model

    key = draft_key(spec)
    cached = models.get(key)
    if cached is not None:
        return cached
    log(f"loading draft {spec.draft}" + (" (int8)" if spec.draft_format == "int8" else ""))
    start = time.perf_counter()
    draft, tokenizer = load_model(spec.draft, device=spec.device, dtype=DTYPES[spec.draft_dtype])
    if spec.draft_format == "int8":
        from specexec_cli.runtime.int8_cpu import quantize_draft_int8

        draft = quantize_draft_int8(draft)
    models.seconds += time.perf_counter() - start
    models.models[key] = (draft, tokenizer)
    return draft, tokenizer


def _load_target(spec: EngineSpec, workload: Workload, draft: Any, lanes: int,
                 models: LoadedModels) -> tuple[Any, Any, EngineSpec, int]:
    """The target (resident, or offloaded under the plan), and the spec with the placement it got."""
    import time

    from specexec_cli.models.load import load_model, load_tokenizer, local_source
    from specexec_cli.models.registry import resolve as resolve_model

    dtype = DTYPES[spec.compute_dtype]
    if spec.placement is None:
        key = target_key(spec)
        cached = models.get(key)
        if cached is None:
            log(f"loading target {spec.target} ({spec.device}, {str(dtype).removeprefix('torch.')})")
            start = time.perf_counter()
            cached = load_model(spec.target, device=spec.device, dtype=dtype)
            models.seconds += time.perf_counter() - start
            models.models[key] = cached
        return cached[0], cached[1], spec, lanes
    from specexec_cli.runtime.caps import parse_caps
    from specexec_cli.runtime.target import load_offloaded_target, plan_target

    model_spec = resolve_model(spec.target)
    if spec.weight_format not in FLOAT_FORMATS and model_spec.variant_id(spec.weight_format):
        model_spec = model_spec.quantized_variant(spec.weight_format)  # the registry's gptq / awq / w4a16
    folder = local_source(model_spec)
    source = str(folder) if folder is not None else model_spec.hub_id
    tokenizer = models.get(("tokenizer", source))
    if tokenizer is None:
        tokenizer = models.models[("tokenizer", source)] = load_tokenizer(model_spec)
    place = spec.placement
    plain = spec.method == "autoregressive"
    budget = 0 if plain else (place.plan_budget or spec.tree.budget)
    headroom = 0 if plain else tree_headroom(spec.tree)
    planned = spec.lanes is None  # a batch size left to the planner may shrink until its caches fit
    asked, refusal = lanes, None
    while True:
        context = workload.context(tokenizer, lanes, headroom)
        kwargs = dict(device=spec.device, dtype=dtype, offload=place.offload, quant=spec.weight_format,
                      buffers=place.buffers, offload_dir=place.offload_dir, budget=budget,
                      context_len=context, draft=draft, max_memory=parse_caps(place.max_memory))
        try:
            resident = place.resident_layers
            if resident is None and spec.early_exit:  # an early exit needs its layers on the device
                auto = plan_target(source, resident_layers=None, **kwargs)
                resident = None if auto.resident_layers >= spec.early_exit else spec.early_exit
            key = target_key(spec, context, lanes)
            cached = models.get(key)
            if cached is None:
                start = time.perf_counter()
                cached = load_offloaded_target(source, resident_layers=resident, **kwargs)
                models.seconds += time.perf_counter() - start
                models.models[key] = cached
            model = cached
            break
        except DoesNotFit as error:
            if not planned or lanes <= 1:
                raise
            refusal = refusal or error
            lanes -= 1
    if refusal is not None:
        log(f"batch: the caches of {asked} prompts do not fit ({refusal}); {lanes} do")
    engine = model.offload_engine
    plan = engine.plan
    log(f"offload plan: {plan.summary()}")
    for warning in unused_offload_flags(place, plan, len(engine.layers)):
        log(f"warning: {warning}")
    if engine.pinned.cuda:
        log(engine.pinned.summary())
    pinned = replace(place, offload=plan.offload, buffers=max(2, plan.buffers),
                     resident_layers=plan.resident_layers, plan_budget=None)
    return model, tokenizer, replace(spec, placement=pinned), lanes


def unused_offload_flags(place: Placement, plan: Any, n_layers: int) -> list[str]:
    """What the placement asked for that the memory plan does not do, one sentence each."""
    warnings = []
    streams_nothing = plan.resident_layers >= n_layers
    if place.offload in ("ram", "disk") and place.resident_layers is None and streams_nothing:
        warnings.append(f"--offload {place.offload} has no effect: all {n_layers} layers fit on the "
                        "device and stay resident (cap memory with --max-memory, or pass "
                        "--resident-layers N, to stream)")
    elif place.offload_dir and (plan.offload != "disk" or plan.resident_layers >= n_layers):
        warnings.append(f"--offload-dir {place.offload_dir} is unused: no layer streams from disk")
    return warnings


def open_engine(request: EngineRequest, workload: Workload, engines_on_host: int = 1) -> Engine:
    """resolve (with this machine's best profile) and load: what a front door calls. An offloaded target
    plans with 1 / `engines_on_host` of the host's free memory, when that many engines (Ray workers on
    one node) start together."""
    spec = resolve_request(request)
    if spec.placement is not None and engines_on_host > 1:
        import psutil

        from specexec_cli.runtime.caps import host_share

        caps = host_share(spec.placement.max_memory, engines_on_host, psutil.virtual_memory().available)
        spec = replace(spec, placement=replace(spec.placement, max_memory=caps))
    return load(spec, workload)
