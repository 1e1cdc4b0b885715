"""Images bounded by geometry, on real PNG headers: a few hundred bytes must not take gigabytes after padding
or resizing; paths that are not regular files, or lead outside --image-folder when that is asked, are refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from hostile import IMAGES, PAD
from hostile import png as _png

from vlmkit.data.images import check_image, decode_image, load_image
from vlmkit.errors import BadRecord

@pytest.mark.parametrize("name", list(IMAGES))
def test_geometry_bombs_are_refused_on_the_header(tmp_path, name):
    size, transform, limits, flag, words = IMAGES[name]
    path = _png(tmp_path / "bomb.png", size)
    assert path.stat().st_size < 200_000  # a few bytes a row
    for read in (lambda: check_image(path, "r1", limits, transform), lambda: load_image(path, "r1", limits, transform),
                 lambda: decode_image(path.read_bytes(), "upload", "r1", limits, transform)):
        with pytest.raises(BadRecord) as info:
            read()
        assert info.value.kind == "image_too_large" and flag in info.value.reason and words in info.value.reason, \
            info.value.reason


def test_a_tall_image_within_the_limits_is_decoded_and_transformed(tmp_path):
    path = _png(tmp_path / "tall.png", (40, 800), "RGB")
    image = load_image(path, "r", transform=PAD)
    assert tuple(PAD(image).shape) == (3, 336, 336)
    assert PAD.working_sizes(40, 800) == [("padded to a square", (800, 800)), ("resized", (336, 336))]


def test_peak_memory_per_hostile_image_is_bounded(tmp_path):
    """Each hostile image is read in a fresh process, as training, eval and serve read it; its peak RSS over the
    process's own baseline stays under 300 MB (before the limits, 1x20000 padded added 1.6 GB)."""
    cases = {"1x40000": (1, 40_000), "1x20000": (1, 20_000), "8000x8000 solid": (8_000, 8_000),
             "6300x6300 solid (within the limits: decoded)": (6_300, 6_300), "16384x3000": (16_384, 3_000)}
    for name, size in cases.items():
        _png(tmp_path / f"{name}.png", size)
    script = textwrap.dedent("""
        import json, resource, sys
        from vlmkit.data.images import ImageTransform, load_image
        from vlmkit.errors import BadRecord
        transform = ImageTransform(size=336, crop=(336, 336), pad_to_square=True)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            transform(load_image(sys.argv[1], "r", transform=transform))
            outcome = "decoded"
        except BadRecord as exc:
            outcome = exc.kind
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        print(json.dumps({"outcome": outcome, "grown_mb": grown}))
    """)
    for name in cases:
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{name}.png")], capture_output=True,
                             text=True, timeout=120)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["grown_mb"] < 300, (name, result)


def test_a_fifo_is_refused_not_read_even_with_skip_bad(tmp_path, make_model):
    """A FIFO named as an image would block the reader forever (--skip-bad did not help)."""
    from vlmkit.data.sources import DataSpec, build_dataset

    fifo = tmp_path / "images" / "pipe.png"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    good = _png(tmp_path / "images" / "good.png", (32, 32), "RGB")
    with pytest.raises(BadRecord, match="pipe.png is a FIFO, not a regular file"):
        check_image(fifo, "r1")
    (tmp_path / "images" / "dir.png").mkdir()
    with pytest.raises(BadRecord, match="dir.png is a directory"):
        load_image(tmp_path / "images" / "dir.png", "r1")
    model = make_model()
    turns = [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "red"}]
    records = [{"id": "fifo", "image": "pipe.png", "conversations": turns},
               {"id": "ok", "image": good.name, "conversations": turns}]
    dataset = build_dataset(model, records, "mine.json", model.config.template,
                            DataSpec(instructions="mine.json", image_folder=str(tmp_path / "images"), skip_bad=True))
    assert len(dataset) == 1 and dataset.skipped.counts == {"not_a_file": 1}


def test_image_paths_outside_the_folder_are_a_choice(tmp_path, make_model):
    from vlmkit.data.sources import DataSpec, build_dataset

    folder = tmp_path / "images"
    folder.mkdir()
    outside = _png(tmp_path / "secret.png", (32, 32), "RGB")
    inside = _png(folder / "mine.png", (32, 32), "RGB")
    (folder / "link.png").symlink_to(outside)
    turns = [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "red"}]
    records = [{"id": "abs", "image": str(outside), "conversations": turns},
               {"id": "dots", "image": "../secret.png", "conversations": turns},
               {"id": "link", "image": "link.png", "conversations": turns},
               {"id": "ok", "image": inside.name, "conversations": turns}]
    model = make_model()

    def build(confine, skip_bad=True):
        return build_dataset(model, records, "mine.json", model.config.template,
                             DataSpec(instructions="mine.json", image_folder=str(folder), skip_bad=skip_bad,
                                      confine_images=confine))

    assert len(build(False)) == 4  # the default reads them as written (LLaVA's os.path.join does the same)
    confined = build(True)
    assert len(confined) == 1 and confined.skipped.counts == {"outside_folder": 3}
    with pytest.raises(BadRecord, match=r"record 'abs'.*outside --image-folder .*--confine-images"):
        build(True, skip_bad=False)
