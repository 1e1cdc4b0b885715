"""PaLM-E's tabletop world (TAMP), generated: blocks on a table, seen as state vectors, as an image, or both.

A scene is 3..4 square blocks standing on a table or on one another (towers of at most two), each with a colour
and a size class. The same scene gives, for PaLM-E (Driess et al., 2023):
- **state vectors** (`state_vector`, STATE_WIDTH numbers each, all in [0, 1]): centre x, bottom y, width, height,
  and the colour as r, g, b — what the paper's MLP encoder maps into the LLM's embedding space;
- **a rendered image** (side view, 64 x 64: towers left to right, each block outlined);
- **questions of the paper's TAMP families**: q1 an object's colour, q2 object–table relation (is it on the
  table), q3 object–object relation (is one on the other), q4 plan feasibility (can obj_i be put on obj_j now),
  p1 a grasp plan, p2 a stacking plan — plans are skill steps naming `obj_j`, scored by `execute` against the
  scene (task success), not by string match.

Objects are numbered the same way for every view: towers left to right, bottom to top within a tower, so
`obj_1` is the bottom block of the leftmost tower whether the model reads states or pixels. The rules the
executor applies (and the feasibility answers follow): a block can be grasped or moved only when nothing is on
it; a block goes onto another only when that one is clear, is not itself on a block (towers of two at most),
and is not the smaller of the two (small on small, small on large, large on large; never large on small).

Prompts are multimodal sentences: `Object 1 is <obj>. Object 2 is <obj>. … Q` (states), `<image>\nQ` (image),
`<image>\nObject 1 is <obj>. … Q` (both); each `<obj>` is filled by that object's vector (the record's
`states: {"obj": [[…], …]}`, in placeholder order). Train and test scenes come from separate seeded streams.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from vlmkit.data.scenes import generated_source_options, png_bytes
from vlmkit.errors import ConfigError
from vlmkit.io import atomic_dir, cache_home

VERSION = 1  # bump when a change alters generated scenes or records (cache keys include it)
SOURCE_PREFIX = "tabletop"
VIEWS = ("state", "image", "both")
FAMILIES = ("q1", "q2", "q3", "q4", "p1", "p2")
PLAN_FAMILIES = ("p1", "p2")
STATE_KIND = "obj"           # the placeholder `<obj>` and the record's states key
STATE_WIDTH = 7              # x, y, width, height, r, g, b
COLORS: dict[str, tuple[int, int, int]] = {
    "blue": (37, 99, 235), "brown": (133, 77, 14), "gray": (128, 128, 128), "green": (34, 160, 60),
    "red": (220, 38, 38), "teal": (13, 148, 136), "yellow": (234, 200, 10),
}
SIZES = {"small": (0.12, 0.15), "large": (0.21, 0.25)}  # block side, a fraction of the table's length
SIZE_RANK = {"small": 0, "large": 1}
GAP = 0.04                   # free table between towers
TABLE_TOP = 0.14             # the table's surface, as a fraction of the image height from the bottom
OUTLINE = (30, 30, 30)
TABLE = (150, 110, 70)
IMAGE_SIZE = 64
SOURCE_DEFAULTS = {"train": 20000, "test": 500}


@dataclass
class Block:
    color: str
    size: str
    side: float
    x: float              # centre, fraction of the table
    on: int | None        # index of the block it stands on (None: the table)

    def bottom(self, blocks: list["Block"]) -> float:
        return 0.0 if self.on is None else blocks[self.on].bottom(blocks) + blocks[self.on].side


@dataclass
class TableScene:
    split: str
    index: int
    blocks: list[Block]  # numbered obj_1.. in this order: towers left to right, bottom to top

    @property
    def id(self) -> str:
        return f"tabletop-{self.split}-{self.index:06d}"

    @property
    def image_name(self) -> str:
        return f"{self.split}/{self.index:06d}.png"

    def as_dict(self) -> dict:
        return {"blocks": [{"color": b.color, "size": b.size, "side": round(b.side, 4), "x": round(b.x, 4),
                            "on": b.on} for b in self.blocks]}


def generate_scene(index: int, split: str = "train", seed: int = 0) -> TableScene:
    """Scene `index` of a split: 3 or 4 blocks in 2..4 towers, every quantity drawn from (seed, split, index)."""
    rng = random.Random(f"tabletop:{seed}:{split}:{index}")
    count = rng.choice((3, 4))
    towers = rng.randint(max(2, count - 2), min(count, 3))
    heights = [1] * towers
    for _ in range(count - towers):  # the rest go on top of distinct towers (two blocks high at most)
        heights[rng.choice([i for i, h in enumerate(heights) if h == 1])] += 1
    columns = []  # per tower, bottom to top: (colour, size, side)
    for height in heights:
        column = []
        for level in range(height):
            below = column[-1][1] if column else "large"
            size = rng.choice(["small", "large"] if below == "large" else ["small"])
            column.append((rng.choice(list(COLORS)), size, rng.uniform(*SIZES[size])))
        columns.append(column)
    widths = [max(side for _, _, side in column) for column in columns]
    free = 1.0 - sum(widths) - GAP * (len(columns) + 1)
    cuts = sorted(rng.uniform(0, free) for _ in range(len(columns)))
    blocks, left, previous_cut = [], GAP, 0.0
    for column, width, cut in zip(columns, widths, cuts):
        left += cut - previous_cut
        previous_cut = cut
        centre = left + width / 2
        for level, (color, size, side) in enumerate(column):
            below = len(blocks) - 1 if level else None
            shift = 0.0 if not level else rng.uniform(-1, 1) * (blocks[below].side - side) / 2
            blocks.append(Block(color, size, side, centre + shift, below))
        left += width + GAP
    return TableScene(split, index, blocks)


def state_vector(scene: TableScene, j: int) -> list[float]:
    """Object j's state (0-based): centre x, bottom y, width, height (fractions of the table) and r, g, b / 255."""
    block = scene.blocks[j]
    r, g, b = COLORS[block.color]
    return [round(v, 4) for v in (block.x, block.bottom(scene.blocks), block.side, block.side,
                                  r / 255, g / 255, b / 255)]


def render(scene: TableScene, size: int = IMAGE_SIZE) -> Image.Image:
    """A side view: the table along the bottom, each block a filled, outlined square where it stands."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    table = size - round(TABLE_TOP * size)
    draw.rectangle((0, table, size - 1, size - 1), fill=TABLE)
    for block in scene.blocks:
        side = block.side * size
        x0 = round((block.x * size) - side / 2)
        y1 = table - round(block.bottom(scene.blocks) * size)
        draw.rectangle((x0, y1 - round(side), x0 + round(side) - 1, y1 - 1), fill=COLORS[block.color],
                       outline=OUTLINE)
    return image


# -- the world's rules ---------------------------------------------------------------------------------
def _above(blocks: list[Block], j: int) -> int | None:
    return next((i for i, b in enumerate(blocks) if b.on == j), None)


def can_place(blocks: list[Block], i: int, j: int) -> bool:
    """Whether obj_i can go onto obj_j now: both clear, j on the table, j not the smaller one."""
    return (i != j and _above(blocks, i) is None and _above(blocks, j) is None and blocks[j].on is None
            and SIZE_RANK[blocks[i].size] <= SIZE_RANK[blocks[j].size])


def grasp_plan(blocks: list[Block], j: int) -> str:
    top = _above(blocks, j)
    return (f"move obj_{top + 1} to table, " if top is not None else "") + f"grasp obj_{j + 1}"


def stack_plan(blocks: list[Block], i: int, j: int) -> str:
    steps = [f"move obj_{t + 1} to table" for t in (_above(blocks, i), _above(blocks, j)) if t is not None]
    return ", ".join(steps + [f"put obj_{i + 1} on obj_{j + 1}"])


_STEP = re.compile(r"^(?:grasp obj_(\d+)|move obj_(\d+) to table|put obj_(\d+) on obj_(\d+))$")


def execute(scene_blocks: list[dict], plan: str, goal: dict) -> tuple[bool, str]:
    """Run a plan (skill steps joined by commas) in the scene (`TableScene.as_dict()["blocks"]`); returns (task
    success, why not). `goal`: {"grasp": j} (p1) or {"put": i, "on": j} (p2), objects numbered from 1."""
    blocks = [Block(b["color"], b["size"], b["side"], b["x"], b["on"]) for b in scene_blocks]
    grasped = None
    steps = [s.strip().rstrip(".") for s in re.split(r"[,;]|\bthen\b", plan) if s.strip().rstrip(".")]
    if not steps:
        return False, "no steps"
    for step in steps:
        match = _STEP.match(step)
        if not match:
            return False, f"not a skill: {step!r}"
        numbers = [int(g) - 1 for g in match.groups() if g is not None]
        if any(not 0 <= n < len(blocks) for n in numbers):
            return False, f"no such object in {step!r}"
        if grasped is not None:
            return False, f"{step!r} after the grasp"
        if step.startswith("grasp"):
            if _above(blocks, numbers[0]) is not None:
                return False, f"{step!r}: something is on it"
            grasped = numbers[0]
        elif step.startswith("move"):
            if _above(blocks, numbers[0]) is not None:
                return False, f"{step!r}: something is on it"
            blocks[numbers[0]].on = None
        else:
            if not can_place(blocks, *numbers):
                return False, f"{step!r}: not possible here"
            blocks[numbers[0]].on = numbers[1]
    if "grasp" in goal:
        return (grasped == goal["grasp"] - 1, "" if grasped == goal["grasp"] - 1 else "the goal is not grasped")
    done = grasped is None and blocks[goal["put"] - 1].on == goal["on"] - 1
    return done, "" if done else "the goal is not reached"


# -- questions ---------------------------------------------------------------------------------------
def scene_questions(scene: TableScene, rng: random.Random) -> list[dict]:
    """One question of each family that the scene allows: {family, question, answer, goal (plans)}; yes/no
    families draw the yes and no cases alike where the scene has both."""
    blocks, n = scene.blocks, len(scene.blocks)
    out = []
    j = rng.randrange(n)
    out.append({"family": "q1", "question": f"What colour is obj_{j + 1}?", "answer": blocks[j].color})
    want = rng.random() < 0.5
    pool = [k for k in range(n) if (blocks[k].on is None) == want] or list(range(n))
    j = rng.choice(pool)
    out.append({"family": "q2", "question": f"Is obj_{j + 1} on the table?",
                "answer": "yes" if blocks[j].on is None else "no"})
    pairs = [(i, k) for i in range(n) for k in range(n) if i != k]
    on_pairs = [(i, k) for i, k in pairs if blocks[i].on == k]
    i, k = rng.choice(on_pairs if on_pairs and rng.random() < 0.5 else pairs)
    out.append({"family": "q3", "question": f"Is obj_{i + 1} on obj_{k + 1}?",
                "answer": "yes" if blocks[i].on == k else "no"})
    feasible = [(i, k) for i, k in pairs if can_place(blocks, i, k)]
    i, k = rng.choice(feasible if feasible and rng.random() < 0.5 else pairs)
    out.append({"family": "q4", "question": f"Can obj_{i + 1} be put on obj_{k + 1} now?",
                "answer": "yes" if can_place(blocks, i, k) else "no"})
    covered = [k for k in range(n) if _above(blocks, k) is not None]
    j = rng.choice(covered if covered and rng.random() < 0.7 else list(range(n)))
    out.append({"family": "p1", "question": f"How do you grasp obj_{j + 1}?", "answer": grasp_plan(blocks, j),
                "goal": {"grasp": j + 1}})
    stackable = [(i, k) for i, k in pairs if blocks[i].on != k and blocks[k].on is None
                 and SIZE_RANK[blocks[i].size] <= SIZE_RANK[blocks[k].size] and blocks[k].on != i]
    if stackable:
        i, k = rng.choice(stackable)
        out.append({"family": "p2", "question": f"How do you stack obj_{i + 1} on obj_{k + 1}?",
                    "answer": stack_plan(blocks, i, k), "goal": {"put": i + 1, "on": k + 1}})
    return out


def prompt(question: str, count: int, view: str) -> str:
    """The multimodal sentence of a question about a scene of `count` objects, seen through `view`."""
    if view not in VIEWS:
        raise ConfigError(f"tabletop view {view!r}: one of {', '.join(VIEWS)}")
    objects = " ".join(f"Object {j + 1} is <{STATE_KIND}>." for j in range(count))
    if view == "state":
        return f"{objects} {question}"
    if view == "image":
        return f"<image>\n{question}"
    return f"<image>\n{objects} {question}"


def records(questions: list[dict], view: str, folder: Path | None = None) -> list[dict]:
    """LLaVA-format records of the written questions (`write_tabletop`) seen through `view`, with the scene
    (for plan scoring), the family and the states (states views) as fields."""
    out = []
    for item in questions:
        record = {"id": f"{item['id']}-{view}", "family": item["family"], "scene": item["scene"],
                  "conversations": [{"from": "human", "value": prompt(item["question"], len(item["states"]), view)},
                                    {"from": "gpt", "value": item["answer"]}]}
        if "goal" in item:
            record["goal"] = item["goal"]
        if view != "image":
            record["states"] = {STATE_KIND: item["states"]}
        if view != "state":
            record["image"] = str(folder / item["image"]) if folder is not None else item["image"]
        out.append(record)
    return out


def write_tabletop(out_dir, n: int, split: str = "train", seed: int = 0) -> Path:
    """`n` scenes of a split: their images and `{split}_questions.json` (every question with its scene, states
    and image name), written into `out_dir`."""
    out_dir = Path(out_dir)
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    questions = []
    for index in range(n):
        scene = generate_scene(index, split, seed)
        (out_dir / scene.image_name).write_bytes(png_bytes(render(scene)))
        rng = random.Random(f"tabletop-questions:{seed}:{split}:{index}")
        states = [state_vector(scene, j) for j in range(len(scene.blocks))]
        for number, item in enumerate(scene_questions(scene, rng)):
            questions.append(dict(item, id=f"{scene.id}-{number}", image=scene.image_name, states=states,
                                  scene=scene.as_dict()))
    path = out_dir / f"{split}_questions.json"
    path.write_text(json.dumps(questions))
    return path


def parse_source_name(name: str) -> dict:
    """`tabletop:VIEW[:train|test][:n<N>][:seed<N>]` -> {view, split, n, seed}; e.g. `tabletop:state:test:n500`."""
    view, options = generated_source_options(
        name, SOURCE_PREFIX, lambda head: head in VIEWS, SOURCE_DEFAULTS,
        usage=f"tabletop:VIEW[:train|test][:n<N>][:seed<N>], VIEW one of {', '.join(VIEWS)}")
    return dict(options, view=view)


def ensure_tabletop(split: str = "train", n: int = 20000, seed: int = 0) -> Path:
    """A cached directory of these scenes ($VLMKIT_HOME/tabletop/...), written once."""
    target = cache_home() / "tabletop" / f"v{VERSION}-{split}-n{n}-seed{seed}"
    if not (target / f"{split}_questions.json").exists():
        with atomic_dir(target) as tmp:
            write_tabletop(tmp, n, split, seed)
    return target


def builtin_records(name: str) -> list[dict]:
    """The records of source `name` (see parse_source_name), with absolute image paths."""
    options = parse_source_name(name)
    folder = ensure_tabletop(options["split"], options["n"], options["seed"])
    questions = json.loads((folder / f"{options['split']}_questions.json").read_text())
    return records(questions, options["view"], folder)
