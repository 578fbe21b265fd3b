"""Detect a damaged model folder before loading it: every safetensors file must be as long as its
header says (a truncated copy, a disk that filled up, a killed `cp`). Only headers are read."""

from __future__ import annotations

from pathlib import Path

from specexec_cli.errors import SpecexecError
from specexec_cli.models.bundled import MARKER_FILE
from specexec_cli.runtime.disk import read_raw_header


def expected_size(path: Path) -> int:
    """Bytes a safetensors file must have according to its header; ValueError when the header is bad."""
    header_len, header = read_raw_header(path)
    try:
        ends = [int(info["data_offsets"][1]) for name, info in header.items() if name != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise ValueError(f"the header is not valid ({type(exc).__name__})") from None
    return 8 + header_len + max(ends, default=0)


def rebuild_hint(folder: Path) -> str:
    if (folder / MARKER_FILE).is_file():
        return f"delete it (rm -r '{folder}') and run again to convert the model again"
    return "copy or download the model again"


def check_model_folder(folder: Path) -> None:
    """Raise a one-line SpecexecError naming the first damaged safetensors file in `folder`."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            need = expected_size(path)
            have = path.stat().st_size
        except (OSError, ValueError) as exc:
            problem = getattr(exc, "strerror", None) or str(exc)
            raise SpecexecError(f"model folder {folder} is damaged: {path.name}: {problem}; "
                                f"{rebuild_hint(folder)}") from None
        if have < need:
            raise SpecexecError(f"model folder {folder} is damaged: {path.name} has {have} bytes but its "
                                f"header needs {need} (truncated); {rebuild_hint(folder)}")
