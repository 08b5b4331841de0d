"""`llava-tune serve`: an OpenAI-compatible API over one model (FastAPI + uvicorn).

`POST /v1/chat/completions` (text and image parts, `stream`), `GET /v1/models`, and
`GET /health` (no key needed: for load balancers and scripts waiting for the server).
A request is read and checked in inference/api.py (every refusal an OpenAI-style error),
its prompt built off the event loop, and it waits in the Batcher's queue
(inference/batching.py) for the thread that owns the model. A client that goes away,
streaming or not, has its job cancelled: dropped from the queue, or its row ended.

The log says who asked what size (client address, images, pixels, tokens, time), never
what they asked or the images' bytes. fastapi and uvicorn are imported only here, the
`[serve]` extra: `import llava_tune` never needs them.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, and
# `fastapi.Request` is only a name inside build_app.
import asyncio
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llava_tune.assembly.model import ModelBundle
from llava_tune.errors import UserError
from llava_tune.inference.api import (
    ApiError,
    Completion,
    Limits,
    parse_body,
    prepare,
    read,
    too_large,
)
from llava_tune.inference.batching import Batcher, Delta, Done, Event, Failed, Job, QueueFull
from llava_tune.inference.generate import GenerationSettings
from llava_tune.inference.safety import check_host

INSTALL_HINT = "pip install -e .[serve]"
API_KEY_ENV = "LLAVA_TUNE_API_KEY"
log = logging.getLogger("llava_tune.serve")


def import_server_stack():
    """(fastapi, uvicorn); UserError naming the install when they are missing."""
    try:
        import fastapi
        import uvicorn
    except ImportError as err:
        raise UserError(f"serve needs fastapi and uvicorn, which are not installed: "
                        f"{INSTALL_HINT} (in the llava-tune checkout)") from err
    return fastapi, uvicorn


@dataclass(frozen=True)
class ServeOptions:
    """How the server answers: the model's name, sampling defaults, limits, the key."""

    model_name: str
    defaults: GenerationSettings
    limits: Limits = Limits()
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64


def build_app(bundle: ModelBundle, options: ServeOptions, batcher: Batcher):
    """The FastAPI app over `batcher` (which owns the model)."""
    fastapi, _ = import_server_stack()
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = fastapi.FastAPI(title="llava-tune", docs_url=None, redoc_url=None, openapi_url=None)
    has_vision = bundle.model.vision is not None
    created = int(time.time())

    def refuse(err: ApiError, request) -> JSONResponse:
        log.info("%s %s %s %d %s: %s", _client(request), request.method, request.url.path,
                 err.status, err.code or err.kind, err.message)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(ApiError)
    async def on_api_error(request, err: ApiError):
        return refuse(err, request)

    @app.exception_handler(HTTPException)
    async def on_http_error(request, err: HTTPException):  # unknown path, wrong method
        return refuse(ApiError(err.status_code, f"{request.method} {request.url.path}: "
                               f"{err.detail}; this server answers POST /v1/chat/completions "
                               "and GET /v1/models",
                               code="not_found" if err.status_code == 404 else "bad_method"),
                      request)

    @app.exception_handler(Exception)
    async def on_bug(request, err: Exception):  # logged with its traceback by uvicorn
        return refuse(ApiError(500, f"the server failed on this request ({type(err).__name__}); "
                               "its log has the details", code="internal_error"), request)

    @app.middleware("http")
    async def check_key(request, call_next):
        if options.api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            scheme, _, key = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(),
                                                                      options.api_key.encode()):
                return refuse(ApiError(401, "a valid API key is needed: send the header "
                                       "'Authorization: Bearer KEY' (the key the server was "
                                       "started with)", code="invalid_api_key"), request)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "waiting": batcher.waiting, "running": batcher.running}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": options.model_name, "object": "model",
                                            "created": created, "owned_by": "llava-tune"}]}

    def check(body: bytes) -> Completion:
        """The body read, checked and turned into a prompt (or an ApiError)."""
        completion = read(parse_body(body, options.limits), options.model_name,
                          options.defaults, options.limits, has_vision)
        return prepare(completion, bundle, options.defaults, options.limits)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: fastapi.Request):
        start = time.perf_counter()
        body = await _read_body(request, options.limits)
        # Off the event loop: JSON, base64 and image decoding, tokenizing (other clients'
        # answers stream meanwhile).
        completion = await run_in_threadpool(check, body)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def deliver(event: Event) -> None:  # called from the model's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone: the server stopped
                job.cancel()

        job = Job(completion.prompt, completion.settings, on_event=deliver,
                  stop=completion.stop, seed=completion.seed)
        try:
            batcher.submit(job)
        except QueueFull as err:
            raise ApiError(503, f"the server is busy ({batcher.waiting} requests wait); retry "
                           f"in {err.retry_after} s", code="server_busy",
                           headers={"Retry-After": str(err.retry_after)}) from None
        answer_id = f"chatcmpl-{uuid.uuid4().hex}"
        record = _Record(_client(request), completion, start)
        if completion.stream:
            return StreamingResponse(
                _stream(events, job, answer_id, options.model_name, completion, record),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            event = await _wait(events, request)
        finally:
            job.cancel()  # no-op once answered; a client gone frees its row
        if event is None:
            record.log(499, "client went away")
            return fastapi.Response(status_code=499)
        if isinstance(event, Failed):
            record.log(500, event.message)
            raise ApiError(500, f"the model could not answer: {event.message}",
                           code="generation_failed")
        record.log(200, event.finish_reason, event.completion_tokens)
        return {"id": answer_id, "object": "chat.completion", "created": int(time.time()),
                "model": options.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": event.text},
                             "logprobs": None, "finish_reason": event.finish_reason}],
                "usage": _usage(event)}

    return app


async def _read_body(request, limits: Limits) -> bytes:
    """The body, refused (413) as soon as it passes the limit: a client cannot make the
    server hold more than that in memory."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_large(int(declared), limits)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise too_large(size, limits)
        chunks.append(chunk)
    return b"".join(chunks)


async def _wait(events: asyncio.Queue, request) -> Done | Failed | None:
    """The final event of a non-streamed answer; None when the client went away first."""
    while True:
        try:
            event = await asyncio.wait_for(events.get(), timeout=0.5)
        except asyncio.TimeoutError:  # noqa: UP041  (not the builtin before Python 3.11)
            if await request.is_disconnected():
                return None
            continue
        if isinstance(event, (Done, Failed)):
            return event


async def _stream(events: asyncio.Queue, job: Job, answer_id: str, model: str,
                  completion: Completion, record: "_Record") -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: a role chunk, content chunks, a chunk with
    the finish reason (and usage when asked), then `[DONE]`."""
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        body = {"id": answer_id, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": finish}]}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    finished = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield chunk({"content": event.text})
            elif isinstance(event, Done):
                yield chunk({}, event.finish_reason)
                if completion.include_usage:
                    body = {"id": answer_id, "object": "chat.completion.chunk",
                            "created": created, "model": model, "choices": [],
                            "usage": _usage(event)}
                    yield f"data: {json.dumps(body)}\n\n"
                record.log(200, event.finish_reason, event.completion_tokens)
                break
            else:
                error = ApiError(500, f"the model could not answer: {event.message}",
                                 code="generation_failed")
                record.log(500, event.message)
                yield f"data: {json.dumps(error.body())}\n\n"
                break
        yield "data: [DONE]\n\n"
        finished = True
    finally:
        job.cancel()  # the client went away mid-stream: its row ends at the next token
        if not finished:
            record.log(499, "client went away mid-stream")


def _usage(done: Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _client(request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "-"


class _Record:
    """The log line of one answered request: sizes and times, never the content."""

    def __init__(self, client: str, completion: Completion, start: float) -> None:
        self.client, self.completion, self.start = client, completion, start

    def log(self, status: int, outcome: str, completion_tokens: int = 0) -> None:
        c = self.completion
        log.info("%s POST /v1/chat/completions %d %s stream=%s images=%d pixels=%d "
                 "prompt_tokens=%d completion_tokens=%d %.2fs", self.client, status, outcome,
                 c.stream, len(c.images), c.pixels, len(c.prompt.ids), completion_tokens,
                 time.perf_counter() - self.start)


class ApiServer:
    """The app on host:port in a background thread: `start()`, then `.url`; `close()`
    stops it (the running batch ends first). The CLI blocks on `wait()`."""

    def __init__(self, bundle: ModelBundle, options: ServeOptions, host: str = "127.0.0.1",
                 port: int = 8000, listen_public: bool = False) -> None:
        check_host(host, listen_public)
        _, uvicorn = import_server_stack()
        self.batcher = Batcher(bundle, options.max_batch, options.max_queue)
        app = build_app(bundle, options, self.batcher)
        self.host = host
        self._socket = _bind(host, port)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._socket]},
                                        name="llava-tune-api", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "ApiServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise UserError(f"the API server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop_soon(self) -> None:
        """Ask the server to stop (safe from a signal handler); `wait` then returns."""
        self._server.should_exit = True

    def wait(self) -> None:
        """Until Ctrl-C, stop_soon or close."""
        try:
            while self._thread.is_alive():
                self._thread.join(timeout=0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.close()

    def close(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.batcher.close()
        self._socket.close()


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model's thread starts: a port in use is a
    UserError now, not a log line from uvicorn's thread."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP; with
    # proto 0 each small response waited out the client's delayed ACK (42 ms a request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}: in use by another "
                        "program, or not an address of this machine); pick another with "
                        "--port or --host") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
