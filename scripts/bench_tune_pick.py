"""How good is the tuner's pick? The saved profile against a grid around it, on prompts it did not see.

`specexec tune` saves a profile; this runs that profile as `specexec generate` would (the profile's
draft, budget, placement and caps) and a grid of neighbours under the same caps, each opened through the
engine (`engine.open_engine`, the planner placing the target for that configuration, no profile):

- plain decoding;
- SpecExec with each draft candidate of the tuner's default space (registry drafts, on a CPU also in
  int8, the early exit), at budgets /4, /2, x1, x2 and x4 of the pick's (of the best speculative budget
  the tune measured when plain decoding won, else 16), with the pick's beam shape.

Every configuration is measured the way the tuner measures a trial (`tuning.objective`: greedy, a fixed
number of new tokens, decode tokens/s with the prompt's prefill left out) on held-out prompts: MT-Bench
first turns that are not among the tuner's calibration prompts. The figure is tuned / best of the grid
(goal >= 0.95); all configurations run in this one process, one at a time, the tuned profile first
and again last (the figure: the first configuration of a process runs colder than the rest).

    specexec tune --target qwen2.5-coder-1.5b --max-memory cpu=5GiB
    python scripts/bench_tune_pick.py --target qwen2.5-coder-1.5b --out pick.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specexec_cli import profiles  # noqa: E402
from specexec_cli.decoding.generate import generate  # noqa: E402
from specexec_cli.engine import EngineRequest, Workload, open_engine  # noqa: E402
from specexec_cli.prompt_sets import load_prompt_set  # noqa: E402
from specexec_cli.tuning.objective import GenerationObjective  # noqa: E402
from specexec_cli.tuning.prompt_set import encode_prompt, packaged_prompts  # noqa: E402
from specexec_cli.tuning.space import (  # noqa: E402
    INT8_SUFFIX,
    NO_DRAFT,
    UNCAPPED,
    Candidate,
    generate_draft_name,
    normalize_draft,
    split_draft_quant,
)
from specexec_cli.tuning.tune import default_drafts  # noqa: E402

PROMPT_SETS = ROOT.parent / "shared" / "data" / "prompts"
DEFAULT_PROMPTS = [PROMPT_SETS / "mtbench.json", PROMPT_SETS / "oasst.json"]
# what the grid's runs plan for: the tuner's plan context (a 2048-token prompt and generate's 256 new)
WORKLOAD = Workload.uniform(2048, 256, 1)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Point:
    """One configuration of the comparison and what it measured."""

    label: str
    request: EngineRequest
    candidate: Candidate | None = None  # set once the engine says what it runs
    tokens_per_s: float | None = None
    resident_layers: int | None = None
    error: str | None = None


def held_out_prompts(paths: list[Path], n: int) -> list[str]:
    """`n` prompts that are not among the tuner's calibration prompts, taken in turn from each of `paths`
    (the calibration set interleaves MT-Bench and OASST the same way), the first of each that qualify."""
    seen = {p.text.strip() for p in packaged_prompts()}
    pools = [[text for _, text in load_prompt_set(path, None) if text.strip() not in seen] for path in paths]
    texts = [pool[i] for i in range(max(map(len, pools), default=0)) for pool in pools if i < len(pool)]
    if len(texts) < n:
        sys.exit(f"bench_tune_pick: {len(texts)} held-out prompts in {', '.join(map(str, paths))}, "
                 f"{n} asked for")
    return texts[:n]


def budgets_around(center: int) -> list[int]:
    return sorted({b for b in (center // 4, center // 2, center, 2 * center, 4 * center) if 1 <= b <= 4096})


def grid(target: str, settings: dict, profile: profiles.Profile, device: torch.device) -> list[Point]:
    """The profile's neighbours: plain decoding, then every draft candidate at budgets around the pick."""
    caps = tuple(settings.get("max_memory") or ())
    base = dict(target=target, offload=settings.get("offload"), max_memory=caps,
                quant=settings.get("quantization"), use_profile=False, batch_size=1)
    plain_won = settings.get("method") == "autoregressive"
    spec = profile.measured.get("best_speculative") if plain_won else settings
    center = int(spec["budget"]) if spec else 16
    beams = int(settings.get("max_n_beams") or (spec or {}).get("max_n_beams") or 32)
    length = settings.get("max_beam_len")
    points = [Point("plain decoding", EngineRequest(method="autoregressive", **base))]
    for key in default_drafts(target, None, device):
        if key == NO_DRAFT:
            continue
        name, draft_quant = split_draft_quant(key)
        for budget in budgets_around(center):
            request = EngineRequest(method="specexec", draft=generate_draft_name(name, target),
                                    draft_quant=draft_quant or "none", budget=budget, max_n_beams=beams,
                                    max_beam_len=length, **base)
            points.append(Point(f"{key} budget={budget}", request))
    return points


def measure(point: Point, texts: list[str], new_tokens: int) -> None:
    """Open the engine for `point`, warm it up, and measure decode tokens/s as a tuner trial does."""
    engine = open_engine(point.request, WORKLOAD)
    try:
        spec = engine.spec
        plain = spec.method == "autoregressive"
        key = NO_DRAFT if plain else (normalize_draft(spec.draft, spec.target)
                                      + (INT8_SUFFIX if spec.draft_format == "int8" else ""))
        tree = engine.tree
        point.candidate = Candidate(key, spec.weight_format, 0 if plain else tree.budget,
                                    0 if plain else tree.max_n_beams,
                                    0 if plain else (tree.max_beam_len or UNCAPPED))
        plan = engine.plan
        point.resident_layers = plan.resident_layers if plan is not None else None
        tokenizer = engine.pair.tokenizer
        prompts = [encode_prompt(tokenizer, text) for text in texts]
        objective = GenerationObjective(None, prompts, new_tokens, max_branch_width=tree.max_branch_width)
        generate(engine.pair.target, engine.pair.draft, prompts[0], objective.config(point.candidate, 2))
        point.tokens_per_s = objective.measure(point.candidate, engine.pair.target, engine.pair.draft,
                                               record=False)
    finally:
        engine.close()
        del engine
        gc.collect()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="qwen2.5-coder-1.5b")
    p.add_argument("--prompts", type=Path, nargs="+", default=DEFAULT_PROMPTS,
                   help="held-out prompt sets, taken in turn [MT-Bench and OASST, as the calibration set]")
    p.add_argument("--n-prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="write the rows and the ratio as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from specexec_cli.models.registry import resolve

    target = resolve(args.target).name
    settings, match = profiles.settings_for_generate(target, {})
    if match is None or match.path is None:
        sys.exit(f"bench_tune_pick: no tuned profile for {target} on this machine; run specexec tune first")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    texts = held_out_prompts(args.prompts, args.n_prompts)
    tuned = Point(f"tuned profile ({profiles.describe_settings(settings)})",
                  EngineRequest(target=target, batch_size=1))
    # the tuned profile runs first and again last: the first configuration of a process runs colder
    # (page cache, allocator) than the grid after it; the figure is the warm, last one
    again = Point("tuned profile, again (the figure)", EngineRequest(target=target, batch_size=1))
    points = [tuned, *grid(target, settings, match.profile, device), again]
    start = time.perf_counter()
    for i, point in enumerate(points, 1):
        log(f"[{i}/{len(points)}] {point.label}")
        try:
            measure(point, texts, args.max_new_tokens)
        except Exception as exc:  # a configuration that cannot run here is a row, not the end
            point.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log(f"  failed: {point.error}")
            continue
        log(f"  {point.tokens_per_s:.2f} tok/s, {point.resident_layers} resident layers")
    ran = [p for p in points[1:-1] if p.tokens_per_s is not None]
    best = max(ran, key=lambda q: q.tokens_per_s, default=None)
    ratio = again.tokens_per_s / best.tokens_per_s if best and again.tokens_per_s else None
    print("| configuration | resident layers | tok/s |")
    print("| --- | --- | --- |")
    for point in points:
        rate = f"{point.tokens_per_s:.2f}" if point.tokens_per_s is not None else f"failed: {point.error}"
        layers = point.resident_layers if point.resident_layers is not None else "-"
        print(f"| {point.label} | {layers} | {rate} |")
    if ratio is not None:
        print(f"\ntuned / best of the grid: {ratio:.3f} (tuned {again.tokens_per_s:.2f} tok/s, first run "
              f"{tuned.tokens_per_s or 0:.2f}; best "
              f"{best.label} {best.tokens_per_s:.2f} tok/s); {len(texts)} held-out prompts x "
              f"{args.max_new_tokens} tokens, {time.perf_counter() - start:.0f} s")
    result = {
        "target": target, "profile": str(match.path), "settings": settings, "prompts": texts,
        "max_new_tokens": args.max_new_tokens, "device": str(device), "threads": torch.get_num_threads(),
        "rows": [{"label": q.label, "candidate": q.candidate.to_dict() if q.candidate else None,
                  "tokens_per_s": q.tokens_per_s, "resident_layers": q.resident_layers, "error": q.error}
                 for q in points],
        "tuned_over_best": ratio, "best": best.label if best else None,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
