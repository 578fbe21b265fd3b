"""Read prompts from flags, a file or stdin (plain text or JSON Lines) and apply chat templates.

JSON Lines hold one object per line: `{"id": ..., "prompt": "..."}` (a user turn), or a chat
`{"id": ..., "messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`, encoded
with the model's chat template ready for the assistant's turn.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from specexec_cli.errors import UsageError

ROLES = ("system", "user", "assistant")
# OpenAI's newer name for the system turn: read as one (every chat template knows "system")
ROLE_ALIASES = {"developer": "system"}
# per-message fields besides role and content: refused unless at their neutral value, never ignored
MESSAGE_FIELDS_NEUTRAL = {"name": (None, ""), "tool_calls": (None, []), "refusal": (None,),
                          "function_call": (None,), "audio": (None,)}

@dataclass(frozen=True)
class Prompt:
    """One prompt of a batch; `id` comes from JSON Lines input or is its 1-based position. A chat line
    carries its `messages`; `text` is then its last user message (for logs and text-only uses)."""

    id: str
    text: str
    messages: tuple[dict[str, str], ...] = ()
    request: dict[str, Any] | None = None  # an OpenAI Batch API line: {"custom_id", "url", "body", ...}


def message_content(content: Any, where: str) -> str:
    """A message's text: a string, or the OpenAI list of content parts whose text parts are joined with
    newlines (as vLLM joins them); any other part (an image, audio, a file) is refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise UsageError(f"{where}.content must be a string or a list of content parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "text":
            raise UsageError(f'{where}.content[{j}]: a text part needs a "text" string')
        else:
            raise UsageError(f"{where}.content[{j}]: content parts of type {kind!r} are not supported; "
                             "this server reads text only")
    return "\n".join(texts)


def parse_messages(value: Any, where: str) -> tuple[dict[str, str], ...]:
    """A chat's messages, checked: a non-empty list of {"role", "content"} with a known role ("developer"
    is read as "system") and at least one user turn. Content is a string or a list of text parts; an
    assistant turn may have no content (null). A field that would change the prompt and is not
    supported (a name, tool calls) is refused."""
    if not isinstance(value, list) or not value:
        raise UsageError(f'{where}: "messages" must be a non-empty list')
    messages = []
    for i, message in enumerate(value):
        at = f"{where}: messages[{i}]"
        if not isinstance(message, dict):
            raise UsageError(f"{at} must be an object with a role and a content")
        role = ROLE_ALIASES.get(message.get("role"), message.get("role"))
        if role not in ROLES:
            known = ", ".join([*ROLES, *ROLE_ALIASES])
            raise UsageError(f"{at} has role {message.get('role')!r}; use one of {known}")
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        elif content is None:
            raise UsageError(f'{at} needs a "content" (a string or a list of text parts)')
        for name, neutral in MESSAGE_FIELDS_NEUTRAL.items():
            if name in message and message[name] not in neutral:
                raise UsageError(f"{at}.{name} is not supported (it would change the prompt)")
        unknown = sorted(set(message) - {"role", "content", *MESSAGE_FIELDS_NEUTRAL})
        if unknown:
            raise UsageError(f"{at}.{unknown[0]} is not a message field this server reads")
        messages.append({"role": role, "content": message_content(content, at)})
    if not any(m["role"] == "user" for m in messages):
        raise UsageError(f"{where}: the messages hold no user turn")
    return tuple(messages)


def parse_jsonl(lines: list[str], source: str) -> list[Prompt]:
    """JSON Lines with an object per line holding `prompt` or `messages` (and optionally `id`); blank
    lines skipped."""
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{source}:{number}: not valid JSON ({exc.msg})") from None
        where = f"{source}:{number}"
        if isinstance(record, dict) and "custom_id" in record and "body" in record:
            prompts.append(Prompt(str(record["custom_id"]), "", (), record))  # checked by run.batch_requests
            continue
        prompt_id = str(record.get("id", len(prompts) + 1)) if isinstance(record, dict) else ""
        if isinstance(record, dict) and "messages" in record:
            messages = parse_messages(record["messages"], where)
            last_user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
            prompts.append(Prompt(prompt_id, last_user, messages))
            continue
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UsageError(f'{where}: expected an object with a "prompt" string or a "messages" list')
        prompts.append(Prompt(prompt_id, record["prompt"]))
    if not prompts:
        raise UsageError(f"{source}: no prompts")
    if 0 < sum(p.request is not None for p in prompts) < len(prompts):
        raise UsageError(f"{source}: mixes OpenAI Batch API lines with prompt lines; use one kind per run")
    return prompts


def looks_like_jsonl(text: str) -> bool:
    """True when the first non-blank line is a JSON object with a "prompt" or "messages" field."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    if not first.lstrip().startswith("{"):
        return False
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return True  # meant as JSON Lines but broken: let the parser report the line
    return isinstance(record, dict) and ("prompt" in record or "messages" in record)


BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def decode_text(data: bytes, source: str) -> str:
    """Bytes of a prompt file or stdin as text: UTF-8 (a BOM is dropped) or UTF-16 with a BOM;
    anything else is a UsageError naming the first bad byte."""
    encoding = next((name for bom, name in BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        bad = data[exc.start:exc.start + 1].hex()
        raise UsageError(f"{source}: not UTF-8 text (byte 0x{bad} at offset {exc.start}); "
                         "save it as UTF-8") from None


def read_stream(stream: TextIO, source: str = "<stdin>") -> str:
    """All of a text stream, decoded by `decode_text` from its bytes when it has a binary buffer."""
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        return decode_text(buffer.read(), source)
    text = stream.read()
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError(f"{source}: not UTF-8 text (at character {exc.start})") from None
    return text


def parse_text(text: str, source: str, input_format: str) -> list[Prompt]:
    """A whole file or stdin: one plain-text prompt, or JSON Lines (by format or by detection)."""
    if input_format == "jsonl" or (input_format == "auto" and looks_like_jsonl(text)):
        return parse_jsonl(text.splitlines(), source)
    if not text.strip():
        raise UsageError(f"{source}: empty prompt")
    return [Prompt("1", text.rstrip("\r\n"))]


def collect_prompts(flag_prompts: tuple[str, ...], files: tuple[str, ...], stdin: TextIO,
                    input_format: str = "auto") -> list[Prompt]:
    """Prompts from --prompt flags (`-` reads stdin), then --file files; stdin when neither is given."""
    prompts: list[Prompt] = []
    for text in flag_prompts:
        if text == "-":
            prompts += parse_text(read_stream(stdin), "<stdin>", input_format)
        else:
            prompts.append(Prompt(str(len(prompts) + 1), check_text(text, "--prompt")))
    for name in files:
        if name == "-":
            prompts += parse_text(read_stream(stdin), "<stdin>", input_format)
            continue
        path = Path(name)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read prompt file {name}: {exc.strerror or exc}") from None
        text = decode_text(data, name)
        fmt = "jsonl" if input_format == "auto" and path.suffix in (".jsonl", ".ndjson") else input_format
        prompts += parse_text(text, name, fmt)
    if not flag_prompts and not files:
        if stdin.isatty():
            raise UsageError("no prompt: pass --prompt TEXT, --file FILE, or pipe text on stdin")
        prompts = parse_text(read_stream(stdin), "<stdin>", input_format)
    return prompts


def encode_messages(tokenizer: Any, messages: list[dict[str, str]], chat_template: bool = True) -> list[int]:
    """Token ids of a conversation in the tokenizer's chat template, ready for the assistant's turn;
    without a template (or with chat_template False) the contents joined by blank lines."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"]


def check_text(text: str, what: str) -> str:
    """`text` unchanged when it is valid Unicode; a command-line argument that was not UTF-8 arrives
    with lone surrogates (Python's surrogateescape), which tokenizers reject: a UsageError instead."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError(f"{what} is not UTF-8 text (at character {exc.start})") from None
    return text


def encode_prompt(tokenizer: Any, text: str, system: str | None, chat_template: bool) -> list[int]:
    """Token ids for one prompt, wrapped in the tokenizer's chat template when it has one."""
    check_text(text, "the prompt")
    if system:
        check_text(system, "--system")
    system_turn = [{"role": "system", "content": system}] if system else []
    return encode_messages(tokenizer, [*system_turn, {"role": "user", "content": text}], chat_template)


def encode(tokenizer: Any, prompt: Prompt, system: str | None, chat_template: bool) -> list[int]:
    """Token ids for a prompt of a batch: a chat line's messages in the chat template (`system` is
    prepended unless the chat has a system turn), else `encode_prompt` of its text."""
    if not prompt.messages:
        return encode_prompt(tokenizer, prompt.text, system, chat_template)
    for message in prompt.messages:
        check_text(message["content"], f"prompt {prompt.id}")
    system_turn = []
    if system and not any(m["role"] == "system" for m in prompt.messages):
        system_turn = [{"role": "system", "content": check_text(system, "--system")}]
    return encode_messages(tokenizer, [*system_turn, *prompt.messages], chat_template)
