"""Calibration prompts for the tuner.

A small packaged set (`specexec_cli/data/calibration_prompts.json`) taken from MT-Bench and OASST,
with the Llama-2 `[INST]` wrappers stripped to the user's text; `--prompts FILE` reads the same format
or the shared `[[id, text], ...]` files.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from specexec_cli.errors import UsageError
from specexec_cli.prompt_sets import load_prompt_set, parse_llama2_chat, strip_llama2_wrapper
from specexec_cli.prompts import Prompt, encode_messages, parse_text

PROMPTS_RESOURCE = "data/calibration_prompts.json"
PROMPTS_SCHEMA_VERSION = 1


def _packaged_format(data: dict, origin: str) -> list[Prompt]:
    if data.get("schema_version") != PROMPTS_SCHEMA_VERSION:
        raise UsageError(
            f"{origin}: prompt file schema version {data.get('schema_version')!r}, expected 1"
        )
    prompts = [
        Prompt(str(p["id"]), p["text"])
        for p in data.get("prompts", [])
        if isinstance(p, dict) and isinstance(p.get("text"), str) and p["text"].strip()
    ]
    if not prompts:
        raise UsageError(f"{origin}: no prompts found")
    return prompts


def read_prompts(path: Path) -> list[Prompt]:
    """Calibration prompts from a file: a JSON list of [id, text] pairs or of strings (the shared
    MT-Bench / OASST format), the packaged format, JSON Lines with a "prompt" field, or plain text
    (one prompt). Llama-2 `[INST]` wrappers are reduced to the last user message."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read prompts {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"prompts file {path} is not valid JSON ({exc.msg})") from None
        if isinstance(data, dict):
            return _packaged_format(data, f"prompts file {path}")
        prompts = [Prompt(pid, user) for pid, user in load_prompt_set(path, None)]
    else:
        prompts = [Prompt(p.id, strip_llama2_wrapper(p.text)) for p in parse_text(text, str(path), "auto")]
    if not prompts:
        raise UsageError(f"prompts file {path}: no prompts found")
    return prompts


def packaged_prompts() -> list[Prompt]:
    """The calibration prompts that ship with specexec (MT-Bench and OASST, interleaved)."""
    text = resources.files("specexec_cli").joinpath(PROMPTS_RESOURCE).read_text(encoding="utf-8")
    return _packaged_format(json.loads(text), "packaged calibration prompts")


def build_calibration_set(mtbench: Path, oasst: Path, per_set: int = 8, max_chars: int = 400) -> dict:
    """The packaged prompt file from the shared MT-Bench and OASST sets: single-turn prompts of at
    most `max_chars` characters of user text, spread evenly over each set, interleaved."""
    chosen = []
    for name, path in (("mtbench", mtbench), ("oasst", oasst)):
        usable = []
        for pid, text in json.loads(Path(path).read_text(encoding="utf-8")):
            turns = [m for m in parse_llama2_chat(text) if m["role"] != "system"]
            if len(turns) == 1 and len(turns[0]["content"]) <= max_chars:
                usable.append((pid, turns[0]["content"]))
        step = max(1, len(usable) // per_set)
        chosen.append([{"id": f"{name}-{pid}", "text": text} for pid, text in usable[::step][:per_set]])
    interleaved = [p for pair in zip(*chosen, strict=True) for p in pair]
    return {
        "schema_version": PROMPTS_SCHEMA_VERSION,
        "source": (
            "MT-Bench first turns and OpenAssistant (OASST) conversations, as evaluated in the SpecExec "
            f"paper; single-turn prompts of at most {max_chars} characters, Llama-2 [INST] wrapper and "
            "system prompt removed (specexec_cli.tuning.prompt_set.build_calibration_set)"
        ),
        "prompts": interleaved,
    }


def encode_prompt(tokenizer, text: str) -> torch.Tensor:
    """Token ids [1, L] of a user message, through the tokenizer's chat template when it has one."""
    return torch.tensor([encode_messages(tokenizer, [{"role": "user", "content": text}])], dtype=torch.long)

