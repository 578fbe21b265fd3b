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
from dataclasses import dataclass, replace
from typing import Any

from specexec_cli.decoding.config import GenerationConfig, SamplingConfig
from specexec_cli.errors import SpecexecError, UsageError
from specexec_cli.prompts import Prompt, encode, parse_messages

MAX_STOPS = 4  # as OpenAI's API
SEED_RANGE = (-(2**63), 2**64)  # what torch.manual_seed takes (negative seeds included, as vLLM's)
# Fields that would change the output and are not supported: refused, never ignored. The value that
# leaves the output unchanged (the API's default, or vLLM's) is accepted.
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
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    # vLLM's sampling extensions (what load generators and eval harnesses send)
    "repetition_penalty": (None, 1, 1.0),
    "min_p": (None, 0, 0.0),
    "typical_p": (None, 1, 1.0),
    "length_penalty": (None, 1, 1.0),
    "use_beam_search": (None, False),
    "early_stopping": (None, False),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True),
    "truncate_prompt_tokens": (None,),
    "prompt_logprobs": (None,),
    "bad_words": (None, []),
    "allowed_token_ids": (None,),
    "logits_processors": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "guided_decoding_backend": (None,),
    "guided_whitespace_pattern": (None,),
    "structured_outputs": (None,),
    "return_tokens_as_token_ids": (None, False),
    "add_generation_prompt": (None, True),
    "continue_final_message": (None, False),
    "add_special_tokens": (None, False),
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "documents": (None,),
    "mm_processor_kwargs": (None,),
}
# Fields that are read (see parse_job), or that describe the request without changing its output.
READ = {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
        "seed", "stop", "stream", "stream_options", "ignore_eos", "min_tokens", "stop_token_ids"}
HARMLESS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "request_id", "priority",
            "safety_identifier", "prompt_cache_key"}


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

    max_tokens: int | None  # the most new tokens a request may ask for (None: the model's context left)
    max_prompt_tokens: int | None  # the longest prompt, in tokens (None: the model's context)
    default_tokens: int | None = None  # new tokens when a request names none (None: the context left)


@dataclass(frozen=True)
class Job:
    """One request, checked: what to decode and how to answer. A completions request may hold several
    prompts (`prompts`: text, or token ids), each decoded as a choice of its own."""

    kind: str  # "chat" or "completion"
    model: str
    messages: tuple[dict[str, str], ...]  # chat: the conversation (encoded with the chat template)
    prompts: tuple[str | tuple[int, ...], ...]  # completion: raw text (no template) or token ids
    max_tokens: int | None  # None: as many as the model's context leaves after the prompt
    sampling: SamplingConfig
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    max_tokens_field: str = "max_tokens"  # how the request named its limit (for messages)

    @property
    def prompt(self) -> str | tuple[int, ...]:
        """The one prompt of a completion with a single prompt."""
        return self.prompts[0] if self.prompts else ""


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
            raise ApiError(400, f"'{name}' is not supported (it would change the output)", name)
    unknown = sorted(set(body) - READ - HARMLESS - set(UNSUPPORTED))
    if unknown:
        raise ApiError(400, f"'{unknown[0]}' is not a field this server reads", unknown[0])


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)


def completion_prompts(value: Any) -> tuple[str | tuple[int, ...], ...]:
    """The prompts of a completions request: a string, a list of token ids, or a list of either (one
    choice per prompt, as the OpenAI API and vLLM take them)."""
    if isinstance(value, str) or _is_token_ids(value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'prompt' must be a string, a list of token ids, or a non-empty list of either",
                       "prompt")
    prompts: list[str | tuple[int, ...]] = []
    for i, item in enumerate(value):
        if isinstance(item, str) and item:
            prompts.append(item)
        elif _is_token_ids(item):
            prompts.append(tuple(item))
        else:
            raise ApiError(400, f"'prompt[{i}]' must be a non-empty string or a non-empty list of token ids "
                           "(integers >= 0)", "prompt")
    return tuple(prompts)


def parse_job(body: Any, kind: str, limits: Limits) -> Job:
    """The Job of a chat (`kind` "chat") or completions ("completion") request body, or an ApiError."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _check_unsupported(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "model")
    messages: tuple[dict[str, str], ...] = ()
    prompts: tuple[str | tuple[int, ...], ...] = ()
    if kind == "chat":
        if "messages" not in body:
            raise ApiError(400, "'messages' is required", "messages")
        try:
            messages = parse_messages(body["messages"], "request")
        except UsageError as exc:
            raise ApiError(400, str(exc).removeprefix("request: "), "messages") from None
    else:
        prompts = completion_prompts(body.get("prompt"))
    max_tokens = _integer(body, "max_completion_tokens")
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = _integer(body, "max_tokens"), "max_tokens"
    if max_tokens is None:
        max_tokens = limits.default_tokens
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"'{name}' must be >= 1, got {max_tokens}", name)
    if max_tokens is not None and limits.max_tokens is not None and max_tokens > limits.max_tokens:
        raise ApiError(400, f"'{name}' must be at most {limits.max_tokens} (the server's --max-tokens), got "
                       f"{max_tokens}", name)
    top_k = _integer(body, "top_k") or 0
    if top_k < -1:
        raise ApiError(400, f"'top_k' must be -1 or 0 (off) or a positive count, got {top_k}", "top_k")
    # OpenAI's defaults: temperature 1, top_p 1; top_k (llama-server, vLLM) 0 or -1 = off
    sampling = SamplingConfig(temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                              top_p=_number(body, "top_p", 1.0, 0.0, 1.0), top_k=max(0, top_k))
    if sampling.top_p == 0.0:
        raise ApiError(400, "'top_p' must be greater than 0", "top_p")
    seed = _integer(body, "seed")
    if seed is not None and not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise ApiError(400, f"'seed' must be a 64-bit integer, got {seed}", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "'ignore_eos' must be true or false", "ignore_eos")
    min_tokens = _integer(body, "min_tokens") or 0
    if min_tokens < 0 or (max_tokens is not None and min_tokens > max_tokens):
        raise ApiError(400, f"'min_tokens' must lie in 0..max_tokens, got {min_tokens}", "min_tokens")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                 for t in stop_ids):
        raise ApiError(400, "'stop_token_ids' must be a list of token ids (integers >= 0)", "stop_token_ids")
    return Job(kind=kind, model=model or "", messages=messages, prompts=prompts, max_tokens=max_tokens,
               sampling=sampling, seed=seed, stop=_stops(body.get("stop")), stream=stream,
               include_usage=bool(options.get("include_usage")) and stream, ignore_eos=ignore_eos,
               min_tokens=min_tokens, stop_token_ids=tuple(stop_ids), max_tokens_field=name)


def with_max_tokens(job: Job, n_prompt_tokens: int, context: int | None) -> Job:
    """The job with its token limit settled: as asked, else what the model's context leaves after the
    prompt (a 400 when the prompt leaves none, or the limit passes the context)."""
    if context and n_prompt_tokens >= context:
        raise ApiError(400, f"the prompt has {n_prompt_tokens} tokens; the model's context is {context}",
                       code="context_length_exceeded")
    if job.max_tokens is None:
        if not context:
            raise ApiError(400, f"'{job.max_tokens_field}' is required: the model's context is unknown",
                           job.max_tokens_field)
        return replace(job, max_tokens=context - n_prompt_tokens)
    if context and n_prompt_tokens + job.max_tokens > context:
        raise ApiError(400, f"the prompt has {n_prompt_tokens} tokens; with {job.max_tokens_field} "
                       f"{job.max_tokens} it exceeds the model's context of {context}",
                       code="context_length_exceeded")
    return job


def job_config(engine: Any, job: Job) -> GenerationConfig:
    """The request's GenerationConfig, checked by the engine as `generate` checks its flags (a bad value
    is a 400); `job.max_tokens` is settled (with_max_tokens)."""
    try:
        config = engine.config(job.max_tokens, job.sampling, job.stop, job.seed)
        config = replace(config, ignore_eos=job.ignore_eos, min_new_tokens=job.min_tokens,
                         stop_token_ids=job.stop_token_ids)
        config.validate()
        return config
    except SpecexecError as exc:
        raise ApiError(400, str(exc).replace("--", "")) from None


def max_token_chars(tokenizer: Any) -> int:
    """The longest piece of text one token stands for: a prompt of C characters has at least
    C / max_token_chars tokens, so a prompt far too long is refused before it is encoded."""
    cached = getattr(tokenizer, "_specexec_max_token_chars", None)
    if cached is None:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        cached = max((len(piece) for piece in vocab), default=0) or 1_000_000
        try:
            tokenizer._specexec_max_token_chars = cached
        except AttributeError:
            pass
    return cached


def check_text_length(tokenizer: Any, job: Job, max_prompt_tokens: int | None, context: int | None) -> None:
    """A 400, before encoding, for a prompt whose characters alone prove it longer than the limit."""
    limit = min(x for x in (max_prompt_tokens, context) if x) if (max_prompt_tokens or context) else None
    if limit is None:
        return
    chars = sum(len(m["content"]) for m in job.messages) + sum(len(p) for p in job.prompts
                                                               if isinstance(p, str))
    if chars > limit * max_token_chars(tokenizer):
        raise ApiError(400, f"the prompt has {chars} characters, more than {limit} tokens can hold",
                       code="context_length_exceeded")


def encode_job(tokenizer: Any, job: Job, index: int = 0) -> list[int]:
    """The token ids of prompt `index`, as `specexec generate` encodes it: messages in the chat template,
    raw text as `--no-chat-template` does, token ids as given (checked against the vocabulary). Text
    that is not valid Unicode, or a conversation the chat template refuses, is a 400."""
    if job.kind == "completion" and isinstance(job.prompts[index], tuple):
        ids = list(job.prompts[index])
        vocab = len(tokenizer)
        if any(t >= vocab for t in ids):
            raise ApiError(400, f"'prompt' holds a token id past the vocabulary ({vocab} ids)", "prompt")
        return ids
    text = job.prompts[index] if job.kind == "completion" else ""
    try:
        return encode(tokenizer, Prompt("request", text, job.messages), None, job.kind == "chat")
    except UsageError as exc:
        raise ApiError(400, str(exc)) from None
    except Exception as exc:  # the chat template refused the conversation (jinja's TemplateError, ...)
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ApiError(400, f"the chat template cannot render these messages: {message}",
                       "messages") from None


def check_prompt_length(n_tokens: int, max_prompt_tokens: int | None = None) -> None:
    """A 400 for an empty prompt, or one over `max_prompt_tokens`."""
    if not n_tokens:
        raise ApiError(400, "the prompt encodes to no tokens")
    if max_prompt_tokens is not None and n_tokens > max_prompt_tokens:
        raise ApiError(400, f"the prompt has {n_tokens} tokens; this server takes at most "
                       f"{max_prompt_tokens} (--max-prompt-tokens)", code="context_length_exceeded")


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


def completion_body(job: Job, response_id: str, model: str, choices: list[tuple[int, str, str]],
                    usage_: dict[str, int], timings_: dict[str, Any]) -> dict[str, Any]:
    """The whole answer: one choice per (index, text, finish reason)."""
    created = int(time.time())
    if job.kind == "chat":
        body_choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": reason} for i, text, reason in choices]
        return {"id": response_id, "object": "chat.completion", "created": created, "model": model,
                "choices": body_choices, "usage": usage_, "timings": timings_}
    body_choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                    for i, text, reason in choices]
    return {"id": response_id, "object": "text_completion", "created": created, "model": model,
            "choices": body_choices, "usage": usage_, "timings": timings_}


def chunk_body(job: Job, response_id: str, model: str, text: str | None, finish_reason: str | None,
               first: bool = False, index: int = 0) -> dict[str, Any]:
    """One server-sent chunk of choice `index`: new text, or (text None) its last chunk with the finish
    reason."""
    created = int(time.time())
    if job.kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}
    choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {"id": response_id, "object": "text_completion", "created": created, "model": model,
            "choices": [choice]}


def usage_chunk(job: Job, response_id: str, model: str, usage_: dict[str, int],
                timings_: dict[str, Any]) -> dict[str, Any]:
    """The chunk `stream_options.include_usage` asks for: no choices, the usage."""
    kind = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
    return {"id": response_id, "object": kind, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage_, "timings": timings_}


def merged_figures(figures: list[tuple[dict[str, int], dict[str, Any]]]) -> tuple[dict[str, int], dict]:
    """The usage of a request of several prompts: their token counts summed; the timings of each."""
    if len(figures) == 1:
        return figures[0]
    prompt = sum(u["prompt_tokens"] for u, _ in figures)
    completion = sum(u["completion_tokens"] for u, _ in figures)
    return usage(prompt, completion), {"choices": [t for _, t in figures]}
