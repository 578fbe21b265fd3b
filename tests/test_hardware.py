"""Hardware probe: no-GPU machines, NVML guarded, fingerprint stability, probe cache."""

from __future__ import annotations

import json
import sys
import time
import types

import pytest

from specexec_cli import hardware


class FakeNVMLError(Exception):
    pass


def fake_nvml(gpus: list[dict], fail_init: bool = False) -> types.ModuleType:
    """A stand-in for pynvml with the calls the probe makes."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = FakeNVMLError

    def init():
        if fail_init:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def unsupported(_handle):
        raise FakeNVMLError("Not Supported")

    nvml.nvmlInit = init
    nvml.nvmlShutdown = lambda: None
    nvml.nvmlSystemGetDriverVersion = lambda: b"550.54"
    nvml.nvmlDeviceGetCount = lambda: len(gpus)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: gpus[i]
    nvml.nvmlDeviceGetName = lambda h: h["name"].encode()
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=h["total"], free=h["free"])
    nvml.nvmlDeviceGetCurrPcieLinkGeneration = lambda h: h["gen"]
    nvml.nvmlDeviceGetMaxPcieLinkGeneration = lambda h: 4
    nvml.nvmlDeviceGetCurrPcieLinkWidth = unsupported
    nvml.nvmlDeviceGetMaxPcieLinkWidth = lambda h: 16
    return nvml


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([], fail_init=True))


def test_query_gpus_without_a_driver_says_so(no_gpu):
    gpus, status, driver = hardware.query_gpus()
    assert gpus == () and driver is None
    assert status == hardware.NO_GPU == "no NVIDIA GPU found"


def test_query_gpus_without_nvidia_ml_py(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    gpus, status, _ = hardware.query_gpus()
    assert gpus == () and status.startswith("no NVIDIA GPU found") and "not installed" in status


def test_query_gpus_reads_nvml_and_tolerates_unsupported_fields(monkeypatch):
    card = {"name": "NVIDIA GeForce RTX 4090", "total": 24 * 2**30, "free": 23 * 2**30, "gen": 4}
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([card]))
    gpus, status, driver = hardware.query_gpus()
    assert status == "ok" and driver == "550.54"
    (gpu,) = gpus
    assert gpu.name == "NVIDIA GeForce RTX 4090" and gpu.memory_total == 24 * 2**30
    assert (gpu.pcie_gen_current, gpu.pcie_gen_max, gpu.pcie_width_current, gpu.pcie_width_max) == (
        4,
        4,
        None,
        16,
    )
    assert "gen 4 x? (max gen 4 x16)" in hardware._pcie(gpu)


def test_probe_on_a_machine_without_a_gpu(no_gpu, tmp_path):
    start = time.perf_counter()
    result = hardware.probe(weights_dir=tmp_path)
    assert time.perf_counter() - start < 30
    assert not result.has_gpu and result.gpu_status == hardware.NO_GPU
    m = result.measured
    assert (
        m.h2d_pinned_bytes_per_s is None and m.h2d_pageable_bytes_per_s is None and m.gpu_gemm_flops is None
    )
    assert m.host_copy_bytes_per_s > 1e8 and m.host_read_bytes_per_s > 1e8 and m.cpu_gemm_flops > 1e8
    assert result.host.ram_total >= result.host.ram_available > 0 and result.host.cpu_cores_logical >= 1
    assert result.disk.path == str(tmp_path) and result.disk.free_bytes > 0
    assert result.disk.read_bytes_per_s is None or result.disk.read_bytes_per_s > 1e6
    assert list(tmp_path.iterdir()) == []  # the scratch file is gone
    table = hardware.format_probe(result)
    assert "no NVIDIA GPU found" in table and "h2d" not in table and result.fingerprint in table
    assert hardware.probe_from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_probe_without_measurements_is_instant(no_gpu, tmp_path):
    result = hardware.probe(weights_dir=tmp_path / "not-yet", run_measurements=False)
    assert result.measured == hardware.Measurements()
    assert result.disk.read_note == "not measured"


def test_fingerprint_is_stable_and_names_the_hardware(no_gpu):
    assert hardware.fingerprint() == hardware.fingerprint()
    host = hardware.query_host()
    ident = hardware.identity((), host, "2.13.0+cpu")
    assert ident["torch"] == "2.13" and ident["gpus"] == [] and ident["cpu"] == host.cpu_model
    same = hardware.identity((), host, "2.13.1+cu126")
    assert hardware.fingerprint_of(ident) == hardware.fingerprint_of(same)
    other_torch = hardware.identity((), host, "2.14.0")
    assert hardware.fingerprint_of(ident) != hardware.fingerprint_of(other_torch)
    gpu = hardware.GpuInfo(0, "NVIDIA RTX 3090", 24 * 2**30, 20 * 2**30)
    busy = hardware.GpuInfo(0, "NVIDIA RTX 3090", 24 * 2**30, 2 * 2**30)  # free memory does not count
    assert hardware.identity((gpu,), host, "2.13") == hardware.identity((busy,), host, "2.13")
    assert hardware.identity((gpu,), host, "2.13") != ident
    assert len(hardware.fingerprint_of(ident)) == 12


def test_cached_probe_reuses_a_matching_probe(no_gpu, tmp_path, monkeypatch):
    calls = []
    real = hardware.probe

    def counting(weights_dir=None, run_measurements=True):
        calls.append(1)
        return real(weights_dir=tmp_path / "w", run_measurements=False)

    monkeypatch.setattr(hardware, "probe", counting)
    cache = tmp_path / "probe.json"
    first = hardware.cached_probe(cache)
    second = hardware.cached_probe(cache)
    assert len(calls) == 1 and first == second
    hardware.cached_probe(cache, refresh=True)
    assert len(calls) == 2
    cache.write_text("{ not json")
    hardware.cached_probe(cache)
    assert len(calls) == 3


def test_write_json_atomic_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / "sub" / "f.json"
    hardware.write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        hardware.write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["f.json"]


def test_measurements_are_short():
    start = time.perf_counter()
    copy, read = hardware.measure_host_memory()
    flops = hardware.measure_gemm("cpu")
    assert time.perf_counter() - start < 4
    assert copy > 0 and read > 0 and flops > 0
