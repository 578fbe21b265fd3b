"""Tokens per second of the bundled models in float32, GPTQ and AWQ, resident and streamed, on this machine.

The 4-bit checkpoints are made from the bundled models by auto-round itself (round-to-nearest, group
128, asymmetric: its `auto_gptq` and `auto_awq` exports), once, into --make-dir; auto-round comes with
the test extra (`pip install -e ".[test]"`). The float32 rows read the bundled float16 checkpoints.

Placements: "resident" keeps every layer on the device (offload none: a 4-bit layer is decoded once at
load when memory allows, see runtime/plan.py's expanded layers); "streamed" reads every layer from disk
on every pass (offload disk, --resident-layers 0): a float16 layer is upcast per pass, a 4-bit one
dequantized per pass. Plain greedy decoding of --tokens tokens from one code prompt, one thread count,
each row after the previous one in this process (float32 is the baseline of each placement).
Also printed: one matrix's per-pass cost at the model's largest MLP shape, 4-bit dequantization vs a
float16 upcast, both into reused scratch as the engine does.

Example (the figures in docs/benchmarks.md, "4-bit checkpoints on the CPU"):
  python scripts/bench_quant.py --threads 2 --models qwen2.5-coder-0.5b qwen2.5-coder-1.5b
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specexec_cli.decoding.config import GenerationConfig  # noqa: E402
from specexec_cli.decoding.generate import generate  # noqa: E402
from specexec_cli.models import bundled  # noqa: E402
from specexec_cli.runtime import quant  # noqa: E402
from specexec_cli.runtime.target import load_offloaded_target  # noqa: E402

PROMPT = "def quicksort(items):\n    \"\"\"Sort a list of numbers.\"\"\"\n"
FORMATS = {"gptq": "auto_gptq", "awq": "auto_awq"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_checkpoint(name: str, fmt: str, root: Path) -> Path:
    """The auto-round export `fmt` of bundled model `name` under root (made on first use)."""
    dest = root / f"{name}-{fmt}"
    found = [p.parent for p in dest.rglob("config.json")] if dest.is_dir() else []
    if found:
        return found[0]
    try:
        from auto_round import AutoRound
    except ImportError:
        sys.exit("error: making the 4-bit checkpoints needs auto-round: pip install -e '.[test]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"quantizing {name} with auto-round ({fmt}) into {dest}")
    source = bundled.bundled_folder(name)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tmp = dest.with_name(dest.name + ".tmp")
    AutoRound(model, tokenizer, bits=4, group_size=128, sym=False, iters=0,
              disable_opt_rtn=True).quantize_and_save(str(tmp), format=FORMATS[fmt])
    tmp.rename(dest)  # whole or absent
    return next(p.parent for p in dest.rglob("config.json"))


def decode_rate(folder: Path, placement: str, n_tokens: int, offload_dir: Path) -> dict:
    from transformers import AutoTokenizer

    start = time.perf_counter()
    kwargs = dict(offload="none") if placement == "resident" else dict(
        offload="disk", resident_layers=0, offload_dir=offload_dir)
    model = load_offloaded_target(folder, device="cpu", dtype=torch.float32, budget=0, context_len=256,
                                  **kwargs)
    load_s = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([tokenizer(PROMPT).input_ids])
    config = GenerationConfig(method="autoregressive", max_new_tokens=n_tokens)
    generate(model, None, ids, GenerationConfig(method="autoregressive", max_new_tokens=2))  # warm-up
    start = time.perf_counter()
    result = generate(model, None, ids, config)
    seconds = time.perf_counter() - start
    plan = model.offload_engine.plan
    model.offload_engine.close()
    return {"tok_s": len(result.token_ids) / seconds, "load_s": load_s, "tokens": result.token_ids,
            "plan": plan.summary()}


def matrix_costs(hidden: int, intermediate: int) -> dict:
    """ms per call for one [intermediate x hidden] MLP matrix: dequantized from 4-bit vs upcast from fp16."""
    torch.manual_seed(0)
    groups = hidden // 128
    q = torch.randint(0, 16, (intermediate, hidden))
    zeros = torch.randint(0, 16, (groups, intermediate))
    scales = (torch.rand(groups, intermediate) / 50).half()
    t = quant.quantize_gptq_reference(q, zeros, scales, torch.arange(hidden) // 128, 4, "gptq_v2")
    half = torch.randn(intermediate, hidden).half()
    out_t, out = torch.empty(hidden, intermediate), torch.empty(intermediate, hidden)

    def ms(fn, repeats: int = 20) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats * 1e3

    return {
        "shape": [intermediate, hidden],
        "dequant_ms": ms(lambda: quant.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], None, 4, 0,
                                                       torch.float32, out_t)),
        "dequant_reference_ms": ms(lambda: quant.dequantize_gptq_reference(
            t["qweight"], t["qzeros"], t["scales"], None, 4, 0, torch.float32), repeats=5),
        "upcast_ms": ms(lambda: out.copy_(half)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per row [24]")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--make-dir", type=Path, default=bundled.models_cache_dir() / "auto-round")
    parser.add_argument("--offload-dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.make_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.models:
        folders = {"fp32": bundled.bundled_folder(name)}
        folders.update({fmt: make_checkpoint(name, fmt, args.make_dir) for fmt in FORMATS})
        cfg = json.loads((folders["fp32"] / "config.json").read_text())
        costs = matrix_costs(cfg["hidden_size"], cfg["intermediate_size"])
        for placement in ("resident", "streamed"):
            base = None
            for fmt, folder in folders.items():
                log(f"{name} {fmt} {placement} ...")
                row = decode_rate(folder, placement, args.tokens, args.offload_dir)
                base = base or row
                same = [r["format"] for r in results if (r["model"], r["placement"]) == (name, placement)
                        and r["tokens"] == row["tokens"]]
                row.update(model=name, format=fmt, placement=placement, vs_fp32=row["tok_s"] / base["tok_s"],
                           same_tokens_as=same)
                log(f"  {row['tok_s']:.2f} tok/s ({row['plan']})")
                results.append(row)
        results.append({"model": name, "matrix": costs})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} new tokens, plain "
          f"greedy decoding\n")
    print("| model | format | placement | tok/s | vs fp32 same placement | load s | same tokens as |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "tok_s" in r:
            print(f"| {r['model']} | {r['format']} | {r['placement']} | {r['tok_s']:.2f} | "
                  f"{r['vs_fp32']:.2f}x | {r['load_s']:.1f} | {', '.join(r['same_tokens_as']) or '-'} |")
    print("\n| model | MLP matrix | 4-bit dequant ms | previous path (int32 shifts, fresh tensors) ms | "
          "fp16 upcast ms |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        if "matrix" in r:
            m = r["matrix"]
            print(f"| {r['model']} | {m['shape'][0]} x {m['shape'][1]} | {m['dequant_ms']:.2f} | "
                  f"{m['dequant_reference_ms']:.2f} | {m['upcast_ms']:.2f} |")
    if args.out:
        for r in results:
            r.pop("tokens", None)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
