"""Prompt-set files of the benchmarks and the tuner: the MT-Bench / OASST sets the SpecExec paper evaluated
on (shipped in the package, `specexec_cli/data/prompts/`, so an installed specexec finds them anywhere),
JSON lists of [id, text] pairs whose text is wrapped in the Llama-2 chat format, read as chat messages."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from specexec_cli.errors import UsageError
from specexec_cli.prompts import decode_text

PACKAGED_SETS = ("mtbench", "oasst")  # specexec_cli/data/prompts/<name>.json
DEFAULT_PROMPTS = "mtbench"
REPO_ROOT = Path(__file__).resolve().parents[1]

_INST_OPEN = r"\[\s*INST\s*\]"
_INST_CLOSE = r"\[\s*[/\\]\s*INST\s*\]"
_SYS_BLOCK = re.compile(r"<{1,2}\s*SYS\s*>{1,2}(.*?)<{1,2}\s*[/\\]\s*SYS\s*>{0,2}", re.DOTALL | re.IGNORECASE)
_MARKER = re.compile(f"({_INST_OPEN}|{_INST_CLOSE})", re.IGNORECASE)
_SEQ_TOKENS = re.compile(r"</?s>")
_ROLE_LABEL = re.compile(r"^\s*(?:USER|ASSISTANT)\s*:\s*|\s*(?:USER|ASSISTANT)\s*:\s*$", re.IGNORECASE)


def _clean(text: str) -> str:
    """Drop `<s>`/`</s>` markers and a leading or trailing `USER:`/`ASSISTANT:` label."""
    text = _SEQ_TOKENS.sub("", text).strip()
    previous = None
    while previous != text:
        previous, text = text, _ROLE_LABEL.sub("", text).strip()
    return text


def parse_llama2_chat(text: str) -> list[dict[str, str]]:
    """Chat messages (system, then alternating user/assistant, ending with a user turn) of a prompt in
    the Llama-2 format `[INST] <<SYS>>..<</SYS>> user [/INST] answer [INST] ... [/INST]`.

    Tolerates the misspelled markers found in the shared OASST file (`<</SYS>`, `[\\INST]`), a trailing
    `ASSISTANT:` cue and `<s>`/`</s>` markers. Text without any marker is one user message.
    """
    system = None
    sys_match = _SYS_BLOCK.search(text)
    if sys_match:
        system = sys_match.group(1).strip() or None
        text = text[: sys_match.start()] + text[sys_match.end() :]
    messages: list[dict[str, str]] = []
    inside, pending = False, ""
    for piece in _MARKER.split(text):
        if _MARKER.fullmatch(piece):
            is_open = re.fullmatch(_INST_OPEN, piece, re.IGNORECASE) is not None
            if is_open != inside:  # a real transition; a repeated marker just continues the segment
                content = _clean(pending)
                if content:
                    messages.append({"role": "user" if inside else "assistant", "content": content})
                inside, pending = is_open, ""
            continue
        pending += piece
    content = _clean(pending)
    if content:
        messages.append({"role": "user" if inside or not messages else "assistant", "content": content})
    while messages and messages[-1]["role"] != "user":
        messages.pop()
    merged: list[dict[str, str]] = []
    for message in messages:  # two user turns in a row (an answer-less turn) become one message
        if merged and merged[-1]["role"] == message["role"]:
            joined = merged[-1]["content"] + "\n\n" + message["content"]
            merged[-1] = {"role": message["role"], "content": joined}
        else:
            merged.append(message)
    if system:
        merged.insert(0, {"role": "system", "content": system})
    return merged


def strip_llama2_wrapper(text: str) -> str:
    """The last user message of a Llama-2 wrapped prompt (the whole text, cleaned, when unwrapped)."""
    users = [m["content"] for m in parse_llama2_chat(text) if m["role"] == "user"]
    return users[-1] if users else _clean(text)


def packaged_prompt_set(name: str) -> Path:
    """The file of a prompt set shipped with specexec ("mtbench" or "oasst")."""
    from importlib import resources

    return Path(str(resources.files("specexec_cli").joinpath(f"data/prompts/{name}.json")))


def resolve_prompt_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The prompt file: a packaged set by name ("mtbench", the default, or "oasst"), else `path` as
    given, or relative to the repository root."""
    name = str(path) if path is not None else DEFAULT_PROMPTS
    if name in PACKAGED_SETS:
        return packaged_prompt_set(name)
    for candidate in (Path(name), REPO_ROOT / name):
        if candidate.is_file():
            return candidate
    raise UsageError(f"prompt file not found: {name} (looked in {Path.cwd()} and {REPO_ROOT}; the packaged "
                     f"sets are {', '.join(PACKAGED_SETS)}); use --prompts FILE")


def _read_prompt_file(path: Path) -> list[tuple[str, str]]:
    try:
        data = json.loads(decode_text(path.read_bytes(), str(path)))
    except OSError as exc:
        raise UsageError(f"cannot read prompt file {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"prompt file {path} is not valid JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise UsageError(f"prompt file {path}: expected a JSON list of [id, text] pairs")
    items = []
    for index, item in enumerate(data):
        if isinstance(item, str):
            items.append((str(index), item))
        elif isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[1], str):
            items.append((str(item[0]), item[1]))
        else:
            raise UsageError(f"prompt file {path}: item {index} is not an [id, text] pair")
    return items


Messages = list[dict[str, str]]


def load_conversations(path: str | os.PathLike[str] | None, n: int | None) -> list[tuple[str, Messages]]:
    """The first `n` prompts of a [id, text] JSON file (None: all) as (id, chat messages)."""
    items = _read_prompt_file(resolve_prompt_path(path))
    conversations = [(pid, parse_llama2_chat(text)) for pid, text in items]
    conversations = [(pid, messages) for pid, messages in conversations if messages]
    return conversations if n is None else conversations[:n]


def load_prompt_set(path: str | os.PathLike[str] | None, n: int | None) -> list[tuple[str, str]]:
    """The first `n` prompts of a [id, text] JSON file (None: all) as (id, last user message)."""
    return [(pid, messages[-1]["content"]) for pid, messages in load_conversations(path, n)]
