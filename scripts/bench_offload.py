"""Benchmark the offloaded target runtime: forward time vs tokens per pass, streaming efficiency, and
transformers + accelerate offloading of the same model in the same process. Prints markdown tables.

Streaming efficiency = bytes streamed per forward / forward time, as a fraction of a plain copy
benchmark run here: pinned host-to-device copy on CUDA (RAM tier; from host memory registered with
cudaHostRegister as the engine registers its layers, with pin_memory's rate beside it), host memcpy on
a CPU-only machine, cold sequential file read (disk tier). The model is random, built from a config of
realistic shapes and saved as safetensors first.

`--out FILE` writes every row as JSON (ours and accelerate's, with bandwidths and, where both ran at a
token count, accelerate's time over ours). scripts/gpu_check.py reads it.

Examples:
  python scripts/bench_offload.py                                   # CPU: TinyLlama shapes, 8 layers
  python scripts/bench_offload.py --shape qwen2-1.5b --device cuda --dtype fp16 --tokens 1,64,256,1024,4096
  python scripts/bench_offload.py --shape llama-7b --layers 8 --device cuda --dtype fp16 --tiers ram \
      --tokens 1,16,64,256,1024,4096 --accelerate-tokens 1,256 --out ram_tier.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specexec_cli.runtime.disk import (  # noqa: E402
    drop_cache,
    measure_read_bandwidth,
    read_threads,
    safetensors_files,
)
from specexec_cli.runtime.target import load_offloaded_target  # noqa: E402

SHAPES = {
    # name: (config class, kwargs)
    "tinyllama": (
        "LlamaConfig",
        dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=32000,
        ),
    ),
    "qwen2-1.5b": (
        "Qwen2Config",
        dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
        ),
    ),
    # the Llama structure at toy size, for CPU smoke runs of the script itself
    "smoke": (
        "LlamaConfig",
        dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
        ),
    ),
    "llama-7b": (
        "LlamaConfig",
        dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
        ),
    ),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_checkpoint(shape: str, layers: int | None, dtype: torch.dtype, workdir: Path) -> Path:
    """A random model of the given shape saved with save_pretrained into workdir/SHAPE-LAYERS-DTYPE, reused
    if already there (it is written into a temporary folder and renamed when complete, so a build killed
    half-way is not mistaken for a checkpoint)."""
    import shutil

    import transformers

    cls_name, kw = SHAPES[shape]
    kw = dict(kw, max_position_embeddings=8192)
    if layers:
        kw["num_hidden_layers"] = layers
    config = getattr(transformers, cls_name)(**kw)
    directory = workdir / f"{shape}-{layers}-{str(dtype).removeprefix('torch.')}"
    if (directory / "config.json").exists():
        return directory
    log(f"building a random {shape} with {config.num_hidden_layers} layers in {dtype} ...")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    os.replace(partial, directory)
    del model
    gc.collect()
    return directory


def copy_bandwidths(device: torch.device, nbytes: int = 512 << 20, repeats: int = 5) -> dict[str, float]:
    """Bytes/s of a plain copy by the kind of host memory it reads. On CUDA, host -> device from memory
    page-locked as the streaming engine locks it (cudaHostRegister of an ordinary tensor, through
    runtime/pinned.PinnedPool: "cudaHostRegister", absent if registration fails) and from PyTorch's
    caching host allocator ("pin_memory"); on a CPU, a host memcpy ("host memcpy")."""
    from specexec_cli.runtime.pinned import PinnedPool

    if device.type != "cuda":
        return {"host memcpy": _copy_rate(torch.ones(nbytes, dtype=torch.uint8),
                                          torch.empty(nbytes, dtype=torch.uint8), device, repeats)}
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    rates = {}
    pool = PinnedPool(cuda=True)
    try:
        src = pool.empty(nbytes)
        if pool.registered_bytes:  # else the pool fell back to pin_memory, measured next anyway
            rates["cudaHostRegister"] = _copy_rate(src.fill_(1), dst, device, repeats)
        del src
    finally:
        pool.close()
    rates["pin_memory"] = _copy_rate(torch.ones(nbytes, dtype=torch.uint8, pin_memory=True), dst, device,
                                     repeats)
    return rates


def floor_bandwidth(rates: dict[str, float]) -> tuple[str, float]:
    """The copy rate a streamed pass's floor is computed from: the engine's own kind of pinned memory
    (cudaHostRegister) where it was measured, else the first one measured."""
    kind = "cudaHostRegister" if "cudaHostRegister" in rates else next(iter(rates))
    return kind, rates[kind]


def _copy_rate(src: torch.Tensor, dst: torch.Tensor, device: torch.device, repeats: int) -> float:
    dst.copy_(src, non_blocking=True)
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync(device)
        times.append(time.perf_counter() - start)
    return src.numel() / statistics.median(times)


def time_forward(model, device: torch.device, tokens: int, repeats: int, before=None) -> float:
    """Median seconds of one forward over `tokens` new tokens (no cache), after `before()` if given."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def drop_file_cache(directory: Path) -> None:
    for f in safetensors_files(directory):
        fd = os.open(f, os.O_RDONLY)
        try:
            drop_cache(fd, 0, os.path.getsize(f))
        finally:
            os.close(fd)


def bench_ours(args, ckpt: Path, device, dtype, bw_ram: float, bw_disk: float | None,
               records: list[dict] | None = None) -> list[list[str]]:
    rows = []
    for tier in args.tiers:
        model = load_offloaded_target(
            ckpt,
            device=device,
            dtype=dtype,
            offload=tier,
            quant=args.quant,
            buffers=args.buffers,
            resident_layers=0 if tier != "none" else None,
            offload_dir=args.workdir,
        )
        engine = model.offload_engine
        per_forward = sum(engine.layers[i].layout.nbytes for i in engine.streamed)
        time_forward(model, device, 1, 1)  # warm-up
        bw = bw_disk if tier == "disk" else bw_ram
        for t in args.tokens:
            reps = args.repeats if t <= 256 else 1
            before = engine.stats.load_wait_s
            sec = time_forward(model, device, t, reps)
            wait = (engine.stats.load_wait_s - before) / reps
            eff = per_forward / sec / bw if per_forward else float("nan")
            if records is not None:
                records.append({"runtime": "specexec", "tier": tier, "tokens": t, "seconds": sec,
                                "streamed_bytes": per_forward, "floor_seconds": per_forward / bw,
                                "efficiency": eff if per_forward else None, "load_wait_s": wait})
            rows.append(
                [
                    f"specexec {tier}",
                    str(t),
                    f"{sec:.3f}",
                    f"{per_forward / 1e9:.2f}",
                    f"{per_forward / sec / 1e9:.2f}" if per_forward else "-",
                    f"{eff:.0%}" if per_forward else "-",
                    f"{wait:.3f}",
                ]
            )
            log(" | ".join(rows[-1]))
        engine.close()
        del model, engine
        gc.collect()
    return rows


def bench_accelerate(args, ckpt: Path, device, dtype, records: list[dict] | None = None) -> list[list[str]]:
    """transformers + accelerate offloading of the same checkpoint: layers on 'cpu' (CUDA) or 'disk' (CPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ckpt)
    layer_home = offload_home(device)
    device_map = accelerate_device_map(config, device)
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        model = AutoModelForCausalLM.from_pretrained(
            ckpt, device_map=device_map, offload_folder=folder, dtype=dtype
        )
        model.eval()
        time_forward(model, device, 1, 1)
        rows = []
        for t in args.accelerate_tokens:
            cases = [("warm page cache", None)]
            if layer_home == "disk":
                cases.append(("cold (cache dropped)", lambda: drop_file_cache(ckpt)))
            for label, before in cases:
                sec = time_forward(model, device, t, args.repeats, before=before)
                if records is not None:
                    records.append({"runtime": "accelerate", "tier": layer_home, "case": label, "tokens": t,
                                    "seconds": sec})
                rows.append([f"accelerate {layer_home} offload, {label}", str(t), f"{sec:.3f}"])
                log(" | ".join(rows[-1]))
        del model
        gc.collect()
    return rows


def execution_device(device: torch.device) -> int | str:
    """The device accelerate computes on, as its device_map names it: a GPU index (`cuda` with no index
    is the current device, or 0 when torch sees none, as in a CPU test of the map), else "cpu"."""
    if device.type != "cuda":
        return "cpu"
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def offload_home(device: torch.device) -> str:
    """Where accelerate keeps the offloaded layers: host RAM when computing on CUDA, disk on a CPU."""
    return "cpu" if device.type == "cuda" else "disk"


def accelerate_device_map(config, device: torch.device) -> dict[str, int | str]:
    """accelerate's device_map for the baseline: every decoder layer offloaded (`offload_home`), every
    other module of the model (embeddings, norm, rotary, head) on the execution device. Built from the
    model's own module names (an empty-weights instance of `config`)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    exec_dev, layer_home = execution_device(device), offload_home(device)
    base = model.base_model_prefix
    device_map: dict[str, int | str] = {}
    for name, child in model.named_children():
        if name != base:
            device_map[name] = exec_dev
            continue
        for inner, _ in child.named_children():
            if inner == "layers":
                device_map.update({f"{base}.layers.{i}": layer_home for i in range(len(child.layers))})
            else:
                device_map[f"{base}.{inner}"] = exec_dev
    return device_map


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (0: the real model's count)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--quant", default=None, help="fp16|bf16|fp32|nf4|int8 (default: the dtype)")
    p.add_argument("--tokens", default="1,16,64,256,1024", help="comma-separated tokens per pass")
    p.add_argument("--tiers", default="none,ram,disk", help="comma-separated: none,ram,disk")
    p.add_argument("--buffers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--no-accelerate", action="store_true")
    p.add_argument("--accelerate-tokens", default="1,256", help="tokens per pass for accelerate's baseline")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--workdir", default=None, help="where the checkpoint and blobs go (default: a tmp dir)")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.accelerate_tokens = [int(t) for t in args.accelerate_tokens.split(",")]
    args.tiers = args.tiers.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench-offload-")
    ckpt = build_checkpoint(args.shape, args.layers, dtype, Path(args.workdir))

    rates = copy_bandwidths(device)
    kind, bw_ram = floor_bandwidth(rates)
    files = safetensors_files(ckpt)
    # reads in flight as the streaming engine issues them; a cold read of the whole shard, so only
    # when the disk tier is measured (it is the disk tier's floor)
    bw_disk = (measure_read_bandwidth(files[0], os.path.getsize(files[0]), threads=read_threads())
               if "disk" in args.tiers else None)
    size = sum(os.path.getsize(f) for f in files)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"device={device} dtype={dtype} shape={args.shape} layers={args.layers or 'all'} "
        f"checkpoint={size / 1e9:.2f} GB threads={torch.get_num_threads()} loadavg={load:.1f}"
    )
    measured = ", ".join(f"{name} {rate / 1e9:.2f} GB/s" for name, rate in rates.items())
    disk = f"{bw_disk / 1e9:.2f} GB/s" if bw_disk is not None else "not measured (no disk tier)"
    print(f"copy bandwidth: {measured} (floors use {kind}); cold sequential read: {disk}\n")

    records: list[dict] = []
    result = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "shape": args.shape,
              "layers": args.layers, "checkpoint_bytes": size, "copy_bandwidth": bw_ram,
              "copy_kind": kind, "copy_bandwidths": rates, "disk_bandwidth": bw_disk, "rows": records}

    def save() -> None:  # after each part, so a run killed part-way still leaves its rows
        if args.out:
            result["speedup_vs_accelerate"] = speedups(records)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    rows = bench_ours(args, ckpt, device, dtype, bw_ram, bw_disk, records)
    save()
    header = ["runtime", "tokens", "forward s", "streamed GB", "GB/s", "of copy bw", "load wait s"]
    print(table(header, rows))
    if not args.no_accelerate:
        print()
        print(table(["runtime", "tokens", "forward s"], bench_accelerate(args, ckpt, device, dtype, records)))
        save()
        for row in result["speedup_vs_accelerate"]:
            print(f"{row['tier']} tier at {row['tokens']} tokens: {row['speedup']:.1f}x accelerate's "
                  f"{row['baseline']} ({row['baseline_seconds']:.3f} s vs {row['seconds']:.3f} s)")


def speedups(records: list[dict]) -> list[dict]:
    """Accelerate's (warm) forward time over ours at each token count both measured, per tier of ours."""
    theirs = {r["tokens"]: r for r in records
              if r["runtime"] == "accelerate" and r["case"] == "warm page cache"}
    out = []
    for r in records:
        base = theirs.get(r["tokens"])
        if r["runtime"] == "specexec" and r["tier"] != "none" and base is not None:
            out.append({"tier": r["tier"], "tokens": r["tokens"], "seconds": r["seconds"],
                        "baseline": f"{base['tier']} offload", "baseline_seconds": base["seconds"],
                        "speedup": base["seconds"] / r["seconds"]})
    return out


if __name__ == "__main__":
    main()
