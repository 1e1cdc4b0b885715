"""Hostile requests against a live server: each is refused alone (4xx, or its own 500) while normal requests
beside it are answered, and the engine keeps running. Real sockets for clients that trickle or vanish."""
from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hostile import NORMAL, SERVE
from live import LiveServer, image_message, png_uri

# the corpus's served cases (tests/hostile.py) that need no image: each beside four normal requests
HOSTILE = {name: case for name, case in SERVE.items() if case[0] is not None}


def _post(url, raw: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", content=raw, timeout=60,
                      headers={"Content-Type": "application/json", **(headers or {})})


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_request_is_refused_while_normal_ones_are_answered(server, name):
    raw, headers, status, code, words = HOSTILE[name]
    with ThreadPoolExecutor(5) as pool:
        normal = [pool.submit(_post, server.url, json.dumps(NORMAL).encode()) for _ in range(4)]
        hostile = _post(server.url, raw, headers)
        assert [f.result().status_code for f in normal] == [200] * 4
    assert hostile.status_code == status, hostile.text
    error = hostile.json()["error"]
    assert error["code"] == code and words in error["message"], error
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["pending"] == 0 and health["restarts"] == 0


def test_the_largest_seed_and_the_smallest_top_p_are_served(server):
    for body in ({**NORMAL, "seed": 2**64 - 1, "temperature": 1}, {**NORMAL, "seed": -2**63, "temperature": 1},
                 {**NORMAL, "top_p": 1e-6, "temperature": 2}):
        assert _post(server.url, json.dumps(body).encode()).status_code == 200, body


def test_a_page_of_the_server_itself_and_an_api_key_are_not_refused(served_model):
    from vlmkit.serve import ServeSettings, create_app

    with LiveServer(create_app(served_model, "t", ServeSettings(max_tokens=4, allowed_hosts=("vlm.lan",)))) as live:
        for headers in ({"Origin": f"http://127.0.0.1:{live.port}"}, {"Host": "vlm.lan"}, {"Host": "localhost:1"}):
            reply = _post(live.url, json.dumps(NORMAL).encode(), headers)
            assert reply.status_code == 200, (headers, reply.text)
        assert httpx.get(live.url + "/health", headers={"Host": "evil.example"}).status_code == 403
    with LiveServer(create_app(served_model, "t", ServeSettings(max_tokens=4), api_key="k")) as live:
        keyed = {"Host": "vlm.example", "Origin": "https://app.example", "Authorization": "Bearer k"}
        assert _post(live.url, json.dumps(NORMAL).encode(), keyed).status_code == 200


def _until_pending(live_or_engine, want: int, seconds: float = 30) -> int:
    engine = getattr(live_or_engine, "engine", live_or_engine)
    deadline = time.time() + seconds
    while (pending := engine.pending) != want and time.time() < deadline:
        time.sleep(0.02)
    return pending


def test_a_client_trickling_its_body_loses_its_place(served_model):
    from vlmkit.serve import ServeSettings, create_app

    settings = ServeSettings(max_tokens=4, max_queue=1, body_timeout=1.0)
    with LiveServer(create_app(served_model, "t", settings)) as live:
        sock = socket.create_connection(("127.0.0.1", live.port), timeout=10)
        try:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n")
            started = time.time()
            reply = b""
            for _ in range(40):  # a byte every 0.1 s: every read succeeds, the whole body never comes in time
                try:
                    sock.sendall(b" ")
                except OSError:
                    break
                sock.settimeout(0.1)
                try:
                    reply += sock.recv(4096)
                except (TimeoutError, socket.timeout):
                    continue
                if reply:
                    break
            sock.settimeout(10)
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        finally:
            sock.close()
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"body_timeout" in reply and b"--body-timeout" in reply
        assert time.time() - started < 3
        assert _until_pending(live, 0) == 0
        assert _post(live.url, json.dumps(NORMAL).encode()).status_code == 200


def test_a_plain_client_that_disconnects_cancels_its_job(served_model):
    """Not streaming: the server notices the closed socket while it waits for the answer and stops generating."""
    from vlmkit.serve import ServeSettings, create_app

    steps = []
    real = served_model.llm.forward

    def slow(*args, **kwargs):  # each decode step takes 0.1 s: 24 tokens take 2.4 s unless cancelled
        steps.append(time.time())
        time.sleep(0.1)
        return real(*args, **kwargs)

    settings = ServeSettings(max_tokens=24)
    with LiveServer(create_app(served_model, "t", settings)) as live:
        served_model.llm.forward = slow
        try:
            body = json.dumps({"messages": [image_message("what colour?", png_uri())], "max_tokens": 24,
                               "stop": ["\u0001"]}).encode()
            sock = socket.create_connection(("127.0.0.1", live.port), timeout=10)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            deadline = time.time() + 20
            while len(steps) < 3 and time.time() < deadline:
                time.sleep(0.02)
            sock.close()  # gone before its answer
            closed_at = time.time()
            assert _until_pending(live, 0) == 0
            time.sleep(0.3)
            after = [t for t in steps if t > closed_at + 0.6]  # a poll (0.25 s) and the step in flight
            assert not after, f"{len(after)} decode steps after the client left"
        finally:
            served_model.llm.__dict__.pop("forward", None)
        assert _post(live.url, json.dumps(NORMAL).encode()).status_code == 200


def test_a_listener_that_fails_cancels_its_job_alone(served_model):
    """A job whose listener raises (its event loop closed under it) is cancelled; the jobs beside it finish."""
    from vlmkit.infer.generate import GenerationConfig
    from vlmkit.serve.engine import Engine, Job
    from vlmkit.serve.protocol import ServeSettings

    engine = Engine(served_model, ServeSettings(max_tokens=4))
    engine.start()
    try:
        ids = served_model.tokenizer.encode("hi")

        def closed_loop(event):
            raise RuntimeError("Event loop is closed")

        done, events = threading.Event(), []
        broken = Job(ids, [], GenerationConfig(max_new_tokens=4), [], emit=closed_loop, _tokenizer=served_model.tokenizer)
        engine.submit(broken)
        engine.submit(Job(ids, [], GenerationConfig(max_new_tokens=4), [], _tokenizer=served_model.tokenizer,
                          emit=lambda event: (events.append(event), event[0] != "delta" and done.set())))
        assert done.wait(30) and events[-1][0] == "done"
        assert _until_pending(engine, 0) == 0 and broken.cancelled and engine.restarts == 0
    finally:
        engine.stop()


def test_a_worker_that_dies_is_restarted(served_model):
    """Whatever escapes the per-request handlers (here a job whose images are missing, not an empty list) kills the worker
    loop; the engine fails the jobs it held, starts the loop again and serves the next job."""
    from vlmkit.infer.generate import GenerationConfig
    from vlmkit.serve.engine import Engine, Job
    from vlmkit.serve.protocol import ServeSettings

    engine = Engine(served_model, ServeSettings(max_tokens=4))
    engine.start()
    try:
        ids = served_model.tokenizer.encode("hi")
        failed = []
        engine.submit(Job(ids, None, GenerationConfig(max_new_tokens=2), [], emit=failed.append,
                          _tokenizer=served_model.tokenizer))
        deadline = time.time() + 30
        while engine.restarts == 0 and time.time() < deadline:
            time.sleep(0.01)
        assert engine.restarts == 1 and failed and failed[0][:2] == ("error", 500)
        done, events = threading.Event(), []
        engine.submit(Job(ids, [], GenerationConfig(max_new_tokens=2), [], _tokenizer=served_model.tokenizer,
                          emit=lambda event: (events.append(event), event[0] != "delta" and done.set())))
        assert done.wait(30) and events[-1][0] == "done"
        assert engine.alive and _until_pending(engine, 0) == 0
    finally:
        engine.stop()
    assert not engine.alive


def test_health_is_503_while_the_engine_is_not_running(served_model):
    from vlmkit.serve import ServeSettings, create_app
    from vlmkit.serve.engine import Engine

    engine = Engine(served_model, ServeSettings())
    with LiveServer(create_app(served_model, "t", ServeSettings(), engine=engine)) as live:
        assert httpx.get(live.url + "/health").json()["status"] == "ok"
        engine.stop()  # the worker has ended: no request would ever be answered
        response = httpx.get(live.url + "/health")
        assert response.status_code == 503 and response.json()["status"] == "unavailable"


def test_a_job_whose_prefill_fails_fails_alone(served_model):
    """Two jobs admitted together, one with pixels the tower cannot take: the group's prefill fails, each job is
    tried by itself, the bad one gets its own 500 and the good one its answer."""
    import torch

    from vlmkit.infer.generate import GenerationConfig
    from vlmkit.serve.engine import Engine, Job
    from vlmkit.serve.protocol import ServeSettings

    from vlmkit.data.render import render_conversation
    from vlmkit.data.templates import get_template

    ids = render_conversation([{"role": "user", "content": "<image>\nwhat colour?"}],
                              get_template(served_model.config.template), served_model.tokenizer,
                              num_image_tokens=served_model.num_image_tokens, add_generation_prompt=True).input_ids
    good_pixels = served_model.image_transform(__import__("PIL.Image").Image.new("RGB", (40, 30), (255, 0, 0)))
    engine = Engine(served_model, ServeSettings(max_tokens=4, batch_wait=0.5))
    outcomes: dict[str, list] = {"good": [], "bad": []}
    done = threading.Event()

    def listener(name):
        def emit(event):
            outcomes[name].append(event)
            if event[0] != "delta" and all(any(e[0] != "delta" for e in v) for v in outcomes.values()):
                done.set()
        return emit

    for name, pixels in (("bad", torch.zeros(3, 7, 7)), ("good", good_pixels)):
        engine.submit(Job(ids, [pixels], GenerationConfig(max_new_tokens=3), [], emit=listener(name),
                          _tokenizer=served_model.tokenizer))
    engine.start()
    try:
        assert done.wait(30)
        assert outcomes["good"][-1][0] == "done" and outcomes["bad"][-1][:2] == ("error", 500)
        assert _until_pending(engine, 0) == 0 and engine.restarts == 0
    finally:
        engine.stop()
