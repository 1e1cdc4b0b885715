"""Generated scenes of coloured shapes with exact pixel boxes, as LLaVA-format records for grounding tasks.

A scene is 1..`max_shapes` shapes (circle, square, rectangle, triangle, ellipse, star) in easy-VQA's colours
and two size classes, drawn with PIL in list order (later objects on top) on a white canvas. Everything is
a function of (seed, split, index, size, max_shapes, shapes): the same arguments give byte-identical PNGs and JSON.

Decided here, in one place each:
- **Boxes** are `[x1, y1, x2, y2]` in pixels, x2/y2 exclusive (the tight box of the drawn pixels is columns
  x1..x2-1, rows y1..y2-1), computed from the drawn mask, not from the shape's parameters.
- **Overlap rule** (`_fits`): a shape may cover part of an earlier one only if they differ in colour, the
  earlier one keeps at least 1 - MAX_OCCLUDED of its pixels, and its visible pixels still span its whole box
  (so its box is both the tight box of the shape and of what is visible). Shapes of one colour never touch:
  their boxes are at least one pixel apart, so each shape is exactly the pixels of its colour in its box.
- **Train and test never share a layout**: each split has its own RNG stream, and on top of that the hash
  of a scene's bottom object (image size, shape, colour, size, geometry) must fall in its split's buckets
  (SPLIT_BUCKETS, `split_bucket`); identical layouts have identical bottom objects, so no layout can be
  generated for both splits, whatever n, seed or curriculum each uses.
- **Referring phrases** (`referring_phrases`) name exactly one object: "the red circle" when that colour
  and shape is unique, else "the small red circle" (its size class is unique among them) or "the left red
  circle" / "the leftmost red circle" (centre at least POSITION_MARGIN of the image side beyond every other).
- **Boxes in text are placeholders**, rendered per model later (`render_markup`): `<box:i>` is the record's
  `boxes[i]`, `<box:i,j>` several boxes, `<ref>phrase</ref>` a referred phrase. A preset maps these to its
  own format (MiniGPT-v2 `<p>..</p> {<x1><y1><x2><y2>}`, Qwen-VL `<ref>..</ref><box>(x1,y1),(x2,y2)</box>`);
  the structured fields (`task`, `boxes`, `image_size`, `objects`, ...) allow rebuilding the text entirely.

Record kinds (KINDS): caption, grounded_caption, rec (phrase -> box), reg (box -> phrase), detection (all
shapes, or one class), vqa (count, colour, shape, existence, relative position; yes/no answers balanced).
"""
from __future__ import annotations

import gc
import hashlib
import json
import math
import random
import re
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vlmkit.errors import ConfigError
from vlmkit.io import atomic_dir, cache_home

VERSION = 1  # bump when a change alters generated scenes or records (cache keys include it)

COLORS: dict[str, tuple[int, int, int]] = {  # easy-VQA's colour names
    "black": (0, 0, 0), "blue": (37, 99, 235), "brown": (133, 77, 14), "gray": (128, 128, 128),
    "green": (34, 160, 60), "red": (220, 38, 38), "teal": (13, 148, 136), "yellow": (234, 200, 10),
}
BACKGROUND = (255, 255, 255)
SHAPES = ("circle", "square", "rectangle", "triangle", "ellipse", "star")
SIZE_CLASSES = {"small": (0.14, 0.22), "large": (0.32, 0.42)}  # the shape's extent, as a fraction of the side
ELONGATION = (1.6, 2.2)          # long / short side of rectangles and ellipses (never mistaken for squares/circles)
STAR_INNER = 0.45                # inner / outer radius of a star
MAX_OCCLUDED = 0.25              # at most this fraction of a shape's pixels may be covered by later shapes
SAME_COLOR_GAP = 2               # boxes of one colour stay this far apart (>= 1 free pixel between them)
POSITION_MARGIN = 0.1            # "left"/"above" need box centres this far apart (fraction of the image side)
REPEAT_PROB = 0.3                # chance a new shape repeats an existing colour+shape (makes disambiguation needed)
PLACEMENT_TRIES = 30
MIN_PIXELS = 12
NUM_BUCKETS = 4
SPLIT_BUCKETS = {"train": (0, 1, 2), "test": (3,)}
KINDS = ("caption", "grounded_caption", "rec", "reg", "detection", "vqa")
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

PROMPTS = {  # human turns; {ref}, {box}, {shape}, {shapes} are filled in
    "caption": ("Describe the image briefly.",),
    "grounded_caption": ("Describe the image and give the location of each object.",
                         "List the objects in the image with their locations."),
    "rec": ("Where is {ref}?", "Give the location of {ref}."),
    "reg": ("What is the object at {box}?", "Describe the object at {box} so that it can be told apart."),
    "detection_all": ("Detect all the shapes in the image.",),
    "detection_class": ("Detect every {shape} in the image.", "Find all the {shapes}."),
}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str                      # size class: small | large
    box: tuple[int, int, int, int]  # tight pixel box of the drawn shape, x2/y2 exclusive
    geometry: tuple                # ("ellipse"|"rectangle", (x0, y0, x1, y1)) or ("polygon", ((x, y), ...))

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2

    def as_dict(self, geometry: bool = False) -> dict:
        out = {"shape": self.shape, "color": self.color, "size": self.size, "box": list(self.box)}
        if geometry:
            out["geometry"] = _geometry_json(self.geometry)
        return out


@dataclass(frozen=True)
class Scene:
    split: str
    index: int
    width: int
    height: int
    objects: tuple[SceneObject, ...]  # in drawing order (z-order: later on top)

    @property
    def id(self) -> str:
        return f"scenes-{self.split}-{self.index:06d}"

    @property
    def image_name(self) -> str:
        return f"{self.split}/{self.index:06d}.png"

    @property
    def layout_hash(self) -> str:
        return layout_hash(self.width, self.height, self.objects)

    @property
    def split_bucket(self) -> int:
        bottom = self.objects[0]
        return split_bucket(self.width, self.height, bottom.shape, bottom.color, bottom.size, bottom.geometry)


def _geometry_json(geometry) -> list:
    kind, xy = geometry
    return [kind, [list(p) for p in xy] if kind == "polygon" else list(xy)]


def layout_hash(width: int, height: int, objects: Sequence[SceneObject]) -> str:
    """A hash of everything the image is drawn from: size and the ordered (shape, colour, size, geometry)."""
    key = [width, height, [[o.shape, o.color, o.size, _geometry_json(o.geometry)] for o in objects]]
    return hashlib.sha256(json.dumps(key, separators=(",", ":")).encode()).hexdigest()


def split_bucket(width: int, height: int, shape: str, color: str, size: str, geometry) -> int:
    """The split bucket of a scene whose bottom (first-drawn) object is this one. Two identical layouts have
    the same bottom object, hence the same bucket, so a layout can only ever be generated for one split; and
    the bucket is decided before the rest of the scene is drawn, so rejection costs one object, not a scene."""
    key = json.dumps([width, height, shape, color, size, _geometry_json(geometry)], separators=(",", ":"))
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % NUM_BUCKETS


# -- drawing and placement ------------------------------------------------------------------------
def _draw(draw: ImageDraw.ImageDraw, geometry, fill) -> None:
    kind, xy = geometry
    if kind == "ellipse":
        draw.ellipse(xy, fill=fill)
    elif kind == "rectangle":
        draw.rectangle(xy, fill=fill)
    else:
        draw.polygon(list(xy), fill=fill)


def object_mask(geometry, width: int, height: int) -> np.ndarray:
    """The pixels one shape covers when drawn alone: (height, width) bool."""
    canvas = Image.new("L", (width, height), 0)
    _draw(ImageDraw.Draw(canvas), geometry, 255)
    return np.frombuffer(canvas.tobytes(), dtype=np.uint8).reshape(height, width) > 0


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """[x1, y1, x2, y2) of a mask's true pixels, or None when it has none."""
    rows, cols = mask.any(axis=1), mask.any(axis=0)
    if not rows.any():
        return None
    y1, x1 = int(rows.argmax()), int(cols.argmax())
    y2, x2 = len(rows) - int(rows[::-1].argmax()), len(cols) - int(cols[::-1].argmax())
    return x1, y1, x2, y2


def _sample_geometry(rng: random.Random, shape: str, extent: int, width: int, height: int):
    if shape in ("circle", "square", "rectangle", "ellipse"):
        w = h = extent
        if shape in ("rectangle", "ellipse"):
            short = max(3, round(extent / rng.uniform(*ELONGATION)))
            w, h = (extent, short) if rng.random() < 0.5 else (short, extent)
        x0, y0 = rng.randint(0, width - w), rng.randint(0, height - h)
        return ("ellipse" if shape in ("circle", "ellipse") else "rectangle", (x0, y0, x0 + w - 1, y0 + h - 1))
    radius, angle = extent / 2, rng.uniform(0, 2 * math.pi)
    if shape == "triangle":
        radii, steps = [radius] * 3, 3
    elif shape == "star":
        radii, steps = [radius, radius * STAR_INNER] * 5, 10
    else:
        raise ConfigError(f"unknown scene shape {shape!r}; shapes: {', '.join(SHAPES)}")
    points = [(round(r * math.cos(angle + 2 * math.pi * k / steps)), round(r * math.sin(angle + 2 * math.pi * k / steps)))
              for k, r in enumerate(radii)]
    min_x, max_x = min(p[0] for p in points), max(p[0] for p in points)
    min_y, max_y = min(p[1] for p in points), max(p[1] for p in points)
    dx, dy = rng.randint(-min_x, width - 1 - max_x), rng.randint(-min_y, height - 1 - max_y)
    return ("polygon", tuple((x + dx, y + dy) for x, y in points))


def _near(a, b, gap: int) -> bool:
    return a[0] - gap < b[2] and b[0] - gap < a[2] and a[1] - gap < b[3] and b[1] - gap < a[3]


def _fits(color: str, mask: np.ndarray, box, objects: list[SceneObject], visible: list[np.ndarray],
          areas: list[int]) -> bool:
    """May a shape (drawn on top of `objects`) go here? See the module docstring's overlap rule."""
    for other, seen, area in zip(objects, visible, areas):
        if other.color == color:
            if _near(other.box, box, SAME_COLOR_GAP):
                return False
            continue
        if not _near(other.box, box, 0):
            continue
        left = seen & ~mask
        if left.sum() < (1 - MAX_OCCLUDED) * area or tight_box(left) != other.box:
            return False
    return True


def _layout(rng: random.Random, width: int, height: int, count: int, shapes: Sequence[str],
            buckets: Sequence[int]) -> list[SceneObject]:
    objects: list[SceneObject] = []
    visible: list[np.ndarray] = []
    areas: list[int] = []
    side = min(width, height)
    while len(objects) < count:
        for _attempt in range(PLACEMENT_TRIES):
            if objects and rng.random() < REPEAT_PROB:
                twin = rng.choice(objects)
                shape, color = twin.shape, twin.color
            else:
                shape, color = rng.choice(shapes), rng.choice(tuple(COLORS))
            size = rng.choice(tuple(SIZE_CLASSES))
            extent = max(5, round(rng.uniform(*SIZE_CLASSES[size]) * side))
            geometry = _sample_geometry(rng, shape, extent, width, height)
            if not objects and split_bucket(width, height, shape, color, size, geometry) not in buckets:
                continue  # the bottom object decides the split (see split_bucket)
            mask = object_mask(geometry, width, height)
            area = int(mask.sum())
            if area < MIN_PIXELS:
                continue
            box = tight_box(mask)
            if _fits(color, mask, box, objects, visible, areas):
                visible = [seen & ~mask for seen in visible] + [mask]
                areas.append(area)
                objects.append(SceneObject(shape, color, size, box, geometry))
                break
        else:
            if objects:  # no room left for another shape: the scene keeps the ones it has
                break
    return objects


def _image_size(size) -> tuple[int, int]:
    width, height = (size, size) if isinstance(size, int) else tuple(size)
    if min(width, height) < 32:
        raise ConfigError(f"scene images must be at least 32x32 pixels, not {width}x{height}")
    return int(width), int(height)


def generate_scene(index: int, split: str = "train", seed: int = 0, size=64, max_shapes: int = 3,
                   shapes: Sequence[str] = SHAPES, min_shapes: int = 1) -> Scene:
    """Scene `index` of a split, from its own RNG stream; its bottom object is redrawn until it falls in the
    split's buckets (SPLIT_BUCKETS, `split_bucket`), so train and test layouts are disjoint by construction."""
    if split not in SPLIT_BUCKETS:
        raise ConfigError(f"scene splits are {', '.join(SPLIT_BUCKETS)}, not {split!r}")
    if not 1 <= min_shapes <= max_shapes:
        raise ConfigError(f"need 1 <= min_shapes <= max_shapes, got {min_shapes} and {max_shapes}")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not shapes:
        raise ConfigError(f"unknown scene shape(s) {unknown}; shapes: {', '.join(SHAPES)}")
    width, height = _image_size(size)
    rng = random.Random(f"vlmkit-scenes:{seed}:{split}:{index}")
    objects = _layout(rng, width, height, rng.randint(min_shapes, max_shapes), shapes, SPLIT_BUCKETS[split])
    return Scene(split, index, width, height, tuple(objects))


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image (shapes drawn in order, no antialiasing: every pixel is one exact colour)."""
    image = Image.new("RGB", (scene.width, scene.height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw(draw, obj.geometry, COLORS[obj.color])
    return image


def png_bytes(image: Image.Image) -> bytes:
    """An RGB image as PNG bytes (8-bit RGB, no filter, zlib level 6, no metadata): about 5x faster than
    PIL's encoder on small images, and the same bytes for the same pixels."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    height, width, _ = pixels.shape
    rows = np.zeros((height, 1 + 3 * width), dtype=np.uint8)  # each row: filter type 0, then its RGB bytes
    rows[:, 1:] = pixels.reshape(height, -1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))


# -- language -------------------------------------------------------------------------------------
def plural(shape: str) -> str:
    return shape + "s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def existence_question(color: str, shape: str) -> str:
    """The VQA records' yes/no question about a colour+shape (also what the POPE probe asks)."""
    return f"Is there {_article(color)} {color} {shape}?"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _count_phrase(count: int, words: str) -> str:
    *adjectives, shape = words.split()
    if count == 1:
        return f"{_article(words)} {words}"
    return " ".join([NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count), *adjectives, plural(shape)])


# (word for a pair, word for a larger group, axis, direction: -1 = smaller coordinate)
POSITION_WORDS = (("left", "leftmost", 0, -1), ("right", "rightmost", 0, 1),
                  ("top", "topmost", 1, -1), ("bottom", "bottommost", 1, 1))


def _beyond(a: SceneObject, b: SceneObject, axis: int, direction: int, margin: float) -> bool:
    """Is a's centre at least `margin` beyond b's along `axis` in `direction`?"""
    return (a.center[axis] - b.center[axis]) * direction >= margin


def _margin(scene: Scene) -> float:
    return max(3.0, POSITION_MARGIN * min(scene.width, scene.height))


def referring_phrases(scene: Scene, index: int) -> list[str]:
    """Phrases that name object `index` and no other, the canonical (most natural) first; [] if none does.

    Order: "the red circle" (unique colour+shape), "the small red circle" (its size class is unique among
    the red circles), "the left/leftmost red circle" (beyond every other red circle by the margin), then
    "the circle" as an alternative when the shape alone is unique.
    """
    obj = scene.objects[index]
    twins = [o for i, o in enumerate(scene.objects) if i != index and (o.shape, o.color) == (obj.shape, obj.color)]
    name = f"{obj.color} {obj.shape}"
    phrases = []
    if not twins:
        phrases.append(f"the {name}")
    else:
        if all(o.size != obj.size for o in twins):
            phrases.append(f"the {obj.size} {name}")
        margin = _margin(scene)
        for pair_word, group_word, axis, direction in POSITION_WORDS:
            if all(_beyond(obj, o, axis, direction, margin) for o in twins):
                phrases.append(f"the {pair_word if len(twins) == 1 else group_word} {name}")
    if sum(o.shape == obj.shape for o in scene.objects) == 1:
        phrases.append(f"the {obj.shape}")
    return phrases


def _groups(objects: Sequence[SceneObject]) -> list[tuple[str, list[int]]]:
    """(size colour shape, object indices) groups, ordered left to right by their leftmost member."""
    groups: dict[str, list[int]] = {}
    for i in sorted(range(len(objects)), key=lambda i: (objects[i].center, i)):
        o = objects[i]
        groups.setdefault(f"{o.size} {o.color} {o.shape}", []).append(i)
    return list(groups.items())


def caption(scene: Scene) -> str:
    """'a large red circle, two small blue squares and a small teal star' (left to right)."""
    return _join([_count_phrase(len(members), words) for words, members in _groups(scene.objects)])


# -- records --------------------------------------------------------------------------------------
MARKUP = re.compile(r"<ref>(.*?)</ref>|<box:([0-9,]+)>")


def render_markup(text: str, boxes: Sequence[Sequence[int]], image_size: Sequence[int],
                  format_boxes: Callable[[list, Sequence[int]], str],
                  format_ref: Callable[[str], str] = lambda phrase: phrase) -> str:
    """Replace `<box:i,j>` by format_boxes([boxes[i], boxes[j]], (width, height)) and `<ref>p</ref>` by
    format_ref(p): how a preset writes a record's boxes in its own format."""
    def replace(match: re.Match) -> str:
        if match.group(1) is not None:
            return format_ref(match.group(1))
        return format_boxes([list(boxes[int(i)]) for i in match.group(2).split(",")], image_size)
    return MARKUP.sub(replace, text)


def plain_boxes(boxes: list, image_size: Sequence[int]) -> str:
    """A neutral rendering: each box on a 0-100 grid as [x1, y1, x2, y2], joined by ' and '."""
    width, height = image_size
    return " and ".join("[" + ", ".join(str(int(v / s * 100)) for v, s in zip(box, (width, height, width, height)))
                        + "]" for box in boxes)


def render_record(record: dict, format_boxes: Callable = plain_boxes,
                  format_ref: Callable[[str], str] = lambda phrase: phrase) -> dict:
    """A copy of `record` whose conversation has its box and phrase markup rendered."""
    turns = [{**turn, "value": render_markup(turn["value"], record.get("boxes", []), record["image_size"],
                                             format_boxes, format_ref)} for turn in record["conversations"]]
    return {**record, "conversations": turns}


def _box_marker(indices: Iterable[int]) -> str:
    return "<box:" + ",".join(str(i) for i in indices) + ">"


class _RecordMaker:
    """Makes one scene's records of one kind, numbered in order."""

    def __init__(self, scene: Scene, kind: str, objects: list[dict]):
        self.scene, self.kind, self.count, self.objects = scene, kind, 0, objects
        self.scene_id, self.prefix, self.image = scene.id, f"{scene.id}-{kind}-", scene.image_name
        self.image_size = [scene.width, scene.height]

    def __call__(self, human: str, gpt: str, boxes: Sequence[int] = (), **fields) -> dict:
        record = {"id": f"{self.prefix}{self.count}", "image": self.image,
                  "conversations": [{"from": "human", "value": f"<image>\n{human}"}, {"from": "gpt", "value": gpt}],
                  "task": self.kind, "scene": self.scene_id, "image_size": self.image_size,
                  "boxes": [list(self.scene.objects[i].box) for i in boxes], "targets": list(boxes),
                  **fields, "objects": self.objects}
        self.count += 1
        return record


def _caption_records(scene, rng, make, shapes, phrases):
    return [make(rng.choice(PROMPTS["caption"]), caption(scene))]


def _grounded_caption_records(scene, rng, make, shapes, phrases):
    order, parts = [], []
    for words, members in _groups(scene.objects):
        parts.append(f"<ref>{_count_phrase(len(members), words)}</ref>"
                     + _box_marker(range(len(order), len(order) + len(members))))
        order += members
    return [make(rng.choice(PROMPTS["grounded_caption"]), _join(parts), order)]


def _rec_records(scene, rng, make, shapes, phrases):
    records = []
    for i, options in enumerate(phrases):
        if options:
            phrase = rng.choice(options)
            records.append(make(rng.choice(PROMPTS["rec"]).format(ref=f"<ref>{phrase}</ref>"), "<box:0>", [i],
                                phrase=phrase))
    return records


def _reg_records(scene, rng, make, shapes, phrases):
    records = []
    for i, options in enumerate(phrases):
        if options:
            records.append(make(rng.choice(PROMPTS["reg"]).format(box="<box:0>"), options[0], [i], phrase=options[0]))
    return records


def _reading_order(scene: Scene, indices: Iterable[int]) -> list[int]:
    return sorted(indices, key=lambda i: (scene.objects[i].box[0], scene.objects[i].box[1], i))


def _detection_records(scene, rng, make, shapes, phrases):
    present = [s for s in shapes if any(o.shape == s for o in scene.objects)]
    by_shape = {s: _reading_order(scene, (i for i, o in enumerate(scene.objects) if o.shape == s)) for s in present}
    order, parts, detections = [], [], []
    for shape in present:
        parts.append(f"<ref>{shape}</ref>" + _box_marker(range(len(order), len(order) + len(by_shape[shape]))))
        detections.append({"label": shape, "boxes": list(range(len(order), len(order) + len(by_shape[shape])))})
        order += by_shape[shape]
    records = [make(rng.choice(PROMPTS["detection_all"]), ", ".join(parts), order, detections=detections)]
    absent = [s for s in shapes if s not in present]
    asked = present + ([rng.choice(absent)] if absent and rng.random() < 0.5 else [])
    for shape in asked:
        members = by_shape.get(shape, [])
        prompt = rng.choice(PROMPTS["detection_class"]).format(shape=shape, shapes=plural(shape))
        answer = _box_marker(range(len(members))) if members else "none"
        records.append(make(prompt, answer, members, label=shape))
    return records


def _vqa_records(scene, rng, make, shapes, phrases):
    objects = scene.objects
    questions: list[tuple[str, str, str, list[int]]] = []  # (question, answer, type, objects involved)
    shape_counts = Counter(o.shape for o in objects)
    color_counts = Counter(o.color for o in objects)
    for shape in shapes:
        if shape_counts[shape]:
            questions.append((f"How many {plural(shape)} are there?", str(shape_counts[shape]), "count",
                              [i for i, o in enumerate(objects) if o.shape == shape]))
    absent = [s for s in shapes if not shape_counts[s]]
    if absent and rng.random() < 0.5:
        questions.append((f"How many {plural(rng.choice(absent))} are there?", "0", "count", []))
    questions.append(("How many shapes are there?", str(len(objects)), "count", list(range(len(objects)))))
    color = rng.choice(sorted(color_counts))
    questions.append((f"How many {color} shapes are there?", str(color_counts[color]), "count",
                      [i for i, o in enumerate(objects) if o.color == color]))
    for i, o in enumerate(objects):
        if shape_counts[o.shape] == 1:
            questions.append((f"What color is the {o.shape}?", o.color, "color", [i]))
        if color_counts[o.color] == 1:
            questions.append((f"What shape is the {o.color} object?", o.shape, "shape", [i]))
    # yes/no: the wanted answer alternates with (scene index + question number), per question type
    want_yes = (scene.index % 2 == 0)
    present = {(o.color, o.shape) for o in objects}
    if want_yes:
        color, shape = rng.choice(sorted(present))
    else:
        color, shape = rng.choice([(c, s) for c in COLORS for s in shapes if (c, s) not in present])
    questions.append((existence_question(color, shape), "yes" if want_yes else "no", "exists",
                      [i for i, o in enumerate(objects) if (o.color, o.shape) == (color, shape)]))
    margin = _margin(scene)
    # pairs of one colour+shape are left out: "is the left red circle left of the right red circle?" answers itself
    pairs = [(a, b, axis) for a in range(len(objects)) for b in range(len(objects)) if a != b
             and phrases[a] and phrases[b] and (objects[a].shape, objects[a].color) != (objects[b].shape, objects[b].color)
             for axis in (0, 1) if abs(objects[a].center[axis] - objects[b].center[axis]) >= margin]
    relations = {(0, -1): "to the left of", (0, 1): "to the right of", (1, -1): "above", (1, 1): "below"}
    for k, (a, b, axis) in enumerate(rng.sample(pairs, min(2, len(pairs)))):
        want_yes = (scene.index + k) % 2 == 0
        direction = 1 if objects[a].center[axis] > objects[b].center[axis] else -1
        relation = relations[(axis, direction if want_yes else -direction)]
        questions.append((f"Is {phrases[a][0]} {relation} {phrases[b][0]}?", "yes" if want_yes else "no",
                          "position", [a, b]))
    return [make(question, answer, (), question=question, answer=answer, question_type=qtype, involved=involved)
            for question, answer, qtype, involved in questions]


_BUILDERS = {"caption": _caption_records, "grounded_caption": _grounded_caption_records, "rec": _rec_records,
             "reg": _reg_records, "detection": _detection_records, "vqa": _vqa_records}


def _check_kinds(kinds) -> tuple[str, ...]:
    kinds = tuple(KINDS if kinds in (None, "all") else ([kinds] if isinstance(kinds, str) else kinds))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ConfigError(f"unknown scene record kind(s) {unknown}; kinds: {', '.join(KINDS)}")
    return kinds


def scene_records(scene: Scene, kinds: Iterable[str] = KINDS, shapes: Sequence[str] = SHAPES,
                  seed: int = 0) -> dict[str, list[dict]]:
    """The records of one scene, per kind; prompts are drawn from each kind's own RNG stream. The records
    share one `objects` list (and `image_size`): copy before changing them in place."""
    out = {}
    phrases = [referring_phrases(scene, i) for i in range(len(scene.objects))]
    objects = [o.as_dict() for o in scene.objects]
    for kind in _check_kinds(kinds):
        rng = random.Random(f"vlmkit-scenes-text:{seed}:{scene.split}:{scene.index}:{kind}")
        out[kind] = _BUILDERS[kind](scene, rng, _RecordMaker(scene, kind, objects), shapes, phrases)
    return out


def write_scenes(out_dir, n: int, split: str = "train", seed: int = 0, kinds: Iterable[str] = KINDS, size=64,
                 max_shapes: int = 3, shapes: Sequence[str] = SHAPES, min_shapes: int = 1) -> dict[str, Path]:
    """Write `n` scenes of `split` under `out_dir`: PNGs in `{split}/`, one LLaVA JSON per kind
    (`{split}_{kind}.json`, image paths relative to `out_dir`) and `{split}_scenes.json` (every scene's
    objects with their geometry and layout hash). Returns {'images': dir, 'scenes': path, kind: path, ...}."""
    kinds = _check_kinds(kinds)
    if n < 1:
        raise ConfigError(f"the number of scenes must be at least 1, got {n}")
    out_dir = Path(out_dir)
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    records: dict[str, list[dict]] = {kind: [] for kind in kinds}
    manifest = []
    collecting = gc.isenabled()
    gc.disable()  # ~10^5 small acyclic dicts would trigger many full collections (about 15% of the time)
    try:
        for index in range(n):
            scene = generate_scene(index, split, seed, size, max_shapes, shapes, min_shapes)
            (out_dir / scene.image_name).write_bytes(png_bytes(render(scene)))
            for kind, items in scene_records(scene, kinds, shapes, seed).items():
                records[kind] += items
            manifest.append({"id": scene.id, "image": scene.image_name, "image_size": [scene.width, scene.height],
                             "layout_hash": scene.layout_hash, "caption": caption(scene),
                             "objects": [o.as_dict(geometry=True) for o in scene.objects]})
    finally:
        if collecting:
            gc.enable()
    paths = {"images": image_dir, "scenes": out_dir / f"{split}_scenes.json"}
    paths["scenes"].write_text(json.dumps(manifest, separators=(",", ":")))
    for kind in kinds:
        paths[kind] = out_dir / f"{split}_{kind}.json"
        paths[kind].write_text(json.dumps(records[kind], separators=(",", ":")))
    return paths


# -- built-in sources -----------------------------------------------------------------------------
SOURCE_PREFIX = "scenes"
SOURCE_DEFAULTS = {"train": 10_000, "test": 1_000}
_OPTION = re.compile(r"^(n|shapes|size|seed)(\d+)$")


def parse_source_name(name: str) -> dict:
    """`scenes:KIND[:OPTION...]` -> write_scenes arguments. KIND is one of KINDS or 'all'; options: `train` |
    `test`, `n<N>` scenes, `shapes<N>` (max_shapes, the curriculum knob), `size<N>` pixels, `seed<N>`.
    E.g. `scenes:rec:shapes1` (one shape a scene), `scenes:vqa:test:n500`."""
    prefix, _, rest = name.partition(":")
    parts = rest.split(":") if rest else []
    if prefix != SOURCE_PREFIX or not parts or (parts[0] not in KINDS and parts[0] != "all"):
        raise ConfigError(f"scene source {name!r}: write scenes:KIND[:OPTION...], KIND one of "
                          f"{', '.join(KINDS)}, all; options train|test, n<N>, shapes<N>, size<N>, seed<N>")
    options = {"kinds": KINDS if parts[0] == "all" else (parts[0],), "split": "train", "seed": 0, "size": 64,
               "max_shapes": 3}
    for part in parts[1:]:
        match = _OPTION.match(part)
        if part in SPLIT_BUCKETS:
            options["split"] = part
        elif match:
            key = {"n": "n", "shapes": "max_shapes", "size": "size", "seed": "seed"}[match.group(1)]
            options[key] = int(match.group(2))
        else:
            raise ConfigError(f"scene source {name!r}: unknown option {part!r} (train|test, n<N>, shapes<N>, "
                              "size<N>, seed<N>)")
    options.setdefault("n", SOURCE_DEFAULTS[options["split"]])
    return options


def generated_source_options(name: str, prefix: str, head_ok: Callable[[str], bool], split_defaults: dict[str, int],
                             words: Iterable[str] = (), *, usage: str) -> tuple[str, dict]:
    """`PREFIX:HEAD[:OPTION...]`, the name of a generated source other than scenes (comparisons, the tabletop):
    (HEAD, {split, n, seed, and 'word' when one of `words` is given}); options `train|test`, `n<N>`, `seed<N>`,
    a word. `usage` (how to write the name) ends every error."""
    got, _, rest = name.partition(":")
    parts = rest.split(":") if rest else []
    if got != prefix or not parts or not head_ok(parts[0]):
        raise ConfigError(f"{prefix} source {name!r}: write {usage}")
    options: dict = {"split": "train", "seed": 0}
    for part in parts[1:]:
        match = re.match(r"^(n|seed)(\d+)$", part)
        if part in split_defaults:
            options["split"] = part
        elif part in words:
            options["word"] = part
        elif match:
            options[match.group(1)] = int(match.group(2))
        else:
            raise ConfigError(f"{prefix} source {name!r}: unknown option {part!r}; write {usage}")
    options.setdefault("n", split_defaults[options["split"]])
    return parts[0], options


def _cache_dir(split: str, n: int, seed: int, size: int, max_shapes: int) -> Path:
    return cache_home() / "scenes" / f"v{VERSION}-{split}-n{n}-size{size}-shapes{max_shapes}-seed{seed}"


def scene_objects(split: str = "train", n: int = 10_000, seed: int = 0, size: int = 64,
                  max_shapes: int = 3) -> list[list[dict]]:
    """Each scene's objects (`SceneObject.as_dict()`: colour, shape, size, box) as `ensure_scenes` would write
    them: read from its cached manifest when there is one, else laid out without drawing a pixel (counting what
    10,000 training scenes hold takes seconds; rendering them, minutes)."""
    manifest = _cache_dir(split, n, seed, size, max_shapes) / f"{split}_scenes.json"
    if manifest.exists():
        return [scene["objects"] for scene in json.loads(manifest.read_text())]
    return [[o.as_dict() for o in generate_scene(index, split, seed, size, max_shapes).objects] for index in range(n)]


def ensure_scenes(split: str = "train", n: int = 10_000, seed: int = 0, size: int = 64, max_shapes: int = 3) -> Path:
    """A cached directory of every kind's records for these arguments ($VLMKIT_HOME/scenes/...), written once."""
    target = _cache_dir(split, n, seed, size, max_shapes)
    if not (target / f"{split}_scenes.json").exists():
        with atomic_dir(target) as tmp:
            write_scenes(tmp, n, split, seed, KINDS, size, max_shapes)
    return target


def builtin_records(name: str, answer_prompt: str = "", caption_prompt: str | None = None,
                    format_boxes: Callable = plain_boxes, format_ref: Callable[[str], str] = lambda p: p) -> list[dict]:
    """Records of the built-in source `name` (see parse_source_name), with absolute image paths and the box
    markup rendered by `format_boxes`/`format_ref` (default: plain 0-100 boxes; a preset passes its own).
    `answer_prompt` is appended to VQA questions; `caption_prompt` replaces the caption records' question."""
    options = parse_source_name(name)
    folder = ensure_scenes(options["split"], options["n"], options["seed"], options["size"], options["max_shapes"])
    records = []
    for kind in options["kinds"]:
        for record in json.loads((folder / f"{options['split']}_{kind}.json").read_text()):
            record["image"] = str(folder / record["image"])
            human = record["conversations"][0]
            if kind == "vqa" and answer_prompt:
                human["value"] = f"{human['value']}\n{answer_prompt}"
            elif kind == "caption" and caption_prompt:
                human["value"] = f"<image>\n{caption_prompt}"
            records.append(render_record(record, format_boxes, format_ref))
    return records
