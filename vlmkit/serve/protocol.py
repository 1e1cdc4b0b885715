"""The OpenAI chat-completions format: request validation, response and error bodies.

`parse_chat_request` turns a decoded JSON body into a `ChatRequest` (messages in vlmkit's role/content form
with `<image>` where each image part was, the images still as bytes, sampling settings) or raises `ApiError`
naming the field at fault (`messages[1].content[0].image_url.url: ...`) — the server sends that back as an
OpenAI-style error body with a 4xx status. Nothing here touches the model, so it is cheap to test.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from vlmkit.config import option
from vlmkit.data.images import ImageLimits
from vlmkit.data.render import IMAGE_TOKEN
from vlmkit.data.templates import numbered_images

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _setting(default, text: str, flag: str = "", image_limit: bool = False):
    """A ServeSettings field: its default, its `vlmkit serve --help` text, its flag when not --field-name (a
    repeatable flag collects a tuple); `image_limit`: one of the image limits every command shares."""
    metadata = {"help": text, **({"flag": flag} if flag else {}), **({"image_limit": True} if image_limit else {})}
    if isinstance(default, tuple):
        return field(default=default, metadata={**metadata, "repeat": True})
    return field(default=default, metadata=metadata)


@dataclass
class ServerOptions:
    """Where `vlmkit serve` listens and who may call it (its flags are made from these fields, as ServeSettings')."""
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    port: int = option(8000, "port to listen on")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1/* (or set VLMKIT_API_KEY)", kind=str)
    model_name: str | None = option(None, "the model id clients send (default: the run's directory name)", kind=str)
    log_level: str = option("info", "uvicorn's log level", choices=("critical", "error", "warning", "info", "debug"))


@dataclass
class ServeSettings:
    """What one request may ask for (every refusal is a 4xx naming the limit and its flag), and defaults. The
    `vlmkit serve` flags are made from these fields (`--max-body-bytes` from max_body_bytes)."""
    max_body_bytes: int = _setting(20 * 1024 * 1024, "largest request body")
    max_images: int = _setting(4, "images per request")
    max_image_pixels: int = _setting(4096 * 4096, "largest image (width x height), and largest image made of it by "
                                                   "padding to a square or resizing", image_limit=True)
    max_tokens: int = _setting(512, "cap on a request's max_tokens, and the default when a request gives none")
    max_queue: int = _setting(256, "requests queued or running; more get 429")
    max_batch: int = _setting(8, "requests generated together in one batch (left-padded)")
    batch_wait: float = _setting(0.02, "longest a batch waits to fill: for requests already arriving, or under "
                                       "load for as many as the last batch had (a lone client never waits)")
    allow_image_urls: bool = _setting(False, "also fetch http(s) image URLs (public addresses only, checked after "
                                             "DNS and on every redirect; capped by --max-body-bytes and "
                                             "--image-url-timeout); off: only data: URIs")
    image_url_timeout: float = _setting(10.0, "seconds for a whole image-URL fetch (name lookup, connects, "
                                              "redirects, every read)")
    # networks a fetch may reach although they are not public (loopback, private, link-local, …); empty unless
    # the image hosts are known ones on the server's own network (the tests allow 127.0.0.1)
    image_url_allow_networks: tuple = _setting((), "a non-public network (CIDR) that image URLs may reach "
                                                   "(repeatable; default: public addresses only)",
                                               flag="--image-url-allow-network")
    temperature: float = _setting(0.0, "for requests that give no temperature (0 = greedy, as vlmkit chat)")
    body_timeout: float = _setting(30.0, "seconds a client has to send its whole request body (a trickling client "
                                         "loses its place)")
    # host names (besides IP addresses and localhost) that requests may name in their Host header when the server
    # has no API key: a web page on another name that resolves to this machine (DNS rebinding) is refused
    allowed_hosts: tuple = _setting((), "a host name clients may address this server by when it has no --api-key "
                                        "(repeatable; IP addresses and localhost always may). Without an API key, "
                                        "requests naming another host (DNS rebinding) or coming from another "
                                        "site's page (Origin) are refused", flag="--allowed-host")
    max_image_side: int = _setting(8192, "longest side of an image, before padding and resizing",
                                   image_limit=True)
    max_image_aspect: float = _setting(20.0, "largest long side / short side", image_limit=True)

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(self.max_image_pixels, self.max_image_side, self.max_image_aspect)

    def __post_init__(self):
        if isinstance(self.image_url_allow_networks, str):
            self.image_url_allow_networks = (self.image_url_allow_networks,)
        self.image_url_allow_networks = tuple(ipaddress.ip_network(network, strict=False)
                                              for network in self.image_url_allow_networks)
        if isinstance(self.allowed_hosts, str):
            self.allowed_hosts = (self.allowed_hosts,)
        self.allowed_hosts = tuple(host.lower() for host in self.allowed_hosts)


class ApiError(Exception):
    """A request the server refuses: HTTP status, OpenAI error type, the offending parameter, a code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                             429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500
                                                          else "server_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class ImageRef:
    """One image part: bytes from a data: URI, or an http(s) URL to fetch (when the server allows it)."""
    param: str
    data: bytes | None = None
    url: str | None = None


@dataclass
class ChatRequest:
    messages: list[dict]            # role/content, `<image>` where each image part was
    images: list[ImageRef]
    max_tokens: int | None          # None: as many as the cap and the context allow
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    seed: int | None = None
    states: dict | None = None      # PaLM-E's state vectors, {kind: [[numbers], ...]} (an extension of the format)


def _bad(message: str, param: str | None = None, code: str | None = None, status: int = 400) -> ApiError:
    return ApiError(status, f"{param}: {message}" if param else message, param, code)


SEED_RANGE = (-2**63, 2**64 - 1)  # what a torch.Generator takes
MIN_TOP_P = 1e-6  # smaller values are below float32's resolution of a probability sum: use temperature 0 for greedy
MIN_TEMPERATURE = 1e-3  # logits / a smaller temperature overflow float32; 0 (greedy) is accepted as such


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"must be a number, got {type(value).__name__}", name, "invalid_type")
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(f"must be a finite number, got {value}", name, "invalid_value")
    if value > high or value < low or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise _bad(f"{value} is outside {bound}", name, "invalid_value")
    return float(value)


def _data_uri(url: str, param: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.startswith("data:"):
        raise _bad("a data: URI needs the form data:image/png;base64,<data>", param, "invalid_image_url")
    if not header.endswith(";base64"):
        raise _bad("only base64 data: URIs are accepted (…;base64,<data>)", param, "invalid_image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad(f"the base64 payload does not decode ({exc})", param, "invalid_image_url") from None


def _image_part(part: dict, param: str, settings: ServeSettings) -> ImageRef:
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    param = f"{param}.image_url.url" if isinstance(spec, dict) else f"{param}.image_url"
    if not isinstance(url, str) or not url:
        raise _bad("an image_url part needs a URL string", param, "invalid_image_url")
    if url.startswith("data:"):
        return ImageRef(param, data=_data_uri(url, param))
    if url.startswith(("http://", "https://")):
        if not settings.allow_image_urls:
            raise _bad("only data: URIs are accepted; this server does not fetch http(s) images "
                       "(start it with --allow-image-urls to allow that)", param, "image_url_not_allowed")
        try:
            parts = urlsplit(url)
            valid = bool(parts.hostname) and (parts.port or 0) >= 0  # .port raises on one out of range
        except ValueError:
            valid = False
        if not valid:
            raise _bad("the URL needs a host (and a valid port, if any)", param, "invalid_image_url")
        return ImageRef(param, url=url)
    raise _bad(f"unsupported image URL scheme {url.split(':', 1)[0]!r}; send a data: URI", param,
               "invalid_image_url")


def _unicode(text: str, param: str) -> None:
    """JSON escapes can write lone surrogates (\\ud800), which are not characters: no tokenizer takes them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _bad(f"the text is not valid Unicode: {exc.object[exc.start:exc.end]!r} at character {exc.start} "
                   "is a lone surrogate", param, "invalid_text") from None


def _content(message: dict, param: str, role: str, images: list[ImageRef], settings: ServeSettings) -> str:
    content = message.get("content")
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise _bad("content must be a string or a list of parts", f"{param}.content", "invalid_type")
    pieces = []
    for j, part in enumerate(parts):
        where = f"{param}.content" if isinstance(content, str) else f"{param}.content[{j}]"
        if not isinstance(part, dict):
            raise _bad("each content part must be an object with a 'type'", where, "invalid_type")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad("a text part needs a 'text' string", where, "invalid_type")
            _unicode(text, where)
            if IMAGE_TOKEN in text:
                raise _bad(f"the text contains {IMAGE_TOKEN}, which marks where images go; send images as "
                           "image_url parts", where, "reserved_token")
            pieces.append(text)
        elif kind == "image_url":
            if role != "user":
                raise _bad(f"images are accepted in user messages only, not {role!r}", where, "invalid_image")
            if len(images) >= settings.max_images:
                raise _bad(f"more than {settings.max_images} images in one request (the server's --max-images)",
                           where, "too_many_images")
            images.append(_image_part(part, where, settings))
            pieces.append(IMAGE_TOKEN)
        else:
            raise _bad(f"unsupported content part type {kind!r} (expected 'text' or 'image_url')", where,
                       "invalid_type")
    leading = next((i for i, piece in enumerate(pieces) if piece != IMAGE_TOKEN), len(pieces))
    if leading >= 2 and IMAGE_TOKEN not in pieces[leading:]:
        # several images before the text: numbered as `vlmkit chat` and the comparison data write them
        return numbered_images(leading) + "\n".join(pieces[leading:])
    return "\n".join(pieces)


def parse_chat_request(body, settings: ServeSettings, model_name: str) -> ChatRequest:
    """Validate a /v1/chat/completions body against the OpenAI format and this server's settings."""
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(404, f"model {model!r} is not served here; this server serves {model_name!r}", "model",
                       "model_not_found")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _bad("must be a non-empty list of messages", "messages", "invalid_value")
    messages: list[dict] = []
    images: list[ImageRef] = []
    for i, message in enumerate(raw):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad("each message must be an object with 'role' and 'content'", param, "invalid_type")
        role = ROLES.get(message.get("role"))
        if role is None:
            raise _bad(f"unsupported role {message.get('role')!r} (expected system, user or assistant)",
                       f"{param}.role", "invalid_value")
        if role == "system" and messages:
            raise _bad("a system message must come first", f"{param}.role", "invalid_value")
        messages.append({"role": role, "content": _content(message, param, role, images, settings)})
    body_turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, message in enumerate(body_turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            index = i + (len(messages) - len(body_turns))
            raise _bad(f"turns must alternate user, assistant, user, …; this one is {message['role']!r}",
                       f"messages[{index}].role", "invalid_value")
    if not body_turns or body_turns[-1]["role"] != "user":
        raise _bad("the last message must be a user message (the one to answer)", "messages", "invalid_value")

    n = body.get("n", 1)
    if n != 1:
        raise _bad("only n=1 is supported", "n", "invalid_value")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise _bad(f"must be a positive integer, got {max_tokens!r}", name, "invalid_value")
        if max_tokens > settings.max_tokens:
            raise _bad(f"{max_tokens} is more than this server's cap of {settings.max_tokens} (--max-tokens)",
                       name, "max_tokens_too_large")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise _bad("must be a string or a list of up to 4 non-empty strings", "stop", "invalid_value")
    if any(len(s) > 256 for s in stop):
        raise _bad("a stop string may be at most 256 characters", "stop", "invalid_value")
    for s in stop:
        _unicode(s, "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("must be true or false", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("must be an object", "stream_options", "invalid_type")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad("must be an integer", "seed", "invalid_type")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise _bad(f"must be within [-2**63, 2**64 - 1], got {seed}", "seed", "invalid_value")
    temperature = _number(body, "temperature", settings.temperature, 0.0, 2.0)
    if 0 < temperature < MIN_TEMPERATURE:
        raise _bad(f"{temperature} is below {MIN_TEMPERATURE}; use 0 for greedy decoding", "temperature",
                   "invalid_value")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    if top_p < MIN_TOP_P:
        raise _bad(f"{top_p} is below {MIN_TOP_P}; use temperature 0 for greedy decoding", "top_p", "invalid_value")
    return ChatRequest(messages=messages, images=images, max_tokens=max_tokens,
                       temperature=temperature, top_p=top_p,
                       stop=stop, stream=stream, include_usage=bool(options.get("include_usage")), seed=seed,
                       states=_states(body.get("states")))


MAX_STATE_VECTORS, MAX_STATE_WIDTH = 256, 1024


def _states(states) -> dict | None:
    """The request's `states` (PaLM-E: {kind: [[numbers], ...]}, one vector per `<kind>` in the messages), bounded
    in size here; the model checks kinds, widths and counts against its own (`vlmkit.engine.prepare`)."""
    if states is None:
        return None
    if not isinstance(states, dict) or not all(isinstance(k, str) and isinstance(v, list) for k, v in states.items()):
        raise _bad("must be an object {kind: [[numbers], ...]}", "states", "invalid_type")
    vectors = [v for values in states.values() for v in values]
    if len(vectors) > MAX_STATE_VECTORS:
        raise _bad(f"more than {MAX_STATE_VECTORS} state vectors", "states", "invalid_value")
    for vector in vectors:
        if not isinstance(vector, list) or len(vector) > MAX_STATE_WIDTH or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in vector):
            raise _bad(f"each state vector must be a list of at most {MAX_STATE_WIDTH} finite numbers", "states",
                       "invalid_value")
    return states


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion_body(cid: str, model: str, text: str, finish_reason: str, usage: dict) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage}


def chunk_body(cid: str, model: str, delta: dict, finish_reason: str | None = None, usage: dict | None = None
               ) -> dict:
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    if usage is not None:
        body["choices"], body["usage"] = [], usage
    return body


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
