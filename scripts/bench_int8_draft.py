"""Measure the int8 CPU draft (runtime/int8_cpu.py) against the float32 one: matmul times, memory, pass
times, and top-1 agreement with the float32 draft and with the target. Prints markdown tables.

Matmuls: float32 `F.linear`, `Int8Linear` (fbgemm dynamic int8) and torch's weight-only
`aten._weight_int8pack_mm`, at the bundled 0.5B draft's shapes. Models: the bundled pair (converted on
first use); agreement is measured on the first --tokens tokens of each text file.

Example (the figures in docs/benchmarks.md, "Equal memory and equal streaming"):
  python scripts/bench_int8_draft.py --threads 2 --texts specexec_cli/decoding/specexec.py README.md
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specexec_cli.runtime.int8_cpu import Int8Linear  # noqa: E402
from specexec_cli.runtime.target import model_bytes  # noqa: E402

SHAPES = [(16, 896, 4864), (16, 4864, 896), (1, 896, 151936), (16, 896, 151936)]  # (rows, in, out)


def seconds(fn, *args, repeats: int = 10) -> float:
    """Mean seconds of fn(*args) after one warm-up call."""
    fn(*args)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return (time.perf_counter() - start) / repeats


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def matmuls() -> str:
    rows = []
    with torch.inference_mode():
        for m, k, n in SHAPES:
            x, linear = torch.randn(m, k), torch.nn.Linear(k, n, bias=False)
            int8 = Int8Linear(linear)
            w = linear.weight.detach()
            scales = w.abs().amax(1) / 127
            packed = torch.round(w / scales[:, None]).to(torch.int8)
            weight_only = seconds(torch.ops.aten._weight_int8pack_mm, x, packed, scales, repeats=3)
            rows.append([f"[{m} x {k}] x [{k} x {n}]", f"{seconds(linear, x) * 1e3:.2f}",
                         f"{seconds(int8, x) * 1e3:.2f}", f"{weight_only * 1e3:.2f}"])
    return table(["matmul", "float32 ms", "Int8Linear ms", "_weight_int8pack_mm ms"], rows)


def models(texts: list[str], n_tokens: int) -> str:
    from specexec_cli.engine import LoadedModels, Workload, load, resolve
    from specexec_cli.settings import EngineRequest

    # the pair as generate opens it, with the float32 draft and then the int8 one (the target loads once)
    loaded, workload = LoadedModels(), Workload.uniform(n_tokens, 1, 1)
    request = EngineRequest(device="cpu", draft_quant="none", use_profile=False)
    pair = load(resolve(request), workload, loaded).pair
    draft, target, tokenizer = pair.draft, pair.target, pair.tokenizer
    int8 = load(resolve(replace(request, draft_quant="int8")), workload, loaded).pair.draft
    rows = []
    with torch.inference_mode():
        for path in texts:
            ids = torch.tensor([tokenizer(Path(path).read_text()[: 20 * n_tokens])["input_ids"][:n_tokens]])
            want = draft(ids).logits[0].argmax(-1)
            got = int8(ids).logits[0].argmax(-1)
            best = target(ids).logits[0].argmax(-1)
            rows.append([Path(path).name, str(ids.shape[1]), f"{(got == want).float().mean():.3f}",
                         f"{(want == best).float().mean():.3f}", f"{(got == best).float().mean():.3f}"])
        x = ids[:, :16]
        passes = [f"{seconds(model, x, repeats=5) * 1e3:.0f}" for model in (draft, int8)]
    header = ["text", "tokens", "int8 = float32 draft", "float32 draft = target", "int8 draft = target"]
    agreement = table(header, rows)
    size = table(["draft", "GB", "16-token pass ms"],
                 [["float32", f"{model_bytes(draft) / 1e9:.2f}", passes[0]],
                  ["int8", f"{model_bytes(int8) / 1e9:.2f}", passes[1]]])
    return agreement + "\n\n" + size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--texts", nargs="*", default=[], help="text files for the agreement table")
    p.add_argument("--tokens", type=int, default=400)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(matmuls())
    if args.texts:
        print()
        print(models(args.texts, args.tokens))


if __name__ == "__main__":
    main()
