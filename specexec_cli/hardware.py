"""Hardware probe: GPUs through NVML, host memory and CPU through psutil, disk, measured bandwidths.

`probe()` returns a plain `HardwareProbe` dataclass. Every measurement is short (well under 2 s) and
every query is guarded: a machine without an NVIDIA driver reports "no NVIDIA GPU found" and measures
what applies there (host memory bandwidth, CPU GEMM, disk) instead of failing.

`identity()` / `fingerprint()` name the machine for tuned profiles: GPU names and memory totals, CPU
model, RAM total rounded to GiB and the torch major.minor version. They need no measurement and stay
the same across runs on the same machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

NO_GPU = "no NVIDIA GPU found"
PROBE_SCHEMA_VERSION = 1
GIB = 1024**3


@dataclass(frozen=True)
class GpuInfo:
    """One NVIDIA GPU as NVML reports it; PCIe fields are None where NVML cannot tell."""

    index: int
    name: str
    memory_total: int
    memory_free: int
    pcie_gen_current: int | None = None
    pcie_gen_max: int | None = None
    pcie_width_current: int | None = None
    pcie_width_max: int | None = None


@dataclass(frozen=True)
class HostInfo:
    cpu_model: str
    cpu_cores_physical: int
    cpu_cores_logical: int
    ram_total: int
    ram_available: int


@dataclass(frozen=True)
class DiskInfo:
    """Free space and measured sequential read speed of the folder that holds the weights."""

    path: str
    free_bytes: int
    read_bytes_per_s: float | None = None
    read_note: str = ""


@dataclass(frozen=True)
class Measurements:
    """Measured throughputs in bytes/s and FLOP/s; None where they do not apply or were skipped."""

    host_copy_bytes_per_s: float | None = None
    host_read_bytes_per_s: float | None = None
    cpu_gemm_flops: float | None = None
    h2d_pinned_bytes_per_s: float | None = None
    h2d_pageable_bytes_per_s: float | None = None
    gpu_gemm_flops: float | None = None


@dataclass(frozen=True)
class HardwareProbe:
    gpus: tuple[GpuInfo, ...]
    gpu_status: str
    driver_version: str | None
    host: HostInfo
    disk: DiskInfo | None
    measured: Measurements
    torch_version: str
    fingerprint: str
    probed_at: float = field(default_factory=time.time)
    seconds: float = 0.0
    schema_version: int = PROBE_SCHEMA_VERSION

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    def to_dict(self) -> dict:
        return asdict(self)


# --- static queries ---------------------------------------------------------------------------


def query_gpus() -> tuple[tuple[GpuInfo, ...], str, str | None]:
    """(gpus, status, driver version) from NVML; never raises. Status is "ok" or a plain reason."""
    try:
        import pynvml
    except ImportError:
        return (), f"{NO_GPU} (nvidia-ml-py is not installed)", None
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError):
        return (), NO_GPU, None
    try:
        driver = _text(_nvml(pynvml.nvmlSystemGetDriverVersion))
        gpus = tuple(_query_gpu(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount()))
    except (pynvml.NVMLError, OSError) as exc:
        return (), f"{NO_GPU} (NVML error: {exc})", None
    finally:
        try:
            pynvml.nvmlShutdown()
        except (pynvml.NVMLError, OSError):
            pass
    return gpus, ("ok" if gpus else NO_GPU), driver


def _query_gpu(pynvml, index: int) -> GpuInfo:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    return GpuInfo(
        index=index,
        name=_text(pynvml.nvmlDeviceGetName(handle)),
        memory_total=int(memory.total),
        memory_free=int(memory.free),
        pcie_gen_current=_nvml(pynvml.nvmlDeviceGetCurrPcieLinkGeneration, handle),
        pcie_gen_max=_nvml(pynvml.nvmlDeviceGetMaxPcieLinkGeneration, handle),
        pcie_width_current=_nvml(pynvml.nvmlDeviceGetCurrPcieLinkWidth, handle),
        pcie_width_max=_nvml(pynvml.nvmlDeviceGetMaxPcieLinkWidth, handle),
    )


def _nvml(fn: Callable, *args):
    """One optional NVML query: None where the device or driver does not support it."""
    import pynvml

    try:
        return fn(*args)
    except pynvml.NVMLError:
        return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def query_host() -> HostInfo:
    memory = psutil.virtual_memory()
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    return HostInfo(
        cpu_model=cpu_model(),
        cpu_cores_physical=psutil.cpu_count(logical=False) or logical,
        cpu_cores_logical=logical,
        ram_total=int(memory.total),
        ram_available=int(memory.available),
    )


def torch_version() -> str:
    import torch

    return torch.__version__


# --- fingerprint ------------------------------------------------------------------------------


def identity(gpus: tuple[GpuInfo, ...], host: HostInfo, torch_ver: str) -> dict:
    """The stable facts that name a machine: what a tuned profile is keyed by."""
    return {
        "gpus": [f"{gpu.name} {round(gpu.memory_total / GIB)}GiB" for gpu in gpus],
        "cpu": host.cpu_model,
        "ram_gib": round(host.ram_total / GIB),
        "torch": ".".join(torch_ver.split("+")[0].split(".")[:2]),
    }


def fingerprint_of(ident: dict) -> str:
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def current_identity() -> dict:
    """This machine's identity, without any measurement (fast: NVML, psutil, torch import)."""
    gpus, _, _ = query_gpus()
    return identity(gpus, query_host(), torch_version())


def fingerprint() -> str:
    """This machine's hardware fingerprint: 12 hex digits, stable across runs."""
    return fingerprint_of(current_identity())


# --- measurements -----------------------------------------------------------------------------


def _best_rate(work: float, fn: Callable[[], None], seconds: float, sync: Callable[[], None]) -> float:
    """Best-of rate work/time of fn(), repeated for about `seconds` after one warm-up call."""
    fn()
    sync()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    repeats = 0
    while repeats < 2 or (time.perf_counter() < deadline and repeats < 50):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
        repeats += 1
    return work / best


def _no_sync() -> None:
    return None


def measure_host_memory(n_bytes: int = 128 * 1024**2, seconds: float = 0.4) -> tuple[float, float]:
    """(copy, read) host memory bandwidth in bytes/s: a tensor copy and a reduction over n_bytes."""
    import torch

    src = torch.ones(n_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy = _best_rate(n_bytes, lambda: dst.copy_(src), seconds, _no_sync)
    read = _best_rate(n_bytes, lambda: src.sum(), seconds, _no_sync)
    return copy, read


def measure_gemm(device: str = "cpu", n: int | None = None, seconds: float = 0.5) -> float:
    """Achieved matrix-multiply throughput in FLOP/s (float32 on CPU, float16 on a GPU)."""
    import torch

    on_gpu = device != "cpu"
    n = n or (4096 if on_gpu else 1024)
    dtype = torch.float16 if on_gpu else torch.float32
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if on_gpu else _no_sync
    return _best_rate(2.0 * n**3, lambda: torch.mm(a, b), seconds, sync)


def measure_h2d(pinned: bool, n_bytes: int = 256 * 1024**2, seconds: float = 0.5) -> float:
    """Host-to-device copy bandwidth in bytes/s from pinned or pageable host memory (needs CUDA)."""
    import torch

    src = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=pinned)
    dst = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    return _best_rate(n_bytes, lambda: dst.copy_(src, non_blocking=pinned), seconds, torch.cuda.synchronize)


def measure_disk_read(
    folder: Path, n_bytes: int = 192 * 1024**2, seconds: float = 1.5
) -> tuple[float | None, str]:
    """Sequential read speed of the disk under `folder` (bytes/s) and a note on how it was measured.

    Writes a scratch file, asks the kernel to drop its cached pages (posix_fadvise DONTNEED, no root
    needed) and reads it back in 8 MiB chunks, stopping after `seconds`. Where dropping the cache is
    not possible the figure may show page-cache speed, and the note says so.
    """
    chunk = 8 * 1024**2
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(folder).free < 4 * n_bytes:
            return None, "skipped: too little free space for a scratch file"
        fd, name = tempfile.mkstemp(prefix=".specexec-probe-", dir=folder)
    except OSError as exc:
        return None, f"skipped: {exc.strerror or exc}"
    try:
        block = os.urandom(chunk)
        with os.fdopen(fd, "wb") as fh:
            for _ in range(n_bytes // chunk):
                fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
        note = "scratch file, page cache dropped"
        with open(name, "rb", buffering=0) as fh:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                note = "scratch file, page cache could not be dropped: may read from memory"
            start, done = time.perf_counter(), 0
            while time.perf_counter() - start < seconds:
                data = fh.read(chunk)
                if not data:
                    break
                done += len(data)
            elapsed = time.perf_counter() - start
        return (done / elapsed if elapsed > 0 else None), note
    except OSError as exc:
        return None, f"skipped: {exc.strerror or exc}"
    finally:
        try:
            os.unlink(name)
        except OSError:
            pass


def measure(has_cuda: bool) -> Measurements:
    """All bandwidth and throughput measurements that apply to this machine (a few seconds)."""
    copy, read = measure_host_memory()
    values: dict = {
        "host_copy_bytes_per_s": copy,
        "host_read_bytes_per_s": read,
        "cpu_gemm_flops": measure_gemm("cpu"),
    }
    if has_cuda:
        values["h2d_pinned_bytes_per_s"] = measure_h2d(pinned=True)
        values["h2d_pageable_bytes_per_s"] = measure_h2d(pinned=False)
        values["gpu_gemm_flops"] = measure_gemm("cuda")
    return Measurements(**values)


def default_weights_dir() -> Path:
    """Where converted weights live by default: the models cache ($SPECEXEC_CACHE/models or the user
    cache folder)."""
    from specexec_cli.models.bundled import models_cache_dir

    return models_cache_dir()


def probe(weights_dir: Path | None = None, run_measurements: bool = True) -> HardwareProbe:
    """Query and measure this machine. Quick: a few seconds with measurements, well under a minute."""
    import torch

    start = time.perf_counter()
    gpus, status, driver = query_gpus()
    host = query_host()
    folder = Path(weights_dir) if weights_dir else default_weights_dir()
    disk = None
    usage_folder = _existing_parent(folder)
    if usage_folder is not None:
        speed, note = measure_disk_read(folder) if run_measurements else (None, "not measured")
        disk = DiskInfo(str(folder), int(shutil.disk_usage(usage_folder).free), speed, note)
    has_cuda = bool(gpus) and torch.cuda.is_available()
    measured = measure(has_cuda) if run_measurements else Measurements()
    ident = identity(gpus, host, torch.__version__)
    return HardwareProbe(
        gpus=gpus,
        gpu_status=status,
        driver_version=driver,
        host=host,
        disk=disk,
        measured=measured,
        torch_version=torch.__version__,
        fingerprint=fingerprint_of(ident),
        seconds=time.perf_counter() - start,
    )


def _existing_parent(folder: Path) -> Path | None:
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return candidate
    return None


# --- (de)serialisation and cache --------------------------------------------------------------


def probe_from_dict(data: dict) -> HardwareProbe:
    """Inverse of HardwareProbe.to_dict(); raises KeyError/TypeError on a malformed dict."""
    disk = data.get("disk")
    return HardwareProbe(
        gpus=tuple(GpuInfo(**gpu) for gpu in data["gpus"]),
        gpu_status=data["gpu_status"],
        driver_version=data.get("driver_version"),
        host=HostInfo(**data["host"]),
        disk=DiskInfo(**disk) if disk else None,
        measured=Measurements(**data["measured"]),
        torch_version=data["torch_version"],
        fingerprint=data["fingerprint"],
        probed_at=data.get("probed_at", 0.0),
        seconds=data.get("seconds", 0.0),
        schema_version=data.get("schema_version", PROBE_SCHEMA_VERSION),
    )


def probe_cache_path() -> Path:
    from specexec_cli.models.bundled import cache_root

    return cache_root() / "probe.json"


def cached_probe(
    path: Path | None = None, refresh: bool = False, weights_dir: Path | None = None
) -> HardwareProbe:
    """The last probe of this machine if its fingerprint still matches, else a fresh (cached) probe."""
    path = path or probe_cache_path()
    if not refresh and path.exists():
        try:
            old = probe_from_dict(json.loads(path.read_text(encoding="utf-8")))
            if old.schema_version == PROBE_SCHEMA_VERSION and old.fingerprint == fingerprint():
                return old
        except (OSError, ValueError, KeyError, TypeError):
            pass
    fresh = probe(weights_dir)
    write_json_atomic(path, fresh.to_dict())
    return fresh


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temporary file beside `path`, then os.replace it: readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --- human output -----------------------------------------------------------------------------


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.1f} GB"


def _rate(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.1f} GB/s"


def _flops(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e12:.2f} TFLOP/s"


def _pcie(gpu: GpuInfo) -> str:
    if gpu.pcie_gen_current is None and gpu.pcie_gen_max is None:
        return "-"
    return (
        f"gen {gpu.pcie_gen_current or '?'} x{gpu.pcie_width_current or '?'}"
        f" (max gen {gpu.pcie_gen_max or '?'} x{gpu.pcie_width_max or '?'})"
    )


def format_probe(result: HardwareProbe) -> str:
    """A two-column human table of a probe (for stderr)."""
    rows: list[tuple[str, str]] = []
    if result.gpus:
        rows.append(("driver", result.driver_version or "-"))
        for gpu in result.gpus:
            rows += [
                (f"gpu {gpu.index}", gpu.name),
                ("  memory total / free", f"{_gb(gpu.memory_total)} / {_gb(gpu.memory_free)}"),
                ("  PCIe", _pcie(gpu)),
            ]
    else:
        rows.append(("gpu", result.gpu_status))
    host, m = result.host, result.measured
    rows += [
        ("cpu", f"{host.cpu_model} ({host.cpu_cores_physical} cores, {host.cpu_cores_logical} threads)"),
        ("ram total / available", f"{_gb(host.ram_total)} / {_gb(host.ram_available)}"),
    ]
    if result.disk:
        rows += [
            ("weights folder", result.disk.path),
            ("  disk free", _gb(result.disk.free_bytes)),
            ("  sequential read", f"{_rate(result.disk.read_bytes_per_s)} ({result.disk.read_note})"),
        ]
    rows += [
        ("host memory copy / read", f"{_rate(m.host_copy_bytes_per_s)} / {_rate(m.host_read_bytes_per_s)}"),
        ("cpu gemm (fp32)", _flops(m.cpu_gemm_flops)),
    ]
    if result.gpus:
        rows += [
            (
                "h2d pinned / pageable",
                f"{_rate(m.h2d_pinned_bytes_per_s)} / {_rate(m.h2d_pageable_bytes_per_s)}",
            ),
            ("gpu gemm (fp16)", _flops(m.gpu_gemm_flops)),
        ]
    rows += [
        ("torch", result.torch_version),
        ("fingerprint", result.fingerprint),
        ("probe time", f"{result.seconds:.1f} s"),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)
