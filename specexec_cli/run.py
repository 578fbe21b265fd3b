"""Glue between the CLI and the library: load a target/draft pair, run a batch, write each result.

Each finished prompt's result is written and flushed as soon as it and every earlier prompt are done,
and whatever finished is written when a failure or Ctrl-C stops the run, so nothing done is lost.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import torch

from specexec_cli.decoding.config import GenerationConfig, TreeConfig
from specexec_cli.decoding.generate import GenerationResult, generate_many
from specexec_cli.errors import DoesNotFit, SpecexecError, UsageError
from specexec_cli.prompts import Prompt, encode_prompt

DEFAULT_TARGET = "qwen2.5-coder-1.5b"
DEFAULT_BATCH = 8  # prompts per pass by default when the target is offloaded
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


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


def load_pair(target_name: str, draft_name: str | None, method: str, device: str,
              dtype: torch.dtype, load_target: Callable[..., tuple[Any, Any]] | None = None) -> ModelPair:
    """Load the target and, unless decoding plainly, a tokenizer-compatible draft.

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
    draft, draft_tokenizer = None, None
    if needs_draft and early_exit is None:
        log(f"loading draft {draft_name}")
        draft, draft_tokenizer = load_model(draft_name, device=device, dtype=dtype)
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


def tree_headroom(tree: TreeConfig) -> int:
    """KV slots an iteration needs beyond the budget + 1 tree rows the memory planner already counts: the
    draft cache keeps a slot for every node the draft ran, trimmed ones included, up to
    (max_beam_len - 1) * max_n_beams of them (SpecExec; SpecInfer's stems stay within the budget)."""
    return max(0, (tree.max_beam_len - 1) * tree.max_n_beams - (tree.budget + 1))


def prompt_context(prompts: list[Prompt], config: GenerationConfig, system: str | None,
                   chat_template: bool, batch_size: int = 1) -> Callable[..., int]:
    """The context the KV caches must hold, as a function of the tokenizer (known only at load time)
    and optionally of the batch size (default `batch_size`): the `lanes` longest encoded prompts +
    max_new_tokens for each (their caches are packed into one, decoding/packed.py) + `tree_headroom`."""

    encoded: list[int] = []  # prompt lengths, longest first (encoded once, on the first call)

    def context_len(tokenizer: Any, lanes: int = batch_size) -> int:
        if not encoded:
            lengths = [len(encode_prompt(tokenizer, p.text, system, chat_template)) for p in prompts]
            encoded.extend(sorted(lengths, reverse=True) or [1])
        lengths = encoded[: max(1, lanes)]
        return sum(lengths) + len(lengths) * config.max_new_tokens + tree_headroom(config.tree)

    return context_len


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
    if options.offload in ("ram", "disk") and plan.resident_layers >= n_layers:
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
    context_len: tokens the KV caches must hold, or a function of the tokenizer giving it (and of the
    batch size, `prompt_context`, when `batch` is given). With a planned `batch`, a plan that does not
    fit is retried with one prompt fewer per pass, down to 1 (the plan refuses before any weights load)."""
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
        if options.quant == "gptq" and spec.gptq_hub_id:
            spec = spec.gptq_variant()
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


FLOAT_FORMATS = ("fp32", "fp16", "bf16")
TREE_DEFAULTS = {"budget": 64, "max_n_beams": 16, "max_beam_len": 8, "max_branch_width": 8}


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


def result_record(prompt: Prompt, result: GenerationResult, config: GenerationConfig) -> dict[str, Any]:
    """The JSON Lines object written for one prompt."""
    return {
        "id": prompt.id,
        "text": result.text,
        "new_tokens": result.n_new_tokens,
        "finish_reason": result.finish_reason,
        "tokens_per_s": round(result.tokens_per_s, 3),
        "tokens_per_target_pass": round(result.tokens_per_pass, 3),
        "target_passes": result.n_target_passes,
        "draft_passes": result.stats.draft_passes,
        "elapsed_s": round(result.elapsed_s, 3),
        "method": config.method,
        "budget": config.tree.budget if config.method != "autoregressive" else None,
    }


def describe(prompt: Prompt, result: GenerationResult) -> str:
    """One line of stats for --verbose."""
    share = result.host_s / result.elapsed_s if result.elapsed_s else 0.0
    return (f"[{prompt.id}] {result.n_new_tokens} tokens in {result.elapsed_s:.2f} s "
            f"({result.tokens_per_s:.2f} tok/s), {result.tokens_per_pass:.2f} tokens/target pass, "
            f"{result.n_target_passes} target + {result.stats.draft_passes} draft passes, "
            f"host {share:.0%}, finish: {result.finish_reason}")


class OrderedWriter:
    """Writes each prompt's output line as soon as it and every earlier prompt are done (or at once,
    `unordered`). `close` writes what is still held back when the run stops early, so no finished result
    is lost, and says which prompts did not finish."""

    def __init__(self, out: TextIO, unordered: bool) -> None:
        self.out, self.unordered = out, unordered
        self.held: dict[int, str] = {}
        self.next_index = 0
        self.written = 0

    def put(self, index: int, text: str) -> None:
        if self.unordered:
            self._write(text)
            return
        self.held[index] = text
        while self.next_index in self.held:
            self._write(self.held.pop(self.next_index))
            self.next_index += 1

    def close(self, prompts: list[Prompt]) -> None:
        if self.held:
            missing = [prompts[i].id for i in range(self.next_index, max(self.held)) if i not in self.held]
            log(f"warning: the run stopped before prompt(s) {', '.join(missing)} finished; the "
                f"{len(self.held)} later result(s) that did finish follow without them")
            for index in sorted(self.held):
                self._write(self.held.pop(index))

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
        self.written += 1


def encoded_prompts(pair: ModelPair, prompts: list[Prompt], config: GenerationConfig, system: str | None,
                    chat_template: bool) -> Iterator[torch.Tensor]:
    """Each prompt's token ids [L], checked when it is reached (a bad one raises then)."""
    limit = getattr(pair.target.config, "max_position_embeddings", None)
    for prompt in prompts:
        ids = encode_prompt(pair.tokenizer, prompt.text, system, chat_template)
        if not ids:
            raise UsageError(f"prompt {prompt.id} encodes to no tokens")
        if limit and len(ids) + config.max_new_tokens + config.tree.max_beam_len > limit:
            raise SpecexecError(f"prompt {prompt.id} has {len(ids)} tokens; with --max-new-tokens "
                                f"{config.max_new_tokens} it exceeds the model's context of {limit}")
        yield torch.tensor(ids)


def run_batch(pair: ModelPair, prompts: list[Prompt], config: GenerationConfig, *, system: str | None,
              chat_template: bool, as_json: bool, stream: bool, verbose: bool, out: TextIO,
              batch_size: int = 1, unordered: bool = False) -> int:
    """Generate for every prompt, `batch_size` at a time sharing each target pass; write each result
    as soon as it and all earlier ones are done (any order if `unordered`). Returns the count written.

    On an error or Ctrl-C, every finished result is written before the exception goes on."""
    writer = OrderedWriter(out, unordered)
    streaming = stream and not as_json

    def write_piece(piece: str) -> None:
        out.write(piece)
        out.flush()

    def on_result(index: int, result: GenerationResult) -> None:
        if as_json:
            writer.put(index, json.dumps(result_record(prompts[index], result, config), ensure_ascii=False)
                       + "\n")
        else:
            writer.put(index, "\n" if streaming else result.text + "\n")
        if verbose:
            log(describe(prompts[index], result))

    try:
        generate_many(pair.target, pair.draft, encoded_prompts(pair, prompts, config, system, chat_template),
                      config, on_result, batch_size=1 if streaming else batch_size,
                      decode=lambda t: pair.tokenizer.decode(t, skip_special_tokens=True),
                      on_text=write_piece if streaming else None)
    finally:
        writer.close(prompts)
    return writer.written
