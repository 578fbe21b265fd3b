"""Tokens per target pass against the tree budget, SpecExec and SpecInfer, as the SpecExec paper's
Figures 3-4 plot generation rate against draft size: a table on stdout, the rows as JSON Lines and a PNG.

Two prompt sets: MT-Bench first turns in the target's chat template ("mtbench"), and web-like prose
continued raw, with no chat template ("prose": the user texts of the OASST set, our stand-in for C4,
which no model hub is reachable for here). Tokens per target pass depends only on the tree, never on the
speed of the machine, once one draft pass's cost is fixed (`--draft-cost`, default 0: depth is free, as
on a GPU where a draft pass costs milliseconds against seconds for a streamed target pass). With
`--draft-cost measured` the tree grows as it would on this machine (the default flags of `generate`).

Rows are appended to `--out` as they finish and a rerun skips the rows already there, so a long run that
is stopped resumes where it was. `--plot-only` redraws the PNG from the rows.

Examples:
  python scripts/bench_budget.py --out docs/data/bench_budget_cpu.jsonl --png docs/budget_curve.png
  python scripts/bench_budget.py --datasets prose --budgets 128 --draft-cost measured --temperature 0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from specexec_cli.bench import (  # noqa: E402
    BenchPlan,
    encode_chat,
    load_conversations,
    load_prompt_set,
    parse_budgets,
    run_method,
    warm_up,
)
from specexec_cli.decoding.config import TreeConfig  # noqa: E402
from specexec_cli.engine import Workload, load, resolve  # noqa: E402
from specexec_cli.errors import SpecexecError, UsageError  # noqa: E402
from specexec_cli.prompt_sets import packaged_prompt_set  # noqa: E402
from specexec_cli.settings import DEFAULT_TARGET, EngineRequest  # noqa: E402

DATASETS = {"mtbench": "mtbench", "prose": "oasst"}  # prose: OASST user texts, no chat template
DEFAULT_TREE = TreeConfig()
PROSE_TOKENS = 256  # a prose prompt is cut to its last this many tokens


def encode_dataset(name: str, tokenizer, n_prompts: int, prompt_dir: Path | None) -> list[torch.Tensor]:
    """Token ids [1, L] of the first `n_prompts` prompts of a data set (the packaged sets by default)."""
    file = DATASETS[name]
    path = packaged_prompt_set(file) if prompt_dir is None else prompt_dir / f"{file}.json"
    if not path.is_file():
        raise UsageError(f"prompt set {name}: {path} not found (--prompt-dir)")
    if name == "mtbench":
        return [encode_chat(tokenizer, messages) for _, messages in load_conversations(path, n_prompts)]
    texts = [text for _, text in load_prompt_set(path, None) if len(text) >= 400][:n_prompts]
    ids = [tokenizer.encode(text, add_special_tokens=False)[-PROSE_TOKENS:] for text in texts]
    return [torch.tensor([row]) for row in ids]


def row_key(row: dict) -> tuple:
    return (row["dataset"], row["method"], row["budget"], row["temperature"], row["draft_cost"],
            row["n_prompts"], row["max_new_tokens"])


def read_rows(path: Path | None) -> list[dict]:
    if path is None or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_row(path: Path | None, row: dict) -> None:
    """One JSON line, flushed to disk before the next row starts (a stopped run loses at most one row)."""
    if path is None:
        return
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def format_table(rows: Sequence[dict]) -> str:
    lines = ["| data | t | budget | SpecExec tok/pass | SpecInfer tok/pass | ratio | SpecExec draft/iter |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    cells: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        cells.setdefault((row["dataset"], row["temperature"], row["budget"]), {})[row["method"]] = row
    for (dataset, temperature, budget), by in sorted(cells.items()):
        spec, inf = by.get("specexec"), by.get("specinfer")
        a = spec["tokens_per_pass"] if spec else None
        b = inf["tokens_per_pass"] if inf else None
        ratio = f"{a / b:.2f}" if a and b else "-"
        draft = f"{spec['draft_passes_per_iteration']:.1f}" if spec else "-"
        lines.append(f"| {dataset} | {temperature:g} | {budget} | {'-' if a is None else f'{a:.2f}'} | "
                     f"{'-' if b is None else f'{b:.2f}'} | {ratio} | {draft} |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], png: Path, title: str) -> None:
    """Tokens per target pass against budget (log 2 axis), one panel per data set, one line per method
    and temperature."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UsageError("drawing the PNG needs matplotlib: pip install -e '.[bench]'") from exc
    datasets = sorted({row["dataset"] for row in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    styles = {"specexec": "-o", "specinfer": "--s"}
    for ax, dataset in zip(axes[0], datasets, strict=True):
        series: dict[tuple[str, float], list[tuple[int, float]]] = {}
        for row in rows:
            if row["dataset"] == dataset:
                series.setdefault((row["method"], row["temperature"]), []).append(
                    (row["budget"], row["tokens_per_pass"]))
        temperatures = sorted({temperature for _, temperature in series})
        for (method, temperature), points in sorted(series.items()):
            points.sort()
            name = {"specexec": "SpecExec", "specinfer": "SpecInfer"}[method]
            ax.plot([p[0] for p in points], [p[1] for p in points], styles[method],
                    color=f"C{temperatures.index(temperature)}", label=f"{name}, t={temperature:g}")
        ax.set_xscale("log", base=2)
        budgets = sorted({p[0] for points in series.values() for p in points})
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("budget (tree tokens per target pass)")
        ax.set_ylabel("generated tokens per target pass")
        ax.set_title(dataset)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, png)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="mtbench,prose", help="comma-separated: " + ",".join(DATASETS))
    parser.add_argument("--prompt-dir", type=Path, default=None,
                        help="folder of mtbench.json and oasst.json [default: the packaged sets]")
    parser.add_argument("--budgets", default="16,64,256,1024")
    parser.add_argument("--methods", default="specexec,specinfer")
    parser.add_argument("--temperature", type=float, action="append", default=None,
                        help="repeatable [default: 0 and 0.6]")
    parser.add_argument("--n-prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--draft-cost", default="0",
                        help="one draft pass in target passes (0: depth is free, the GPU regime), or "
                             "'measured' (this machine's pass times, as generate does) [default: 0]")
    parser.add_argument("--max-n-beams", type=int, default=DEFAULT_TREE.max_n_beams,
                        help="SpecExec: most nodes per draft pass [default: generate's, %(default)s]")
    parser.add_argument("--max-beam-len", type=int, default=None, help="cap on draft passes [default: none]")
    parser.add_argument("--max-branch-width", type=int, default=DEFAULT_TREE.max_branch_width,
                        help="SpecExec: children per expanded node [default: %(default)s]")
    parser.add_argument("--specinfer-stems", type=int, default=DEFAULT_TREE.max_n_beams,
                        help="SpecInfer: sampled stems, each budget / stems long (generate's "
                             "--max-n-beams) [default: %(default)s]")
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--draft", default=None, help="[default: the target's registry draft]")
    parser.add_argument("--draft-quant", choices=["none", "int8"], default="none",
                        help="the draft's weights [default: none, float, as the recorded figures ran]")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="JSON Lines rows, appended and resumed")
    parser.add_argument("--png", type=Path, default=None, help="draw the figure here")
    parser.add_argument("--plot-only", action="store_true", help="draw --png from --out without running")
    return parser


def parse_draft_cost(text: str) -> float | None:
    if text == "measured":
        return None
    try:
        return float(text)
    except ValueError as exc:
        raise UsageError(f"--draft-cost must be a number >= 0 or 'measured', got {text!r}") from exc


def run(args: argparse.Namespace) -> list[dict]:
    datasets = [d for d in args.datasets.split(",") if d]
    for name in datasets:
        if name not in DATASETS:
            raise UsageError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    methods = tuple(m for m in args.methods.split(",") if m)
    if not set(methods) <= {"specexec", "specinfer"}:
        raise UsageError("--methods takes specexec and/or specinfer")
    draft_cost = parse_draft_cost(args.draft_cost)
    budgets = parse_budgets(args.budgets)
    temperatures = tuple(args.temperature or (0.0, 0.6))
    tree = TreeConfig(budget=1, max_n_beams=args.max_n_beams, max_beam_len=args.max_beam_len,
                      max_branch_width=args.max_branch_width, draft_cost=draft_cost)
    tree.validate()
    trees = {"specexec": tree, "specinfer": TreeConfig(budget=1, max_n_beams=args.specinfer_stems)}
    trees["specinfer"].validate()
    done = read_rows(args.out)
    done_keys = {row_key(row) for row in done}
    rows = list(done)
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(f"[bench_budget {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    request = EngineRequest(target=args.target, draft=args.draft, device=args.device,
                            draft_quant=args.draft_quant, use_profile=False)
    engine = load(resolve(request), Workload.uniform(2048, args.max_new_tokens, 1))  # generate's loader
    target, draft, tokenizer = engine.pair.target, engine.pair.draft, engine.pair.tokenizer
    eos_ids = engine.pair.eos_token_ids
    log(f"opened {engine.spec.target} and {engine.spec.draft} on {engine.device}")
    encoded = {dataset: encode_dataset(dataset, tokenizer, args.n_prompts, args.prompt_dir)
               for dataset in datasets}
    warm_up(target, draft, encoded[datasets[0]][0], eos_ids)
    for budget in budgets:  # smallest first: a stopped run has every series up to some budget
        for dataset, prompts in encoded.items():
            for temperature in temperatures:
                for method in methods:
                    key = (dataset, method, budget, temperature, draft_cost, len(prompts),
                           args.max_new_tokens)
                    label = f"{dataset} t={temperature:g} {method} budget {budget}"
                    if key in done_keys:
                        log(f"{label}: already in {args.out}")
                        continue
                    plan = BenchPlan(temperatures=(temperature,), methods=(method,), tree=trees[method],
                                     max_new_tokens=args.max_new_tokens)
                    log(f"{label}: {len(prompts)} prompts ...")
                    result = run_method(target, draft, prompts, method, budget, temperature, plan, eos_ids)
                    row = {"dataset": dataset, "method": method, "budget": budget, "temperature": temperature,
                           "draft_cost": draft_cost, "n_prompts": len(prompts),
                           "max_new_tokens": args.max_new_tokens, "tokens_per_pass": result.tokens_per_pass,
                           "new_tokens": result.new_tokens, "target_passes": result.target_passes,
                           "draft_passes_per_iteration": result.draft_passes_per_iteration,
                           "elapsed_s": result.elapsed_s, "settings": result.settings,
                           "target": args.target, "draft": args.draft}
                    log(f"  {row['tokens_per_pass']:.2f} tok/pass ({row['new_tokens']} tokens, "
                        f"{row['target_passes']} passes, {row['draft_passes_per_iteration']:.1f} draft/iter, "
                        f"{row['elapsed_s']:.0f} s)")
                    append_row(args.out, row)
                    rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows = read_rows(args.out) if args.plot_only else run(args)
        if not rows:
            raise UsageError(f"no rows to show (--out {args.out})")
        print(format_table(rows), end="")
        if args.png:
            targets = sorted({f"{r['target']} / draft {r['draft']}" for r in rows})
            costs = sorted({"measured" if r["draft_cost"] is None else f"{r['draft_cost']:g}" for r in rows})
            sizes = sorted({f"{r['n_prompts']} prompts x {r['max_new_tokens']} tokens" for r in rows})
            plot(rows, args.png, f"{'; '.join(targets)}; draft cost {', '.join(costs)}; {', '.join(sizes)}")
    except SpecexecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
