"""The hostile-input corpus: requests, images, data records, weight files and checkpoints that an attacker or a
careless user could hand vlmkit. Each case names its input and what it expects (a status and error code, or a
refusal kind, and words the one-line message must contain). tests/faults/test_hostile_corpus.py runs every case
in one test; the area tests (tests/serve/test_hostile.py, test_image_geometry.py, test_hostile_files.py) run
them again with their surroundings (concurrent normal requests, subprocesses, memory)."""
from __future__ import annotations

import json
import os
import struct

from PIL import Image

from vlmkit.data.images import ImageLimits, ImageTransform

# -- serve: raw body bytes, extra headers, status, error code, words in the message ---------------------------------
NORMAL = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
SERVE = {
    "seed past 2**64": (json.dumps({**NORMAL, "seed": 2**64, "temperature": 1}).encode(), {}, 400, "invalid_value",
                        "seed"),
    "seed below -2**63": (json.dumps({**NORMAL, "seed": -2**63 - 1}).encode(), {}, 400, "invalid_value", "seed"),
    "top_p below float32": (json.dumps({**NORMAL, "top_p": 1e-46, "temperature": 1}).encode(), {}, 400,
                            "invalid_value", "top_p"),
    "temperature too small": (json.dumps({**NORMAL, "temperature": 1e-300}).encode(), {}, 400, "invalid_value",
                              "temperature"),
    "NaN temperature": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', {}, 400,
                        "invalid_json", "NaN"),
    "Infinity top_p": (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}', {}, 400,
                       "invalid_json", "Infinity"),
    "float overflow": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}', {}, 400,
                       "invalid_value", "finite"),
    "nested 90,000 deep": (b'{"messages": ' + b"[" * 90_000 + b"]" * 90_000 + b"}", {}, 400, "invalid_json",
                           "deeper than 32"),
    "lone surrogate": (b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}', {}, 400, "invalid_text",
                       "lone surrogate"),
    "lone surrogate in stop": (b'{"messages": [{"role": "user", "content": "hi"}], "stop": "\\udfff"}', {}, 400,
                               "invalid_text", "stop"),
    "invalid UTF-8 bytes": (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', {}, 400, "invalid_json",
                            "not valid JSON"),
    "prompt of 150,000 characters": (json.dumps({"messages": [{"role": "user", "content": "x" * 150_000}]}).encode(),
                                     {}, 400, "context_length_exceeded", "characters"),
    "max_tokens of 10**30": (json.dumps({**NORMAL, "max_tokens": 10**30}).encode(), {}, 400, "max_tokens_too_large",
                             "cap"),
    "stop string of 10,000 characters": (json.dumps({**NORMAL, "stop": "x" * 10_000}).encode(), {}, 400,
                                         "invalid_value", "256"),
    "a form POST": (b"messages=hi", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
                    "unsupported_media_type", "must be JSON"),
    "a text/plain POST": (json.dumps(NORMAL).encode(), {"Content-Type": "text/plain"}, 415, "unsupported_media_type",
                          "text/plain"),
    "a foreign Host (DNS rebinding)": (json.dumps(NORMAL).encode(), {"Host": "attacker.example:8000"}, 403,
                                       "forbidden_origin", "attacker.example"),
    "a foreign Origin": (json.dumps(NORMAL).encode(), {"Origin": "http://attacker.example"}, 403, "forbidden_origin",
                         "attacker.example"),
    "a null Origin": (json.dumps(NORMAL).encode(), {"Origin": "null"}, 403, "forbidden_origin", "'null'"),
    "a 1x40000 image (238 bytes)": (None, {}, 400, "image_too_large", "--max-image-side"),
    "a 1x3000 image padded to a square": (None, {}, 400, "image_too_large", "--max-image-aspect"),
}


def serve_image_bodies(png) -> dict:
    """The image cases' bodies, from `png(size) -> data: URI` (the tests make the PNG bytes)."""
    def ask(uri):
        return json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                                     {"type": "text", "text": "?"}]}],
                           "max_tokens": 4}).encode()
    return {"a 1x40000 image (238 bytes)": ask(png((1, 40_000))),
            "a 1x3000 image padded to a square": ask(png((1, 3_000)))}


# -- images: size, transform, limits, the flag the message names, words in the message -----------------------------
PAD = ImageTransform(size=336, crop=(336, 336), pad_to_square=True)     # LLaVA-1.5's
SHORT_EDGE = ImageTransform(size=224, crop=(224, 224))                  # LLaVA's (CLIP)
IMAGES = {
    "1x40000 padded to a square": ((1, 40_000), PAD, ImageLimits(), "--max-image-side", "a side of 40,000"),
    "1x12000 padded to a square": ((1, 12_000), PAD, ImageLimits(), "--max-image-aspect", "aspect ratio of 12,000"),
    "200x9000 padded to a square": ((200, 9_000), PAD, ImageLimits(max_aspect=100), "--max-image-pixels",
                                    "9000x9000 pixels once padded to a square"),
    "100x4000 resized by its short edge": ((100, 4_000), SHORT_EDGE, ImageLimits(max_aspect=100, max_pixels=1_000_000),
                                           "--max-image-pixels", "224x8960 pixels once resized"),
    "30000x30000": ((30_000, 30_000), SHORT_EDGE, ImageLimits(), "--max-image-pixels", "declares 900,000,000 pixels"),
    "20000x2": ((20_000, 2), SHORT_EDGE, ImageLimits(), "--max-image-side", "a side of 20,000"),
}


def png(path, size, mode="1"):
    Image.new(mode, size).save(path, optimize=True)
    return path


# -- data records: what a record file may hold; (record, expected BadRecord kind, words) ----------------------------
TURNS = [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "red"}]
RECORDS = {
    "image is a number": ({"id": "n", "image": 7, "conversations": TURNS}, "schema", "'image' must be a file name"),
    "a NUL in the image path": ({"id": "nul", "image": "a\x00.png", "conversations": TURNS}, "schema", "NUL"),
    "the image is a FIFO": ({"id": "fifo", "image": "pipe.png", "conversations": TURNS}, "not_a_file", "a FIFO"),
    "the image is a directory": ({"id": "dir", "image": "folder.png", "conversations": TURNS}, "not_a_file",
                                 "a directory"),
    "the image is missing": ({"id": "gone", "image": "nothing.png", "conversations": TURNS}, "missing_image",
                             "not found"),
    "the image is not an image": ({"id": "txt", "image": "text.png", "conversations": TURNS}, "corrupt_image",
                                  "cannot decode"),
    "a 1x40000 image": ({"id": "tall", "image": "tall.png", "conversations": TURNS}, "image_too_large",
                        "--max-image-side"),
    "an absolute path outside the folder (confined)": ({"id": "abs", "image": "/etc/hostname", "conversations": TURNS},
                                                       "outside_folder", "--confine-images"),
    "a .. path outside the folder (confined)": ({"id": "dots", "image": "../../x.png", "conversations": TURNS},
                                                "outside_folder", "--confine-images"),
    "conversations is a string": ({"id": "s", "image": "good.png", "conversations": "hi"}, "schema",
                                  "no 'conversations' list"),
    "not an object": (["a", "list"], "schema", "must be an object"),
    "two placeholders, one image": ({"id": "two", "image": "good.png", "conversations": [
        {"from": "human", "value": "<image><image>\nwhat?"}, {"from": "gpt", "value": "red"}]}, "image_count",
        "2 <image> placeholder(s)"),
}


def record_folder(root) -> str:
    """The image folder the record cases name: a good image, a FIFO, a directory, text, a 1x40000 PNG."""
    folder = root / "images"
    folder.mkdir(exist_ok=True)
    png(folder / "good.png", (32, 32), "RGB")
    png(folder / "tall.png", (1, 40_000))
    if not (folder / "pipe.png").exists():
        os.mkfifo(folder / "pipe.png")
    (folder / "folder.png").mkdir(exist_ok=True)
    (folder / "text.png").write_text("not a picture")
    return str(folder)


# -- safetensors headers: header, data, header-length override, words in the error ---------------------------------
HEADERS = {
    "a header length of 2**63": ({}, b"", 2**63, "its header claims"),
    "a tensor of 2**40 bytes in a 64-byte file": ({"a": {"dtype": "F32", "shape": [2**38],
                                                         "data_offsets": [0, 2**40]}}, b"\0" * 64, None,
                                                  "past the end of the file"),
    "offsets that disagree with the shape": ({"a": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}},
                                             b"\0" * 64, None, "32 bytes of data for shape [4, 4] F32 (64 bytes)"),
    "a negative dimension": ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None,
                             "not a list of non-negative integers"),
    "end before start": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, b"\0" * 8, None,
                         "0 <= start <= end"),
    "overlapping tensors": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None,
                            "overlap"),
    "an unknown dtype": ({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16, None,
                         "'F128'"),
    "a header that is a list": ([1, 2], b"", None, "not a JSON object"),
    "an entry without offsets": ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, None, "needs dtype, shape"),
}


def safetensors_file(path, header, data: bytes = b"", length: int | None = None):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


# -- checkpoints: what a power cut or a bad disk leaves; damage(directory) and words of the report -----------------
def _truncate(path, keep=1000):
    path.write_bytes(path.read_bytes()[:keep])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF
    path.write_bytes(bytes(data))


CHECKPOINTS = {
    "empty weights": (lambda d: (d / "model.safetensors").write_bytes(b""), "model.safetensors is 0 bytes"),
    "truncated weights": (lambda d: _truncate(d / "model.safetensors"), "model.safetensors is 1,000 bytes"),
    "a changed byte": (lambda d: _flip(d / "model.safetensors"), "does not match its checksum"),
    "a missing file": (lambda d: (d / "config.json").unlink(), "config.json is missing"),
    "an empty manifest": (lambda d: (d / "manifest.json").write_text(""), "manifest.json is unreadable"),
}
