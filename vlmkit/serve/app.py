"""The HTTP side of the server: a FastAPI app speaking OpenAI's chat-completions API, plus the chat page.

Routes: `POST /v1/chat/completions` (plain or streamed as Server-Sent Events), `GET /v1/models`,
`GET /health`, `GET /` (the web chat page, one static HTML file). Every refusal is an OpenAI-style error
body `{"error": {"message", "type", "param", "code"}}` with a 4xx status; a model failure is a 500 with a
message and the server keeps serving. Image decoding and prompt rendering run in worker threads and
generation in the engine's thread, so the event loop only moves bytes.
"""

import asyncio
import hmac
import ipaddress
import json
import logging
import re
import time
from contextlib import asynccontextmanager
from importlib import resources
from urllib.parse import urlsplit

import uvicorn
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request

from vlmkit.serve.engine import Engine, context_length, prepare
from vlmkit.serve.protocol import (
    ApiError,
    ServerOptions,
    ServeSettings,
    chunk_body,
    completion_body,
    completion_id,
    error_body,
    parse_chat_request,
    usage_body,
)

log = logging.getLogger("vlmkit.serve")


def page_html() -> str:
    return resources.files("vlmkit.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def model_card(model, name: str, settings: ServeSettings, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "vlmkit",
            "vlmkit": {"preset": model.config.name, "template": model.config.template,
                       "answer_prompt": model.config.answer_prompt, "context_length": context_length(model),
                       "image_tokens": model.num_image_tokens, "max_images": settings.max_images,
                       "max_tokens": settings.max_tokens}}


async def read_body(request, limit: int, timeout: float = 30.0) -> bytes:
    """The whole body within `timeout` seconds and `limit` bytes, or ApiError (408, 413, 400)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared):,} bytes, more than this server's limit of "
                            f"{limit:,} (--max-body-bytes)", code="body_too_large")

    chunks, size = [], 0

    async def receive():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is more than this server's limit of {limit:,} bytes "
                                    "(--max-body-bytes)", code="body_too_large")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive(), timeout)
    except ClientDisconnect:  # an ordinary refusal (and its place in the queue freed), not a server error
        raise ApiError(400, "the client went away before sending the whole body", code="client_disconnected") \
            from None
    except asyncio.TimeoutError:  # a client trickling its body does not keep its place in the queue
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s ({size:,} bytes came; the "
                            "server's --body-timeout)", code="body_timeout") from None
    return b"".join(chunks)


MAX_JSON_DEPTH = 32  # an OpenAI chat request nests 6 deep; deeper bodies are refused before they are parsed


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # unrolled: runs of plain bytes at C speed
_JSON_BRACKETS = re.compile(rb"[\[\]{}]")


def _json_depth_exceeded(raw: bytes, limit: int) -> bool:
    """Whether brackets outside strings nest deeper than `limit`: the strings (base64 images: megabytes) are
    skipped by a regular expression, and only the brackets are walked, without recursion."""
    depth = 0
    for bracket in _JSON_BRACKETS.findall(_JSON_STRING.sub(b"", raw)):
        depth += 1 if bracket in (b"[", b"{") else -1
        if depth > limit:
            return True
    return False


def _parse_and_prepare(raw: bytes, model, model_name: str, settings: ServeSettings):
    """Body bytes -> a Job, or ApiError. Runs in a worker thread: JSON, base64 and images are CPU work."""
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _json_depth_exceeded(raw, MAX_JSON_DEPTH):
        raise ApiError(400, f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except ApiError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    chat = parse_chat_request(body, settings, model_name)
    return chat, prepare(model, chat, settings)


def _no_constant(name: str):
    raise ApiError(400, f"the request body is not valid JSON: {name} is not a JSON number", code="invalid_json")


def _host_refusal(request, settings: ServeSettings) -> str | None:
    """Why a request that carries no API key may not be served (None: it may). A web page the user visits can
    send requests to a local server: under a name that resolves to this machine (DNS rebinding: its Host is that
    name) or from its own origin (its Origin header). Neither reaches a server without an API key."""
    host = request.headers.get("host", "")
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").lower()
    if not _ip_or_local(name) and name not in settings.allowed_hosts:
        return (f"the Host header names {name!r}; without an API key this server answers requests addressed to "
                "an IP address or localhost (or a name given with --allowed-host)")
    origin = request.headers.get("origin")
    if origin is not None:
        try:
            parts = urlsplit(origin)
            same = parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()
        except ValueError:
            same = False
        if not same:
            return (f"requests from the web page at {origin!r} are refused: without an API key this server "
                    "answers its own page and programs that send no Origin")
    return None


def _refusal(request, settings: ServeSettings, api_key: str | None):
    """The response refusing a request before any route sees it, or None."""
    from fastapi.responses import JSONResponse  # start-up: FastAPI, 0.32 s

    if not api_key:
        refusal = _host_refusal(request, settings)
        if refusal:
            return JSONResponse(error_body(refusal, "permission_error", code="forbidden_origin"), status_code=403)
    if request.method == "POST":
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":  # a page's form or text/plain POST needs no CORS preflight: refuse it
            return JSONResponse(error_body(f"a POST body must be JSON (Content-Type: application/json), not "
                                           f"{kind or 'unspecified'!r}", "invalid_request_error",
                                           code="unsupported_media_type"), status_code=415)
    if api_key and request.url.path.startswith("/v1/"):
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            message = ("no API key given: send the header 'Authorization: Bearer <key>'" if not header
                       else "the API key is not valid for this server")
            return JSONResponse(error_body(message, "authentication_error", code="invalid_api_key"),
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
    return None


class _Gate:
    """Host, Origin, content type and API key, checked on the headers before a route runs."""

    def __init__(self, app, settings: ServeSettings, api_key: str | None):
        self.app, self.settings, self.api_key = app, settings, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = _refusal(Request(scope), self.settings, self.api_key)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _ip_or_local(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def create_app(model, model_name: str, settings: ServeSettings | None = None, api_key: str | None = None,
               engine: Engine | None = None):
    """The ASGI app serving `model` under `model_name`; `api_key` makes /v1/* require `Bearer <key>`."""
    from fastapi import FastAPI, Request  # start-up: FastAPI, 0.32 s
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse  # start-up: FastAPI, 0.32 s

    settings = settings or ServeSettings()
    engine = engine or Engine(model, settings)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="vlmkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.settings = settings

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, "invalid_request_error", code=str(exc.status_code)),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, exc):
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)

    # a plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide a client's disconnect from the routes
    app.add_middleware(_Gate, settings=settings, api_key=api_key)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(page_html())

    @app.get("/health")
    async def health():
        alive = engine.alive
        body = {"status": "ok" if alive else "unavailable", "model": model_name, "pending": engine.pending,
                "batches": engine.batches, "restarts": engine.restarts, "auth": bool(api_key)}
        return body if alive else JSONResponse(body, status_code=503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(model, model_name, settings, created)]}

    @app.get("/v1/models/{name}")
    async def one_model(name: str):
        if name != model_name:
            raise ApiError(404, f"model {name!r} is not served here; this server serves {model_name!r}",
                           code="model_not_found")
        return model_card(model, model_name, settings, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        # the place in the queue is taken before the body is read: bodies, fetched and decoded images count
        # against --max-queue too. (A cancelled thread still runs to its end: the place is freed after it.)
        engine.reserve()
        try:
            raw = await read_body(request, settings.max_body_bytes, settings.body_timeout)
            chat, job = await run_in_threadpool(_parse_and_prepare, raw, engine.model, model_name, settings)
        except BaseException:
            engine.release()
            raise
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.emit = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
        engine.submit(job, reserved=True)
        cid = completion_id()
        if chat.stream:
            return StreamingResponse(_stream(job, events, cid, model_name, chat.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces, watched = [], _Events(events, request)
        try:
            while True:
                event = await watched.next()
                if event is None:  # the client went away: stop generating for it, as for a stream
                    job.cancelled = True
                    return JSONResponse(error_body("the client went away", "invalid_request_error",
                                                   code="client_disconnected"), status_code=499)
                if event[0] == "delta":
                    pieces.append(event[1])
                elif event[0] == "done":
                    usage = usage_body(event[2]["prompt_tokens"], event[2]["completion_tokens"])
                    return completion_body(cid, model_name, "".join(pieces), event[1], usage)
                else:
                    return JSONResponse(error_body(event[2], "server_error", code="model_failure"),
                                        status_code=event[1])
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    return app


class _Events:
    """A job's events for a plain (not streamed) reply, watching the client: `next()` gives None once the client
    has disconnected, checked at least every `poll` seconds whether or not events keep coming."""

    def __init__(self, events: asyncio.Queue, request, poll: float = 0.25):
        self.events, self.request, self.poll = events, request, poll
        self.checked = time.monotonic()

    async def next(self):
        while True:
            if time.monotonic() - self.checked >= self.poll:
                self.checked = time.monotonic()
                if await self.request.is_disconnected():
                    return None
            try:
                return await asyncio.wait_for(self.events.get(), self.poll)
            except asyncio.TimeoutError:
                continue


def _sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _stream(job, events: asyncio.Queue, cid: str, model_name: str, include_usage: bool):
    finished = False
    try:
        yield _sse(chunk_body(cid, model_name, {"role": "assistant", "content": ""}))
        while True:
            event = await events.get()
            if event[0] == "delta":
                yield _sse(chunk_body(cid, model_name, {"content": event[1]}))
            elif event[0] == "done":
                yield _sse(chunk_body(cid, model_name, {}, event[1]))
                if include_usage:
                    usage = usage_body(event[2]["prompt_tokens"], event[2]["completion_tokens"])
                    yield _sse(chunk_body(cid, model_name, {}, usage=usage))
                break
            else:  # the headers are sent: the failure travels as an error event, as OpenAI's API does
                yield _sse(error_body(event[2], "server_error", code="model_failure"))
                break
        finished = True
        yield _sse("[DONE]")
    finally:
        if not finished:
            job.cancelled = True  # the client went away: stop generating for it


def serve(model, model_name: str, host: str = ServerOptions.host, port: int = ServerOptions.port,
          settings: ServeSettings | None = None, api_key: str | None = None,
          log_level: str = ServerOptions.log_level) -> None:
    """Run the server in the foreground with uvicorn until Ctrl-C."""
    app = create_app(model, model_name, settings, api_key)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
