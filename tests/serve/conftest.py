"""A live server on a free local port: uvicorn in a thread of the test process, serving a tiny random model."""
from __future__ import annotations

import pytest
from live import LiveServer


@pytest.fixture(scope="module")
def served_model(make_model):
    import torch

    torch.manual_seed(0)
    # the paper's short-answer prompt (the tiny scale has none): the page appends it while "short answer" is ticked
    return make_model(answer_prompt="Answer the question using a single word or phrase.").eval()


@pytest.fixture(scope="module")
def server(served_model):
    from vlmkit.serve import ServeSettings, create_app

    settings = ServeSettings(max_body_bytes=200_000, max_images=2, max_image_pixels=1_000_000, max_tokens=24,
                             max_queue=64, max_batch=8)
    with LiveServer(create_app(served_model, "tiny-test", settings)) as live:
        yield live
