"""Memory caps (`--max-memory`), in the spirit of accelerate's `max_memory`: how much of each memory pool
a run may plan with.

A cap is `POOL=SIZE` or a bare `SIZE`:
  cpu=4GiB        host RAM (on a CPU-only machine the CPU is also the compute device)
  cuda:0=20GiB    one GPU's memory ("cuda" means the compute device when it is a GPU)
  4GiB            the compute device, whichever it is
Sizes take B, KB/MB/GB/TB (powers of 1000) or KiB/MiB/GiB/TiB (powers of 1024); a plain number is
bytes. The planner plans against the smaller of each cap and what the probe measured.
"""

from __future__ import annotations

import re
from dataclasses import replace

from specexec_cli.errors import UsageError
from specexec_cli.runtime.plan import HardwareFacts

UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
    "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,  # as in accelerate: "10G" = 10 GiB
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
DEVICE_KEY = "device"  # a bare SIZE: the compute device


def parse_size(text: str) -> int:
    """'4GiB' -> 4294967296; raises UsageError naming the accepted units."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in UNITS:
        raise UsageError(f"--max-memory: cannot read size {text!r} (use e.g. 4GiB, 512MiB, 20GB)")
    return int(float(match.group(1)) * UNITS[unit])


def parse_caps(values: tuple[str, ...] | list[str] | str | None) -> dict[str, int]:
    """Parse --max-memory values (repeatable, or comma-separated) into {pool: bytes}.

    Pools: "cpu", "cuda" or "cuda:N", and DEVICE_KEY for a bare size."""
    if not values:
        return {}
    if isinstance(values, str):
        values = [values]
    caps: dict[str, int] = {}
    for value in values:
        for item in str(value).split(","):
            item = item.strip()
            if not item:
                continue
            pool, sep, size = item.rpartition("=")
            pool = pool.strip().lower() if sep else DEVICE_KEY
            if pool != DEVICE_KEY and not re.fullmatch(r"cpu|cuda(:\d+)?", pool):
                raise UsageError(
                    f"--max-memory: unknown pool {pool!r} (use cpu, cuda, cuda:N or a bare size)"
                )
            nbytes = parse_size(size)
            if nbytes <= 0:
                raise UsageError(f"--max-memory: {item!r} must be larger than 0")
            caps[pool] = nbytes
    return caps


def format_caps(caps: dict[str, int]) -> list[str]:
    """The caps back as --max-memory values (for profiles and logs)."""
    out = []
    for pool, nbytes in caps.items():
        size = f"{nbytes / (1 << 30):.4g}GiB" if nbytes >= 1 << 30 else f"{nbytes / (1 << 20):.4g}MiB"
        out.append(size if pool == DEVICE_KEY else f"{pool}={size}")
    return out


def device_cap(caps: dict[str, int], device_type: str, device_index: int | None) -> int | None:
    """The cap on the compute device's memory, if any."""
    if device_type == "cpu":
        keys = ["cpu", DEVICE_KEY]
    else:
        keys = [f"cuda:{device_index or 0}", "cuda", DEVICE_KEY]
    found = [caps[k] for k in keys if k in caps]
    return min(found) if found else None


def apply_caps(hw: HardwareFacts, caps: dict[str, int], device_type: str,
               device_index: int | None = None) -> HardwareFacts:
    """HardwareFacts with each pool the smaller of the probe and its cap."""
    if not caps:
        return hw
    dev = device_cap(caps, device_type, device_index)
    host = caps.get("cpu")
    if hw.unified:  # the CPU computes: one pool
        limits = [x for x in (dev, host) if x is not None]
        if not limits:
            return hw
        pool = min(hw.host_ram_available, *limits)
        return replace(hw, device_mem_free=pool, host_ram_available=pool)
    return replace(
        hw,
        device_mem_free=min(hw.device_mem_free, dev) if dev is not None else hw.device_mem_free,
        host_ram_available=min(hw.host_ram_available, host) if host is not None else hw.host_ram_available,
    )


def host_share(max_memory: tuple[str, ...], engines_on_host: int, available: int) -> tuple[str, ...]:
    """`max_memory` with host memory capped at 1 / `engines_on_host` of the `available` bytes (or its own
    cpu cap, if smaller): engines that start together on one host each see all of the free memory and
    would each plan their streamed layers' host copies with all of it."""
    if engines_on_host <= 1:
        return max_memory
    caps = parse_caps(max_memory)
    share = available // engines_on_host
    if caps.get("cpu", share + 1) <= share:
        return max_memory
    return tuple(format_caps({**caps, "cpu": share}))
