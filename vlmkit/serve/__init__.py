"""Serving: an OpenAI-compatible chat-completions API and a web chat page (`vlmkit serve RUN`)."""
from vlmkit.serve.protocol import ApiError, ServeSettings

__all__ = ["ApiError", "ServeSettings", "create_app", "serve"]


def __getattr__(name):  # FastAPI is imported only when an app is made
    if name in ("create_app", "serve"):
        from vlmkit.serve import app  # start-up: FastAPI (0.32 s) only when an app is made

        return getattr(app, name)
    raise AttributeError(name)
