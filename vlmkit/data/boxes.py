"""Pixel boxes <-> the text that grounding models read and write, and a parser for their answers.

One place decides how a box becomes text for each family, so training data, prompts and evaluation agree.
A `Box` is (x1, y1, x2, y2) in pixels, top-left origin, x to the right and y down; an image size is
(width, height). Each format quantises a coordinate to a grid with `int(pixel / size * scale)` (x by the
width, y by the height) and reads a grid value back as its cell's lower edge, `value / scale * size`, so a
round trip moves a coordinate by at most one cell, `size / scale` pixels, towards the origin.

Formats, as the released code writes them:

- `minigpt_v2` (Vision-CAIR/MiniGPT-4): scale 100 and 100 itself is kept (`x = W` writes `<100>`; the
  datasets assert `x <= 100`), so values are 0..100. One box is `{<x1><y1><x2><y2>}`
  (`datasets/coco_dataset.py`, `vg_dataset.py`); a grounded phrase is `<p>phrase</p> {...}` (`flickr.py`);
  several boxes of one phrase are brace groups joined by `<delim>`: `{<..><..><..><..>}<delim>{<..>...}`
  (`demo_v2.py` splits a phrase's boxes on `<delim>` and strips `{<\\d+><\\d+><\\d+><\\d+>}` and `<delim>`
  one by one). The parser also reads `<delim>` inside one brace group.
- `qwen_vl` (QwenLM/Qwen-VL): coordinates in [0, 1000), so `x = W` (1000) is written 999.
  `<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>`, several boxes as `<box>..</box><box>..</box>` after one
  ref (README's finetuning format; TUTORIAL.md's "Two apples" answer; the tokenizer's `from_list_format`);
  every box of the run gets the ref. Reading divides by 1000 as the tokenizer's `draw_bbox_on_latest_picture`
  does (its `eval_mm/evaluate_grounding.py` divides by 999, a 0.1% difference).
- `cogvlm` (THUDM/CogVLM): relative coordinates times 1000 "prefixed with zeros to three digits" (README),
  0..999, so `x = W` is written 999: `[[086,540,400,760]]`; several boxes share one pair of brackets,
  separated by `;`: `[[x0,y0,x1,y1;x0,y0,x1,y1]]` (`composite_demo/conversation.py`,
  `utils/utils/grounding_parser.py`). CogVLM has no phrase markup: the phrase is plain text before the
  box, so `parse_boxes` returns the phrase as None.

`parse_boxes` never raises on what a model wrote: it returns the well-formed boxes and, for the first
malformed expression (or an answer without any box), one line saying exactly what is wrong with it.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real

from vlmkit.errors import ConfigError, VlmkitError

FORMATS = ("minigpt_v2", "qwen_vl", "cogvlm")
# what the formats write around phrases and boxes: where a tokenizer holds one as a special token (Qwen-VL's
# <ref> and <box> are), decoding an answer keeps it (vlmkit.infer.generate.decode_text)
MARKUP_TOKENS = ("<p>", "</p>", "<delim>", "<ref>", "</ref>", "<box>", "</box>")


class BoxError(VlmkitError, ValueError):
    """A box that cannot be used: not a rectangle, outside its image, or lost in the format's grid."""


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixels; x1 < x2 and y1 < y2 (an empty box cannot be written in any format)."""
    x1: float
    y1: float
    x2: float
    y2: float

    def __post_init__(self):
        for name in ("x1", "y1", "x2", "y2"):
            value = getattr(self, name)
            # bool is an Integral; True as a coordinate is a bug upstream, not a pixel
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                raise BoxError(f"box coordinate {name} must be a finite number, got {value!r}")
        if not self.x1 < self.x2:
            raise BoxError(f"box {self.as_tuple()}: x2 must be greater than x1")
        if not self.y1 < self.y2:
            raise BoxError(f"box {self.as_tuple()}: y2 must be greater than y1")

    @classmethod
    def from_xywh(cls, x: float, y: float, width: float, height: float) -> Box:
        """A box from COCO's (x, y, width, height)."""
        return cls(x, y, x + width, y + height)

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        return self.width * self.height

    def check_inside(self, size: tuple[int, int]) -> Box:
        """This box, or BoxError if it leaves the image of `size` (width, height)."""
        width, height = check_size(size)
        if self.x1 < 0 or self.y1 < 0 or self.x2 > width or self.y2 > height:
            raise BoxError(f"box {self.as_tuple()} is outside the {width}x{height} image")
        return self


def check_size(size) -> tuple[int, int]:
    """(width, height) as two positive integers, or BoxError."""
    try:
        width, height = size
    except (TypeError, ValueError):
        raise BoxError(f"image size must be (width, height), got {size!r}") from None
    for value in (width, height):
        if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
            raise BoxError(f"image size must be two positive integers (width, height), got {size!r}")
    return int(width), int(height)


def as_box(box) -> Box:
    """A Box from a Box or any 4-sequence (x1, y1, x2, y2)."""
    if isinstance(box, Box):
        return box
    try:
        x1, y1, x2, y2 = box
    except (TypeError, ValueError):
        raise BoxError(f"a box is (x1, y1, x2, y2), got {box!r}") from None
    return Box(x1, y1, x2, y2)


def iou(a, b) -> float:
    """Intersection over union of two boxes (areas of continuous rectangles, no +1 pixel convention)."""
    a, b = as_box(a), as_box(b)
    overlap_w = min(a.x2, b.x2) - max(a.x1, b.x1)
    overlap_h = min(a.y2, b.y2) - max(a.y1, b.y1)
    if overlap_w <= 0 or overlap_h <= 0:
        return 0.0
    inter = overlap_w * overlap_h
    return inter / (a.area + b.area - inter)


@dataclass(frozen=True)
class GridFormat:
    """How one family quantises coordinates: `int(pixel / size * scale)`, capped at `max_value`."""
    name: str
    scale: int
    max_value: int
    digits: int = 0  # zero-pad written values to this many digits (CogVLM writes 086)

    @property
    def range_text(self) -> str:
        if self.max_value == self.scale:
            return f"[0, {self.scale}]"
        return f"[0, {self.max_value + 1})"

    def cell(self, size: int) -> float:
        """Pixels per grid step along an axis of `size` pixels: the round trip's error bound."""
        return size / self.scale


GRIDS = {
    "minigpt_v2": GridFormat("minigpt_v2", scale=100, max_value=100),
    "qwen_vl": GridFormat("qwen_vl", scale=1000, max_value=999),
    "cogvlm": GridFormat("cogvlm", scale=1000, max_value=999, digits=3),
    # vlmkit's neutral format (generated scenes' default): `[x1, y1, x2, y2]` on 0-100, several joined by ' and '
    "plain": GridFormat("plain", scale=100, max_value=100),
}


def coordinate_tokens(fmt: str) -> list[str]:
    """Each grid value of a format as the text one whole token would cover, in value order: MiniGPT-v2's
    `<0>`..`<100>` (the brackets are part of its syntax), Qwen-VL's `0`..`999`, CogVLM's `000`..`999`
    (vlmkit.model.vlm adds them to the tokenizer when `coordinate_tokens` is on)."""
    grid = get_grid(fmt)
    values = range(grid.max_value + 1)
    if fmt == "minigpt_v2":
        return [f"<{v}>" for v in values]
    return [str(v).zfill(grid.digits) for v in values]


def get_grid(fmt: str) -> GridFormat:
    if fmt not in GRIDS:
        raise ConfigError(f"unknown box format {fmt!r}; known: {', '.join(GRIDS)}")
    return GRIDS[fmt]


def box_to_grid(fmt: str, box, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A pixel box as the format's four grid values; BoxError if it is outside the image or collapses."""
    grid = get_grid(fmt)
    box = as_box(box).check_inside(size)
    width, height = check_size(size)
    # divide first, then multiply, as MiniGPT-v2's datasets do: the floats (and so the floors) are theirs
    values = tuple(min(int(coord / extent * grid.scale), grid.max_value)
                   for coord, extent in zip(box.as_tuple(), (width, height, width, height)))
    if values[0] == values[2] or values[1] == values[3]:
        raise BoxError(f"box {box.as_tuple()} on the {width}x{height} image is thinner than one cell of the "
                       f"{fmt} grid: it would be written as the empty box {values}")
    return values


def grid_to_box(fmt: str, values: Sequence[int], size: tuple[int, int]) -> Box:
    """Four grid values as a pixel box, each at its cell's lower edge (`value / scale * size`)."""
    grid = get_grid(fmt)
    width, height = check_size(size)
    if len(values) != 4:
        raise BoxError(f"a {fmt} box has 4 grid values, got {len(values)}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, Integral) or not 0 <= value <= grid.max_value:
            raise BoxError(f"grid value {value!r} is outside {grid.range_text}")
    x1, y1, x2, y2 = values
    # value * size / scale is value / scale * size with one rounding, so cell edges land on whole pixels
    return Box(x1 * width / grid.scale, y1 * height / grid.scale, x2 * width / grid.scale, y2 * height / grid.scale)


# ---- writing ---------------------------------------------------------------------------------------------

def _write_minigpt_v2(values: list[tuple[int, ...]], phrase: str | None, digits: int) -> str:
    text = "<delim>".join("{" + "".join(f"<{v}>" for v in box) + "}" for box in values)
    return text if phrase is None else f"<p>{phrase}</p> {text}"


def _write_qwen_vl(values: list[tuple[int, ...]], phrase: str | None, digits: int) -> str:
    text = "".join(f"<box>({x1},{y1}),({x2},{y2})</box>" for x1, y1, x2, y2 in values)
    return text if phrase is None else f"<ref>{phrase}</ref>{text}"


def _write_cogvlm(values: list[tuple[int, ...]], phrase: str | None, digits: int) -> str:
    text = "[[" + ";".join(",".join(f"{v:0{digits}d}" for v in box) for box in values) + "]]"
    return text if phrase is None else f"{phrase} {text}"


def _write_plain(values: list[tuple[int, ...]], phrase: str | None, digits: int) -> str:
    text = " and ".join("[" + ", ".join(str(v) for v in box) + "]" for box in values)
    return text if phrase is None else f"{phrase} {text}"


_WRITERS = {"minigpt_v2": _write_minigpt_v2, "qwen_vl": _write_qwen_vl, "cogvlm": _write_cogvlm,
            "plain": _write_plain}
# text a phrase may not hold, or the parser would read the phrase as markup
_PHRASE_FORBIDDEN = {"minigpt_v2": ("<p>", "</p>", "{", "}"), "qwen_vl": ("<ref>", "</ref>", "<box>"),
                     "cogvlm": ("[[", "]]"), "plain": ("[", "]")}


def format_boxes(fmt: str, boxes, size: tuple[int, int], phrase: str | None = None) -> str:
    """One box or several (all of one phrase, if given) as the format writes them."""
    grid = get_grid(fmt)
    if isinstance(boxes, Box) or (isinstance(boxes, Sequence) and len(boxes) == 4
                                  and all(isinstance(v, Real) for v in boxes)):
        boxes = [boxes]
    boxes = list(boxes)
    if not boxes:
        raise BoxError("no boxes to write")
    if phrase is not None:
        bad = [mark for mark in _PHRASE_FORBIDDEN[fmt] if mark in phrase]
        if bad:
            raise BoxError(f"phrase {phrase!r} contains {bad[0]!r}, which {fmt} reads as box markup")
    values = [box_to_grid(fmt, box, size) for box in boxes]
    return _WRITERS[fmt](values, phrase, grid.digits)


# ---- parsing ---------------------------------------------------------------------------------------------

@dataclass
class ParseResult:
    """Every well-formed box found, in order, with its phrase (None where the format or text has none);
    `error` names the first malformed box expression, or says there was none at all."""
    boxes: list[tuple[str | None, Box]] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class _Malformed(Exception):
    """Internal: one box expression is malformed; the message is the user-facing reason."""


_INT = re.compile(r"[+-]?\d+")
_MAX_DIGITS = 9  # int() of a 5000-digit string raises in Python >= 3.11; no grid needs more than 4


def _show(text: str, limit: int = 60) -> str:
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return repr(text)


def _coordinates(tokens: list[str], expr: str, grid: GridFormat) -> tuple[int, int, int, int]:
    """Four tokens as checked grid values, or _Malformed with the reason."""
    if len(tokens) != 4:
        raise _Malformed(f"{_show(expr)} has {len(tokens)} coordinates, expected 4")
    values = []
    for token in tokens:
        token = token.strip()
        if not _INT.fullmatch(token):
            raise _Malformed(f"{_show(token)} in {_show(expr)} is not an integer coordinate")
        digits = token.lstrip("+-").lstrip("0")
        if len(digits) > _MAX_DIGITS:
            raise _Malformed(f"coordinate {_show(token, 20)} in {_show(expr)} is outside {grid.range_text}")
        value = int(token)
        if not 0 <= value <= grid.max_value:
            raise _Malformed(f"coordinate {value} is outside {grid.range_text} in {_show(expr)}")
        values.append(value)
    x1, y1, x2, y2 = values
    for low, high, axis in ((x1, x2, "x"), (y1, y2, "y")):
        if high < low:
            raise _Malformed(f"{axis}2 < {axis}1 in {_show(expr)}")
        if high == low:
            raise _Malformed(f"{axis}2 == {axis}1 in {_show(expr)}: the box is empty")
    return x1, y1, x2, y2


# An expression is a run of boxes with an optional phrase before it. Phrases are "tempered" (may not hold
# their own tags), so a stray opening tag costs one scan, not a backtracking search.
_MINIGPT_GROUP = r"\{\s*<[^{}]*\}"
_MINIGPT = re.compile(r"(?:<p>(?P<phrase>(?:(?!</?p>).)*)</p>\s*)?"
                      rf"(?P<run>{_MINIGPT_GROUP}(?:\s*<delim>\s*{_MINIGPT_GROUP})*)", re.DOTALL)
_QWEN = re.compile(r"(?:<ref>(?P<phrase>(?:(?!</?ref>).)*)</ref>\s*)?"
                   r"(?P<run>(?:<box>(?:(?!</?box>).)*</box>)(?:\s*<box>(?:(?!</?box>).)*</box>)*)", re.DOTALL)
_COGVLM = re.compile(r"\[\[(?P<run>[^\[\]]*)\]\]")
_PLAIN = re.compile(r"\[(?P<run>[^\[\]]*)\]")
_PATTERNS = {"minigpt_v2": _MINIGPT, "qwen_vl": _QWEN, "cogvlm": _COGVLM, "plain": _PLAIN}
# the start of a box expression; one left after the matches is unclosed (an answer cut off mid-box)
_OPENERS = {"minigpt_v2": re.compile(r"\{\s*<"), "qwen_vl": re.compile(r"<box>"), "cogvlm": re.compile(r"\[\["),
            "plain": re.compile(r"\[")}


def _boxes_minigpt_v2(run: str, grid: GridFormat) -> list[tuple[int, int, int, int]]:
    found = []
    for group in re.findall(_MINIGPT_GROUP, run):
        content = group[1:-1]
        if re.sub(r"<[^<>]*>", "", content).strip():
            raise _Malformed(f"{_show(group)} holds text outside its <number> tags")
        tags = re.findall(r"<([^<>]*)>", content)
        # `<delim>` inside one group, as well as between groups, separates boxes
        one_box: list[str] = []
        for tag in tags + ["delim"]:
            if tag.strip() == "delim":
                found.append(_coordinates(one_box, group, grid))
                one_box = []
            else:
                one_box.append(tag)
    return found


def _boxes_qwen_vl(run: str, grid: GridFormat) -> list[tuple[int, int, int, int]]:
    found = []
    for body in re.findall(r"<box>((?:(?!</?box>).)*)</box>", run, re.DOTALL):
        expr = f"<box>{body}</box>"
        shape = re.fullmatch(r"\s*\(([^()]*),([^()]*)\)\s*,\s*\(([^()]*),([^()]*)\)\s*", body)
        if shape is None:
            numbers = re.findall(r"[+-]?\d+(?:\.\d+)?", body)
            if len(numbers) != 4:
                raise _Malformed(f"{_show(expr)} has {len(numbers)} coordinates, expected 4")
            raise _Malformed(f"{_show(expr)} is not written (x1,y1),(x2,y2)")
        found.append(_coordinates(list(shape.groups()), expr, grid))
    return found


def _boxes_cogvlm(run: str, grid: GridFormat) -> list[tuple[int, int, int, int]]:
    expr = f"[[{run}]]"
    return [_coordinates(part.split(",") if part.strip() else [], expr, grid) for part in run.split(";")]


def _boxes_plain(run: str, grid: GridFormat) -> list[tuple[int, int, int, int]]:
    return [_coordinates(run.split(",") if run.strip() else [], f"[{run}]", grid)]


_READERS = {"minigpt_v2": _boxes_minigpt_v2, "qwen_vl": _boxes_qwen_vl, "cogvlm": _boxes_cogvlm,
            "plain": _boxes_plain}


def parse_boxes(fmt: str, text, size: tuple[int, int]) -> ParseResult:
    """Every box expression of `fmt` in a free-text answer, as pixel boxes of an image of `size`.

    Never raises on the answer (an unknown `fmt` or a bad `size` are the caller's errors and do raise)."""
    grid = get_grid(fmt)
    size = check_size(size)
    if not isinstance(text, str):
        return ParseResult(error=f"the answer is not text (got {type(text).__name__})")
    result = ParseResult()
    errors: list[tuple[int, str]] = []
    covered = list(text)
    for match in _PATTERNS[fmt].finditer(text):
        covered[match.start():match.end()] = " " * (match.end() - match.start())
        phrase = match.groupdict().get("phrase")
        phrase = phrase.strip() if phrase is not None else None
        try:
            values = _READERS[fmt](match.group("run"), grid)
        except _Malformed as exc:
            errors.append((match.start(), str(exc)))
            continue
        result.boxes.extend((phrase, grid_to_box(fmt, v, size)) for v in values)
    rest = "".join(covered)
    unclosed = _OPENERS[fmt].search(rest)
    if unclosed is not None:
        fragment = text[unclosed.start():].split("\n", 1)[0]
        errors.append((unclosed.start(), f"{_show(fragment, 40)} is not closed (was the answer cut off?)"))
    if errors:
        result.error = min(errors)[1]
    elif not result.boxes:
        result.error = "no box in the answer"
    return result
