"""Generated scenes: determinism, disjoint splits, exact boxes, unique referring phrases, correct VQA answers."""
import hashlib
import io
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vlmkit.data import scenes
from vlmkit.data.render import normalise_messages
from vlmkit.errors import ConfigError

POSITIONS = {"left": (0, -1), "leftmost": (0, -1), "right": (0, 1), "rightmost": (0, 1),
             "top": (1, -1), "topmost": (1, -1), "bottom": (1, 1), "bottommost": (1, 1)}
RELATIONS = {"to the left of": (0, -1), "to the right of": (0, 1), "above": (1, -1), "below": (1, 1)}


def many(n, split="train", **kw):
    return [scenes.generate_scene(i, split, **kw) for i in range(n)]


def decode(scene):
    return np.asarray(Image.open(io.BytesIO(scenes.png_bytes(scenes.render(scene)))).convert("RGB"))


def center(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def margin(scene):
    return max(3.0, 0.1 * min(scene.width, scene.height))


def resolve(phrase, scene):
    """The objects a referring phrase denotes, read by its words alone (independent of the generator)."""
    words = phrase.split()
    assert words[0] == "the", phrase
    shape, modifiers = words[-1], words[1:-1]
    assert shape in scenes.SHAPES, phrase
    objects = scene.objects
    candidates = [i for i, o in enumerate(objects) if o.shape == shape]
    position = None
    for word in modifiers:
        if word in scenes.COLORS:
            candidates = [i for i in candidates if objects[i].color == word]
        elif word in scenes.SIZE_CLASSES:
            candidates = [i for i in candidates if objects[i].size == word]
        elif word in POSITIONS:
            position = word
        else:
            raise AssertionError(f"unknown word {word!r} in {phrase!r}")
    if position is not None:
        assert (len(candidates) == 2) == (position in ("left", "right", "top", "bottom")), phrase
        axis, direction = POSITIONS[position]
        candidates = [i for i in candidates
                      if all((center(objects[i].box)[axis] - center(objects[j].box)[axis]) * direction >= margin(scene)
                             for j in candidates if j != i)]
    return candidates


# -- determinism and splits -----------------------------------------------------------------------
def test_same_seed_gives_byte_identical_files(tmp_path):
    a = scenes.write_scenes(tmp_path / "a", 30, "train", seed=3, max_shapes=4)
    scenes.write_scenes(tmp_path / "b", 30, "train", seed=3, max_shapes=4)
    c = scenes.write_scenes(tmp_path / "c", 30, "train", seed=4, max_shapes=4)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 30 + 1 + len(scenes.KINDS)
    assert sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file()) == files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a["scenes"].read_bytes() != c["scenes"].read_bytes()
    assert set(a) == {"images", "scenes", *scenes.KINDS} and a["images"] == tmp_path / "a" / "train"


def test_train_and_test_never_share_a_layout():
    # a tiny layout space (one square on 32x32), where unpartitioned draws would collide often
    kw = dict(size=32, max_shapes=1, shapes=("square",))
    train, test = many(2000, "train", **kw), many(2000, "test", **kw)
    train_hashes = Counter(s.layout_hash for s in train)
    test_hashes = Counter(s.layout_hash for s in test)
    assert sum(c - 1 for c in train_hashes.values()) > 0, "the space is too large for this test to have teeth"
    assert not set(train_hashes) & set(test_hashes)
    pixels = lambda s: hashlib.sha256(decode(s).tobytes()).hexdigest()  # noqa: E731
    assert not {pixels(s) for s in train} & {pixels(s) for s in test}
    assert {s.split_bucket for s in train} <= set(scenes.SPLIT_BUCKETS["train"])
    assert {s.split_bucket for s in test} <= set(scenes.SPLIT_BUCKETS["test"])


def test_default_splits_are_disjoint_and_streams_differ():
    train, test = many(300, "train", max_shapes=3), many(300, "test", max_shapes=3)
    assert not {s.layout_hash for s in train} & {s.layout_hash for s in test}
    assert all(a.objects != b.objects for a, b in zip(train, test))


def test_curriculum_knob_limits_shapes():
    assert {len(s.objects) for s in many(100, max_shapes=1)} == {1}
    counts = Counter(len(s.objects) for s in many(200, max_shapes=5))
    assert max(counts) == 5 and min(counts) == 1 and len(counts) == 5


# -- boxes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,n", [(64, 300), (224, 40)])
def test_boxes_are_tight_boxes_of_the_rendered_pixels(size, n):
    for scene in many(n, size=size, max_shapes=5):
        image = decode(scene)
        assert image.shape == (size, size, 3)
        for obj in scene.objects:
            x1, y1, x2, y2 = obj.box
            assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
            # the object's colour within its box grown by one pixel (clipped) spans exactly its box
            gx1, gy1 = max(0, x1 - 1), max(0, y1 - 1)
            region = np.all(image[gy1:y2 + 1, gx1:x2 + 1] == scenes.COLORS[obj.color], axis=-1)
            rows, cols = np.nonzero(region)
            assert (cols.min() + gx1, rows.min() + gy1, cols.max() + gx1 + 1, rows.max() + gy1 + 1) == obj.box
            # and the whole shape has that box too; at most MAX_OCCLUDED of it is covered
            full = scenes.object_mask(obj.geometry, size, size)
            assert scenes.tight_box(full) == obj.box
            assert region.sum() >= (1 - scenes.MAX_OCCLUDED) * full.sum()


def test_same_colour_shapes_never_touch():
    for scene in many(300, max_shapes=6):
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1:]:
                if a.color == b.color:
                    assert not scenes._near(a.box, b.box, 1), (scene.id, a, b)


def test_tight_box():
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:5, 3:9] = True
    assert scenes.tight_box(mask) == (3, 2, 9, 5)
    assert scenes.tight_box(np.zeros((4, 4), dtype=bool)) is None


# -- records --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def records():
    """Records of 400 scenes with up to 5 shapes: kind -> [(scene, record)]."""
    out = {kind: [] for kind in scenes.KINDS}
    for scene in many(400, max_shapes=5):
        for kind, items in scenes.scene_records(scene).items():
            out[kind] += [(scene, r) for r in items]
    return out


def test_records_are_llava_conversations(records):
    ids = set()
    for kind, items in records.items():
        assert items, kind
        for scene, record in items:
            assert record["id"] not in ids
            ids.add(record["id"])
            assert record["image"] == scene.image_name and record["task"] == kind
            messages = normalise_messages(record["conversations"], record["id"])
            assert [m["role"] for m in messages] == ["user", "assistant"]
            assert messages[0]["content"].startswith("<image>\n") and messages[0]["content"].count("<image>") == 1
            assert record["image_size"] == [scene.width, scene.height]
            assert record["objects"] == [o.as_dict() for o in scene.objects]
            assert record["boxes"] == [list(scene.objects[i].box) for i in record["targets"]]
            text = " ".join(m["content"] for m in messages)
            used = [int(i) for group in re.findall(r"<box:([0-9,]+)>", text) for i in group.split(",")]
            assert sorted(used) == list(range(len(record["boxes"]))), (record["id"], text)


def test_rec_and_reg_phrases_name_exactly_one_object(records):
    used = Counter()
    for kind in ("rec", "reg"):
        for scene, record in records[kind]:
            assert resolve(record["phrase"], scene) == record["targets"], (record["id"], record["phrase"])
            assert f"<ref>{record['phrase']}</ref>" in record["conversations"][0]["value"] or kind == "reg"
            assert record["conversations"][1]["value"] == ("<box:0>" if kind == "rec" else record["phrase"])
            used.update(w for w in record["phrase"].split() if w in POSITIONS or w in scenes.SIZE_CLASSES)
    assert used["small"] and used["large"] and (used["left"] or used["leftmost"]) and (used["top"] or used["topmost"])
    # every object with a unique phrase is asked about, and every phrase offered is unique
    for scene, _ in records["caption"]:
        for i in range(len(scene.objects)):
            for phrase in scenes.referring_phrases(scene, i):
                assert resolve(phrase, scene) == [i], (scene.id, phrase)


def test_captions_and_grounded_captions_count_every_object(records):
    number = {w: n for n, w in enumerate(scenes.NUMBER_WORDS)} | {"a": 1}
    for scene, record in records["grounded_caption"]:
        answer = record["conversations"][1]["value"]
        parts = re.findall(r"<ref>(.*?)</ref><box:([0-9,]+)>", answer)
        assert sum(len(b.split(",")) for _, b in parts) == len(scene.objects)
        for phrase, boxes in parts:
            count, size, color, shape = phrase.split()
            members = [scene.objects[record["targets"][int(b)]] for b in boxes.split(",")]
            assert number[count] == len(members)
            plural = len(members) > 1
            assert all((o.size, o.color, scenes.plural(o.shape) if plural else o.shape) == (size, color, shape)
                       for o in members)
        plain = re.sub(r"<box:[0-9,]+>", "", answer).replace("<ref>", "").replace("</ref>", "")
        assert plain == scenes.caption(scene)
    caption = dict((s.id, r) for s, r in records["caption"])
    assert caption["scenes-train-000000"]["conversations"][1]["value"] == scenes.caption(many(1)[0])


def test_detection_lists_every_box_of_the_class(records):
    for scene, record in records["detection"]:
        if "label" in record:
            expected = sorted(i for i, o in enumerate(scene.objects) if o.shape == record["label"])
            assert sorted(record["targets"]) == expected
            assert (record["conversations"][1]["value"] == "none") == (not expected)
        else:
            assert sorted(record["targets"]) == list(range(len(scene.objects)))
            for detection in record["detections"]:
                assert {scene.objects[record["targets"][b]].shape for b in detection["boxes"]} == {detection["label"]}


def test_vqa_answers_are_correct_by_construction(records):
    kinds = Counter()
    for scene, record in records["vqa"]:
        question, answer = record["question"], record["answer"]
        assert record["conversations"][0]["value"] == f"<image>\n{question}"
        assert record["conversations"][1]["value"] == answer
        objects = scene.objects
        kinds[record["question_type"]] += 1
        if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
            assert answer == str(sum(o.color == m[1] for o in objects))
        elif m := re.fullmatch(r"How many (\w+)s are there\?", question):
            expected = len(objects) if m[1] == "shape" else sum(o.shape == m[1] for o in objects)
            assert answer == str(expected)
        elif m := re.fullmatch(r"What color is the (\w+)\?", question):
            (obj,) = [o for o in objects if o.shape == m[1]]  # asked only when the shape is unique
            assert answer == obj.color
        elif m := re.fullmatch(r"What shape is the (\w+) object\?", question):
            (obj,) = [o for o in objects if o.color == m[1]]
            assert answer == obj.shape
        elif m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", question):
            assert answer == ("yes" if any((o.color, o.shape) == (m[1], m[2]) for o in objects) else "no")
        elif m := re.fullmatch(r"Is (the .+?) (to the left of|to the right of|above|below) (the .+)\?", question):
            (a,), (b,) = resolve(m[1], scene), resolve(m[3], scene)
            assert (objects[a].shape, objects[a].color) != (objects[b].shape, objects[b].color)
            axis, direction = RELATIONS[m[2]]
            delta = (center(objects[a].box)[axis] - center(objects[b].box)[axis]) * direction
            assert abs(delta) >= margin(scene)
            assert answer == ("yes" if delta > 0 else "no")
        else:
            raise AssertionError(f"unparsed question {question!r}")
    assert set(kinds) == {"count", "color", "shape", "exists", "position"}


def test_yes_no_answers_are_balanced(records):
    by_type = {}
    for _, record in records["vqa"]:
        if record["answer"] in ("yes", "no"):
            by_type.setdefault(record["question_type"], Counter())[record["answer"]] += 1
    assert set(by_type) == {"exists", "position"}
    for qtype, counts in by_type.items():
        total = counts["yes"] + counts["no"]
        assert total > 100 and abs(counts["yes"] - counts["no"]) <= 0.05 * total, (qtype, counts)


def test_render_markup_formats_boxes_and_refs():
    text = "<ref>two red circles</ref><box:0,1> and <ref>a blue star</ref><box:2>"
    boxes = [[0, 0, 32, 16], [32, 32, 64, 64], [8, 8, 16, 16]]
    minigpt = scenes.render_markup(
        text, boxes, (64, 64), lambda bs, wh: "<delim>".join(
            "{" + "".join(f"<{int(v / s * 100)}>" for v, s in zip(b, wh * 2)) + "}" for b in bs),
        lambda p: f"<p>{p}</p> ")
    assert minigpt == ("<p>two red circles</p> {<0><0><50><25>}<delim>{<50><50><100><100>} and "
                       "<p>a blue star</p> {<12><12><25><25>}")
    assert scenes.render_markup("Where is <ref>the red circle</ref>?", [], (64, 64), None) == "Where is the red circle?"
    assert scenes.plain_boxes([[0, 0, 32, 16]], (64, 64)) == "[0, 0, 50, 25]"
    record = {"conversations": [{"from": "gpt", "value": "<box:0>"}], "boxes": [[0, 0, 32, 16]], "image_size": [64, 64]}
    assert scenes.render_record(record)["conversations"][0]["value"] == "[0, 0, 50, 25]"
    assert record["conversations"][0]["value"] == "<box:0>"


# -- written files and built-in sources -----------------------------------------------------------
def test_write_scenes_files(tmp_path):
    paths = scenes.write_scenes(tmp_path, 12, "test", seed=1, kinds=["rec", "vqa"], size=48, max_shapes=3)
    assert set(paths) == {"images", "scenes", "rec", "vqa"}
    manifest = json.loads(paths["scenes"].read_text())
    assert [m["id"] for m in manifest] == [f"scenes-test-{i:06d}" for i in range(12)]
    for record in json.loads(paths["vqa"].read_text()) + json.loads(paths["rec"].read_text()):
        with Image.open(tmp_path / record["image"]) as image:
            assert image.size == (48, 48) and image.mode == "RGB"
    with pytest.raises(ConfigError, match="kind"):
        scenes.write_scenes(tmp_path, 2, kinds=["nope"])
    with pytest.raises(ConfigError, match="splits"):
        scenes.write_scenes(tmp_path, 2, split="val")


def test_builtin_source_records(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMKIT_HOME", str(tmp_path))
    records = scenes.builtin_records("scenes:vqa:n8:shapes2", answer_prompt="One word.")
    assert records and all(r["conversations"][0]["value"].endswith("?\nOne word.") for r in records)
    assert all(r["image"].startswith(str(tmp_path)) and (tmp_path / r["image"]).exists() for r in records)
    rec = scenes.builtin_records("scenes:rec:n8:shapes2")
    assert all(re.fullmatch(r"\[\d+, \d+, \d+, \d+\]", r["conversations"][1]["value"]) for r in rec)
    assert "<ref>" not in rec[0]["conversations"][0]["value"]
    captions = scenes.builtin_records("scenes:caption:n8:shapes2", caption_prompt="Caption it.")
    assert captions[0]["conversations"][0]["value"] == "<image>\nCaption it."
    assert len(list((tmp_path / "scenes").iterdir())) == 1  # one cached set serves every kind
    assert scenes.parse_source_name("scenes:all:test:size224:seed3") == {
        "kinds": scenes.KINDS, "split": "test", "seed": 3, "size": 224, "max_shapes": 3, "n": 1000}
    for bad in ("scenes", "scenes:nope", "scenes:rec:big", "other:rec"):
        with pytest.raises(ConfigError):
            scenes.parse_source_name(bad)


def test_scene_objects_are_the_manifests_whether_or_not_it_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMKIT_HOME", str(tmp_path))
    laid_out = scenes.scene_objects("train", 12, seed=2, size=64, max_shapes=3)
    assert not (tmp_path / "scenes").exists()  # nothing rendered, nothing cached
    folder = scenes.ensure_scenes("train", 12, seed=2, size=64, max_shapes=3)
    written = [scene["objects"] for scene in json.loads((folder / "train_scenes.json").read_text())]
    assert [[{k: v for k, v in o.items() if k != "geometry"} for o in objects] for objects in written] == laid_out
    assert scenes.scene_objects("train", 12, seed=2, size=64, max_shapes=3) == written  # read from the cache
    assert len(laid_out) == 12 and all(1 <= len(objects) <= 3 for objects in laid_out)


def test_cli_writes_scenes_and_the_builtin_source_reads_them(tmp_path, monkeypatch, capsys):
    """`vlmkit data scenes` writes LLaVA JSON + PNGs; `scenes:rec:n20` is a mixture source like easy-vqa's."""
    import json as _json

    from vlmkit.cli import main
    from vlmkit.archs import from_name
    from vlmkit.data.sources import Source, source_records

    assert main(["data", "scenes", "--out", str(tmp_path / "out"), "--n", "20", "--split", "test",
                 "--kinds", "rec,vqa"]) == 0
    records = _json.loads((tmp_path / "out" / "test_rec.json").read_text())
    assert records and all((tmp_path / "out" / r["image"]).exists() for r in records)
    assert main(["data", "scenes", "--out", str(tmp_path / "x"), "--kinds", "nope"]) == 2
    monkeypatch.setenv("VLMKIT_HOME", str(tmp_path / "home"))
    config = from_name("llava-1.5")
    got = source_records(config, config.stages[-1], Source("scenes:rec:n20"))
    assert len(got) >= 20 and all(r["task"] == "rec" for r in got)
