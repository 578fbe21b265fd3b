"""The OpenAI API's request and response bodies, as plain dicts: parse a request into a `Job` (checked:
a bad or unsupported field is an `ApiError`, a 4xx with an OpenAI-style error body) and build responses
and stream chunks. No tensors and no HTTP here: the routes (serve/app.py) move bytes, the scheduler
(serve/scheduler.py) decodes.

Sampling and limits are checked by the same `GenerationConfig.validate` as `specexec generate`
(decoding/config.py), so the server and the CLI accept and refuse the same values.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from specexec_cli.decoding.config import GenerationConfig, SamplingConfig
from specexec_cli.errors import SpecexecError, UsageError
from specexec_cli.prompts import Prompt, encode, parse_messages

MAX_STOPS = 4  # as OpenAI's API
# Fields that would change the output and are not supported: refused, never ignored. The value that
# leaves the output unchanged (the API's default) is accepted.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (1, None),
    "best_of": (1, None),
    "logprobs": (False, None, 0),
    "top_logprobs": (0, None),
    "echo": (False, None),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
}


class ApiError(Exception):
    """A request the server answers with `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What the server admits per request."""

    max_tokens: int  # the most new tokens a request may ask for
    max_prompt_tokens: int  # the longest prompt, in tokens
    default_tokens: int | None = None  # new tokens when a request names none (None: max_tokens)


@dataclass(frozen=True)
class Job:
    """One request, checked: what to decode and how to answer."""

    kind: str  # "chat" or "completion"
    model: str
    messages: tuple[dict[str, str], ...]  # chat: the conversation (encoded with the chat template)
    prompt: str  # completion: raw text, no template (as `generate --no-chat-template`)
    max_tokens: int
    sampling: SamplingConfig
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a finite number, got {value!r}", name)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low:g} and {high:g}, got {value!r}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer, got {value!r}", name)
    return value


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"'stop' holds at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    if any(s == "" for s in stops):
        raise ApiError(400, "'stop' strings must not be empty", "stop")
    return tuple(stops)


def _check_unsupported(body: dict[str, Any]) -> None:
    for name, harmless in UNSUPPORTED.items():
        if name in body and body[name] not in harmless:
            raise ApiError(400, f"'{name}' is not supported (it would change the output)",
                           name)


def parse_job(body: Any, kind: str, limits: Limits) -> Job:
    """The Job of a chat (`kind` "chat") or completions ("completion") request body, or an ApiError."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _check_unsupported(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "model")
    messages: tuple[dict[str, str], ...] = ()
    prompt = ""
    if kind == "chat":
        if "messages" not in body:
            raise ApiError(400, "'messages' is required", "messages")
        try:
            messages = parse_messages(body["messages"], "request")
        except UsageError as exc:
            raise ApiError(400, str(exc).removeprefix("request: "), "messages") from None
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string (one prompt per request)", "prompt")
        if not prompt:
            raise ApiError(400, "'prompt' must not be empty", "prompt")
    max_tokens = _integer(body, "max_completion_tokens")
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = _integer(body, "max_tokens"), "max_tokens"
    if max_tokens is None:
        max_tokens = limits.default_tokens or limits.max_tokens
    if not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(400, f"'{name}' must be between 1 and {limits.max_tokens} (the server's "
                       f"--max-tokens), got {max_tokens}", name)
    # OpenAI's defaults: temperature 1, top_p 1; top_k (llama-server, vLLM) 0 = off
    sampling = SamplingConfig(temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                              top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
                              top_k=_integer(body, "top_k") or 0)
    if sampling.top_p == 0.0:
        raise ApiError(400, "'top_p' must be greater than 0", "top_p")
    seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed < 2**63:
        raise ApiError(400, f"'seed' must be between 0 and 2**63 - 1, got {seed}", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    return Job(kind=kind, model=model or "", messages=messages, prompt=prompt, max_tokens=max_tokens,
               sampling=sampling, seed=seed, stop=_stops(body.get("stop")), stream=stream,
               include_usage=bool(options.get("include_usage")) and stream)


def job_config(engine: Any, job: Job) -> GenerationConfig:
    """The request's GenerationConfig, checked by the engine as `generate` checks its flags (a bad value
    is a 400)."""
    try:
        return engine.config(job.max_tokens, job.sampling, job.stop, job.seed)
    except SpecexecError as exc:
        raise ApiError(400, str(exc).replace("--", "")) from None


def encode_job(tokenizer: Any, job: Job) -> list[int]:
    """The prompt's token ids, as `specexec generate` encodes it: messages in the chat template, a raw
    prompt as `--no-chat-template` does; text that is not valid Unicode is a 400."""
    try:
        return encode(tokenizer, Prompt("request", job.prompt, job.messages), None, job.kind == "chat")
    except UsageError as exc:
        raise ApiError(400, str(exc)) from None


def check_prompt_length(n_tokens: int, job: Job, context: int | None, max_prompt_tokens: int | None = None,
                        ) -> None:
    """A 400 for an empty prompt, one over `max_prompt_tokens`, or one that with its max_tokens passes the
    model's `context`."""
    if not n_tokens:
        raise ApiError(400, "the prompt encodes to no tokens")
    if max_prompt_tokens is not None and n_tokens > max_prompt_tokens:
        raise ApiError(400, f"the prompt has {n_tokens} tokens; this server takes at most "
                       f"{max_prompt_tokens} (--max-prompt-tokens)", code="context_length_exceeded")
    if context and n_tokens + job.max_tokens > context:
        raise ApiError(400, f"the prompt has {n_tokens} tokens; with max_tokens {job.max_tokens} it exceeds "
                       f"the model's context of {context}", code="context_length_exceeded")


# --- the Batch API (offline requests, as `vllm run-batch` takes them) --------------------------------

BATCH_URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


def batch_kind(record: dict[str, Any]) -> str:
    """"chat" or "completion" for a Batch API line {"custom_id", "method", "url", "body"}; ApiError if its
    method or url is not one this tool runs."""
    if record.get("method", "POST") != "POST":
        raise ApiError(400, f"method {record.get('method')!r}: only POST requests run", "method")
    url = record.get("url")
    if url not in BATCH_URLS:
        raise ApiError(400, f"url {url!r}: use one of {', '.join(BATCH_URLS)}", "url")
    return BATCH_URLS[url]


def batch_output(custom_id: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """One line of the Batch API's output file: the response's status and body (an error body for a
    request that failed, as the HTTP API would have answered it)."""
    return {"id": "batch_req_" + uuid.uuid4().hex[:24], "custom_id": custom_id,
            "response": {"status_code": status, "request_id": uuid.uuid4().hex[:24], "body": body},
            "error": None}


# --- responses ---------------------------------------------------------------------------------------


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def result_figures(result: Any, prompt_tokens: int, first_token_s: float | None = None,
                   ) -> tuple[dict[str, int], dict[str, Any]]:
    """`usage` and `timings` of a finished GenerationResult: the token counts, and the speculative
    figures in an extra object as llama-server's `timings`."""
    generated, seconds = result.n_new_tokens, result.elapsed_s
    target_passes, draft_passes = result.stats.target_passes, result.stats.draft_passes
    timings = {"prompt_n": prompt_tokens, "predicted_n": generated, "target_passes": target_passes,
               "draft_passes": draft_passes,
               "tokens_per_target_pass": round(generated / target_passes, 4) if target_passes else None,
               "predicted_ms": round(1000 * seconds, 3),
               "predicted_per_second": round(generated / seconds, 4) if seconds > 0 else None,
               "time_to_first_token_ms": None if first_token_s is None else round(1000 * first_token_s, 3)}
    return usage(prompt_tokens, generated), timings


def completion_body(job: Job, response_id: str, model: str, text: str, finish_reason: str,
                    usage_: dict[str, int], timings_: dict[str, Any]) -> dict[str, Any]:
    created = int(time.time())
    if job.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        return {"id": response_id, "object": "chat.completion", "created": created, "model": model,
                "choices": [choice], "usage": usage_, "timings": timings_}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"id": response_id, "object": "text_completion", "created": created, "model": model,
            "choices": [choice], "usage": usage_, "timings": timings_}


def chunk_body(job: Job, response_id: str, model: str, text: str | None, finish_reason: str | None,
               first: bool = False) -> dict[str, Any]:
    """One server-sent chunk: new text, or (text None) the last chunk with the finish reason."""
    created = int(time.time())
    if job.kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}
    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {"id": response_id, "object": "text_completion", "created": created, "model": model,
            "choices": [choice]}


def usage_chunk(job: Job, response_id: str, model: str, usage_: dict[str, int],
                timings_: dict[str, Any]) -> dict[str, Any]:
    """The chunk `stream_options.include_usage` asks for: no choices, the usage."""
    kind = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
    return {"id": response_id, "object": kind, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage_, "timings": timings_}
