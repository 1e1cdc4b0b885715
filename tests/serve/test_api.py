"""The OpenAI-compatible API against a live server: the official `openai` client, plain and streaming, and
every refusal as an OpenAI-style 4xx naming what was wrong."""
from __future__ import annotations

import contextlib
import http.server
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from live import LiveServer, file_uri, image_message, png_uri, reference
from PIL import Image

openai = pytest.importorskip("openai")

BAD = Path(__file__).parent.parent / "data" / "bad"
QUESTION = "what color is the shape?"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_plain_and_streamed_answers_equal_the_library(server, served_model, client):
    uri = png_uri((255, 0, 0))
    tokens, text, prompt_tokens = reference(served_model, QUESTION, uri)
    assert text  # the seeded random model says something: the comparison below is not vacuous

    reply = client.chat.completions.create(model="tiny-test", messages=[image_message(QUESTION, uri)])
    assert reply.object == "chat.completion" and reply.model == "tiny-test"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == ("length" if len(tokens) == 24 else "stop")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, len(tokens))
    assert reply.usage.total_tokens == prompt_tokens + len(tokens)

    chunks = list(client.chat.completions.create(model="tiny-test", messages=[image_message(QUESTION, uri)],
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1  # it really streamed, piece by piece
    assert "".join(deltas) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)
    assert len({c.id for c in chunks}) == 1


def test_raw_stream_is_server_sent_events_ending_with_done(server):
    body = {"model": "tiny-test", "messages": [image_message(QUESTION, png_uri())], "stream": True, "max_tokens": 4}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_text_only_multi_turn_and_system_message(server, served_model, client):
    from vlmkit.infer.chat import answer
    from vlmkit.infer.generate import GenerationConfig

    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi"}, {"role": "user", "content": "what is a circle?"}]
    expected = answer(served_model, messages, [], GenerationConfig(max_new_tokens=24))
    reply = client.chat.completions.create(model="tiny-test", messages=messages)
    assert reply.choices[0].message.content == expected


def test_several_images_before_the_text_are_numbered_as_chat_numbers_them(server, served_model, client):
    """[image, image, text] is `Image 1: <image>\nImage 2: <image>\ntext` (vlmkit chat, the comparison data); images
    placed between text parts stay where they are."""
    import base64

    from vlmkit.infer.chat import answer, first_user_turn
    from vlmkit.infer.generate import GenerationConfig
    from vlmkit.serve.protocol import ServeSettings, parse_chat_request

    uris = [png_uri((220, 30, 30)), png_uri((30, 60, 220))]
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in uris] + [{"type": "text", "text": "same colour?"}]
    reply = client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": parts}])
    images = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).convert("RGB") for u in uris]
    expected = answer(served_model, [{"role": "user", "content": first_user_turn("same colour?", 2)}], images,
                      GenerationConfig(max_new_tokens=24))
    assert reply.choices[0].message.content == expected
    between = [{"type": "text", "text": "is"}, parts[0], {"type": "text", "text": "like"}, parts[1]]
    request = parse_chat_request({"messages": [{"role": "user", "content": between}]}, ServeSettings(), "m")
    assert request.messages[0]["content"] == "is\n<image>\nlike\n<image>"
    one = parse_chat_request({"messages": [{"role": "user", "content": parts[1:]}]}, ServeSettings(), "m")
    assert one.messages[0]["content"] == "<image>\nsame colour?"  # one image: as before


def test_max_tokens_stop_strings_and_seeded_sampling(server, served_model, client):
    uri = png_uri((0, 0, 255))
    tokens, text, _ = reference(served_model, QUESTION, uri)
    assert len(tokens) >= 4
    short = client.chat.completions.create(model="tiny-test", messages=[image_message(QUESTION, uri)], max_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    assert text.startswith(short.choices[0].message.content)

    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = text[:text.find(stop)].strip()
    for stream in (False, True):
        reply = client.chat.completions.create(model="tiny-test", messages=[image_message(QUESTION, uri)],
                                               stop=[stop], stream=stream)
        if stream:
            pieces = [c.choices[0] for c in reply if c.choices]
            content = "".join(p.delta.content or "" for p in pieces).strip()
            finish = pieces[-1].finish_reason
        else:
            content, finish = reply.choices[0].message.content.strip(), reply.choices[0].finish_reason
        assert (content, finish) == (cut, "stop"), stream

    sampled = [client.chat.completions.create(model="tiny-test", messages=[image_message(QUESTION, uri)],
                                              temperature=1.5, seed=seed).choices[0].message.content
               for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1]


def test_models_and_health(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-test"]
    card = httpx.get(server.url + "/v1/models").json()["data"][0]["vlmkit"]
    assert card["preset"] == "llava-1.5" and card["context_length"] == 512 and card["image_tokens"] == 16
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-test" and health["auth"] is False


def _post(server, body, raw: bytes | None = None):
    response = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                          content=raw if raw is not None else json.dumps(body).encode(),
                          headers={"Content-Type": "application/json"})
    return response.status_code, response.json()


def _ask(content, **extra) -> dict:
    return {"model": "tiny-test", "messages": [{"role": "user", "content": content}], **extra}


def _image(uri):
    return {"type": "image_url", "image_url": {"url": uri}}


REFUSALS = {
    # name: (body, status, param, code, words the message must contain)
    "not JSON": (b'{"model": "tiny-test", "messages": [', 400, None, "invalid_json", "not valid JSON"),
    "body too large": (_ask("x" * 210_000), 413, None, "body_too_large", "200,000"),
    "too many images": (_ask([_image(png_uri())] * 3 + [{"type": "text", "text": "?"}]), 400,
                        "messages[0].content[2]", "too_many_images", "more than 2 images"),
    "decompression bomb": (_ask([_image(file_uri(BAD / "bomb.png"))]), 400, "messages[0].content[0].image_url.url",
                           "image_too_large", "declares 400,000,000 pixels"),
    "over the pixel limit": (_ask([_image(png_uri(size=(1200, 1000)))]), 400, "messages[0].content[0].image_url.url",
                             "image_too_large", "1200x1000 pixels, more than the limit of 1,000,000"),
    "corrupt image": (_ask([_image(file_uri(BAD / "corrupt.png"))]), 400, "messages[0].content[0].image_url.url",
                      "corrupt_image", "cannot decode"),
    "empty image": (_ask([_image("data:image/png;base64,")]), 400, "messages[0].content[0].image_url.url",
                    "corrupt_image", "empty"),
    "bad base64": (_ask([_image("data:image/png;base64,@@@")]), 400, "messages[0].content[0].image_url.url",
                   "invalid_image_url", "base64"),
    "http image URL": (_ask([_image("http://example.com/cat.png")]), 400, "messages[0].content[0].image_url.url",
                       "image_url_not_allowed", "--allow-image-urls"),
    "max_tokens over the cap": (_ask("hi", max_tokens=25), 400, "max_tokens", "max_tokens_too_large",
                                "cap of 24"),
    "prompt over the context": (_ask("circle " * 600), 400, "messages", "context_length_exceeded",
                                "context is 512"),
    "prompt + max_tokens over the context": (_ask("circle " * 495, max_tokens=24), 400, "max_tokens",
                                             "context_length_exceeded", "ask for at most"),
    "n=2": (_ask("hi", n=2), 400, "n", "invalid_value", "only n=1"),
    "unknown model": ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model",
                      "model_not_found", "'gpt-9' is not served here"),
    "no messages": ({"model": "tiny-test"}, 400, "messages", "invalid_value", "non-empty list"),
    "ends with the assistant": ({"model": "tiny-test", "messages": [{"role": "user", "content": "hi"},
                                                                    {"role": "assistant", "content": "yo"}]},
                                400, "messages", "invalid_value", "last message must be a user message"),
    "turns do not alternate": ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
                               400, "messages[1].role", "invalid_value", "alternate"),
    "image in an assistant turn": ({"messages": [{"role": "user", "content": "a"},
                                                 {"role": "assistant", "content": [_image(png_uri())]},
                                                 {"role": "user", "content": "b"}]},
                                   400, "messages[1].content[0]", "invalid_image", "user messages only"),
    "<image> typed in the text": (_ask("look: <image>"), 400, "messages[0].content", "reserved_token", "<image>"),
    "temperature out of range": (_ask("hi", temperature=3), 400, "temperature", "invalid_value", "outside"),
    "unknown part type": (_ask([{"type": "input_audio", "input_audio": {}}]), 400, "messages[0].content[0]",
                          "invalid_type", "'input_audio'"),
    "unknown role": ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", "invalid_value",
                     "'tool'"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_every_refusal_is_an_openai_error_naming_the_problem(server, name):
    body, status, param, code, words = REFUSALS[name]
    got_status, got = _post(server, None if isinstance(body, bytes) else body, body if isinstance(body, bytes) else None)
    assert got_status == status, got
    error = got["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code)
    assert words in error["message"], error["message"]
    assert error["type"] in ("invalid_request_error", "not_found_error")


def test_the_openai_client_raises_its_own_errors(server, client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "hi"}], max_tokens=99)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    assert httpx.get(server.url + "/v2/nothing").json()["error"]["code"] == "404"


@contextlib.contextmanager
def _restore_forward(model):
    """Undo a test's replacement of the language model's forward, whatever happens."""
    try:
        yield
    finally:
        model.llm.__dict__.pop("forward", None)


def test_a_model_failure_is_a_500_and_the_server_keeps_serving(server, served_model, client):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    served_model.llm.forward = broken  # the language model fails on its next call
    with _restore_forward(served_model):
        with pytest.raises(openai.InternalServerError, match="illegal memory access"):
            client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "hi"}])
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-2])["error"]["code"] == "model_failure" and events[-1] == "[DONE]"
    reply = client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(server.url + "/health").json()["pending"] == 0


def test_a_client_that_leaves_mid_stream_frees_its_place(server, client):
    body = {"messages": [image_message(QUESTION, png_uri())], "stream": True, "max_tokens": 24}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        next(response.iter_lines())  # the first event, then hang up
    deadline = time.time() + 30
    while httpx.get(server.url + "/health").json()["pending"] and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").json()["pending"] == 0
    assert client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "hi"}]).choices


@pytest.fixture(scope="module")
def image_host():
    """A local web server with one PNG, for --allow-image-urls."""
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(buffer, format="PNG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/red.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(buffer.getvalue())

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_api_key_and_image_urls(served_model, image_host):
    from vlmkit.serve import ServeSettings, create_app

    settings = ServeSettings(max_tokens=8, allow_image_urls=True, image_url_allow_networks=("127.0.0.1/32",))
    with LiveServer(create_app(served_model, "keyed", settings, api_key="sekret")) as live:
        body = {"messages": [{"role": "user", "content": "hi"}]}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            response = httpx.post(live.url + "/v1/chat/completions", json=body, headers=headers)
            assert response.status_code == 401, headers
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(live.url + "/v1/models").status_code == 401
        assert httpx.get(live.url + "/health").json()["auth"] is True  # health and the page stay open
        assert httpx.get(live.url + "/").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()

        client = openai.OpenAI(base_url=live.url + "/v1", api_key="sekret", max_retries=0, timeout=60)
        by_url = client.chat.completions.create(model="keyed", messages=[image_message(QUESTION, image_host + "/red.png")])
        by_data = client.chat.completions.create(model="keyed", messages=[image_message(QUESTION, png_uri((255, 0, 0)))])
        assert by_url.choices[0].message.content == by_data.choices[0].message.content
        assert by_url.usage == by_data.usage
        with pytest.raises(openai.BadRequestError, match="could not fetch"):
            client.chat.completions.create(model="keyed", messages=[image_message(QUESTION, image_host + "/gone.png")])


def test_generation_rows_keep_their_own_settings(served_model):
    """The engine's batches mix requests: each row's budget and sampling must be its own."""
    from vlmkit.infer.generate import GenerationConfig, generate

    ids = [served_model.tokenizer.encode(text) for text in ("is there a red circle here?", "no")]
    alone = [generate(served_model, [p], config=GenerationConfig(max_new_tokens=n), stop_ids=set())[0]
             for p, n in zip(ids, (6, 3))]
    seen = []
    together = generate(served_model, ids, config=GenerationConfig(), stop_ids=set(),
                        row_configs=[GenerationConfig(max_new_tokens=6), GenerationConfig(max_new_tokens=3)],
                        on_token=lambda row, token: seen.append((row, token)) or False)
    assert together == alone
    assert [t for r, t in seen if r == 0] == alone[0] and [t for r, t in seen if r == 1] == alone[1]
    stopped = generate(served_model, ids[:1], config=GenerationConfig(max_new_tokens=6), stop_ids=set(),
                       on_token=lambda row, token: True)
    assert stopped == [alone[0][:1]]


def test_a_full_queue_answers_429_and_recovers(served_model):
    from vlmkit.serve import ServeSettings, create_app

    with LiveServer(create_app(served_model, "busy", ServeSettings(max_tokens=4, max_queue=1))) as live:
        release = threading.Event()
        real = served_model.llm.forward

        def held(*args, **kwargs):
            release.wait(30)
            return real(*args, **kwargs)

        served_model.llm.forward = held  # the first request holds the model until released
        body = {"messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(base_url=live.url, timeout=60) as http, ThreadPoolExecutor(1) as pool, \
                _restore_forward(served_model):
            first = pool.submit(http.post, "/v1/chat/completions", json=body)
            deadline = time.time() + 30
            while http.get("/health").json()["pending"] < 1 and time.time() < deadline:
                time.sleep(0.02)
            second = http.post("/v1/chat/completions", json=body)
            assert second.status_code == 429
            assert second.json()["error"]["code"] == "queue_full" and "--max-queue" in second.json()["error"]["message"]
            release.set()
            assert first.result().status_code == 200
            del served_model.llm.forward
            assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_a_short_request_overtakes_a_long_one(server, served_model):
    """Continuous batching: a request that arrives while a long answer is being generated joins the running
    batch and is answered before the long one ends (with static batches it would wait for it)."""
    uri = png_uri((255, 0, 0))
    tokens, _, _ = reference(served_model, QUESTION, uri)
    assert len(tokens) == 24  # the long request really runs to its 24-token budget
    real = served_model.llm.forward

    def slow(*args, **kwargs):
        time.sleep(0.02)  # 24 decode steps take about half a second
        return real(*args, **kwargs)

    served_model.llm.forward = slow
    body = {"messages": [image_message(QUESTION, uri)], "stream": True, "max_tokens": 24}
    arrivals = []  # (time, line) of the long stream, read as it comes
    started = threading.Event()

    def read_long():
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as long:
            for line in long.iter_lines():
                if line.startswith("data: "):
                    arrivals.append((time.perf_counter(), line))
                    if '"content": "' in line and '"content": ""' not in line:
                        started.set()  # it is decoding

    with _restore_forward(served_model), ThreadPoolExecutor(1) as pool:
        reader = pool.submit(read_long)
        assert started.wait(30)
        short = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                           json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        short_done = time.perf_counter()
        reader.result()
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 1
    assert arrivals[-1][1] == "data: [DONE]"
    assert json.loads(arrivals[-2][1][6:])["choices"][0]["finish_reason"] == "length"
    later = [line for at, line in arrivals if at > short_done and '"content": "' in line]
    assert len(later) >= 5, f"only {len(later)} pieces of the long answer came after the short one"
