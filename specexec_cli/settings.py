"""The engine settings, in one table: what a front door may ask for, how the CLI spells it, whether a
profile may carry it, and its type. The click options of `generate` / `serve` / `bench`, the
`EngineRequest` every front door builds and the profile schema are all made from `SETTINGS`, so a new
setting is added here and nowhere else.

A request holds None for every setting left to the profile and then to the defaults (engine.resolve).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any

from specexec_cli.decoding.config import METHODS

DEFAULT_TARGET = "qwen2.5-coder-1.5b"  # the bundled pair's target: what runs when no --target is given
OFFLOADS = ("none", "ram", "disk", "auto")
WEIGHT_FORMATS = ("fp16", "bf16", "fp32", "gptq", "awq", "w4a16", "nf4", "int8")
FLOAT_FORMATS = ("fp32", "fp16", "bf16")
DRAFT_QUANTS = ("none", "int8")  # none: the compute dtype; int8: runtime/int8_cpu.py (CPU only)


@dataclass(frozen=True)
class Setting:
    """One engine setting.

    name: the EngineRequest field; flags: the CLI's spelling (first is the long one); kind: int, float,
    str, or a tuple of choices; profile: the key a profile stores it under (None: never in a profile);
    multiple: repeatable flag (a tuple in the request, a list in a profile)."""

    name: str
    flags: tuple[str, ...]
    help: str
    kind: Any = str
    profile: str | None = None
    multiple: bool = False
    metavar: str | None = None

    @property
    def python_type(self) -> Any:
        if self.multiple:
            return tuple[str, ...]
        return {int: int, float: float}.get(self.kind, str)

    def profile_types(self) -> type | tuple[type, ...]:
        """The JSON types a profile may hold for it."""
        if self.multiple:
            return list
        if self.kind is float:
            return (int, float)
        if self.kind is int:
            return int
        return (str, type(None)) if self.name == "draft" else str


SETTINGS: tuple[Setting, ...] = (
    Setting("target", ("--target", "-t"), "Target model: registry name, hub id, folder or .gguf "
            "[default: qwen2.5-coder-1.5b, the bundled pair]."),
    Setting("draft", ("--draft", "-d"), "Draft model name or path, 'first-layers:N' (the target's first N "
            "layers) or 'none'.", profile="draft"),
    Setting("method", ("--method", "-m"), "[default: the profile's, else specexec]", kind=METHODS,
            profile="method"),
    Setting("budget", ("--budget",), "Tree tokens checked per target pass [default: 64].", kind=int,
            profile="budget"),
    Setting("max_n_beams", ("--max-n-beams",), "Nodes the draft expands per pass [default: 16].", kind=int,
            profile="max_n_beams"),
    Setting("max_beam_len", ("--max-beam-len",), "Most draft passes per iteration, which caps the tree "
            "depth [default: no cap: the tree grows while a draft pass pays for itself, judged from this "
            "run's measured pass times].", kind=int, profile="max_beam_len"),
    Setting("max_branch_width", ("--max-branch-width",), "Children per expanded node [default: 8].",
            kind=int, profile="max_branch_width"),
    Setting("draft_cost", ("--draft-cost",), "Cost of one draft pass as a fraction of a target pass, "
            "fixed instead of measured (0: depth is free); the tree's shape then no longer depends on "
            "timing [default: measured].", kind=float, profile="draft_cost"),
    Setting("draft_quant", ("--draft-quant",), "Draft weights: none (the compute dtype) or int8 (a CPU "
            "only: less than half the memory of float32 and faster; the output is still the target's "
            "own) [default: the profile's, else int8 on a CPU where torch has its int8 GEMM, else none].",
            kind=DRAFT_QUANTS, profile="draft_quant"),
    Setting("device", ("--device",), "torch device [default: cuda if available, else cpu]."),
    Setting("dtype", ("--dtype",), "Compute dtype [default: fp32 on a CPU; bf16 on a GPU that has it, "
            "else fp16].", kind=FLOAT_FORMATS),
    Setting("offload", ("--offload",), "Where the target's layers live: none (resident), ram or disk; "
            "auto picks the first tier that fits. The planner keeps as many layers resident as memory "
            "allows (streaming only the rest), so on a big machine nothing may stream: use --max-memory "
            "or --resident-layers [default: resident, unless another offload flag is given].",
            kind=OFFLOADS, profile="offload"),
    Setting("quant", ("--quant",), "Target weight format: gptq, awq, w4a16 load the registry's 4-bit "
            "checkpoint of that format; nf4, int8 quantize at load. A quantized folder or hub id needs "
            "none.", kind=WEIGHT_FORMATS, profile="quantization"),
    Setting("buffers", ("--buffers",), "Device-side layer buffers in the ring (>= 2).", kind=int,
            profile="buffers"),
    Setting("resident_layers", ("--resident-layers",), "First layers kept on the device [default: as many "
            "as fit].", kind=int, profile="resident_layers"),
    Setting("offload_dir", ("--offload-dir",), "Where the disk tier writes converted layers."),
    Setting("max_memory", ("--max-memory",), "Memory the run may plan with, like accelerate's max_memory: "
            "'cpu=4GiB', 'cuda:0=20GiB', or a bare size for the compute device (repeatable). The planner "
            "uses the smaller of the cap and what it measures, and streams the layers that do not fit.",
            multiple=True, profile="max_memory"),
    Setting("prefill_chunk", ("--prefill-chunk",), "Prompt tokens a joining prompt enters per target pass "
            "while others decode (chunked prefill); 0 enters a prompt whole [default: chosen from the "
            "measured pass times].", kind=int, metavar="N"),
)
BY_NAME = {s.name: s for s in SETTINGS}
# what a profile may carry besides the engine settings a request may ask for
PROFILE_ONLY = {"batch_size": int}


def profile_types() -> dict[str, type | tuple[type, ...]]:
    """The profile schema: every key a profile may hold, with its JSON types (profiles.py checks it)."""
    table = {s.profile: s.profile_types() for s in SETTINGS if s.profile is not None}
    return {**table, **PROFILE_ONLY}


_request_fields = [(s.name, s.python_type | None, field(default=() if s.multiple else None))
                   for s in SETTINGS]
EngineRequest = make_dataclass(
    "EngineRequest",
    [*_request_fields,
     ("batch_size", int | None, field(default=None)),  # explicit prompts per pass (--batch-size, --max-batch)
     ("use_profile", bool, field(default=True))],
    frozen=True,
)
EngineRequest.__module__ = __name__  # pickled by reference (a Ray job carries one)
EngineRequest.__doc__ = ("What a front door asks for (one field per engine setting, `SETTINGS`, plus the "
                         "batch size and whether a profile applies); None leaves a knob to the profile, "
                         "then to the defaults.")


def request_from_flags(values: dict[str, Any], batch_size: int | None = None,
                       use_profile: bool = True) -> Any:
    """The EngineRequest of a command's parsed engine flags (click's keyword arguments)."""
    known = {f.name for f in fields(EngineRequest)}
    flags = {k: (tuple(v) if BY_NAME[k].multiple else v) for k, v in values.items() if k in known}
    return EngineRequest(**flags, batch_size=batch_size, use_profile=use_profile)
