"""Benchmark the tuner against an exhaustive grid over the same space, measured in the same run.

Target: the bundled Qwen2.5-Coder-1.5B (float32 and NF4); drafts: none (plain decoding), the bundled
0.5B, and early-exit drafts (the first layers of the target and of the 0.5B). Both the tuner and the
grid measure with one GenerationObjective (same prompts, seed, new-token count, loaded models).

Reported: the tuner's evaluations vs the grid's, the tuned configuration's tokens/s (measured by the
tuner, and again inside the grid) against the grid's best, and the cost model's predicted vs measured
tokens/s for every configuration. The comparison uses the grid's own measurement of the tuned
configuration, so slow drifts of the machine's load between the two phases do not bias it.

    python scripts/bench_tune.py --out bench_tune.json   # ~45 min on a 2-core CPU

The streamed regime (issue 8): the target cannot stay resident under --max-memory and streams from
disk; quantizations fp32 (computed from the float16 files) and bf16; drafts 0.5B / none / early exit;
budgets 1-256. Goal: tuned within 10 % of the grid's best with at most 1/3 of its evaluations, where
the grid's best is speculative. Hours on a 2-core CPU:

    python scripts/bench_tune.py --offload disk --max-memory cpu=4GiB --quantizations fp32,bf16 \
        --budgets 1,2,4,8,16,32,64,128,256 --n-beams 8,32 --beam-lens 8 --trial-time-limit 120 \
        --out bench_tune_streamed.json

`--smoke` runs the same code end to end on a tiny random pair saved to a temporary folder (seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from specexec_cli import hardware
from specexec_cli.tuning.options import TuneOptions
from specexec_cli.tuning.space import NO_DRAFT, Candidate, early_exit_key
from specexec_cli.tuning.tune import build_space, tune

TARGET = "qwen2.5-coder-1.5b"
DRAFT = "qwen2.5-coder-0.5b"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_tune.json"))
    parser.add_argument("--budgets", default="1,2,4,8,16,32")
    parser.add_argument("--quantizations", default="fp32,nf4")
    parser.add_argument(
        "--target-exit-layers", type=int, default=4, help="early-exit draft: target's first N"
    )
    parser.add_argument("--draft-exit-layers", type=int, default=12, help="early-exit draft: 0.5B's first N")
    parser.add_argument("--no-early-exit", action="store_true", help="leave the early-exit drafts out")
    parser.add_argument("--n-beams", default="8", help="max_n_beams choices")
    parser.add_argument("--beam-lens", default="8", help="max_beam_len choices")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--n-prompts", type=int, default=2)
    parser.add_argument("--trial-time-limit", type=float, default=30.0, help="seconds per measurement")
    parser.add_argument("--trials", type=int, default=None, help="tuner evaluations (default: grid / 3)")
    parser.add_argument(
        "--calibration-iterations", type=int, default=8, help="SpecExec iterations per prompt"
    )
    parser.add_argument("--skip-grid", action="store_true")
    parser.add_argument("--prompts-file", type=Path, default=None, help="calibration prompts (--prompts)")
    parser.add_argument("--offload", default=None, help="auto|none|ram|disk (tune --offload)")
    parser.add_argument("--max-memory", action="append", default=[], help="caps, as tune --max-memory")
    parser.add_argument("--smoke", action="store_true", help="tiny random models, end to end, in seconds")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Rank correlation (ties get their mean rank)."""
    if len(xs) < 3:
        return None

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else None


def row(c: Candidate, measured: float | None, predicted: float | None, calibrated: bool, record) -> dict:
    return {
        "config": c.label(),
        "candidate": c.to_dict(),
        "measured_tokens_per_s": measured,
        "predicted_tokens_per_s": predicted,
        "predicted_from": (
            "target latency"
            if c.autoregressive
            else "measured acceptance"
            if calibrated
            else "optimistic prior"
        ),
        "tokens_per_pass": record.tokens_per_pass if record else None,
        "draft_passes_per_iteration": record.draft_passes_per_iteration if record else None,
        "truncated": record.truncated if record else None,
    }


def smoke_setup(work: Path, args: argparse.Namespace) -> tuple[str, tuple, tuple, dict]:
    """A tiny random pair saved to `work`, streamed from disk under a cap one byte short of holding it:
    (target, drafts, quantizations, tune() keyword arguments). It opens through the engine like any
    model (a folder)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import save_tiny_cli_pair

    from specexec_cli.models.load import load_model
    from specexec_cli.runtime.target import plan_target
    from specexec_cli.tuning.tune import PLAN_CONTEXT

    save_tiny_cli_pair(work)
    folder, draft_folder = work / "target", str(work / "draft")
    draft, _ = load_model(draft_folder)
    budget = max(int(b) for b in args.budgets.split(","))
    full = plan_target(folder, device="cpu", quant="fp32", offload="none", budget=budget,
                       context_len=PLAN_CONTEXT, draft=draft)
    args.max_memory = args.max_memory or [f"cpu={full.device_bytes - 1}"]
    args.offload = args.offload or "disk"
    prompts = work / "prompts.json"
    prompts.write_text(json.dumps([[0, "w1 w5 w9 w2"], [1, "w7 w3 w3 w8 w1"]]))
    args.prompts_file = prompts
    drafts = (NO_DRAFT, draft_folder, "first-layers:1")
    return str(folder), drafts, ("fp32",), {"target_key": "tiny-target"}


def main() -> int:
    args = parse_args()
    torch.manual_seed(args.seed)
    budgets = tuple(int(b) for b in args.budgets.split(","))
    drafts = (NO_DRAFT, DRAFT)
    if not args.no_early_exit:
        drafts += (
            early_exit_key(TARGET, args.target_exit_layers),
            early_exit_key(DRAFT, args.draft_exit_layers),
        )
    n_beams = tuple(int(b) for b in args.n_beams.split(","))
    beam_lens = tuple(int(b) for b in args.beam_lens.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    target, quantizations = TARGET, tuple(args.quantizations.split(","))
    tune_kwargs: dict = {}
    if args.smoke:
        target, drafts, quantizations, tune_kwargs = smoke_setup(work, args)
        budgets = tuple(int(b) for b in args.budgets.split(","))
    options = TuneOptions(
        target=target,
        drafts=drafts,
        quantizations=quantizations,
        budgets=budgets,
        n_beams=n_beams,
        beam_lens=beam_lens,
        n_prompts=args.n_prompts,
        max_new_tokens=args.max_new_tokens,
        prompts_file=args.prompts_file,
        seed=args.seed,
        storage=work / "tune.db",
        profiles_dir=work / "profiles",
        device="cpu",
        trial_time_limit_s=args.trial_time_limit,
        calibration_iterations=args.calibration_iterations,
        progress=True,
        max_memory=tuple(args.max_memory),
        offload=args.offload,
    )
    probe = hardware.probe(work / "weights", run_measurements=False) if args.smoke else hardware.probe()
    print(hardware.format_probe(probe), file=sys.stderr)
    # The space size decides the tuner's evaluation allowance: a third of the grid.
    grid = build_space(options, target, torch.device("cpu")).candidates()
    options.n_trials = args.trials or max(3, len(grid) // 3)
    start = time.perf_counter()
    report = tune(options, probe=probe, **tune_kwargs)
    tune_s = time.perf_counter() - start
    result, calibration, objective = report.result, report.calibration, report.objective
    pool = objective.pool
    print(report.summary(), file=sys.stderr)

    tuner_rows = [
        row(
            e.candidate,
            e.tokens_per_s,
            e.predicted,
            e.candidate.draft in calibration.acceptance,
            report.records.get(e.candidate),
        )
        for e in result.ranked()
    ]
    out: dict = {
        "machine": hardware.identity(probe.gpus, probe.host, probe.torch_version),
        "probe": probe.to_dict(),
        "protocol": {
            "target": target,
            "offload": args.offload,
            "max_memory": args.max_memory,
            "drafts": list(drafts),
            "quantizations": list(options.quantizations),
            "budgets": list(budgets),
            "max_n_beams": list(n_beams),
            "max_beam_len": list(beam_lens),
            "max_new_tokens": args.max_new_tokens,
            "prompts": args.n_prompts,
            "trial_time_limit_s": args.trial_time_limit,
            "calibration_iterations_per_prompt": args.calibration_iterations,
            "temperature": 0.0,
            "objective": "decode tokens/s (prefill excluded), greedy, no EOS",
        },
        "calibration": calibration.to_dict(),
        "tuner": {
            "evaluations": len(result.evaluations),
            "pruned": [[c.label(), reason] for c, reason in result.pruned],
            "failed": [[c.label(), reason] for c, reason in result.failed],
            "stop_reason": result.stop_reason,
            "seconds_total": tune_s,
            "seconds_calibration": calibration.seconds,
            "load_seconds": pool.load_seconds,
            "best": result.best.candidate.label(),
            "best_tokens_per_s": result.best.tokens_per_s,
            "verdict": result.verdict(),
            "rows": tuner_rows,
        },
        "grid": None,
    }
    if not args.skip_grid:
        grid_rows, start = [], time.perf_counter()
        tuned_records = dict(objective.records)
        objective.records.clear()
        for i, c in enumerate(grid, start=1):
            try:
                measured = objective(c)
            except Exception as exc:  # a failing configuration is a result too
                print(f"grid {i}/{len(grid)} {c.label()}: failed: {exc}", file=sys.stderr)
                measured = None
            else:
                print(f"grid {i}/{len(grid)} {c.label()}: {measured:.3f} tok/s", file=sys.stderr, flush=True)
            grid_rows.append(
                row(
                    c,
                    measured,
                    calibration.predict(c),
                    c.draft in calibration.acceptance,
                    objective.records.get(c),
                )
            )
        objective.records.update(tuned_records)
        measured_rows = [r for r in grid_rows if r["measured_tokens_per_s"] is not None]
        best = max(measured_rows, key=lambda r: r["measured_tokens_per_s"])
        tuned = next(r for r in grid_rows if r["candidate"] == result.best.candidate.to_dict())
        plain = max(
            (r for r in measured_rows if r["candidate"]["draft"] == NO_DRAFT),
            key=lambda r: r["measured_tokens_per_s"],
        )
        pairs = [
            (r["predicted_tokens_per_s"], r["measured_tokens_per_s"])
            for r in measured_rows
            if r["predicted_tokens_per_s"] is not None and r["predicted_from"] != "optimistic prior"
        ]
        errors = [abs(p - m) / m for p, m in pairs]
        out["grid"] = {
            "evaluations": len(grid),
            "seconds": time.perf_counter() - start,
            "best": best["config"],
            "best_tokens_per_s": best["measured_tokens_per_s"],
            "plain_best": plain["config"],
            "plain_tokens_per_s": plain["measured_tokens_per_s"],
            "tuned_in_grid_tokens_per_s": tuned["measured_tokens_per_s"],
            "tuned_over_grid_best": tuned["measured_tokens_per_s"] / best["measured_tokens_per_s"],
            "tuner_measured_over_grid_best": result.best.tokens_per_s / best["measured_tokens_per_s"],
            "evaluation_ratio": len(result.evaluations) / len(grid),
            "grid_best_is_speculative": best["candidate"]["draft"] != NO_DRAFT,
            "goal_met": tuned["measured_tokens_per_s"] >= 0.9 * best["measured_tokens_per_s"]
            and len(result.evaluations) <= len(grid) / 3,
            "prediction_median_abs_error": statistics.median(errors) if errors else None,
            "prediction_rank_correlation": spearman([p for p, _ in pairs], [m for _, m in pairs]),
            "rows": grid_rows,
        }
    args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    print_markdown(out)
    return 0


def print_markdown(out: dict) -> None:
    tuner, grid = out["tuner"], out["grid"]
    print(
        f"tuner: {tuner['evaluations']} evaluations, "
        f"best {tuner['best']} at {tuner['best_tokens_per_s']:.2f} tok/s"
    )
    print(f"verdict: {tuner['verdict']}")
    if grid is None:
        return
    print(
        f"grid: {grid['evaluations']} evaluations, "
        f"best {grid['best']} at {grid['best_tokens_per_s']:.2f} tok/s; "
        f"tuned config in the grid: {grid['tuned_in_grid_tokens_per_s']:.2f} tok/s "
        f"({100 * grid['tuned_over_grid_best']:.0f}% of the best) with "
        f"{100 * grid['evaluation_ratio']:.0f}% of the evaluations"
    )
    print()
    print("| configuration | measured tok/s | predicted tok/s | predicted from | tokens/pass |")
    print("| --- | --- | --- | --- | --- |")
    for r in sorted(grid["rows"], key=lambda r: -(r["measured_tokens_per_s"] or 0)):
        m, p, t = r["measured_tokens_per_s"], r["predicted_tokens_per_s"], r["tokens_per_pass"]
        print(
            f"| {r['config']} | {'-' if m is None else f'{m:.3f}'} | {'-' if p is None else f'{p:.3f}'} "
            f"| {r['predicted_from']} | {'-' if t is None else f'{t:.2f}'} |"
        )


if __name__ == "__main__":
    sys.exit(main())
