"""Validate a `--device` string before any weight is loaded: one clear usage error instead of torch's
traceback ("Invalid device string", "Torch not compiled with CUDA enabled")."""

from __future__ import annotations

from specexec_cli.errors import UsageError

SUPPORTED = ("cpu", "cuda", "mps", "xpu")
# Upper bound for `--threads`: torch takes a C int, and more threads than this helps no machine.
MAX_THREADS = 1024


def _backend_count(kind: str) -> int:
    """How many devices of `kind` torch can use here (0 when the backend is missing or has none)."""
    import torch

    if kind == "cpu":
        return 1
    if kind == "mps":
        backend = getattr(torch.backends, "mps", None)
        return 1 if backend is not None and backend.is_available() else 0
    module = getattr(torch, kind, None)
    if module is None or not module.is_available():
        return 0
    return int(module.device_count())


def check_device(text: str | None) -> str | None:
    """`text` unchanged when it names a device usable here (None passes through: the default applies);
    otherwise a UsageError that says what is available."""
    if text is None:
        return None
    import torch

    try:
        device = torch.device(text.strip())
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {text!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type not in SUPPORTED:
        raise UsageError(f"--device {text!r}: {device.type} devices are not supported; use cpu, cuda or mps")
    count = _backend_count(device.type)
    if count == 0:
        cpu_only = device.type == "cuda" and not torch.backends.cuda.is_built()
        built = " (torch is a CPU-only build)" if cpu_only else ""
        raise UsageError(f"--device {text}: no {device.type} device is available here{built}; "
                         "use --device cpu")
    if device.index is not None and device.index >= count:
        raise UsageError(f"--device {text}: only {count} {device.type} device(s) here "
                         f"(indices 0..{count - 1})")
    return text.strip()
