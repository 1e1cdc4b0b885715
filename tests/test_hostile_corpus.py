"""Every case of the hostile corpus (tests/hostile.py) in one test: served requests, images, data records,
safetensors headers, damaged checkpoints. The outcome of each must be the refusal it names: a 4xx with its
code, or the one-line error of its kind. Anything else (a traceback's exception, a 500, a dead engine) is
counted, and the counts must be 0. The table of outcomes is printed (pytest -s shows it)."""
from __future__ import annotations

import base64
import io
import json
import sys
from collections import Counter
from pathlib import Path

import httpx
from hostile import (CHECKPOINTS, HEADERS, IMAGES, NORMAL, RECORDS, SERVE, png, record_folder, safetensors_file,
                     serve_image_bodies)
from PIL import Image

from vlmkit.errors import BadRecord, ConfigError

sys.path.insert(0, str(Path(__file__).parent / "serve"))
from live import LiveServer  # noqa: E402


def _png_uri(size) -> str:
    buffer = io.BytesIO()
    Image.new("1", size).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _serve_cases(model, outcomes):
    from vlmkit.serve import ServeSettings, create_app

    images = serve_image_bodies(_png_uri)
    with LiveServer(create_app(model, "corpus", ServeSettings(max_tokens=8))) as live:
        for name, (raw, headers, status, code, words) in SERVE.items():
            response = httpx.post(live.url + "/v1/chat/completions", content=raw if raw is not None else images[name],
                                  headers={"Content-Type": "application/json", **headers}, timeout=60)
            error = response.json().get("error", {}) if response.headers.get("content-type", "").startswith(
                "application/json") else {}
            ok = response.status_code == status and error.get("code") == code and words in error.get("message", "")
            outcomes.append(("serve", name, ok, f"{response.status_code} {error.get('code')}"))
        normal = httpx.post(live.url + "/v1/chat/completions", json=NORMAL, timeout=60)
        health = httpx.get(live.url + "/health").json()
        outcomes.append(("serve", "a normal request after them all", normal.status_code == 200,
                         f"{normal.status_code}"))
        outcomes.append(("serve", "the engine is alive, nothing pending, no restart",
                         health["status"] == "ok" and health["pending"] == 0 and health["restarts"] == 0,
                         json.dumps(health)))


def _refusal(call, kind_or_type, *words) -> tuple[bool, str]:
    """Run `call`; it must raise the named BadRecord kind (a str) or exception type, in one line with `words`."""
    try:
        call()
    except BadRecord as exc:
        return (kind_or_type == exc.kind and _says(exc, words)), f"BadRecord {exc.kind}"
    except ConfigError as exc:
        return (kind_or_type is ConfigError and _says(exc, words)), "ConfigError"
    except Exception as exc:  # noqa: BLE001  what the corpus counts as a traceback
        return False, f"TRACEBACK {type(exc).__name__}: {exc}"[:200]
    return False, "accepted"


def _says(exc, words) -> bool:
    return all(word in str(exc) for word in words) and "\n" not in str(exc)


def test_the_hostile_corpus(make_model, tmp_path, capsys):
    from vlmkit.model.weights import stream_safetensors
    from vlmkit.data.images import check_image, decode_image, load_image
    from vlmkit.data.sources import DataSpec, build_dataset
    from vlmkit.io import verify_manifest

    model = make_model()
    outcomes: list[tuple[str, str, bool, str]] = []
    _serve_cases(model, outcomes)

    for name, (size, transform, limits, flag, words) in IMAGES.items():
        path = png(tmp_path / "bomb.png", size)
        for how, call in (("header", lambda: check_image(path, "r", limits, transform)),
                          ("file", lambda: load_image(path, "r", limits, transform)),
                          ("bytes", lambda: decode_image(path.read_bytes(), "upload", "r", limits, transform))):
            ok, seen = _refusal(call, "image_too_large", words, flag)
            outcomes.append(("image", f"{name} ({how})", ok, seen))

    folder = record_folder(tmp_path)
    for name, (record, kind, words) in RECORDS.items():
        confine = "(confined)" in name
        ok, seen = _refusal(lambda: build_dataset(model, [record], "hostile.json", model.config.template,
                                                  DataSpec(instructions="hostile.json", image_folder=folder,
                                                           confine_images=confine)), kind, words)
        outcomes.append(("record", name, ok, seen))

    for name, (header, data, length, words) in HEADERS.items():
        path = safetensors_file(tmp_path / "x.safetensors", header, data, length)
        ok, seen = _refusal(lambda: list(stream_safetensors(path)), ConfigError, words)
        outcomes.append(("weights", name, ok, seen))

    for name, (damage, words) in CHECKPOINTS.items():
        directory = tmp_path / f"ckpt-{len(outcomes)}"
        model.save_pretrained(directory)
        assert verify_manifest(directory) is None
        damage(directory)
        problem = verify_manifest(directory)
        outcomes.append(("checkpoint", name, problem is not None and words in problem, str(problem)))

    with capsys.disabled():
        print(f"\nhostile corpus: {len(outcomes)} cases")
        for area, name, ok, seen in outcomes:
            print(f"  {'ok  ' if ok else 'FAIL'} {area:<10} {name:<48} {seen}")
    counts = Counter(area for area, *_ in outcomes)
    assert len(outcomes) >= 40 and all(counts[a] for a in ("serve", "image", "record", "weights", "checkpoint"))
    tracebacks = [o for o in outcomes if o[3].startswith("TRACEBACK")]
    failed = [o for o in outcomes if not o[2]]
    assert not tracebacks and not failed, failed
