"""Generated glyph images: one character in a colour, somewhere on a 64-px canvas, over a background texture.

A visual domain that is not easy-VQA's shapes: `vlmkit data glyphs --out DIR` writes a small VQA data set
of it (LLaVA JSON + PNGs, one question per record: which digit, its colour, top or bottom, left or right, the
background pattern), the check that a user's data of another kind is learnable with the defaults (issue 15).
Captions (`Glyph.caption`, "a red K on stripes") are there for pretraining a tower on characters.

Everything is a function of (seed, split, index): the same arguments give byte-identical PNGs and JSON, and
the splits draw from separate random streams. The font is Pillow's built-in scalable one (Aileron, in Pillow's
wheel), so no font file is needed.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from vlmkit.data.scenes import COLORS, png_bytes
from vlmkit.errors import ConfigError

VERSION = 1  # bump when a change alters generated images or records
DIGITS = "0123456789"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
TEXTURES = ("plain", "stripes", "checks", "dots")
SIZE = 64
FONT_SIZES = (24, 34)  # pixel size range of the font (the glyph is about 0.7 of it tall)
QUESTIONS = {  # kind -> question (Glyph.answer gives the answer); {what} = "digit", "letter" or "character"
    "identity": "What {what} is shown?",
    "color": "What colour is the {what}?",
    "vertical": "Is the {what} at the top or the bottom?",
    "horizontal": "Is the {what} on the left or the right?",
    "texture": "What pattern is the background?",
}
SPLIT_SALT = {"train": 0, "test": 1_000_003}


@dataclass(frozen=True)
class Glyph:
    char: str
    color: str
    texture: str
    vertical: str    # "top" | "bottom": where the glyph's centre is
    horizontal: str  # "left" | "right"
    font_size: int
    center: tuple[int, int]

    def caption(self) -> str:
        return f"a {self.color} {self.char} on {self.texture}"

    def answer(self, kind: str) -> str:
        return {"identity": self.char, "color": self.color, "vertical": self.vertical,
                "horizontal": self.horizontal, "texture": self.texture}[kind]


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def sample_glyph(rng: random.Random, chars: str) -> Glyph:
    vertical, horizontal = rng.choice(("top", "bottom")), rng.choice(("left", "right"))
    # the centre in its quadrant, far enough from the midlines that top/bottom and left/right are unambiguous
    x = rng.randint(14, 22) if horizontal == "left" else rng.randint(42, 50)
    y = rng.randint(14, 22) if vertical == "top" else rng.randint(42, 50)
    return Glyph(rng.choice(chars), rng.choice(tuple(COLORS)), rng.choice(TEXTURES), vertical, horizontal,
                 rng.randint(*FONT_SIZES), (x, y))


def _texture(draw: ImageDraw.ImageDraw, texture: str, phase: int) -> None:
    light = (200, 200, 200)
    if texture == "stripes":
        for y in range(phase % 6, SIZE, 6):
            draw.rectangle([0, y, SIZE - 1, y + 1], fill=light)
    elif texture == "checks":
        for y in range(0, SIZE, 8):
            for x in range(0, SIZE, 8):
                if (x // 8 + y // 8 + phase) % 2:
                    draw.rectangle([x, y, x + 7, y + 7], fill=(225, 225, 225))
    elif texture == "dots":
        for y in range(phase % 7 + 2, SIZE, 7):
            for x in range(phase % 5 + 2, SIZE, 7):
                draw.rectangle([x, y, x + 1, y + 1], fill=(170, 170, 170))


def render(glyph: Glyph, phase: int = 0) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    _texture(draw, glyph.texture, phase)
    draw.text(glyph.center, glyph.char, fill=COLORS[glyph.color], font=_font(glyph.font_size), anchor="mm",
              stroke_width=1, stroke_fill=COLORS[glyph.color])
    return image


def glyph_images(n: int, split: str, seed: int = 0, chars: str = DIGITS):
    """Yields (index, Glyph, PIL image) for the split's first `n` glyphs."""
    if split not in SPLIT_SALT:
        raise ConfigError(f"glyph split must be one of {', '.join(SPLIT_SALT)}, got {split!r}")
    for index in range(n):
        rng = random.Random(f"glyphs-v{VERSION}-{seed}-{SPLIT_SALT[split]}-{index}")
        glyph = sample_glyph(rng, chars)
        yield index, glyph, render(glyph, phase=rng.randrange(12))


def write_glyphs(out_dir, n: int, split: str = "train", seed: int = 0, chars: str = DIGITS,
                 kinds=tuple(QUESTIONS)) -> Path:
    """`n` one-question records of `split` under `out_dir` (PNGs in `{split}/`, `{split}.json` in LLaVA format,
    image paths relative to `out_dir`); each record asks one question, its kind drawn (seeded) from `kinds`.
    Returns the JSON's path."""
    if n < 1:
        raise ConfigError(f"the number of glyph images must be at least 1, got {n}")
    unknown = sorted(set(kinds) - set(QUESTIONS))
    if unknown:
        raise ConfigError(f"unknown glyph question kind(s) {', '.join(unknown)}; available: {', '.join(QUESTIONS)}")
    what = "digit" if set(chars) <= set(DIGITS) else "letter" if set(chars) <= set(LETTERS) else "character"
    out_dir = Path(out_dir)
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    records = []
    for index, glyph, image in glyph_images(n, split, seed, chars):
        name = f"{split}/{index:06d}.png"
        (out_dir / name).write_bytes(png_bytes(image))
        kind = kinds[random.Random(f"glyph-kind-{seed}-{split}-{index}").randrange(len(kinds))]
        records.append({"id": f"glyphs-{split}-{index}", "image": name, "kind": kind,
                        "conversations": [{"from": "human", "value": "<image>\n" + QUESTIONS[kind].format(what=what)},
                                          {"from": "gpt", "value": glyph.answer(kind)}]})
    path = out_dir / f"{split}.json"
    path.write_text(json.dumps(records, separators=(",", ":")))
    return path
