"""32 clients at once, one in ten malformed: every valid request is answered (as the library answers it
alone), every malformed one gets a 4xx, nothing crashes, and the engine really batched."""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from live import file_uri, image_message, png_uri, reference

CLIENTS = 32
COLOURS = [(255, 0, 0), (0, 0, 255), (0, 160, 0), (250, 200, 0)]
QUESTIONS = ["what color is the shape?", "what shape is in the image?", "is there a circle?"]
BAD = Path(__file__).parent.parent / "data" / "bad"


def malformed(i: int):
    """Three kinds of bad request: broken JSON, a corrupt image, a max_tokens over the cap."""
    kind = (i // 10) % 3
    if kind == 0:
        return b'{"messages": [{"role": "user", "content": "hi"}', 400
    if kind == 1:
        return json.dumps({"messages": [image_message("what?", file_uri(BAD / "corrupt.png"))]}).encode(), 400
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}).encode(), 400


def test_32_concurrent_clients_with_malformed_requests(server, served_model):
    requests = []
    for i in range(CLIENTS):
        if i % 10 == 9:
            requests.append(("bad",) + malformed(i))
        else:
            uri, question = png_uri(COLOURS[i % 4]), QUESTIONS[i % 3]
            body = {"model": "tiny-test", "messages": [image_message(question, uri)], "stream": i % 3 == 0}
            requests.append(("good", json.dumps(body).encode(), (uri, question)))
    expected = {key: reference(served_model, key[1], key[0])[1] for kind, _, key in requests if kind == "good"}
    batches_before = server.engine.batches
    start = threading.Barrier(CLIENTS)

    def call(request):
        kind, raw, _ = request
        start.wait()
        with httpx.Client(timeout=120) as http:
            if kind == "good" and json.loads(raw)["stream"]:
                with http.stream("POST", server.url + "/v1/chat/completions", content=raw,
                                 headers={"Content-Type": "application/json"}) as response:
                    events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]"
                text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                               for e in events[:-1] if json.loads(e)["choices"])
                return response.status_code, text
            response = http.post(server.url + "/v1/chat/completions", content=raw,
                                 headers={"Content-Type": "application/json"})
            body = response.json()
            return response.status_code, body["choices"][0]["message"]["content"] if response.is_success else body

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(call, requests))

    for (kind, _, key), (status, got) in zip(requests, results):
        if kind == "good":
            assert status == 200, got
            assert got == expected[key], key
        else:
            assert status == key and "error" in got and got["error"]["message"], got
    assert sum(kind == "bad" for kind, _, _ in requests) == 3
    answered = server.engine.batches - batches_before
    print(f"{CLIENTS - 3} valid requests answered in {answered} batches")
    assert answered < CLIENTS - 3, f"{answered} batches for {CLIENTS - 3} requests: nothing was batched"
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["pending"] == 0
