"""Benchmark a Llama-70B-shaped GPTQ target streamed from pinned RAM, and SpecExec's expected tok/s on it.

Builds a random GPTQ checkpoint (4 bits, group 128, Llama-2-70B shapes: scripts/random_gptq.py) with as
many decoder layers as host RAM holds (at most 80), loads it with the project's offloaded runtime
(`load_offloaded_target(..., offload="ram", quant="gptq", resident_layers=0)`: every layer streams from
pinned RAM each pass), and reports:

- pass time at each token count, scaled to 80 layers: T80 = T(N) + (80 - N) x t_layer, where t_layer is
  the steady-state time per layer measured inside the same passes (from the pre-hook of the first layer
  that was not prefetched during the previous pass to the end of the last layer);
- streamed bytes per pass (80 layers), the floor = streamed bytes / pinned H2D bandwidth (measured here
  from host memory registered with cudaHostRegister, as the engine pins its layers; the pin_memory rate
  is reported beside it),
  and efficiency = floor / T80 (goal on an H100: >= 0.85 at 1 token);
- dequantization time per layer: the torch reference vs the fused Triton kernel (CUDA only), and
  whether both give the same bits;
- SpecExec's expected tok/s with the project's cost model, S(K) = G(K) / (T_draft(K) + T80(K + 1) +
  T_host) (`tuning/cost_model.predict_tokens_per_s`), where G comes from an acceptance-curve JSON
  (`--curve`: {"values": [...]} or any file with an "acceptance" map, e.g. docs/data/bench_tune_cpu.json
  or a tuner calibration; default: the cost model's prior, the SpecExec paper's Llama-2 figures, not a
  measurement) and the draft pass is timed on a random model of the draft's shape (`--draft-pass-s`
  overrides it).

Examples:
  python scripts/bench_gptq70b.py --device cuda --dtype fp16 --layers 12 --out gptq70b.json
  python scripts/bench_gptq70b.py --device cuda --curve docs/data/bench_tune_cpu.json   # RAM-sized
  python scripts/bench_gptq70b.py --device cpu --layers 2 --smoke                        # tiny shapes
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_offload import copy_bandwidths, floor_bandwidth, log, sync, table  # noqa: E402
from random_gptq import LLAMA_70B, SMOKE, streamed_layer_bytes, write_checkpoint  # noqa: E402

from specexec_cli.runtime import gptq_dispatch, quant  # noqa: E402
from specexec_cli.runtime.target import load_offloaded_target  # noqa: E402
from specexec_cli.tuning import cost_model as cm  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FULL_LAYERS = 80
# the bundled pair's draft (Qwen2.5-0.5B), whose acceptance docs/data/bench_tune_cpu.json measured
DRAFT_SHAPE = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
SMOKE_DRAFT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
PRIOR_LABEL = "prior (cost_model.AcceptanceCurve.prior: the SpecExec paper's Llama-2 figures), not measured"


# --- how many layers ------------------------------------------------------------------------------------


def choose_layers(args, layer_bytes: int, workdir: Path) -> tuple[int, str]:
    """Decoder layers to build: --layers, else as many as --host-gib (default 60 % of available RAM) and
    the work directory's free disk hold, at most 80."""
    if args.layers:
        return args.layers, "--layers"
    import psutil

    host = int(args.host_gib * 2**30) if args.host_gib else int(0.6 * psutil.virtual_memory().available)
    disk = int(0.9 * shutil.disk_usage(workdir).free)
    n = min(FULL_LAYERS, host // layer_bytes, disk // layer_bytes - 1)
    if n < 1:
        sys.exit(f"bench_gptq70b: one layer needs {layer_bytes / 2**30:.2f} GiB; host budget "
                 f"{host / 2**30:.1f} GiB, disk {disk / 2**30:.1f} GiB")
    return n, f"fits host budget {host / 2**30:.1f} GiB and disk {disk / 2**30:.1f} GiB"


# --- timing ----------------------------------------------------------------------------------------------


class StackTimer:
    """Device time of the last forward's decoder layers: all of them, and the steady-state tail from
    layer `first` (the first one whose load did not overlap the previous pass) to the end."""

    def __init__(self, layers, first: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: dict[str, object] = {}
        self.first = first
        self.handles = [
            layers[0].register_forward_pre_hook(self._mark("start"), prepend=True),
            layers[first].register_forward_pre_hook(self._mark("steady"), prepend=True),
            layers[-1].register_forward_hook(self._mark("end"), always_call=True),
        ]

    def _mark(self, name: str):
        def hook(*_):
            if self.cuda:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                self.marks[name] = event
            else:
                self.marks[name] = time.perf_counter()

        return hook

    def _between(self, a: str, b: str) -> float:
        if self.cuda:
            return self.marks[a].elapsed_time(self.marks[b]) / 1e3
        return self.marks[b] - self.marks[a]

    def read(self) -> tuple[float, float]:
        """(seconds in all layers, seconds from layer `first` to the end), after a device sync."""
        return self._between("start", "end"), self._between("steady", "end")

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def time_passes(model, timer: StackTimer, device, tokens: int, repeats: int) -> dict:
    """Median pass seconds (host wall clock, synced), layer-stack seconds and steady tail seconds."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    totals, stacks, tails = [], [], []
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)  # warm-up: kernels compile, cuBLAS picks algorithms
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            sync(device)
            totals.append(time.perf_counter() - start)
            stack, tail = timer.read()
            stacks.append(stack)
            tails.append(tail)
    return {"total": statistics.median(totals), "stack": statistics.median(stacks),
            "tail": statistics.median(tails)}


def time_dequant(engine, device, dtype, repeats: int) -> dict:
    """Seconds to dequantize every GPTQ weight of one layer: torch reference vs Triton kernel."""
    layout = engine.layers[engine.streamed[0]].layout
    views = layout.views(engine.layer_bytes(engine.streamed[0]))
    specs = [s for r in layout.recipes for part in r.parts for s in part if s.codec == "gptq"]
    jobs = [([views[k] for k in s.keys], s.args) for s in specs]  # (qweight, qzeros, scales[, g_idx])

    def run(fn) -> float:
        times = []
        for _ in range(repeats + 1):
            sync(device)
            start = time.perf_counter()
            for t, (bits, zero_offset) in jobs:
                fn(t, bits, zero_offset)
            sync(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])  # the first run compiles / warms up

    def torch_ref(t, bits, zero_offset):
        return quant.dequantize_gptq(t[0], t[1], t[2], t[3] if len(t) > 3 else None, bits, zero_offset, dtype)

    out = {"weights": len(jobs), "torch_s": run(torch_ref), "triton_s": None, "triton_equals_torch": None}
    kernels = gptq_dispatch.triton_kernels() if device.type == "cuda" else None
    if kernels is not None and all(len(t) == 3 for t, _ in jobs):
        def triton_run(t, bits, zero_offset):
            return kernels.dequantize(t[0], t[1], t[2], bits, zero_offset, dtype)

        out["triton_s"] = run(triton_run)
        out["triton_equals_torch"] = all(
            torch.equal(triton_run(t, *a), torch_ref(t, *a)) for t, a in jobs
        )
    return out


def time_draft(shape: dict, device, dtype, tokens: int, repeats: int) -> float:
    """Median seconds of one forward of `tokens` tokens (no cache) of a random resident model of `shape`."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    with torch.device(device):
        draft = AutoModelForCausalLM.from_config(Qwen2Config(**shape), dtype=dtype).eval()
    ids = torch.randint(0, shape["vocab_size"], (1, tokens), device=device)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            sync(device)
            start = time.perf_counter()
            draft(input_ids=ids, use_cache=False)
            sync(device)
            times.append(time.perf_counter() - start)
    del draft
    return statistics.median(times[1:])


# --- acceptance ------------------------------------------------------------------------------------------


def load_curve(path: str | None, draft: str | None) -> tuple[cm.AcceptanceCurve, str]:
    """An acceptance curve from a JSON file ({"values": ...}, or an "acceptance" map by draft, at the top
    or under "calibration"); without a file, the cost model's prior."""
    if not path:
        return cm.AcceptanceCurve.prior(), PRIOR_LABEL
    data = json.loads(Path(path).read_text())
    if "values" in data:
        return cm.AcceptanceCurve.from_dict(data), path
    curves = data.get("acceptance") or data.get("calibration", {}).get("acceptance") or {}
    if not curves:
        sys.exit(f"bench_gptq70b: {path} holds no acceptance curve ('values' or an 'acceptance' map)")
    if draft is None:  # the draft whose curve ends highest
        draft = max(curves, key=lambda d: curves[d]["values"][-1])
    if draft not in curves:
        sys.exit(f"bench_gptq70b: {path} has no curve for draft {draft!r} (has: {', '.join(curves)})")
    return cm.AcceptanceCurve.from_dict(curves[draft]), f"{path} [{draft}]"


# --- main ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--layers", type=int, default=0,
                   help="decoder layers (0: as many as --host-gib holds, <= 80)")
    p.add_argument("--host-gib", type=float, default=0.0, help="host RAM for layers (0: 60%% of available)")
    p.add_argument("--tokens", default=None, help="tokens per pass (default 1,64,256,1024; smoke 1,8)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed passes per token count (default 3; smoke 1)")
    p.add_argument("--buffers", type=int, default=2, help="ring buffers of the streaming engine")
    p.add_argument("--budgets", default=None, help="SpecExec budgets K (default 16,64,128,256,512,1024)")
    p.add_argument("--max-n-beams", type=int, default=32)
    p.add_argument("--max-beam-len", type=int, default=16)
    p.add_argument("--curve", default=None, help="acceptance curve JSON (default: the cost model's prior)")
    p.add_argument("--curve-draft", default=None, help="which draft's curve in a multi-draft file")
    p.add_argument("--draft-pass-s", type=float, default=None,
                   help="seconds per draft pass (default: timed on a random Qwen2.5-0.5B-shaped draft)")
    p.add_argument("--workdir", default=None, help="where the checkpoint is written (default: a tmp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint after loading it")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny shapes of the same structure (CPU check)")
    args = p.parse_args(argv)
    args.tokens = [int(t) for t in (args.tokens or ("1,8" if args.smoke else "1,64,256,1024")).split(",")]
    args.budgets = [int(b) for b in (args.budgets or ("4,16" if args.smoke else "16,64,128,256,512,1024"))
                    .split(",")]
    args.repeats = args.repeats or (1 if args.smoke else 3)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    shape = SMOKE if args.smoke else LLAMA_70B
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-gptq70b-"))
    workdir.mkdir(parents=True, exist_ok=True)
    n_layers, why = choose_layers(args, streamed_layer_bytes(shape), workdir)
    ckpt = workdir / f"gptq-{'smoke' if args.smoke else '70b'}-{n_layers}"
    start = time.perf_counter()
    if not (ckpt / "config.json").exists():
        write_checkpoint(ckpt, shape, n_layers)
    log(f"checkpoint: {n_layers} layers ({why}) in {time.perf_counter() - start:.1f} s")

    rates = copy_bandwidths(device, nbytes=(64 << 20) if args.smoke else (1 << 30))
    bandwidth_kind, bandwidth = floor_bandwidth(rates)
    start = time.perf_counter()
    model = load_offloaded_target(ckpt, device=device, dtype=dtype, offload="ram", quant="gptq",
                                  resident_layers=0, buffers=args.buffers)
    log(f"loaded into {'pinned ' if device.type == 'cuda' else ''}RAM in {time.perf_counter() - start:.1f} s")
    if not args.keep and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    engine = model.offload_engine
    layer_bytes = engine.layers[engine.streamed[0]].layout.nbytes
    first = min(engine.n_buffers, n_layers - 1)
    timer = StackTimer([b.module for b in engine.layers], first, device)

    passes = []
    for t in args.tokens:
        m = time_passes(model, timer, device, t, args.repeats)
        t_layer = m["tail"] / (n_layers - first)
        t80 = m["total"] + (FULL_LAYERS - n_layers) * t_layer
        floor = FULL_LAYERS * layer_bytes / bandwidth
        passes.append({"tokens": t, "seconds_measured": m["total"], "layers_seconds": m["stack"],
                       "seconds_per_layer": t_layer, "seconds_80": t80,
                       "streamed_bytes_80": FULL_LAYERS * layer_bytes, "floor_seconds_80": floor,
                       "efficiency": floor / t80})
        log(f"{t} tokens: {m['total']:.4f} s for {n_layers} layers, {t80:.3f} s scaled to 80")
    triton_in_passes = device.type == "cuda" and gptq_dispatch.triton_kernels() is not None
    dequant = time_dequant(engine, device, dtype, repeats=args.repeats + 2)
    timer.close()
    engine.close()
    del model, engine

    if args.draft_pass_s is not None:
        draft_s, draft_src = args.draft_pass_s, "--draft-pass-s"
    else:
        draft_shape = SMOKE_DRAFT if args.smoke else DRAFT_SHAPE
        draft_s = time_draft(draft_shape, device, dtype, args.max_n_beams, args.repeats)
        draft_src = f"timed: random {'smoke' if args.smoke else 'Qwen2.5-0.5B'}-shaped draft, " \
                    f"{args.max_n_beams} tokens per pass"
    curve, curve_src = load_curve(args.curve, args.curve_draft)
    target = cm.LatencyCurve.from_points({p["tokens"]: p["seconds_80"] for p in passes})
    costs = cm.PairCosts(target, cm.LatencyCurve.from_points({1: draft_s}), curve)
    beams, depth = args.max_n_beams, args.max_beam_len
    specexec = [{
        "budget": k,
        "G": curve.at(min(k, cm.effective_budget(beams, depth))),
        "target_s": target.at(k + 1),
        "draft_s": cm.draft_time_s(costs, k, beams, depth),
        "tok_s": cm.predict_tokens_per_s(costs, k, beams, depth),
    } for k in args.budgets]

    result = {
        "device": str(device), "dtype": args.dtype, "smoke": args.smoke,
        "shape": {**shape, "bits": 4, "group_size": 128},
        "layers_measured": n_layers, "layers_scaled_to": FULL_LAYERS, "layer_bytes": layer_bytes,
        "h2d_bandwidth": bandwidth,
        "bandwidth_kind": bandwidth_kind, "copy_bandwidths": rates,
        "buffers": args.buffers, "dequant_in_passes": "triton" if triton_in_passes else "torch",
        "passes": passes, "dequant_per_layer": dequant,
        "goal": {"efficiency_at_1_token": passes[0]["efficiency"] if args.tokens[0] == 1 else None,
                 "target": 0.85},
        "specexec": {"curve": curve_src, "draft_pass_s": draft_s, "draft": draft_src,
                     "max_n_beams": beams, "max_beam_len": depth, "host_s": costs.host_s,
                     "plain_tok_s": cm.predict_tokens_per_s(costs, 0), "rows": specexec},
    }
    report(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def report(r: dict) -> None:
    gb = 1e9
    print(f"device={r['device']} dtype={r['dtype']} layers={r['layers_measured']} (scaled to "
          f"{r['layers_scaled_to']}) layer={r['layer_bytes'] / 1e6:.1f} MB {r['bandwidth_kind']} "
          f"bandwidth={r['h2d_bandwidth'] / gb:.2f} GB/s dequant={r['dequant_in_passes']}"
          + (" SMOKE (tiny shapes, not 70B)" if r["smoke"] else "") + "\n")
    rows = [[str(p["tokens"]), f"{p['seconds_measured']:.4f}", f"{p['seconds_per_layer'] * 1e3:.2f}",
             f"{p['seconds_80']:.3f}", f"{p['streamed_bytes_80'] / gb:.2f}", f"{p['floor_seconds_80']:.3f}",
             f"{p['efficiency']:.0%}"] for p in r["passes"]]
    print(table(["tokens", "measured s", "ms/layer", "pass s (80 layers)", "streamed GB", "floor s",
                 "efficiency"], rows))
    d = r["dequant_per_layer"]
    triton = f"{d['triton_s'] * 1e3:.2f} ms" if d["triton_s"] is not None else "n/a (CUDA + triton only)"
    print(f"\ndequantization of one layer ({d['weights']} weights): torch {d['torch_s'] * 1e3:.2f} ms, "
          f"Triton {triton}, same bits: {d['triton_equals_torch']}\n")
    s = r["specexec"]
    rows = [[str(x["budget"]), f"{x['G']:.2f}", f"{x['target_s']:.3f}", f"{x['draft_s']:.3f}",
             f"{x['tok_s']:.2f}"] for x in s["rows"]]
    print(table(["budget K", "G(K)", "target s (K+1)", "draft s", "expected tok/s"], rows))
    print(f"\nplain decoding: {s['plain_tok_s']:.2f} tok/s; acceptance: {s['curve']}; draft pass "
          f"{s['draft_pass_s'] * 1e3:.1f} ms ({s['draft']}); beams {s['max_n_beams']} x {s['max_beam_len']}")


if __name__ == "__main__":
    if main()["dequant_per_layer"]["triton_equals_torch"] is False:
        sys.exit("bench_gptq70b: the Triton kernel and the torch reference gave different bits")
