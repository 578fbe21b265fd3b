"""The HTTP layer of `specexec serve`: OpenAI-compatible routes (Starlette), served by uvicorn.

Routes: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (JSON, or server-sent
chunks ending with `data: [DONE]` when `stream` is true), `GET /health`, `GET /metrics`. A request
becomes a `Job` (serve/protocol.py), its prompt token ids and its GenerationConfig, and goes to the
engine thread (serve/scheduler.py) as one lane of the shared batch. Errors are OpenAI-style JSON bodies
with a 4xx or 5xx status and a one-line message; no traceback ever reaches a client.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from specexec_cli.errors import SpecexecError
from specexec_cli.serve import protocol
from specexec_cli.serve.metrics import Metrics
from specexec_cli.serve.protocol import ApiError, Job, Limits
from specexec_cli.serve.scheduler import Event, Overloaded, Scheduler, ShuttingDown, Ticket

MAX_BODY_BYTES = 4 * 1024 * 1024  # a larger request body is answered 413
RETRY_AFTER_S = 5  # told to clients turned away with 503
DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there
START = int(time.time())  # the served model's `created` in /v1/models


@dataclass(frozen=True)
class ServeOptions:
    """The server's own settings (the engine's come from `EngineRequest`)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_tokens: int | None = None  # a cap on a request's new tokens; None: the model's context left
    max_prompt_tokens: int = 4096
    model_name: str = "specexec"
    shutdown_timeout: float = 30.0
    allowed_origins: tuple[str, ...] = ()  # browser origins CORS lets in ("*": any)


def log(message: str) -> None:
    print(f"specexec serve: {message}", file=sys.stderr, flush=True)


class Service:
    """What the routes share: the tokenizer (behind a lock: the engine thread decodes with it too), the
    scheduler, the metrics and the limits."""

    def __init__(self, engine: Any, options: ServeOptions) -> None:
        self.engine, self.options = engine, options
        self.tokenizer = engine.pair.tokenizer
        self.tokenizer_lock = threading.Lock()
        self.metrics = Metrics(options.model_name)
        self.limits = Limits(options.max_tokens, options.max_prompt_tokens)
        self.context = getattr(engine.pair.target.config, "max_position_embeddings", None)
        self.scheduler = Scheduler(engine.pair.target, engine.pair.draft, engine.config(1), self.decode,
                                   options.max_batch, options.max_queue, self.metrics, log)
        self.draining = False

    def decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def encode(self, job: Job, index: int = 0) -> list[int]:
        with self.tokenizer_lock:
            return protocol.encode_job(self.tokenizer, job, index)


# --- helpers -----------------------------------------------------------------------------------------


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def check_auth(service: Service, request: Request) -> None:
    key = service.options.api_key
    if not key:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                       kind="authentication_error", code="invalid_api_key")


async def read_json(request: Request) -> Any:
    """The body as JSON, at most MAX_BODY_BYTES (413 past it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


# --- routes ------------------------------------------------------------------------------------------


def make_app(service: Service) -> Starlette:
    """The Starlette app; its lifespan starts the engine thread and, at shutdown, ends it."""

    def counted(endpoint: str, handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def wrapper(request: Request) -> Response:
            try:
                response = await handler(request)
            except ApiError as error:
                response = error_response(error)
            except ClientDisconnect:
                response = Response(status_code=499)
            except Exception as exc:  # noqa: BLE001 - one line to the client, never a traceback
                log(f"{endpoint}: unexpected {type(exc).__name__}: {exc}")
                response = error_response(ApiError(500, f"internal error: {type(exc).__name__}",
                                                   kind="server_error"))
            service.metrics.request(endpoint, response.status_code)
            return response

        return wrapper

    async def health(_request: Request) -> Response:
        if not service.scheduler.alive:
            return JSONResponse({"status": "engine stopped", "error": service.scheduler.failure},
                                status_code=503)
        if service.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(_request: Request) -> Response:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(request: Request) -> Response:
        check_auth(service, request)
        model = {"id": service.options.model_name, "object": "model", "created": START,
                 "owned_by": "specexec"}
        return JSONResponse({"object": "list", "data": [model]})

    async def chat(request: Request) -> Response:
        return await complete(request, "chat")

    async def completions(request: Request) -> Response:
        return await complete(request, "completion")

    async def complete(request: Request, kind: str) -> Response:
        check_auth(service, request)
        job = protocol.parse_job(await read_json(request), kind, service.limits)
        if job.model and job.model != service.options.model_name:
            raise ApiError(404, f"the model '{job.model}' does not exist; this server serves "
                           f"'{service.options.model_name}'", "model", code="model_not_found")
        protocol.check_text_length(service.tokenizer, job, service.limits.max_prompt_tokens, service.context)
        n_choices = len(job.prompts) if kind == "completion" else 1
        lanes = []  # (index, job with its limit settled, prompt ids)
        for index in range(n_choices):
            ids = await asyncio.to_thread(service.encode, job, index)
            protocol.check_prompt_length(len(ids), service.limits.max_prompt_tokens)
            settled = protocol.with_max_tokens(job, len(ids), service.context)
            lanes.append((index, settled, ids, protocol.job_config(service.engine, settled)))
        tickets = []
        try:
            for _, _, ids, config in lanes:
                ticket = Ticket(asyncio.get_running_loop())
                service.scheduler.submit(torch.tensor(ids), config, ticket)
                tickets.append(ticket)
        except Overloaded:
            cancel_all(tickets)
            raise ApiError(503, "the server is busy: too many requests waiting; retry later",
                           kind="server_error", code="overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ShuttingDown as stopped:
            cancel_all(tickets)
            raise ApiError(503, str(stopped) or "the server is shutting down", kind="server_error",
                           code="shutting_down", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        response_id = protocol.new_id(kind)
        prompt_tokens = [len(ids) for _, _, ids, _ in lanes]
        if job.stream:
            return StreamingResponse(stream(job, tickets, response_id, prompt_tokens),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            results = [await collect(request, ticket) for ticket in tickets]
        finally:
            cancel_all(tickets)  # a no-op once finished; frees the lanes if the client went away
        choices = [(i, text, result.finish_reason) for i, (text, result) in enumerate(results)]
        usage_, timings_ = protocol.merged_figures(
            [summary(result, n, ticket) for (_, result), n, ticket in zip(results, prompt_tokens, tickets,
                                                                        strict=True)])
        return JSONResponse(protocol.completion_body(job, response_id, service.options.model_name, choices,
                                                     usage_, timings_))

    def cancel_all(tickets: list[Ticket]) -> None:
        for ticket in tickets:
            ticket.cancel()

    async def next_event(ticket: Ticket, request: Request | None = None) -> Event:
        """The ticket's next event. Every DISCONNECT_POLL_S of waiting it checks that the engine thread
        is alive (if not: an error event at once, no request waits on a dead engine) and, given the
        `request`, that its client is still there."""
        while True:
            try:
                return await asyncio.wait_for(ticket.events.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                if not service.scheduler.alive:
                    return Event("error", text=f"the engine stopped: {service.scheduler.failure}")
                if request is not None and await request.is_disconnected():
                    raise ClientDisconnect from None

    async def collect(request: Request, ticket: Ticket) -> tuple[str, Any]:
        """Wait for the result, checking that the client is still there."""
        while True:
            event = await next_event(ticket, request)
            if event.kind == "done":
                return event.result.text or "", event.result
            if event.kind == "error":
                raise ApiError(503 if "shutting down" in event.text else 500, event.text, kind="server_error")

    async def stream(job: Job, tickets: list[Ticket], response_id: str,
                     prompt_tokens: list[int]) -> AsyncIterator[bytes]:
        """The choices' chunks as they come (each with its index), then the usage and [DONE]."""
        model = service.options.model_name
        merged: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        async def forward(index: int, ticket: Ticket) -> None:
            while True:
                event = await next_event(ticket)
                await merged.put((index, event))
                if event.kind != "text":
                    return

        tasks = [asyncio.create_task(forward(i, t)) for i, t in enumerate(tickets)]
        first = [True] * len(tickets)
        figures: dict[int, tuple[dict, dict]] = {}
        try:
            open_choices = len(tickets)
            while open_choices:
                index, event = await merged.get()
                if event.kind == "text":
                    yield sse(protocol.chunk_body(job, response_id, model, event.text, None, first[index],
                                                  index))
                    first[index] = False
                    continue
                open_choices -= 1
                if event.kind == "error":
                    yield sse(ApiError(500, event.text, kind="server_error").body())
                    break
                result = event.result
                if first[index] and job.kind == "chat":  # an empty answer still opens the assistant turn
                    yield sse(protocol.chunk_body(job, response_id, model, "", None, True, index))
                yield sse(protocol.chunk_body(job, response_id, model, None, result.finish_reason,
                                              index=index))
                figures[index] = summary(result, prompt_tokens[index], tickets[index])
            else:
                if job.include_usage:
                    usage_, timings_ = protocol.merged_figures([figures[i] for i in sorted(figures)])
                    yield sse(protocol.usage_chunk(job, response_id, model, usage_, timings_))
            yield sse("[DONE]")
        finally:
            for task in tasks:
                task.cancel()
            cancel_all(tickets)  # the client went away (the generator was closed) or the answer is complete

    def summary(result: Any, prompt_tokens: int, ticket: Ticket) -> tuple[dict, dict]:
        return protocol.result_figures(result, prompt_tokens, ticket.first_token_s)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                         kind="invalid_request_error")
        service.metrics.request("other", exc.status_code)
        return error_response(error)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        service.scheduler.start()
        yield
        service.scheduler.close()

    routes = [
        Route("/health", counted("health", health), methods=["GET"]),
        Route("/metrics", counted("metrics", metrics), methods=["GET"]),
        Route("/v1/models", counted("models", models), methods=["GET"]),
        Route("/v1/chat/completions", counted("chat", chat), methods=["POST"]),
        Route("/v1/completions", counted("completions", completions), methods=["POST"]),
    ]
    middleware = []
    if service.options.allowed_origins:
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(Middleware(CORSMiddleware, allow_origins=list(service.options.allowed_origins),
                                     allow_methods=["GET", "POST", "OPTIONS"],
                                     allow_headers=["Authorization", "Content-Type"]))
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found}, lifespan=lifespan,
                     middleware=middleware)


# --- running -----------------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, opened before the models load so that a taken port fails at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        raise SpecexecError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or address to listen on) is this machine only."""
    import ipaddress

    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)
        except (OSError, ValueError):
            return False


def serve(engine: Any, options: ServeOptions, sock: socket.socket) -> int:
    """Serve on `sock` until SIGTERM or SIGINT: then stop admitting (new requests get 503), let what is
    in flight finish for up to `shutdown_timeout` seconds, cancel the rest, and return 0."""
    import uvicorn

    service = Service(engine, options)
    app = make_app(service)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning",
                            timeout_graceful_shutdown=options.shutdown_timeout, lifespan="on")

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                log(f"{signal.Signals(sig).name}: no new requests; finishing {service.scheduler.busy} in "
                    f"flight (at most {options.shutdown_timeout:g} s)")
                service.draining = True
                service.scheduler.stop_admitting()
            super().handle_exit(sig, frame)

        @contextmanager
        def capture_signals(self):  # uvicorn's re-raises the signal after shutdown: we exit 0 instead
            handlers = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)

    server = Server(config)
    host, port = sock.getsockname()[:2]
    if not options.api_key and not is_loopback(options.host):
        log(f"warning: listening on {options.host} with no --api-key: anyone who reaches this machine can "
            "use the model (set --api-key or SPECEXEC_API_KEY)")
    log(f"serving {options.model_name} on http://{host}:{port}/v1 "
        f"(up to {options.max_batch} requests per target pass, {options.max_queue} waiting)")
    server.run(sockets=[sock])
    log("stopped")
    return 0
