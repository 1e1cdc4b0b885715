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

import logging
import queue
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vlmkit.data.images import decode_image
from vlmkit.errors import BadRecord
from vlmkit.infer.chat import render_prompt
from vlmkit.infer.generate import Decoder, GenerationConfig, Row, model_stop
from vlmkit.serve.protocol import ApiError, ChatRequest, ImageRef, ServeSettings

log = logging.getLogger("vlmkit.serve")
_RENDER_LOCK = threading.Lock()  # requests are prepared in several threads; the tokenizer encodes one at a time


def context_length(model) -> int:
    """Longest prompt + answer the model takes: its training length, or the LM's positions if fewer."""
    positions = getattr(model.llm.causal_lm.config, "max_position_embeddings", None)
    return min(model.config.max_length, positions) if positions else model.config.max_length


def fetch_image(ref: ImageRef, settings: ServeSettings) -> bytes:
    """GET an http(s) image URL (only when the server allows it), at most max_body_bytes."""
    try:
        with urllib.request.urlopen(ref.url, timeout=settings.image_url_timeout) as response:
            data = response.read(settings.max_body_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ApiError(400, f"{ref.param}: could not fetch {ref.url}: {exc}", ref.param, "image_fetch_failed")
    if len(data) > settings.max_body_bytes:
        raise ApiError(400, f"{ref.param}: the image at {ref.url} is larger than {settings.max_body_bytes:,} bytes",
                       ref.param, "image_too_large")
    return data


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
        return self._tokenizer.decode(self.tokens, skip_special_tokens=True)

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
            self.emit(("delta", text[self._sent:]))
            self._sent = len(text)

    def finish(self) -> None:
        if not self._stopped:
            self._send(self._text().strip())
        reason = "stop" if self._stopped or len(self.tokens) < self.config.max_new_tokens else "length"
        self.emit(("done", reason, {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.tokens)}))


def prepare(model, request: ChatRequest, settings: ServeSettings) -> Job:
    """Decode and transform the images, render the prompt, check it against the context: a Job or ApiError."""
    pixels = []
    for ref in request.images:
        data = ref.data if ref.data is not None else fetch_image(ref, settings)
        try:
            image = decode_image(data, f"the image at {ref.param}", "request", settings.max_image_pixels)
        except BadRecord as exc:
            raise ApiError(400, exc.reason + (" (the server's --max-image-pixels)"
                                              if exc.kind == "image_too_large" else ""), ref.param, exc.kind)
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
        self._arriving = 0  # requests being parsed/prepared: an idle worker waits briefly for them
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="vlmkit-engine", daemon=True)

    @property
    def pending(self) -> int:
        return self._pending

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def submit(self, job: Job, expected: bool = False) -> None:
        """Queue a prepared job (`expected`: it was announced with `expect()`), or raise 429 when full."""
        with self._lock:
            self._arriving -= int(expected)
            if self._pending >= self.settings.max_queue:
                raise ApiError(429, f"the server is busy: {self._pending} requests are queued or running "
                                    f"(its --max-queue is {self.settings.max_queue}); retry shortly",
                               code="queue_full")
            self._pending += 1
        self._queue.put(job)

    def expect(self, delta: int = 1) -> None:
        """A request is being prepared (+1), or its preparation failed (-1); `submit` counts it as arrived."""
        with self._lock:
            self._arriving += delta

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

    def _run(self) -> None:
        decoder, last_size = Decoder(self.model), 1
        jobs: dict[int, Job] = {}  # id(row) -> job
        while True:
            room = self.settings.max_batch - len(decoder)
            if not self._stopping and room > 0 and decoder.can_join and (not len(decoder) or not self._queue.empty()):
                new = self._take(room, idle=not len(decoder), last_size=last_size)
                if new:
                    if not len(decoder):
                        last_size = len(new)
                    self._admit(decoder, new, jobs)
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
        rows = [Row(job.config, torch.Generator().manual_seed(job.config.seed) if job.config.seed is not None
                    else None, job.push) for job in new]
        pixels = [p for job in new for p in job.pixels]
        try:
            decoder.add([job.input_ids for job in new], rows, [len(job.pixels) for job in new],
                        pixel_values=torch.stack(pixels) if pixels else None)
        except Exception as exc:  # noqa: BLE001  the prefill failed: these jobs fail, the running ones go on
            self._fail(new, exc)
            return
        self.batches += 1
        jobs.update({id(row): job for row, job in zip(rows, new)})

    def _finish(self, rows: list[Row], jobs: dict[int, Job]) -> None:
        for row in rows:
            jobs.pop(id(row)).finish()
            self._done()

    def _fail(self, failed: list[Job], exc: Exception) -> None:
        log.error("generation failed for %d request(s):\n%s", len(failed), traceback.format_exc())
        for job in failed:
            job.emit(("error", 500, f"the model failed while generating: {type(exc).__name__}: {exc}"))
        self._done(len(failed))
