"""Several images in one question: comparison records from the scene generator (vlmkit.data.scenes).

`compare:K[:KIND][:train|test][:n<N>][:seed<N>]` gives N records of K = 2 or 3 images each, written `Image 1:
<image>\\nImage 2: <image>\\n… question` (every image its own placeholder, anywhere in the turn):
- **count**: scenes of different shape counts (1..3); "Which image has more shapes?" (K = 2) or "Which image
  has the most shapes?" (K = 3) -> `image J`;
- **colour**: one shape a scene; K = 2: "Are the shapes in the two images the same colour?" -> yes / no (half
  each); K = 3: two shapes share a colour, one does not: "Which image's shape has a different colour?" -> `image J`.
Without KIND, records alternate the two. Each record's scenes are drawn from its own indices of the split's scene
stream, so train and test layouts stay apart as the scene generator keeps them; everything is a function of the
arguments (same bytes for the same name).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from vlmkit.data.scenes import generate_scene, generated_source_options, png_bytes, render
from vlmkit.data.templates import numbered_images
from vlmkit.errors import ConfigError
from vlmkit.io import atomic_dir, cache_home

VERSION = 1
SOURCE_PREFIX = "compare"
KINDS = ("count", "colour")
IMAGES = (2, 3)
SOURCE_DEFAULTS = {"train": 10_000, "test": 500}
_TRIES = 200  # scenes drawn at most to find a colour that a record needs


def _scene(split: str, seed: int, index: int, shapes: int):
    return generate_scene(index, split, seed, 64, max_shapes=shapes, min_shapes=shapes)


def _count_record(rng: random.Random, k: int, split: str, seed: int, base: int) -> tuple[list, str, str]:
    counts = rng.sample((1, 2, 3), k)
    scenes = [_scene(split, seed, base + j, c) for j, c in enumerate(counts)]
    question = "Which image has more shapes?" if k == 2 else "Which image has the most shapes?"
    return scenes, question, f"image {counts.index(max(counts)) + 1}"


def _colour_record(rng: random.Random, k: int, split: str, seed: int, base: int) -> tuple[list, str, str]:
    pool = [_scene(split, seed, base + t, 1) for t in range(_TRIES)]
    by_colour: dict[str, list] = {}
    for scene in pool:
        by_colour.setdefault(scene.objects[0].color, []).append(scene)
    shared = sorted(c for c, s in by_colour.items() if len(s) >= 2)
    if k == 2:
        if rng.random() < 0.5 and shared:
            colour = rng.choice(shared)
            return rng.sample(by_colour[colour], 2), "Are the shapes in the two images the same colour?", "yes"
        first, second = rng.sample(sorted(by_colour), 2)
        return [by_colour[first][0], by_colour[second][0]], \
            "Are the shapes in the two images the same colour?", "no"
    colour = rng.choice(shared)
    odd = rng.choice([c for c in sorted(by_colour) if c != colour])
    scenes = rng.sample(by_colour[colour], 2)
    at = rng.randrange(3)
    scenes.insert(at, by_colour[odd][0])
    return scenes, "Which image's shape has a different colour?", f"image {at + 1}"


def prompt(k: int, question: str) -> str:
    return numbered_images(k) + question


def write_compare(out_dir, n: int, k: int, split: str = "train", seed: int = 0, kinds=KINDS) -> Path:
    """`n` records of `k` images into `out_dir`: the PNGs and `{split}_compare{k}.json` (LLaVA format, relative
    image paths, `kind` as a field)."""
    if k not in IMAGES:
        raise ConfigError(f"comparison records have 2 or 3 images, not {k}")
    out_dir = Path(out_dir)
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        rng = random.Random(f"compare:{seed}:{split}:{k}:{i}")
        make = _count_record if kind == "count" else _colour_record
        scenes, question, answer = make(rng, k, split, seed, 1_000_000 + i * _TRIES)
        names = []
        for j, scene in enumerate(scenes):
            name = f"{split}/{i:06d}-{j}.png"
            (out_dir / name).write_bytes(png_bytes(render(scene)))
            names.append(name)
        records.append({"id": f"compare{k}-{split}-{i:06d}", "kind": kind, "image": names,
                        "conversations": [{"from": "human", "value": prompt(k, question)},
                                          {"from": "gpt", "value": answer}]})
    path = out_dir / f"{split}_compare{k}.json"
    path.write_text(json.dumps(records))
    return path


def parse_source_name(name: str) -> dict:
    """`compare:K[:KIND][:train|test][:n<N>][:seed<N>]` -> {k, kinds, split, n, seed}."""
    head, options = generated_source_options(
        name, SOURCE_PREFIX, lambda head: head in {str(k) for k in IMAGES}, SOURCE_DEFAULTS, KINDS,
        usage=f"compare:K[:KIND][:train|test][:n<N>][:seed<N>], K 2 or 3, KIND one of {', '.join(KINDS)}")
    kind = options.pop("word", None)
    return dict(options, k=int(head), kinds=(kind,) if kind else KINDS)


def builtin_records(name: str) -> list[dict]:
    """The records of source `name`, with absolute image paths (written once into $VLMKIT_HOME/compare/)."""
    o = parse_source_name(name)
    kinds = "-".join(o["kinds"])
    target = cache_home() / "compare" / f"v{VERSION}-{o['split']}-k{o['k']}-{kinds}-n{o['n']}-seed{o['seed']}"
    path = target / f"{o['split']}_compare{o['k']}.json"
    if not path.exists():
        with atomic_dir(target) as tmp:
            write_compare(tmp, o["n"], o["k"], o["split"], o["seed"], o["kinds"])
    records = json.loads(path.read_text())
    for record in records:
        record["image"] = [str(target / name) for name in record["image"]]
    return records
