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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vlmkit.data.dataset import collate_states
from vlmkit.data.images import decode_image
from vlmkit.errors import BadRecord
from vlmkit.infer.chat import render_prompt, state_tensors
from vlmkit.infer.generate import Decoder, GenerationConfig, Row, decode_text, model_stop
from vlmkit.serve.fetch import fetch_image
from vlmkit.serve.protocol import ApiError, ChatRequest, ServeSettings

log = logging.getLogger("vlmkit.serve")
_RENDER_LOCK = threading.Lock()  # requests are prepared in several threads; the tokenizer encodes one at a time


def context_length(model) -> int:
    """Longest prompt + answer the model takes: its training length, or the LM's positions if fewer."""
    positions = getattr(model.require_llm("serving").causal_lm.config, "max_position_embeddings", None)
    return min(model.config.max_length, positions) if positions else model.config.max_length


@dataclass
class Job:
    """One request on its way through the engine; `emit` receives ('delta', text), ('done', finish, usage)
    or ('error', status, message) — called from the worker thread."""
    input_ids: list[int]
    pixels: list[torch.Tensor]
    config: GenerationConfig
    stop: list[str]
    states: dict | None = None  # PaLM-E: {kind: (n, width)} for the prompt's state placeholders
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
    if len(request.images) > model.config.max_images:
        raise ApiError(400, f"{len(request.images)} images; this model takes at most {model.config.max_images} per "
                            "request", "messages", "too_many_images")
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
    try:
        states = state_tensors(model, request.messages, request.states, record_id="request")
    except BadRecord as exc:
        raise ApiError(400, f"states: {exc.reason}", "states", exc.kind)
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
    return Job(rendered.input_ids, pixels, config, stops, states=states, stream=request.stream,
               _tokenizer=model.tokenizer)


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
                        pixel_values=torch.stack(pixels) if pixels else None, states=collate_states(ready))
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
