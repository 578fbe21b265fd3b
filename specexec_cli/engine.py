"""One way to open the engine: settings -> memory plan -> loaded pair -> decoding settings.

`open_engine(request, workload)` is what `specexec generate`, `specexec serve` and remote workers call:
the request is the user's knobs (flags, a server's options, a worker's settings), resolved against the
best profile for the target on this machine; the workload says what the KV caches must hold (prompt
lengths and new tokens) so that an offloaded target is planned for it. The result holds the loaded
target/draft pair, the resolved settings and the tree, and makes the `GenerationConfig` of each request.

Plain decoding is planned with no draft and no tree (a 1-token pass), so under a memory cap it gets the
memory a draft and a tree would take for resident target layers: the "equal memory" comparison
(docs/benchmarks.md).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from specexec_cli.decoding.config import GenerationConfig, SamplingConfig, TreeConfig, tree_headroom
from specexec_cli.errors import DoesNotFit, UsageError

DEFAULT_TARGET = "qwen2.5-coder-1.5b"
DEFAULT_BATCH = 8  # prompts per pass by default when the target is offloaded
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
FLOAT_FORMATS = ("fp32", "fp16", "bf16")
DRAFT_QUANTS = ("none", "int8")  # none: the compute dtype; int8: runtime/int8_cpu.py (CPU only)
# max_beam_len None: no cap on draft passes, the tree grows while a pass pays (decoding/growth.py);
# draft_cost None: that cost is measured during the run.
TREE_DEFAULTS = {"budget": 64, "max_n_beams": 16, "max_beam_len": None, "max_branch_width": 8,
                 "draft_cost": None}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """float32 on CPUs (bf16 is several times slower there); bf16 on GPUs that support it, else fp16."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def parse_dtype(name: str | None, device: str) -> torch.dtype:
    if name is None:
        return default_dtype(device)
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; choose one of fp32, fp16, bf16")
    return DTYPES[name]


# --- the loaded pair --------------------------------------------------------------------------------


@dataclass
class ModelPair:
    """The loaded models and what generation needs from the tokenizer."""

    target: torch.nn.Module
    draft: torch.nn.Module | None
    tokenizer: Any
    eos_token_ids: tuple[int, ...]


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


def check_names(target_name: str, draft_name: str | None, early_exit: int | None) -> None:
    """Fail on an unknown model name or an early-exit draft deeper than the target before any load."""
    from specexec_cli.models.registry import resolve

    target = resolve(target_name)
    if draft_name not in (None, "none") and early_exit is None:
        resolve(draft_name)
    total = layer_count(target) if early_exit is not None else None
    if total is not None and early_exit > total:
        raise UsageError(f"--draft first-layers:{early_exit}: the target has {total} layers (use 1..{total})")


def check_draft_quant(draft_quant: str | None, device: str) -> None:
    if draft_quant in (None, "none"):
        return
    if draft_quant not in DRAFT_QUANTS:
        raise UsageError(f"--draft-quant must be one of {', '.join(DRAFT_QUANTS)}; got {draft_quant!r}")
    if not device.startswith("cpu"):
        raise UsageError("--draft-quant int8 runs on a CPU (fbgemm's int8 GEMM); on a GPU the draft "
                         "computes in bf16/fp16: drop --draft-quant")
    from specexec_cli.runtime.int8_cpu import available

    if not available():
        raise UsageError("--draft-quant int8: this torch build has no dynamic int8 linear")


def load_pair(target_name: str, draft_name: str | None, method: str, device: str,
              dtype: torch.dtype, load_target: Callable[..., tuple[Any, Any]] | None = None,
              draft_quant: str | None = None) -> ModelPair:
    """Load the target and, unless decoding plainly, a tokenizer-compatible draft (int8 when
    `draft_quant` is "int8").

    `load_target(name, device=, dtype=, draft=)` replaces the resident loader when the runtime offloads
    the target; a separate draft is then loaded first, so that the memory plan counts it."""
    from specexec_cli.models.load import check_compatible, eos_token_ids, load_model, make_early_exit_draft
    from specexec_cli.models.registry import early_exit_layers

    needs_draft = method != "autoregressive" and draft_name != "none"
    if not needs_draft and method != "autoregressive":
        raise UsageError(f"method {method!r} needs a draft; drop --draft none or use --method autoregressive")
    if needs_draft and draft_name is None:
        draft_name = default_draft_name(target_name)  # fail on a missing draft before loading weights
    early_exit = early_exit_layers(draft_name) if needs_draft else None  # bad N fails before any load
    check_names(target_name, draft_name if needs_draft else None, early_exit)
    if needs_draft:
        check_draft_quant(draft_quant, device)
    int8 = needs_draft and draft_quant == "int8"
    if int8:
        if early_exit is not None:
            raise UsageError("--draft-quant int8 needs a separate draft: an early-exit draft shares the "
                             "target's own layers")
    draft, draft_tokenizer = None, None
    if needs_draft and early_exit is None:
        log(f"loading draft {draft_name}" + (" (int8)" if int8 else ""))
        draft, draft_tokenizer = load_model(draft_name, device=device, dtype=dtype)
        if int8:
            from specexec_cli.runtime.int8_cpu import quantize_draft_int8

            draft = quantize_draft_int8(draft)
    log(f"loading target {target_name} ({device}, {str(dtype).removeprefix('torch.')})")
    if load_target is None:
        target, tokenizer = load_model(target_name, device=device, dtype=dtype)
    else:
        target, tokenizer = load_target(target_name, device=device, dtype=dtype, draft=draft)
    if draft_tokenizer is not None:
        check_compatible(tokenizer, draft_tokenizer)
    elif needs_draft:
        log(f"draft: the target's first {early_exit} layers")
        draft = make_early_exit_draft(target, early_exit)
    return ModelPair(target, draft, tokenizer, eos_token_ids(target, tokenizer))


# --- the offloaded target -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OffloadOptions:
    """How the target's layers are held: --offload, --quant, --buffers, --resident-layers, --offload-dir,
    --max-memory."""

    offload: str = "auto"
    quant: str | None = None
    buffers: int = 2
    resident_layers: int | None = None
    offload_dir: str | None = None
    max_memory: tuple[str, ...] = ()  # --max-memory values (runtime/caps.py)
    flagged: bool = True  # the tier was a flag (a profile's tier is kept silently: it was measured)


def default_batch_size(n_prompts: int, offloaded: bool, stream: bool) -> int:
    """--batch-size when neither the flag nor the profile sets it: up to DEFAULT_BATCH prompts share each
    pass when the target is offloaded (a pass then costs about the same for one prompt or several);
    one at a time when resident, or when streaming text."""
    if stream or not offloaded:
        return 1
    return max(1, min(DEFAULT_BATCH, n_prompts))


def unused_offload_flags(options: OffloadOptions, plan: Any, n_layers: int) -> list[str]:
    """What the user asked for that the memory plan does not do, one sentence each."""
    warnings = []
    if options.flagged and options.offload in ("ram", "disk") and plan.resident_layers >= n_layers:
        warnings.append(f"--offload {options.offload} has no effect: all {n_layers} layers fit on the "
                        "device and stay resident (cap memory with --max-memory, or pass "
                        "--resident-layers N, to stream)")
    elif options.offload_dir and (plan.offload != "disk" or plan.resident_layers >= n_layers):
        warnings.append(f"--offload-dir {options.offload_dir} is unused: no layer streams from disk")
    return warnings


@dataclass
class BatchSize:
    """Prompts per target pass. `planned`: the user left it to the planner, which may lower it until
    the batch's KV caches fit the memory plan; `lanes` holds what the plan admitted after loading."""

    lanes: int
    planned: bool = False


def offloaded_loader(options: OffloadOptions, budget: int | None, context_len: int | Callable[..., int],
                     batch: BatchSize | None = None):
    """A `load_target` for `load_pair` that streams the target's layers (specexec_cli.runtime).
    budget: the tree tokens a pass checks (0: plain decoding's 1-token pass; None: the largest that fits).
    context_len: tokens the KV caches must hold, or a function of the tokenizer giving it (and of the
    batch size when `batch` is given). With a planned `batch`, a plan that does not fit is retried with
    one prompt fewer per pass, down to 1 (the plan refuses before any weights load)."""
    if options.offload_dir:
        from specexec_cli.fsutil import check_writable_dir

        check_writable_dir(options.offload_dir, "--offload-dir")

    def load(name: str, device: str, dtype: torch.dtype,
             draft: torch.nn.Module | None = None) -> tuple[Any, Any]:
        from specexec_cli.models.load import load_tokenizer, local_source
        from specexec_cli.models.registry import resolve
        from specexec_cli.runtime.caps import parse_caps
        from specexec_cli.runtime.target import load_offloaded_target

        spec = resolve(name)
        if options.quant and spec.variant_id(options.quant):
            spec = spec.quantized_variant(options.quant)  # --quant gptq / awq / w4a16: the registry's
        folder = local_source(spec)
        source = str(folder) if folder is not None else spec.hub_id
        tokenizer = load_tokenizer(spec)
        asked, first_refusal = (batch.lanes if batch else 1), None
        while True:
            if not callable(context_len):
                context = context_len
            elif batch is not None:
                context = context_len(tokenizer, batch.lanes)
            else:
                context = context_len(tokenizer)
            try:
                model = load_offloaded_target(source, device=device, dtype=dtype, offload=options.offload,
                                              quant=options.quant, buffers=options.buffers,
                                              resident_layers=options.resident_layers,
                                              offload_dir=options.offload_dir, budget=budget,
                                              context_len=context, draft=draft,
                                              max_memory=parse_caps(options.max_memory))
                break
            except DoesNotFit as error:
                if batch is None or not batch.planned or batch.lanes <= 1:
                    raise
                first_refusal = first_refusal or error
                batch.lanes -= 1
        if first_refusal is not None:
            log(f"batch: the caches of {asked} prompts do not fit ({first_refusal}); {batch.lanes} do")
        plan = model.offload_engine.plan
        log(f"offload plan: {plan.summary()}")
        for warning in unused_offload_flags(options, plan, len(model.offload_engine.layers)):
            log(f"warning: {warning}")
        if model.offload_engine.pinned.cuda:
            log(model.offload_engine.pinned.summary())
        return model, tokenizer

    return load


# --- settings -------------------------------------------------------------------------------------------


def resolve_settings(target_name: str, flags: dict[str, Any], use_profile: bool) -> dict[str, Any]:
    """Generation settings: the best profile for this target on this machine (tuned, else a shipped
    starting profile) with the explicit flags on top; built-in defaults fill what is left."""
    settings = {key: value for key, value in flags.items() if value is not None}
    if use_profile:
        from specexec_cli.models.registry import resolve
        from specexec_cli.profiles import describe_settings, settings_for_generate

        settings, match = settings_for_generate(resolve(target_name).name, flags)
        if match is not None:
            origin = match.path.name if match.path else f"starting profile for {match.profile.target}"
            explicit = ", ".join(f"{k}={v}" for k, v in flags.items() if v is not None)
            on_top = f"; flags on top: {explicit}" if explicit else ""
            log(f"profile: {origin}: {describe_settings(match.profile.settings)}{on_top}")
            if match.warning:
                log(f"warning: {match.warning}")
    return {**TREE_DEFAULTS, "method": "specexec", **settings}


# --- the engine -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineRequest:
    """What a front door asks for; None leaves a knob to the profile, then to the defaults."""

    target: str | None = None
    draft: str | None = None
    method: str | None = None
    budget: int | None = None
    max_n_beams: int | None = None
    max_beam_len: int | None = None
    max_branch_width: int | None = None
    draft_cost: float | None = None  # one draft pass in target passes, fixed; None: measured
    draft_quant: str | None = None  # "none" | "int8"
    device: str | None = None
    dtype: str | None = None  # fp32 | fp16 | bf16
    offload: str | None = None  # none | ram | disk | auto
    quant: str | None = None  # fp16 | bf16 | fp32 | gptq | nf4 | int8 (the target's weights)
    buffers: int | None = None
    resident_layers: int | None = None
    offload_dir: str | None = None
    max_memory: tuple[str, ...] = ()
    batch_size: int | None = None  # an explicit batch size; None: the profile's or the planner's
    use_profile: bool = True

    def flags(self) -> dict[str, Any]:
        """The knobs a profile may also set, as `resolve_settings` takes them."""
        return dict(method=self.method, draft=self.draft, budget=self.budget, max_n_beams=self.max_n_beams,
                    max_beam_len=self.max_beam_len, max_branch_width=self.max_branch_width,
                    draft_cost=self.draft_cost, offload=self.offload, buffers=self.buffers,
                    resident_layers=self.resident_layers,
                    quantization=self.quant or self.dtype, max_memory=list(self.max_memory) or None,
                    batch_size=self.batch_size, draft_quant=self.draft_quant)


@dataclass(frozen=True)
class Workload:
    """What the KV caches must hold: each prompt's token count (known once the tokenizer is loaded) with
    `max_new_tokens` for each. A server passes its per-request limits (`uniform`)."""

    prompt_lengths: Callable[[Any], Sequence[int]]  # tokenizer -> token count of each prompt
    max_new_tokens: int
    n_prompts: int
    streaming: bool = False  # text printed as it comes: one prompt at a time

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
        longest = sorted(self.prompt_lengths(tokenizer), reverse=True)[: max(1, lanes)] or [1]
        return sum(longest) + len(longest) * self.max_new_tokens + headroom


@dataclass
class Engine:
    """An opened engine: the loaded pair, the settings it runs with and how many prompts share a pass."""

    pair: ModelPair
    settings: dict[str, Any]
    tree: TreeConfig
    device: str
    lanes: int  # prompts per target pass the memory plan admitted
    offloaded: bool = False  # the target runs through the offload engine (runtime/offload.py)

    @property
    def method(self) -> str:
        return self.settings["method"]

    @property
    def plan(self) -> Any | None:
        engine = getattr(self.pair.target, "offload_engine", None)
        return engine.plan if engine is not None else None

    def config(self, max_new_tokens: int, sampling: SamplingConfig | None = None,
               stop_strings: tuple[str, ...] = (), seed: int | None = None) -> GenerationConfig:
        """The GenerationConfig of one request, validated (a bad value is a UsageError); greedy when
        `sampling` is None."""
        config = GenerationConfig(method=self.method, max_new_tokens=max_new_tokens,
                                  sampling=sampling or SamplingConfig(),
                                  tree=self.tree, eos_token_ids=self.pair.eos_token_ids,
                                  stop_strings=tuple(stop_strings), seed=seed)
        config.validate()
        return config

    def close(self) -> None:
        """Stop the offload engine's loader threads and free its buffers; the target cannot run after."""
        engine = getattr(self.pair.target, "offload_engine", None)
        if engine is not None:
            engine.close()


def open_engine(request: EngineRequest, workload: Workload) -> Engine:
    """Resolve the settings, plan the memory, load the pair: see the module docstring.

    Raises UsageError for bad knobs and DoesNotFit / SpecexecError (one line) when the run cannot fit,
    before any weights load where the plan can tell."""
    from specexec_cli.devices import check_device
    from specexec_cli.models.load import is_quantized
    from specexec_cli.runtime.caps import parse_caps

    target = request.target or DEFAULT_TARGET
    settings = resolve_settings(target, request.flags(), use_profile=request.use_profile)
    tree = TreeConfig(**{key: settings[key] for key in TREE_DEFAULTS})
    method = settings["method"]
    GenerationConfig(method=method, tree=tree).validate()  # a bad tree knob fails before any load
    device = check_device(request.device) or default_device()
    draft_quant = settings.get("draft_quant")  # checked by load_pair, before any weights load
    fmt = settings.get("quantization")
    weight_quant = fmt if fmt and fmt not in FLOAT_FORMATS else None
    caps = tuple(settings.get("max_memory") or ())
    parse_caps(caps)  # a bad size fails before any weights load
    offloaded = bool(weight_quant or is_quantized(target) or settings.get("offload", "none") != "none"
                     or request.buffers
                     or request.resident_layers is not None or request.offload_dir or caps)
    profile_batch = None if workload.streaming else settings.get("batch_size")
    lanes = request.batch_size or profile_batch or default_batch_size(workload.n_prompts, offloaded,
                                                                      workload.streaming)
    if workload.streaming and lanes > 1:
        raise UsageError("--stream prints one prompt at a time: drop --batch-size or set it to 1")
    # a batch size left to the planner may shrink until the batch's caches fit the memory plan
    planned = not (request.batch_size or profile_batch)
    batch = BatchSize(min(lanes, max(1, workload.n_prompts)), planned=planned)
    load_target = None
    if offloaded:
        options = OffloadOptions(settings.get("offload") or "auto", fmt, settings.get("buffers") or 2,
                                 settings.get("resident_layers"), request.offload_dir, caps,
                                 flagged=request.offload is not None)
        plain = method == "autoregressive"  # no tree: a 1-token pass, no draft headroom
        headroom = 0 if plain else tree_headroom(tree)

        def context(tokenizer: Any, n_lanes: int = batch.lanes) -> int:
            return workload.context(tokenizer, n_lanes, headroom)

        load_target = offloaded_loader(options, 0 if plain else tree.budget, context, batch)
    dtype_name = fmt if fmt in FLOAT_FORMATS else request.dtype
    pair = load_pair(target, settings.get("draft"), method, device, parse_dtype(dtype_name, device),
                     load_target, draft_quant=draft_quant)
    return Engine(pair, settings, tree, device, batch.lanes, offloaded)
