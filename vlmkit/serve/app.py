"""The HTTP side of the server: a FastAPI app speaking OpenAI's chat-completions API, plus the chat page.

Routes: `POST /v1/chat/completions` (plain or streamed as Server-Sent Events), `GET /v1/models`,
`GET /health`, `GET /` (the web chat page, one static HTML file). Every refusal is an OpenAI-style error
body `{"error": {"message", "type", "param", "code"}}` with a 4xx status; a model failure is a 500 with a
message and the server keeps serving. Image decoding and prompt rendering run in worker threads and
generation in the engine's thread, so the event loop only moves bytes.
"""

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from importlib import resources

from vlmkit.serve.engine import Engine, context_length, prepare
from vlmkit.serve.protocol import (
    ApiError,
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


async def read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared):,} bytes, more than this server's limit of "
                            f"{limit:,} (--max-body-bytes)", code="body_too_large")
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is more than this server's limit of {limit:,} bytes "
                                    "(--max-body-bytes)", code="body_too_large")
            chunks.append(chunk)
    except ClientDisconnect:  # an ordinary refusal (and its place in the queue freed), not a server error
        raise ApiError(400, "the client went away before sending the whole body", code="client_disconnected") \
            from None
    return b"".join(chunks)


def _parse_and_prepare(raw: bytes, model, model_name: str, settings: ServeSettings):
    """Body bytes -> a Job, or ApiError. Runs in a worker thread: JSON, base64 and images are CPU work."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    chat = parse_chat_request(body, settings, model_name)
    return chat, prepare(model, chat, settings)


def create_app(model, model_name: str, settings: ServeSettings | None = None, api_key: str | None = None,
               engine: Engine | None = None):
    """The ASGI app serving `model` under `model_name`; `api_key` makes /v1/* require `Bearer <key>`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

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

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                message = ("no API key given: send the header 'Authorization: Bearer <key>'" if not header
                           else "the API key is not valid for this server")
                return JSONResponse(error_body(message, "authentication_error", code="invalid_api_key"),
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(page_html())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "pending": engine.pending, "batches": engine.batches,
                "auth": bool(api_key)}

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
            raw = await read_body(request, settings.max_body_bytes)
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
        pieces = []
        try:
            while True:
                event = await events.get()
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


def serve(model, model_name: str, host: str = "127.0.0.1", port: int = 8000, settings: ServeSettings | None = None,
          api_key: str | None = None, log_level: str = "info") -> None:
    """Run the server in the foreground with uvicorn until Ctrl-C."""
    import uvicorn

    app = create_app(model, model_name, settings, api_key)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
