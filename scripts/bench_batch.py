"""Batch throughput (issue 10): the same prompts decoded one by one, then B at a time sharing each
target pass (`generate --batch-size B`), in one process on the same loaded models.

Prints a markdown table on stdout (progress on stderr): total tokens/s, speedup over one by one,
tokens per target pass, whether every output equals its one-by-one output, and latency (the first
result of the batch, and the mean per prompt, against the same prompts alone).

The prompts' own passes (prefill) cost the same compute one by one or batched; where that compute is
not hidden behind the weight reads (a CPU: ~30 ms per prompt token for the 1.5B) it bounds every
speedup. `--prompt-baseline` times the prompts alone (one by one, 1 new token each) and adds the
column "speedup beyond prompts" = (one by one - prompts) / (run - prompts), the speedup of the part
of the run that batching can change. `--batch-budgets` runs each batch size at several shared budgets.

Example (CPU, target streamed from disk under a 6 GiB cap; the issue's full setting, hours on 2 cores):
  python scripts/bench_batch.py --offload disk --max-memory cpu=6GiB --n-prompts 32 -n 64 \
      --batch-sizes 2,4,8,16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specexec_cli.decoding.config import (  # noqa: E402
    GenerationConfig,
    TreeConfig,  # noqa: E402
)
from specexec_cli.decoding.generate import GenerationResult  # noqa: E402
from specexec_cli.decoding.runner import generate_many  # noqa: E402
from specexec_cli.engine import Workload, load, resolve  # noqa: E402
from specexec_cli.prompt_sets import load_conversations  # noqa: E402
from specexec_cli.prompts import encode_messages  # noqa: E402
from specexec_cli.settings import DEFAULT_TARGET, EngineRequest  # noqa: E402

OASST = "oasst"  # the packaged OASST set


def log(message: str) -> None:
    print(f"[bench_batch {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def timed_run(pair, prompts: list[torch.Tensor], config: GenerationConfig, batch_size: int) -> dict:
    """Decode `prompts` `batch_size` at a time; results in input order and when each arrived."""
    results: dict[int, GenerationResult] = {}
    arrived: dict[int, float] = {}
    start = time.perf_counter()

    def keep(index: int, result: GenerationResult) -> None:
        results[index] = result
        arrived[index] = time.perf_counter() - start

    passes = 0
    if batch_size == 0:  # one by one: a fresh decoder per prompt, exactly as `--batch-size 1`
        for index, ids in enumerate(prompts):
            passes += generate_many(pair.target, pair.draft, [ids], config,
                                    lambda _i, r, index=index: keep(index, r)).target_passes
    else:
        stats = generate_many(pair.target, pair.draft, prompts, config, keep, batch_size=batch_size)
        passes = stats.target_passes
    seconds = time.perf_counter() - start
    ordered = [results[i] for i in range(len(prompts))]
    return {"seconds": seconds, "results": ordered, "arrived": [arrived[i] for i in range(len(prompts))],
            "passes": passes}


def summarize(method: str, batch: int, budget: int, run: dict, alone: dict,
              prompt_s: float | None) -> dict:
    tokens = sum(r.n_new_tokens for r in run["results"])
    same = all(a.token_ids == b.token_ids for a, b in zip(run["results"], alone["results"], strict=True))
    first = min(run["arrived"])
    first_alone = alone["results"][run["arrived"].index(first)].elapsed_s
    return {
        "method": method, "batch": batch or 1, "budget": budget,
        "mode": "batched" if batch else "one by one",
        "tokens": tokens, "seconds": round(run["seconds"], 1),
        "tok/s": round(tokens / run["seconds"], 3),
        "speedup": round(alone["seconds"] / run["seconds"], 2),
        "target passes": run["passes"], "tok/pass": round(tokens / max(1, run["passes"]), 2),
        "same output": same,
        "first result s": round(first, 1), "first vs alone": round(first / first_alone, 2),
        "mean latency s": round(statistics.mean(r.elapsed_s for r in run["results"]), 1),
        "speedup beyond prompts": "-" if prompt_s is None else round(
            (alone["seconds"] - prompt_s) / max(1e-9, run["seconds"] - prompt_s), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--draft", default=None, help="[default: the target's registry draft]")
    parser.add_argument("--draft-quant", choices=["none", "int8"], default="none",
                        help="the draft's weights [default: none, float, as the recorded figures ran]")
    parser.add_argument("--prompts", default=str(OASST), help="[id, text] JSON prompt set")
    parser.add_argument("--n-prompts", type=int, default=32)
    parser.add_argument("-n", "--max-new-tokens", type=int, default=64)
    parser.add_argument("--methods", default="specexec", help="comma list: specexec,specinfer,autoregressive")
    parser.add_argument("--batch-sizes", default="2,4,8,16")
    parser.add_argument("--budget", type=int, default=16,
                        help="tree tokens per target pass (shared by a batch)")
    parser.add_argument("--batch-budgets", default=None,
                        help="comma list of shared budgets for the batched runs (default: --budget)")
    parser.add_argument("--prompt-baseline", action="store_true",
                        help="time the prompts alone (1 new token each) for 'speedup beyond prompts'")
    parser.add_argument("--max-n-beams", type=int, default=32)
    parser.add_argument("--max-beam-len", type=int, default=8)
    parser.add_argument("--offload", default="disk")
    parser.add_argument("--max-memory", action="append", default=None, help="e.g. cpu=6GiB")
    parser.add_argument("--resident-layers", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    batch_budgets = [int(b) for b in (args.batch_budgets or str(args.budget)).split(",")]
    methods = args.methods.split(",")
    tree = TreeConfig(budget=args.budget, max_n_beams=args.max_n_beams, max_beam_len=args.max_beam_len,
                      max_branch_width=8)
    conversations = load_conversations(args.prompts, args.n_prompts)
    lanes = max(batch_sizes)
    needs_draft = any(m != "autoregressive" for m in methods)
    request = EngineRequest(
        target=args.target, draft=args.draft, method="specexec" if needs_draft else "autoregressive",
        budget=max(args.budget, *batch_budgets), max_n_beams=args.max_n_beams, max_beam_len=args.max_beam_len,
        max_branch_width=8, draft_quant=args.draft_quant if needs_draft else None, device=args.device,
        offload=args.offload, resident_layers=args.resident_layers, max_memory=tuple(args.max_memory or ()),
        batch_size=lanes, use_profile=False)
    spec = resolve(request)  # the engine generate opens, planned for the largest batch's caches

    def lengths(tokenizer) -> list[int]:
        return [len(encode_messages(tokenizer, m)) for _, m in conversations]

    pair = load(spec, Workload(lengths, args.max_new_tokens, len(conversations))).pair
    prompts = [torch.tensor(encode_messages(pair.tokenizer, m)) for _, m in conversations]
    log(f"{len(prompts)} prompts ({sum(p.numel() for p in prompts)} tokens) from {args.prompts}; "
        f"{args.max_new_tokens} new tokens each, greedy")
    warm = GenerationConfig(method="autoregressive", max_new_tokens=2, eos_token_ids=pair.eos_token_ids)
    generate_many(pair.target, None, prompts[:1], warm, lambda *_: None)
    rows = []
    for method in methods:
        config = GenerationConfig(method=method, max_new_tokens=args.max_new_tokens, tree=tree,
                                  eos_token_ids=pair.eos_token_ids)
        prompt_s = None
        if args.prompt_baseline:
            log(f"{method}: the prompts alone (1 new token each)")
            prompt_s = timed_run(pair, prompts, replace(config, max_new_tokens=1), 0)["seconds"]
            log(f"  {prompt_s:.1f} s")
        log(f"{method}: one by one")
        alone = timed_run(pair, prompts, config, 0)
        rows.append(summarize(method, 0, args.budget, alone, alone, prompt_s))
        log(f"  {rows[-1]['tok/s']} tok/s")
        for budget in batch_budgets:
            batch_config = replace(config, tree=replace(tree, budget=budget))
            for batch in batch_sizes:
                log(f"{method}: batch {batch}, budget {budget}")
                run = timed_run(pair, prompts, batch_config, batch)
                rows.append(summarize(method, batch, budget, run, alone, prompt_s))
                row = rows[-1]
                log(f"  {row['tok/s']} tok/s, {row['speedup']}x, same output: {row['same output']}")
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("| " + " | ".join("---" for _ in columns) + " |")
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    if args.json:
        setting = {k: v for k, v in vars(args).items() if k != "json"}
        Path(args.json).write_text(json.dumps({"setting": setting, "prompts_alone_s": prompt_s, "rows": rows},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
