"""Helpers for the server tests: a live uvicorn server in a thread, images as data: URIs."""
from __future__ import annotations

import base64
import io
import socket
import threading
import time

from PIL import Image


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    def __init__(self, app):
        import uvicorn

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def engine(self):
        return self.app.state.engine


def png_uri(colour=(255, 0, 0), size=(40, 30)) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def file_uri(path) -> str:
    with open(path, "rb") as handle:
        return "data:image/png;base64," + base64.b64encode(handle.read()).decode()


def image_message(question: str, uri: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                        {"type": "text", "text": question}]}


def reference(model, question: str, uri: str, max_new_tokens: int = 24):
    """What the library itself answers (tokens, text, prompt length) for one image and question."""
    from vlmkit.data.render import render_conversation
    from vlmkit.data.templates import get_template
    from vlmkit.infer.generate import GenerationConfig, decode_text, generate

    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")
    ids = render_conversation([{"role": "user", "content": f"<image>\n{question}"}], get_template(model.config.template),
                              model.tokenizer, num_image_tokens=model.num_image_tokens,
                              add_generation_prompt=True).input_ids
    tokens = generate(model, [ids], [1], pixel_values=model.image_transform(image)[None],
                      config=GenerationConfig(max_new_tokens=max_new_tokens))[0]
    return tokens, decode_text(model.tokenizer, tokens).strip(), len(ids)
