"""The generation side of the server: requests become jobs, one worker thread batches and runs them.

`prepare` turns a validated request into a `Job` (images decoded under the pixel limit and transformed,
the conversation rendered with the model's template, the token budget checked against the context). The
`Engine` owns the model: its worker thread decodes up to `max_batch` jobs together, admits waiting jobs between
decode steps (their prompts prefilled as one left-padded batch and joined to the running cache), and streams
each job's text back through the job's `emit` callback. The event loop
never runs the model, so the server keeps answering (health, errors, new requests) while it generates.
A model failure fails the jobs it touched with a message; the worker goes on.
"""
from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import logging
import queue
import socket
import ssl
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import torch

from vlmkit.data.images import decode_image
from vlmkit.errors import BadRecord
from vlmkit.infer.chat import render_prompt
from vlmkit.infer.generate import Decoder, GenerationConfig, Row, decode_text, model_stop
from vlmkit.serve.protocol import ApiError, ChatRequest, ImageRef, ServeSettings

log = logging.getLogger("vlmkit.serve")
_RENDER_LOCK = threading.Lock()  # requests are prepared in several threads; the tokenizer encodes one at a time


def context_length(model) -> int:
    """Longest prompt + answer the model takes: its training length, or the LM's positions if fewer."""
    positions = getattr(model.require_llm("serving").causal_lm.config, "max_position_embeddings", None)
    return min(model.config.max_length, positions) if positions else model.config.max_length


MAX_REDIRECTS = 5
_REDIRECTS = {301, 302, 303, 307, 308}


class FetchFailed(Exception):
    """An image URL that could not be fetched: `reason` is all the client is told (short, fixed wording, no
    exception text: that could tell it about the server's network); `detail` goes to the server log only."""

    def __init__(self, reason: str, detail: str = "", code: str = "image_fetch_failed"):
        super().__init__(reason)
        self.reason, self.detail, self.code = reason, detail, code


def fetch_image(ref: ImageRef, settings: ServeSettings) -> bytes:
    """GET an http(s) image URL (only when the server allows it): public addresses only, at most
    max_body_bytes, within image_url_timeout seconds in all; a failure is an ApiError saying only why."""
    try:
        return _fetch(ref.url, settings)
    except FetchFailed as exc:
        log.warning("%s: could not fetch %r (%s)%s", ref.param, ref.url, exc.reason, exc.detail and f": {exc.detail}")
        failure = exc
    except Exception:  # noqa: BLE001  whatever went wrong, the client hears no internals of it
        log.exception("%s: could not fetch %r", ref.param, ref.url)
        failure = FetchFailed("failed")
    raise ApiError(400, f"{ref.param}: could not fetch the image ({failure.reason})", ref.param, failure.code)


def _fetch(url: str, settings: ServeSettings) -> bytes:
    """Follow at most MAX_REDIRECTS redirects by hand, vetting every hop's scheme and addresses."""
    deadline = time.monotonic() + settings.image_url_timeout
    limit = settings.max_body_bytes
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise FetchFailed("refused: only http and https URLs are fetched", f"scheme of {url!r}")
        try:
            host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise FetchFailed("invalid URL", str(exc)) from None
        if not host:
            raise FetchFailed("invalid URL", f"no host in {url!r}")
        addresses = _vetted(host, port, settings.image_url_allow_networks, deadline)
        connection = (_TLSConnection if parts.scheme == "https" else _Connection)(host, port, addresses, deadline)
        response = None
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.connect()
            connection.request("GET", target, headers={"User-Agent": "vlmkit", "Accept": "image/*",
                                                       "Connection": "close"})
            response = connection.getresponse()
            if response.status in _REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise FetchFailed(f"HTTP {response.status} without a Location")
                url = urljoin(url, location.strip())
                continue
            if response.status != 200:
                raise FetchFailed(f"HTTP {response.status}")
            return _read(response, limit)
        except FetchFailed:
            raise
        except Exception as exc:  # noqa: BLE001  mapped to a fixed reason; the text goes to the log
            raise FetchFailed(_reason(exc, deadline), f"{type(exc).__name__}: {exc}") from None
        finally:
            if response is not None:
                response.close()
            connection.close()
    raise FetchFailed(f"too many redirects (more than {MAX_REDIRECTS})", f"the last was to {url!r}")


def _read(response: http.client.HTTPResponse, limit: int) -> bytes:
    too_large = FetchFailed(f"too large: more than {limit:,} bytes, the server's --max-body-bytes",
                            code="image_too_large")
    declared = response.getheader("Content-Length", "")
    if declared.strip().isdigit() and int(declared) > limit:
        raise too_large  # without reading any of it
    chunks, size = [], 0
    while chunk := response.read(min(64 * 1024, limit + 1 - size)):
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _reason(exc: Exception, deadline: float) -> str:
    """The client's words for a failed connection or read."""
    if isinstance(exc, TimeoutError) or time.monotonic() >= deadline:
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "the TLS certificate is not valid"
    if isinstance(exc, ssl.SSLError):
        return "TLS failed"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, http.client.HTTPException):
        return "not a valid HTTP response"
    if isinstance(exc, OSError):
        return "could not connect"
    if isinstance(exc, (ValueError, UnicodeError)):
        return "invalid URL"
    return "failed"


def _refusal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address is not one to fetch from (None: it is public)."""
    if address.version == 6:  # IPv4 written as IPv6 (mapped, 6to4, NAT64) is judged as the IPv4 address
        if address.ipv4_mapped or address.sixtofour:
            return _refusal(address.ipv4_mapped or address.sixtofour)
        if address in _NAT64:
            return _refusal(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    for kind, refused in (("unspecified", address.is_unspecified), ("loopback", address.is_loopback),
                          ("link-local", address.is_link_local), ("multicast", address.is_multicast),
                          ("reserved", address.is_reserved), ("private", address.is_private)):
        if refused:
            return kind
    return None if address.is_global else "not public"


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _vetted(host: str, port: int, allowed, deadline: float) -> list[str]:
    """The host's addresses, after the name lookup, if every one is public (or in `allowed`): the connection
    then goes to these, so a name that resolves differently a moment later (DNS rebinding) changes nothing."""
    addresses = _resolve(host, port, deadline)
    for address in addresses:
        kind = _refusal(address)
        if kind and not any(address in network for network in allowed):
            raise FetchFailed(f"refused: the address is {kind}", f"{address} (the host {host!r})")
    return [str(address) for address in addresses]


def _resolve(host: str, port: int, deadline: float) -> list:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    # getaddrinfo takes no timeout: it runs in a thread of its own, and the fetch stops waiting at the deadline
    result: dict = {}

    def lookup():
        try:
            result["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except Exception as exc:  # noqa: BLE001  reported below
            result["error"] = exc

    thread = threading.Thread(target=lookup, name="vlmkit-resolve", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        raise FetchFailed("timed out", f"resolving {host!r}")
    if "error" in result or not result.get("infos"):
        raise FetchFailed("the host name does not resolve", f"{host!r}: {result.get('error')}")
    addresses = []
    for info in result["infos"]:
        address = ipaddress.ip_address(info[4][0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def _time_left(sock: socket.socket, deadline: float) -> None:
    """Let the socket's next operation wait only until the fetch's deadline."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the fetch's deadline passed")
    sock.settimeout(left)


class _DeadlineReader(io.RawIOBase):
    """The response's bytes, each read waiting only until the deadline: a server trickling a byte a second
    would never trip a per-read timeout, and is cut off all the same."""

    def __init__(self, sock: socket.socket, deadline: float):
        super().__init__()
        self._sock, self._raw, self._deadline = sock, sock.makefile("rb", buffering=0), deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        _time_left(self._sock, self._deadline)
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()  # lets the socket close (the connection hands it to the response)
        super().close()


class _ReaderSocket:
    """All HTTPResponse takes from its socket is a file to read."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock, self._deadline = sock, deadline

    def makefile(self, mode: str):
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))


def _response(sock, *args, deadline: float, **kwargs) -> http.client.HTTPResponse:
    return http.client.HTTPResponse(_ReaderSocket(sock, deadline), *args, **kwargs)


class _Connection(http.client.HTTPConnection):
    """An HTTP connection to addresses already vetted, not to what the host name resolves to by now (the Host
    header and TLS's server name are still the URL's host), every step within the fetch's deadline."""

    def __init__(self, host: str, port: int, addresses: list[str], deadline: float):
        super().__init__(host, port)
        self._addresses, self._deadline = addresses, deadline
        self.response_class = functools.partial(_response, deadline=deadline)

    def connect(self) -> None:
        error: OSError = OSError("no address to connect to")
        for address in self._addresses:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the fetch's deadline passed")
            try:
                self.sock = socket.create_connection((address, self.port), timeout=left)
                break
            except OSError as exc:
                error = exc
        else:
            raise error
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data) -> None:
        if self.sock is not None:
            _time_left(self.sock, self._deadline)  # sendall's timeout is for the whole call
        super().send(data)


class _TLSConnection(_Connection):
    default_port = 443
    _context = None

    def connect(self) -> None:
        super().connect()
        if _TLSConnection._context is None:
            _TLSConnection._context = ssl.create_default_context()
        _time_left(self.sock, self._deadline)  # the handshake's timeout is for the whole handshake
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)


@dataclass
class Job:
    """One request on its way through the engine; `emit` receives ('delta', text), ('done', finish, usage)
    or ('error', status, message) — called from the worker thread."""
    input_ids: list[int]
    pixels: list[torch.Tensor]
    config: GenerationConfig
    stop: list[str]
    emit: Callable[[tuple], None] = lambda event: None
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    stream: bool = True     # False: the text is sent once, at the end (no per-token decoding or wake-ups)
    _sent: int = 0          # characters of the decoded text already emitted
    _stopped: bool = False  # a stop string was found
    _tokenizer: object = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)

    def _text(self) -> str:
        return decode_text(self._tokenizer, self.tokens)

    def push(self, token: int) -> bool:
        """Take one generated token, emit the text that is now certain; True when the job needs no more."""
        self.tokens.append(token)
        if not self.stream and not self.stop:
            return self.cancelled
        text = self._text().lstrip()
        for stop in self.stop:
            at = text.find(stop)
            if at >= 0:
                self._stopped = True
                self._send(text[:at])
                return True
        # hold back trailing spaces, an incomplete character, and a tail that could start a stop string
        safe = len(text) - 1 if text.endswith("\ufffd") else len(text)
        safe = len(text[:safe].rstrip())
        for stop in self.stop:
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if text[:safe].endswith(stop[:k]):
                    safe -= k
                    break
        self._send(text[:safe])
        return self.cancelled

    def _send(self, text: str) -> None:
        if len(text) > self._sent:
            self.tell(("delta", text[self._sent:]))
            self._sent = len(text)

    def tell(self, event: tuple) -> None:
        """Pass an event to the listener; one that fails (its event loop closed: the client is gone) cancels the
        job instead of failing the batch it runs in."""
        try:
            self.emit(event)
        except Exception:  # noqa: BLE001  the listener's failure is this job's alone
            log.warning("a request's listener failed; cancelling it", exc_info=True)
            self.cancelled = True

    def finish(self) -> None:
        if not self._stopped:
            self._send(self._text().strip())
        reason = "stop" if self._stopped or len(self.tokens) < self.config.max_new_tokens else "length"
        self.tell(("done", reason, {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.tokens)}))


def longest_piece(tokenizer) -> int:
    """No token covers more characters of text than the tokenizer's longest vocabulary entry, so a text of n
    characters is at least n / longest_piece(tokenizer) tokens: a bound known before tokenising (computed once
    per tokenizer and kept on it)."""
    found = getattr(tokenizer, "_vlmkit_longest_piece", None)
    if found is None:
        found = max((len(piece) for piece in tokenizer.get_vocab()), default=1) or 1
        tokenizer._vlmkit_longest_piece = found
    return found


def prompt_char_limit(model) -> int:
    """Characters of message text beyond which a prompt cannot fit the model's context, whatever they are."""
    return context_length(model) * longest_piece(model.tokenizer)


def prepare(model, request: ChatRequest, settings: ServeSettings) -> Job:
    """Decode and transform the images, render the prompt, check it against the context: a Job or ApiError."""
    characters = sum(len(message["content"]) for message in request.messages)
    limit = prompt_char_limit(model)
    if characters > limit:  # refused before tokenising: a 20 MB prompt would hold a thread for seconds
        raise ApiError(400, f"messages: the text is {characters:,} characters; no more than {limit:,} can fit the "
                            f"model's context of {context_length(model)} tokens", "messages",
                       "context_length_exceeded")
    pixels = []
    for ref in request.images:
        data = ref.data if ref.data is not None else fetch_image(ref, settings)
        try:
            image = decode_image(data, f"the image at {ref.param}", "request", settings.image_limits,
                                 model.image_transform)
        except BadRecord as exc:
            raise ApiError(400, exc.reason, ref.param, exc.kind)
        pixels.append(model.image_transform(image))
    try:
        with _RENDER_LOCK:
            rendered = render_prompt(model, request.messages, record_id="request")
    except BadRecord as exc:
        raise ApiError(400, f"messages: {exc.reason}", "messages", exc.kind)
    prompt = len(rendered.input_ids)
    context = context_length(model)
    images = f" ({len(pixels)} image{'s' if len(pixels) != 1 else ''} × {model.num_image_tokens} tokens)" \
        if pixels else ""
    if prompt >= context:
        raise ApiError(400, f"messages: the prompt is {prompt} tokens{images}; the model's context is {context}",
                       "messages", "context_length_exceeded")
    if request.max_tokens is None:
        max_tokens = min(settings.max_tokens, context - prompt)
    elif prompt + request.max_tokens > context:
        raise ApiError(400, f"the prompt ({prompt} tokens{images}) plus max_tokens ({request.max_tokens}) is more "
                            f"than the model's context of {context}; ask for at most {context - prompt}",
                       "max_tokens", "context_length_exceeded")
    else:
        max_tokens = request.max_tokens
    config = GenerationConfig(max_new_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                              seed=request.seed)
    stops = list(request.stop) + [s for s in model_stop(model).strings if s not in request.stop]
    return Job(rendered.input_ids, pixels, config, stops, stream=request.stream, _tokenizer=model.tokenizer)


class Engine:
    """Owns the model; a worker thread decodes up to `max_batch` jobs at a time, admitting queued jobs between
    decode steps (continuous batching: a short answer never waits for a long one to end)."""

    def __init__(self, model, settings: ServeSettings):
        self.model = model.eval()
        self.settings = settings
        self.batches = 0  # groups of jobs prefilled together
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0
        self._arriving = 0  # requests being read and prepared: an idle worker waits briefly for them
        self._stopping = False
        self._jobs: dict[int, Job] = {}  # id(row) -> job, for the rows being decoded
        self._admitting: list[Job] = []  # jobs taken from the queue and not yet decoding
        self.restarts = 0   # times the worker died of an error outside a request's own and was restarted
        self.working = False  # the worker loop is running (False before start, after stop, while restarting)
        self._thread = threading.Thread(target=self._supervise, name="vlmkit-engine", daemon=True)

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.working

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def reserve(self) -> None:
        """Take a place for a request that has just come in, or raise 429 when --max-queue are taken. It holds
        the place while its body is read and its images fetched and decoded, so at most max_queue requests
        hold that memory at once; `submit` hands the place to its job, `release` frees it if it never gets one."""
        with self._lock:
            if self._pending >= self.settings.max_queue:
                raise ApiError(429, f"the server is busy: {self._pending} requests are queued or running "
                                    f"(its --max-queue is {self.settings.max_queue}); retry shortly",
                               code="queue_full")
            self._pending += 1
            self._arriving += 1  # the worker may wait a moment for it to fill its batch

    def release(self) -> None:
        """A reserved request ended before it was submitted (refused, or the client left)."""
        with self._lock:
            self._pending -= 1
            self._arriving -= 1

    def submit(self, job: Job, reserved: bool = False) -> None:
        """Queue a prepared job (`reserved`: in the place `reserve()` took for it), or raise 429 when full."""
        if not reserved:
            self.reserve()
        with self._lock:
            self._arriving -= 1
        self._queue.put(job)

    def _done(self, count: int = 1) -> None:
        with self._lock:
            self._pending -= count

    def _take(self, room: int, idle: bool, last_size: int) -> list[Job]:
        """Up to `room` queued jobs. An idle worker blocks for the first, then waits (at most batch_wait)
        for requests already being prepared, or under load for as many as it admitted last time."""
        jobs: list[Job] = []
        if idle:
            job = self._queue.get()
            if job is None:
                self._stopping = True
                return jobs
            jobs.append(job)
        deadline = time.monotonic() + self.settings.batch_wait
        while len(jobs) < room and not self._stopping:
            waiting = idle and (self._arriving or len(jobs) < last_size)
            try:
                wait = deadline - time.monotonic() if waiting else 0
                job = self._queue.get(timeout=min(wait, 0.002)) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                if waiting and time.monotonic() < deadline:
                    continue
                break
            if job is None:
                self._stopping = True
                break
            jobs.append(job)
        live = [job for job in jobs if not job.cancelled]
        self._done(len(jobs) - len(live))  # the client left before its turn
        return live

    def _supervise(self) -> None:
        """Run the worker loop; if it dies of anything (a bug, not a request's own failure, which fails that
        request alone), fail the jobs it held and start it again, so the server never stops answering."""
        while True:
            self.working = True
            try:
                self._run()
                self.working = False
                return
            except BaseException as exc:  # noqa: BLE001  whatever killed the loop, the engine goes on
                self.working = False
                self.restarts += 1
                log.error("the engine's worker failed; restarting it (restart %d):\n%s", self.restarts,
                          traceback.format_exc())
                held = list(self._jobs.values()) + [job for job in self._admitting if job not in self._jobs.values()]
                self._jobs, self._admitting = {}, []
                if held:
                    self._fail(held, exc)

    def _run(self) -> None:
        decoder, last_size = Decoder(self.model), 1
        jobs = self._jobs
        while True:
            room = self.settings.max_batch - len(decoder)
            if not self._stopping and room > 0 and decoder.can_join and (not len(decoder) or not self._queue.empty()):
                new = self._admitting = self._take(room, idle=not len(decoder), last_size=last_size)
                if new:
                    if not len(decoder):
                        last_size = len(new)
                    self._admit(decoder, new, jobs)
                self._admitting = []
            elif self._stopping and not len(decoder):
                return
            if not len(decoder):
                if self._stopping:
                    return
                continue
            try:
                self._finish(decoder.drop_finished(), jobs)
                if len(decoder):
                    decoder.step()
                    self._finish(decoder.drop_finished(), jobs)
            except Exception as exc:  # noqa: BLE001  a model failure fails the running jobs; the server goes on
                self._fail(list(jobs.values()), exc)
                jobs.clear()
                decoder = Decoder(self.model)

    def _admit(self, decoder: Decoder, new: list[Job], jobs: dict[int, Job]) -> None:
        """Prefill `new` together and join them to the batch. A job that cannot start (its seed, its prefill)
        fails alone: when the group's prefill fails, each job is tried by itself."""
        rows, ready = [], []
        for job in new:
            try:
                generator = torch.Generator().manual_seed(job.config.seed) if job.config.seed is not None else None
            except Exception as exc:  # noqa: BLE001  this job's settings: it alone fails
                self._fail([job], exc)
                continue
            rows.append(Row(job.config, generator, job.push))
            ready.append(job)
        if not ready:
            return
        pixels = [p for job in ready for p in job.pixels]
        try:
            decoder.add([job.input_ids for job in ready], rows, [len(job.pixels) for job in ready],
                        pixel_values=torch.stack(pixels) if pixels else None)
        except Exception as exc:  # noqa: BLE001  the prefill failed: the running jobs go on
            if len(ready) == 1 or not decoder.can_join:
                self._fail(ready, exc)
                return
            for job in ready:  # find which of them fails: each alone
                self._admit(decoder, [job], jobs)
            return
        self.batches += 1
        jobs.update({id(row): job for row, job in zip(rows, ready)})

    def _finish(self, rows: list[Row], jobs: dict[int, Job]) -> None:
        for row in rows:
            job = jobs.pop(id(row))
            if row.error is not None:
                self._fail([job], row.error)
            else:
                try:
                    job.finish()
                finally:
                    self._done()

    def _fail(self, failed: list[Job], exc: BaseException) -> None:
        log.error("generation failed for %d request(s):\n%s", len(failed),
                  "".join(traceback.format_exception(exc)))
        for job in failed:
            job.tell(("error", 500, f"the model failed while generating: {type(exc).__name__}: {exc}"))
        self._done(len(failed))
