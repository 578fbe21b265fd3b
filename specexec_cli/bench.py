"""End-to-end decoding benchmark: SpecExec and SpecInfer across budgets, plain autoregressive decoding,
and transformers' assisted generation with the same draft/target pair, all in one process.

For each temperature every method decodes the same prompts (MT-Bench by default, the Llama-2 `[INST]`
wrapper stripped and the conversation re-wrapped in the target's chat template) and one row reports:
tokens per target pass, tok/s, speedup over the autoregressive row of the same run, the share of time
spent outside model forwards (host overhead) and draft passes per iteration. At temperature 0 each row
also says how many prompts gave exactly the autoregressive output (the methods are lossless).

`run_benchmark` is the entry point of `specexec bench` (`scripts/bench.py` runs that command); it opens
the pair through the engine (engine.resolve / engine.load, as generate does) and prints one markdown
table per temperature to stdout (or JSON Lines with `json_lines=True`) and progress to stderr.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TextIO

import torch

from specexec_cli.decoding.config import GenerationConfig, SamplingConfig, TreeConfig
from specexec_cli.decoding.generate import GenerationResult, generate
from specexec_cli.devices import MAX_THREADS
from specexec_cli.errors import UsageError
from specexec_cli.prompt_sets import (  # noqa: F401 - re-exported for scripts and tests
    DEFAULT_PROMPTS,
    Messages,
    load_conversations,
    load_prompt_set,
    parse_llama2_chat,
    resolve_prompt_path,
    strip_llama2_wrapper,
)
from specexec_cli.prompts import encode_messages
from specexec_cli.settings import EngineRequest

SPECEXEC_BUDGETS = (1, 16, 64, 256, 1024)
SPECINFER_BUDGETS = (16, 64, 256)
TREE_METHODS = ("specexec", "specinfer")
ALL_METHODS = ("autoregressive", "specexec", "specinfer", "assisted")

def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> torch.Tensor:
    """Token ids [L] of a conversation in the tokenizer's chat template, ready for the assistant's turn."""
    return torch.tensor(encode_messages(tokenizer, messages), dtype=torch.long)


# --- measurement -------------------------------------------------------------------------------


@dataclass
class BenchRow:
    """Totals of one (method, budget, temperature) over all prompts, and the figures derived from them."""

    method: str
    budget: int | None
    temperature: float
    n_prompts: int = 0
    new_tokens: int = 0
    target_passes: int = 0
    draft_passes: int = 0
    iterations: int = 0
    elapsed_s: float = 0.0
    target_s: float = 0.0
    draft_s: float = 0.0
    greedy_matches: int | None = None  # prompts whose output equals autoregressive decoding (t=0 only)
    speedup: float | None = None  # tok/s over the autoregressive row on the same target (equal streaming)
    speedup_equal_memory: float | None = None  # tok/s over plain decoding planned without the draft
    memory: str = ""  # "equal memory" for plain decoding planned under the same caps without the draft
    settings: str = ""
    outputs: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def tokens_per_pass(self) -> float:
        return self.new_tokens / max(1, self.target_passes)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def host_s(self) -> float:
        return max(0.0, self.elapsed_s - self.target_s - self.draft_s)

    @property
    def host_share(self) -> float:
        """Share of the wall time spent outside model forwards."""
        return self.host_s / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def draft_passes_per_iteration(self) -> float:
        return self.draft_passes / max(1, self.iterations)

    @property
    def target_s_per_pass(self) -> float:
        return self.target_s / max(1, self.target_passes)

    def add(self, tokens: list[int], elapsed: float, target_passes: int, draft_passes: int, iterations: int,
            target_s: float, draft_s: float) -> None:
        self.n_prompts += 1
        self.new_tokens += len(tokens)
        self.outputs.append(list(tokens))
        self.elapsed_s += elapsed
        self.target_passes += target_passes
        self.draft_passes += draft_passes
        self.iterations += iterations
        self.target_s += target_s
        self.draft_s += draft_s

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "outputs"}
        for name in ("tokens_per_pass", "tokens_per_s", "host_s", "host_share", "draft_passes_per_iteration",
                     "target_s_per_pass"):
            data[name] = getattr(self, name)
        return data


def add_result(row: BenchRow, result: GenerationResult) -> None:
    """Fold one prompt's engine result into a row."""
    s = result.stats
    row.add(result.token_ids, result.elapsed_s, s.target_passes, s.draft_passes, s.iterations, s.target_s,
            s.draft_s)


class ForwardMeter:
    """Counts and times a model's top-level forward calls with forward hooks (the model is not patched)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.calls, self.seconds = model, 0, 0.0
        self._start = 0.0
        self._handles: list[Any] = []

    def _sync(self) -> None:
        device = getattr(self.model, "device", torch.device("cpu"))
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def _before(self, module: torch.nn.Module, args: Any) -> None:
        self._sync()
        self._start = time.perf_counter()

    def _after(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._sync()
        self.calls += 1
        self.seconds += time.perf_counter() - self._start

    def __enter__(self) -> ForwardMeter:
        self._handles = [self.model.register_forward_pre_hook(self._before),
                         self.model.register_forward_hook(self._after)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def assisted_settings(draft: torch.nn.Module) -> dict[str, Any]:
    """The assisted-generation knobs transformers will use: the draft's generation config, with
    transformers' global defaults filling what it leaves unset."""
    config = copy.deepcopy(draft.generation_config)
    defaults = getattr(config, "_get_default_generation_params", None)
    if defaults is not None:
        config.update(**defaults(), defaults_only=True)
    names = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
    return {name: getattr(config, name, None) for name in names}


def assisted_kwargs(sampling: SamplingConfig, eos_ids: Sequence[int], max_new_tokens: int) -> dict[str, Any]:
    """`generate` arguments that make transformers decode like the engine: greedy, or plain temperature /
    top-p / top-k sampling with nothing else (no repetition penalty, no default top-k of 50)."""
    eos = list(eos_ids)
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=not sampling.greedy,
                                  eos_token_id=eos or None, pad_token_id=eos[0] if eos else None,
                                  repetition_penalty=1.0)
    if not sampling.greedy:  # top_k 0 disables top-k (None would mean transformers' default of 50)
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    return kwargs


def assisted_generate(
    target: Any, draft: Any, input_ids: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig,
    eos_ids: Sequence[int], seed: int,
) -> tuple[list[int], float, int, float, int, float]:
    """One prompt through `target.generate(assistant_model=draft)`.

    Returns (new tokens, wall s, target forwards, target s, draft forwards, draft s).
    """
    ids = input_ids.reshape(1, -1).to(target.device)
    kwargs = assisted_kwargs(sampling, eos_ids, max_new_tokens)
    torch.manual_seed(seed)
    saved = copy.deepcopy(draft.generation_config)  # assisted generation may adapt it; keep runs independent
    try:
        with ForwardMeter(target) as t_meter, ForwardMeter(draft) as d_meter, torch.inference_mode():
            start = time.perf_counter()
            out = target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=draft, **kwargs)
            elapsed = time.perf_counter() - start
    finally:
        draft.generation_config = saved
    tokens = out[0, ids.shape[1] :].tolist()
    eos = set(eos_ids)
    for i, token in enumerate(tokens):  # generate pads after EOS; keep up to and including the first EOS
        if token in eos:
            tokens = tokens[: i + 1]
            break
    return tokens, elapsed, t_meter.calls, t_meter.seconds, d_meter.calls, d_meter.seconds


# --- the benchmark -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchPlan:
    """What to run: methods, budgets, temperatures, tree shape and generation length."""

    temperatures: tuple[float, ...] = (0.0, 0.6)
    methods: tuple[str, ...] = ALL_METHODS
    specexec_budgets: tuple[int, ...] = SPECEXEC_BUDGETS
    specinfer_budgets: tuple[int, ...] = SPECINFER_BUDGETS
    tree: TreeConfig = field(default_factory=TreeConfig)  # the shape; each row sets its budget
    max_new_tokens: int = 64
    seed: int = 0

    def runs(self) -> list[tuple[str, int | None]]:
        """(method, budget) in the order they run; autoregressive first (it is the speedup reference and
        the output the others must equal at t=0; without it those columns stay empty)."""
        runs: list[tuple[str, int | None]] = []
        if "autoregressive" in self.methods:
            runs.append(("autoregressive", None))
        runs += [("specexec", b) for b in self.specexec_budgets if "specexec" in self.methods]
        runs += [("specinfer", b) for b in self.specinfer_budgets if "specinfer" in self.methods]
        if "assisted" in self.methods:
            runs.append(("assisted", None))
        return runs


def tree_settings(method: str, tree: TreeConfig) -> str:
    if method == "specexec":
        depth = tree.max_beam_len or "auto"
        cost = "" if tree.draft_cost is None else f", draft cost {tree.draft_cost:g}"
        return f"beams {tree.max_n_beams}, len {depth}, width {tree.max_branch_width}{cost}"
    if method == "specinfer":
        n_stems = min(tree.max_n_beams, tree.budget)
        return f"{n_stems} stems x {max(1, tree.budget // n_stems)}"
    return ""


def run_method(target: Any, draft: Any, prompts: Sequence[torch.Tensor], method: str, budget: int | None,
               temperature: float, plan: BenchPlan, eos_ids: Sequence[int]) -> BenchRow:
    """Decode every prompt with one method and fold the results into a row."""
    sampling = SamplingConfig(temperature=temperature)
    row = BenchRow(method, budget, temperature)
    if method == "assisted":
        row.settings = ", ".join(f"{k}={v}" for k, v in assisted_settings(draft).items())
        for i, ids in enumerate(prompts):
            tokens, elapsed, t_calls, t_s, d_calls, d_s = assisted_generate(
                target, draft, ids, plan.max_new_tokens, sampling, eos_ids, plan.seed + i)
            row.add(tokens, elapsed, t_calls, d_calls, t_calls, t_s, d_s)
        return row
    tree = TreeConfig(budget=budget or 1, max_n_beams=plan.tree.max_n_beams,
                      max_beam_len=plan.tree.max_beam_len, max_branch_width=plan.tree.max_branch_width,
                      draft_cost=plan.tree.draft_cost)
    row.settings = tree_settings(method, tree)
    for i, ids in enumerate(prompts):
        config = GenerationConfig(method=method, max_new_tokens=plan.max_new_tokens, sampling=sampling,
                                  tree=tree, eos_token_ids=tuple(eos_ids), seed=plan.seed + i)
        add_result(row, generate(target, draft if method != "autoregressive" else None, ids, config))
    return row


def finish_rows(rows: list[BenchRow]) -> None:
    """Fill the speedups of one temperature's rows: over the autoregressive row on the same target (equal
    streaming) and over the equal-memory one when there is one; and the greedy matches."""
    reference = next((r for r in rows if r.method == "autoregressive" and not r.memory), None)
    equal_memory = next((r for r in rows if r.method == "autoregressive" and r.memory), None)
    for row in rows:
        if reference is not None and reference.tokens_per_s > 0:
            row.speedup = row.tokens_per_s / reference.tokens_per_s
        if equal_memory is not None and equal_memory.tokens_per_s > 0:
            row.speedup_equal_memory = row.tokens_per_s / equal_memory.tokens_per_s
        if reference is not None and row.temperature == 0.0:
            row.greedy_matches = sum(a == b for a, b in zip(row.outputs, reference.outputs, strict=False))


def warm_up(target: Any, draft: Any, prompt: torch.Tensor, eos_ids: Sequence[int]) -> None:
    """A few short generations so one-time costs (allocations, kernels) do not land in the first row."""
    tree = TreeConfig(budget=8, max_n_beams=4, max_beam_len=2, max_branch_width=4)
    for method in ("autoregressive", "specexec"):
        config = GenerationConfig(method=method, max_new_tokens=2, eos_token_ids=tuple(eos_ids), tree=tree)
        generate(target, draft if method != "autoregressive" else None, prompt[:32], config)


def bench_rows(target: Any, draft: Any, prompts: Sequence[torch.Tensor], plan: BenchPlan,
               eos_ids: Sequence[int], log: Callable[[str], None] = lambda _: None) -> list[BenchRow]:
    """Run every (method, budget) of `plan` at every temperature; rows of one temperature are contiguous."""
    rows: list[BenchRow] = []
    for temperature in plan.temperatures:
        for method, budget in plan.runs():
            rows.append(timed_row(target, draft, prompts, method, budget, temperature, plan, eos_ids, log))
    return finish(rows)


def timed_row(target: Any, draft: Any, prompts: Sequence[torch.Tensor], method: str, budget: int | None,
              temperature: float, plan: BenchPlan, eos_ids: Sequence[int], log: Callable[[str], None],
              memory: str = "") -> BenchRow:
    """One (method, budget, temperature) row, with a progress line before and after."""
    label = method + (f" budget {budget}" if budget is not None else "") + (f" ({memory})" if memory else "")
    log(f"t={temperature:g} {label}: {len(prompts)} prompts ...")
    row = run_method(target, draft, prompts, method, budget, temperature, plan, eos_ids)
    row.memory = memory
    log(f"t={temperature:g} {label}: {row.new_tokens} tokens in {row.target_passes} target passes, "
        f"{row.tokens_per_pass:.2f} tok/pass, {row.tokens_per_s:.3f} tok/s, "
        f"host {100 * row.host_share:.1f}%, {row.draft_passes_per_iteration:.1f} draft/iter, "
        f"{row.target_s_per_pass:.2f} s/target pass, {row.elapsed_s:.0f} s, "
        f"load {os.getloadavg()[0]:.1f}")
    return row


def finish(rows: list[BenchRow]) -> list[BenchRow]:
    """Group the rows by temperature (in order) and fill each group's speedups."""
    temperatures = list(dict.fromkeys(row.temperature for row in rows))
    grouped = [[r for r in rows if r.temperature == t] for t in temperatures]
    for group in grouped:
        finish_rows(group)
    return [row for group in grouped for row in group]


# --- output ------------------------------------------------------------------------------------

TABLE_COLUMNS = ("method", "budget", "tok/pass", "tok/s", "speedup", "host %", "draft/iter", "target s/pass",
                 "= AR", "settings")
# with an offloaded target: the speedup over each plain-decoding baseline (docs/benchmarks.md)
OFFLOAD_COLUMNS = ("method", "budget", "tok/pass", "tok/s", "x equal streaming", "x equal memory", "host %",
                   "draft/iter", "target s/pass", "= AR", "settings")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_cells(row: BenchRow, both: bool = False) -> list[str]:
    matches = "-" if row.greedy_matches is None else f"{row.greedy_matches}/{row.n_prompts}"
    method = row.method + (f" ({row.memory})" if row.memory else "")
    speedups = [_fmt(row.speedup, ".2f")] + ([_fmt(row.speedup_equal_memory, ".2f")] if both else [])
    return [method, "-" if row.budget is None else str(row.budget), f"{row.tokens_per_pass:.2f}",
            f"{row.tokens_per_s:.2f}", *speedups, f"{100 * row.host_share:.1f}",
            f"{row.draft_passes_per_iteration:.1f}", f"{row.target_s_per_pass:.2f}", matches, row.settings]


def format_table(rows: Sequence[BenchRow], title: str | None = None) -> str:
    """A markdown table of rows (one line per row), under an optional title line. With an equal-memory
    plain-decoding row the speedup is shown over both baselines."""
    both = any(row.memory for row in rows)
    columns = OFFLOAD_COLUMNS if both else TABLE_COLUMNS
    lines = [title, ""] if title else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join(" --- " for _ in columns) + "|")
    lines += ["| " + " | ".join(table_cells(row, both)) + " |" for row in rows]
    return "\n".join(lines)


def format_report(rows: Sequence[BenchRow], header: str) -> str:
    """One table per temperature, each under the run's header."""
    temperatures = list(dict.fromkeys(row.temperature for row in rows))
    parts = [format_table([r for r in rows if r.temperature == t], f"{header}, t={t:g}")
             for t in temperatures]
    return "\n\n".join(parts) + "\n"


def _parse_csv(text: str, kind: type) -> tuple:
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"expected a comma-separated list of {kind.__name__}s, got {text!r}") from None


def parse_budgets(text: str) -> tuple[int, ...]:
    budgets = _parse_csv(text, int)
    if not budgets or min(budgets) < 1:
        raise UsageError(f"budgets must be integers >= 1, got {text!r}")
    return budgets


def parse_methods(text: str) -> tuple[str, ...]:
    methods = tuple(m.strip().lower() for m in text.split(",") if m.strip())
    if not methods:
        raise UsageError(f"--methods needs at least one of {', '.join(ALL_METHODS)}")
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise UsageError(f"unknown method {unknown[0]!r}; choose from {', '.join(ALL_METHODS)}")
    return methods


# --- entry point -------------------------------------------------------------------------------


def run_benchmark(
    request: EngineRequest | None = None,
    *,
    prompts: str | None = None,
    n_prompts: int = 8,
    max_new_tokens: int = 64,
    temperatures: Sequence[float] = (0.0, 0.6),
    budgets: Sequence[int] | None = None,
    specinfer_budgets: Sequence[int] | None = None,
    methods: Sequence[str] = ALL_METHODS,
    assisted: bool = True,
    threads: int | None = None,
    seed: int = 0,
    json_lines: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> list[BenchRow]:
    """`specexec bench`: open the pair through the engine (`request`'s target, draft, tree shape, formats
    and placement; no profile), decode the prompts with every method and print the results.

    budgets: SpecExec budgets (default 1,16,64,256,1024) and, unless specinfer_budgets is given, the
    SpecInfer ones too (default 16,64,256). Tables (or JSON Lines) go to `out` (stdout), progress to `err`.
    With an offloaded target (the request places it: --offload, --max-memory, ...) every method runs on
    the same streamed target, planned for the largest budget with the draft (the "equal streaming"
    comparison), and plain decoding runs once more on the target planned under the same caps without the
    draft or a tree (the "equal memory" comparison: the draft's memory holds target layers).
    """
    from specexec_cli.engine import Workload, load, resolve

    out, err = out or sys.stdout, err or sys.stderr

    def log(message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=err, flush=True)

    if n_prompts < 1 or max_new_tokens < 1:
        raise UsageError("--n-prompts and --max-new-tokens must be >= 1")
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise UsageError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    methods = tuple(m for m in methods if assisted or m != "assisted")
    specexec_budgets = tuple(budgets or SPECEXEC_BUDGETS)
    specinfer_budgets = tuple(specinfer_budgets or budgets or SPECINFER_BUDGETS)
    biggest = max([*specexec_budgets, *specinfer_budgets, 1])
    request = replace(request or EngineRequest(), method="specexec", budget=biggest, use_profile=False,
                      batch_size=1)
    spec = resolve(request)  # bad knobs and names fail here, before the prompts are read
    plan = BenchPlan(
        temperatures=tuple(float(t) for t in temperatures),
        methods=tuple(methods),
        specexec_budgets=specexec_budgets,
        specinfer_budgets=specinfer_budgets,
        tree=spec.tree,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    for t in plan.temperatures:
        SamplingConfig(temperature=t).validate()
    prompt_path = resolve_prompt_path(prompts)
    conversations = load_conversations(prompt_path, n_prompts)
    if not conversations:
        raise UsageError(f"prompt file {prompt_path} holds no prompt with a user message")
    log(f"opening {spec.target} with draft {spec.draft} ({spec.draft_format}) on {spec.device}")
    workload = Workload.uniform(2048, max_new_tokens, 1)  # MT-Bench turns are short: 2048 holds any
    engine = load(spec, workload)
    target_model, draft_model = engine.pair.target, engine.pair.draft
    eos_ids = engine.pair.eos_token_ids
    encoded = [encode_chat(engine.pair.tokenizer, messages) for _, messages in conversations]
    n_tokens = sum(len(e) for e in encoded)
    log(f"{len(encoded)} prompts from {prompt_path}, {n_tokens} prompt tokens; warming up")
    warm_up(target_model, draft_model, encoded[0], eos_ids)
    load_before = os.getloadavg()
    start = time.perf_counter()
    rows = bench_rows(target_model, draft_model, encoded, plan, eos_ids, log)
    offloaded = engine.offloaded
    where = "resident" if not offloaded else describe_offload(target_model)
    if offloaded and "autoregressive" in plan.methods:
        # equal memory: plain decoding planned under the same caps with no draft and no tree, so the
        # memory they took holds target layers (the same target and prompts, loaded again)
        engine.close()
        del target_model, draft_model, engine
        gc.collect()
        log("equal memory: plain decoding planned under the same caps without the draft")
        plain = load(resolve(replace(request, method="autoregressive")), workload)
        where += f"; equal memory plain decoding: {describe_offload(plain.pair.target)}"
        rows += [timed_row(plain.pair.target, None, encoded, "autoregressive", None, t, plan, eos_ids, log,
                           memory="equal memory") for t in plan.temperatures]
        rows = finish(rows)
        plain.close()
    load_after = os.getloadavg()
    log(f"done in {time.perf_counter() - start:.0f} s; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after (1 min), {load_after[2]:.2f} (15 min)")
    if json_lines:
        for row in rows:
            placed = {} if not offloaded else {"offload": where}
            run = {"target": spec.target, "draft": spec.draft, "draft_quant": spec.draft_format,
                   "prompts": str(prompt_path), "max_new_tokens": max_new_tokens,
                   "threads": torch.get_num_threads(), "load_avg_1m": load_after[0]}
            record = row.to_dict() | placed | run
            print(json.dumps(record), file=out)
    else:
        draft_label = f"{spec.draft}" + (" int8" if spec.draft_format == "int8" else "")
        header = (f"{spec.target} ({where}) / draft {draft_label}, {len(encoded)} prompts of "
                  f"{prompt_path.name}, {max_new_tokens} new tokens, {torch.get_num_threads()} threads, "
                  f"load avg {load_before[0]:.1f}->{load_after[0]:.1f}")
        print(format_report(rows, header), file=out, end="", flush=True)
    return rows


def describe_offload(model: Any) -> str:
    """'disk: 26 of 28 layers streamed, 2.44 GB per pass' for table headers."""
    engine = model.offload_engine
    plan = engine.plan
    streamed = sum(engine.layers[i].layout.nbytes for i in engine.streamed)
    return (f"{plan.offload}: {len(engine.streamed)} of {len(engine.layers)} layers streamed, "
            f"{streamed / 1e9:.2f} GB per pass")
