import random

import pytest

from vlmkit.data.boxes import (FORMATS, GRIDS, Box, BoxError, box_to_grid, format_boxes, grid_to_box, iou,
                               parse_boxes)
from vlmkit.errors import ConfigError, VlmkitError

SIZES = [(64, 64), (448, 448), (640, 480)]


# ---- exact strings, computed by each family's rule ------------------------------------------------------

def test_known_box_on_64x64_in_each_format():
    box = Box(16, 32, 48, 64)
    # 16/64*100 = 25, 32/64*100 = 50, 48/64*100 = 75, 64/64*100 = 100 (MiniGPT-v2 keeps 100)
    assert format_boxes("minigpt_v2", box, (64, 64)) == "{<25><50><75><100>}"
    # 64/64*1000 = 1000 is outside [0, 1000) and is written 999
    assert format_boxes("qwen_vl", box, (64, 64)) == "<box>(250,500),(750,999)</box>"
    assert format_boxes("cogvlm", box, (64, 64)) == "[[250,500,750,999]]"


def test_non_square_image_scales_x_by_width_and_y_by_height():
    box = Box(64, 48, 320, 240)  # a tenth to a half of 640x480 on both axes
    assert format_boxes("minigpt_v2", box, (640, 480)) == "{<10><10><50><50>}"
    assert format_boxes("qwen_vl", box, (640, 480)) == "<box>(100,100),(500,500)</box>"
    assert format_boxes("cogvlm", box, (640, 480)) == "[[100,100,500,500]]"


def test_values_are_floored_and_cogvlm_pads_to_three_digits():
    box = Box(5, 4, 100, 90)  # 7.8125, 8.33, 156.25, 187.5 per mille of 640x480
    assert box_to_grid("qwen_vl", box, (640, 480)) == (7, 8, 156, 187)
    assert format_boxes("qwen_vl", box, (640, 480)) == "<box>(7,8),(156,187)</box>"
    assert format_boxes("cogvlm", box, (640, 480)) == "[[007,008,156,187]]"
    assert format_boxes("minigpt_v2", box, (640, 480)) == "{<0><0><15><18>}"


def test_phrases_and_several_boxes():
    boxes = [Box(16, 32, 48, 64), (0, 0, 10, 10)]
    assert (format_boxes("minigpt_v2", boxes, (64, 64), phrase="a cat")
            == "<p>a cat</p> {<25><50><75><100>}<delim>{<0><0><15><15>}")
    assert (format_boxes("qwen_vl", boxes, (64, 64), phrase="a cat")
            == "<ref>a cat</ref><box>(250,500),(750,999)</box><box>(0,0),(156,156)</box>")
    assert format_boxes("cogvlm", boxes, (64, 64), phrase="a cat") == "a cat [[250,500,750,999;000,000,156,156]]"


def test_grid_helpers_are_inverse_up_to_one_cell():
    assert grid_to_box("minigpt_v2", (25, 50, 75, 100), (64, 64)) == Box(16, 32, 48, 64)
    assert grid_to_box("qwen_vl", (250, 500, 750, 999), (64, 64)) == Box(16, 32, 48, 63.936)
    with pytest.raises(BoxError, match="outside"):
        grid_to_box("cogvlm", (0, 0, 10, 1000), (64, 64))


# ---- round trips ----------------------------------------------------------------------------------------

def _random_boxes(size, count, seed):
    rng = random.Random(seed)
    width, height = size
    boxes = [Box(0, 0, width, height), Box(1, 2, width - 1, height - 2)]
    while len(boxes) < count:
        # at least 3% of the image: wider than two MiniGPT-v2 cells, so no box collapses to an empty one
        x1, y1 = rng.uniform(0, width * 0.9), rng.uniform(0, height * 0.9)
        x2, y2 = rng.uniform(x1 + width * 0.03, width), rng.uniform(y1 + height * 0.03, height)
        if x2 <= width and y2 <= height:
            boxes.append(Box(x1, y1, x2, y2) if rng.random() < 0.7 else Box(int(x1), int(y1), int(x2) + 1,
                                                                             int(y2) + 1))
    return boxes


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("size", SIZES)
def test_pixel_text_pixel_round_trip_moves_each_coordinate_by_at_most_one_cell(fmt, size):
    grid = GRIDS[fmt]
    width, height = size
    for box in _random_boxes(size, 200, seed=10 * FORMATS.index(fmt) + SIZES.index(size)):
        box = Box(*[min(v, lim) for v, lim in zip(box.as_tuple(), (width, height) * 2)])
        result = parse_boxes(fmt, format_boxes(fmt, box, size), size)
        assert result.ok, result.error
        [(phrase, back)] = result.boxes
        assert phrase is None
        for original, decoded, extent in zip(box.as_tuple(), back.as_tuple(), (width, height) * 2):
            # the cell's lower edge: never past the original, and at most one cell before it
            assert decoded <= original + 1e-9
            assert original - decoded <= grid.cell(extent) + 1e-9
        assert back == grid_to_box(fmt, box_to_grid(fmt, box, size), size)
        assert 0 <= back.x1 < back.x2 <= width and 0 <= back.y1 < back.y2 <= height


@pytest.mark.parametrize("fmt", FORMATS)
def test_several_boxes_with_a_phrase_round_trip(fmt):
    size = (640, 480)
    boxes = [Box(10, 20, 300, 400), Box(320, 0, 640, 480), Box(100.5, 100.5, 200.25, 300.75)]
    result = parse_boxes(fmt, "Here: " + format_boxes(fmt, boxes, size, phrase="two dogs") + ". Done.", size)
    assert result.ok, result.error
    assert len(result.boxes) == 3
    # CogVLM has no phrase markup, so its parser cannot know where the phrase starts
    assert [p for p, _ in result.boxes] == [None if fmt == "cogvlm" else "two dogs"] * 3
    for original, (_, back) in zip(boxes, result.boxes):
        for a, b, extent in zip(original.as_tuple(), back.as_tuple(), size * 2):
            assert 0 <= a - b <= GRIDS[fmt].cell(extent) + 1e-9


# ---- answers as the released models write them ----------------------------------------------------------

def test_minigpt_v2_grounded_caption_with_text_around():
    answer = ("<p>a man</p> {<10><20><30><90>} is walking <p>two dogs</p> {<40><50><60><90>}<delim>"
              "{<70><50><95><90>} on the beach")
    result = parse_boxes("minigpt_v2", answer, (100, 200))
    assert result.ok
    assert [(p, b.as_tuple()) for p, b in result.boxes] == [
        ("a man", (10, 40, 30, 180)), ("two dogs", (40, 100, 60, 180)), ("two dogs", (70, 100, 95, 180))]


def test_minigpt_v2_reads_delim_inside_one_brace_group_too():
    result = parse_boxes("minigpt_v2", "<p>cats</p>{<0><0><50><50><delim><50><50><100><100>}", (100, 100))
    assert result.ok
    assert [b.as_tuple() for _, b in result.boxes] == [(0, 0, 50, 50), (50, 50, 100, 100)]


def test_qwen_vl_tutorial_answer():
    answer = ("<ref> Two apples</ref><box>(302,257),(582,671)</box><box>(603,252),(878,642)</box> and"
              "<ref> a bowl</ref><box>(2,269),(304,674)</box>")
    result = parse_boxes("qwen_vl", answer, (1000, 1000))
    assert result.ok
    assert [p for p, _ in result.boxes] == ["Two apples", "Two apples", "a bowl"]
    assert result.boxes[2][1].as_tuple() == (2, 269, 304, 674)


def test_cogvlm_answer_with_zero_padding_and_several_boxes():
    result = parse_boxes("cogvlm", "The children [[086,540,400,760;500,500,600,999]] are playing.", (1000, 500))
    assert result.ok
    assert [b.as_tuple() for _, b in result.boxes] == [(86, 270, 400, 380), (500, 250, 600, 499.5)]


def test_a_box_without_a_phrase_in_a_sentence():
    result = parse_boxes("minigpt_v2", "Sure! It is at {<25><50><75><100>}.", (64, 64))
    assert result.ok and result.boxes == [(None, Box(16, 32, 48, 64))]


# ---- malformed answers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,answer,message", [
    ("minigpt_v2", "it is {<12><40><9>}", "'{<12><40><9>}' has 3 coordinates, expected 4"),
    ("minigpt_v2", "{<50><10><20><30>}", "x2 < x1 in '{<50><10><20><30>}'"),
    ("minigpt_v2", "{<10><30><20><30>}", "y2 == y1 in '{<10><30><20><30>}': the box is empty"),
    ("minigpt_v2", "{<1><2><3><104>}", "coordinate 104 is outside [0, 100] in '{<1><2><3><104>}'"),
    ("minigpt_v2", "{<1><2><three><4>}", "'three' in '{<1><2><three><4>}' is not an integer coordinate"),
    ("minigpt_v2", "{<1> and <2><3><4>}", "'{<1> and <2><3><4>}' holds text outside its <number> tags"),
    ("minigpt_v2", "it is at {<12><40><5", "'{<12><40><5' is not closed (was the answer cut off?)"),
    ("qwen_vl", "<ref>cat</ref><box>(1034,10),(1040,20)</box>",
     "coordinate 1034 is outside [0, 1000) in '<box>(1034,10),(1040,20)</box>'"),
    ("qwen_vl", "<box>(1,2),(3)</box>", "'<box>(1,2),(3)</box>' has 3 coordinates, expected 4"),
    ("qwen_vl", "<box>1,2,3,4</box>", "'<box>1,2,3,4</box>' is not written (x1,y1),(x2,y2)"),
    ("qwen_vl", "<box>(5,2),(3,4)</box>", "x2 < x1 in '<box>(5,2),(3,4)</box>'"),
    ("qwen_vl", "<box>(-5,2),(3,4)</box>", "coordinate -5 is outside [0, 1000) in '<box>(-5,2),(3,4)</box>'"),
    ("qwen_vl", "<box>(1.5,2),(3,4)</box>", "'1.5' in '<box>(1.5,2),(3,4)</box>' is not an integer coordinate"),
    ("qwen_vl", "<ref>cat</ref><box>(1,2),(3,", "'<box>(1,2),(3,' is not closed (was the answer cut off?)"),
    ("cogvlm", "[[1,2,3]]", "'[[1,2,3]]' has 3 coordinates, expected 4"),
    ("cogvlm", "[[1,2,3,4;]]", "'[[1,2,3,4;]]' has 0 coordinates, expected 4"),
    ("cogvlm", "[[1,2,3,1000]]", "coordinate 1000 is outside [0, 1000) in '[[1,2,3,1000]]'"),
    ("cogvlm", "[[100,200,50,300]]", "x2 < x1 in '[[100,200,50,300]]'"),
])
def test_malformed_answers_say_exactly_what_is_wrong(fmt, answer, message):
    result = parse_boxes(fmt, answer, (448, 448))
    assert not result.ok
    assert result.error == message


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_answer_without_a_box(fmt):
    result = parse_boxes(fmt, "I cannot see a cat in this image.", (64, 64))
    assert result.boxes == [] and result.error == "no box in the answer"
    assert parse_boxes(fmt, "", (64, 64)).error == "no box in the answer"


def test_good_boxes_are_kept_and_the_first_bad_one_is_named():
    result = parse_boxes("minigpt_v2", "<p>a</p> {<1><2><3><4>} <p>b</p> {<1><2><3>} {<9><9><8><8>}", (100, 100))
    assert [p for p, _ in result.boxes] == ["a"]
    assert result.error == "'{<1><2><3>}' has 3 coordinates, expected 4"


def test_an_answer_that_is_not_text():
    assert parse_boxes("qwen_vl", None, (64, 64)).error == "the answer is not text (got NoneType)"


def test_huge_numbers_are_reported_not_raised():
    result = parse_boxes("cogvlm", "[[" + "9" * 5000 + ",1,2,3]]", (64, 64))
    assert result.error.startswith("coordinate '9999") and "outside [0, 1000)" in result.error


# ---- boxes, sizes and formats that cannot be written ----------------------------------------------------

def test_box_validation():
    assert Box.from_xywh(10, 20, 30, 40) == Box(10, 20, 40, 60)
    assert Box(1, 2, 3, 4).width == 2 and Box(1, 2, 3, 4).area == 4
    for bad in [(3, 0, 3, 1), (0, 5, 1, 2), (0, 0, float("nan"), 1), (True, 0, 2, 2), ("0", 0, 1, 1)]:
        with pytest.raises(BoxError):
            Box(*bad)
    with pytest.raises(BoxError, match="outside the 64x64 image"):
        format_boxes("qwen_vl", Box(0, 0, 65, 10), (64, 64))
    with pytest.raises(BoxError, match="outside"):
        format_boxes("cogvlm", Box(-1, 0, 10, 10), (64, 64))
    assert issubclass(BoxError, VlmkitError) and issubclass(BoxError, ValueError)


def test_a_box_thinner_than_one_cell_is_refused_rather_than_written_empty():
    with pytest.raises(BoxError, match="thinner than one cell of the minigpt_v2 grid"):
        format_boxes("minigpt_v2", Box(10, 10, 10.1, 30), (64, 64))
    assert format_boxes("qwen_vl", Box(10, 10, 10.1, 30), (64, 64)) == "<box>(156,156),(157,468)</box>"


def test_bad_sizes_formats_and_phrases():
    with pytest.raises(BoxError, match="two positive integers"):
        format_boxes("qwen_vl", Box(0, 0, 1, 1), (0, 64))
    with pytest.raises(BoxError, match="width, height"):
        parse_boxes("qwen_vl", "x", 64)
    with pytest.raises(ConfigError, match="unknown box format 'kosmos'"):
        format_boxes("kosmos", Box(0, 0, 1, 1), (64, 64))
    with pytest.raises(ConfigError):
        parse_boxes("kosmos", "x", (64, 64))
    with pytest.raises(BoxError, match="no boxes"):
        format_boxes("qwen_vl", [], (64, 64))
    with pytest.raises(BoxError, match="reads as box markup"):
        format_boxes("qwen_vl", Box(0, 0, 10, 10), (64, 64), phrase="a </ref> trick")


# ---- iou ------------------------------------------------------------------------------------------------

def test_iou():
    a = Box(0, 0, 4, 4)
    assert iou(a, a) == 1.0
    assert iou(a, Box(5, 5, 6, 6)) == 0.0
    assert iou(a, Box(4, 0, 8, 4)) == 0.0  # touching edges share no area
    assert iou(a, Box(0, 0, 4, 2)) == 0.5  # the lower box is half of a
    assert iou(a, (2, 0, 6, 4)) == pytest.approx(1 / 3)  # shifted by half: 8 / (16 + 16 - 8)
    assert iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)


# ---- fuzzing: arbitrary model text never raises ---------------------------------------------------------

_PIECES = ["{", "}", "<", ">", "<p>", "</p>", "<delim>", "<ref>", "</ref>", "<box>", "</box>", "(", ")", ",",
           ";", "[[", "]]", "[", "]", "-", ".", " ", "\n", "0", "7", "12", "99", "100", "999", "1000",
           "9" * 60, "cat", "é", "\x00", "\\", "*"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_parse_never_raises_on_random_text(fmt):
    rng = random.Random(FORMATS.index(fmt))
    valid = [format_boxes(fmt, _random_boxes((640, 480), 5, seed=s), (640, 480), phrase="a dog") for s in range(5)]
    for trial in range(3000):
        if trial % 3 == 0:
            text = "".join(rng.choice(_PIECES) for _ in range(rng.randrange(0, 40)))
        elif trial % 3 == 1:
            text = "".join(chr(rng.randrange(0, 0x3000)) for _ in range(rng.randrange(0, 60)))
        else:  # a real answer with characters deleted, duplicated or replaced
            chars = list(rng.choice(valid))
            for _ in range(rng.randrange(1, 6)):
                at = rng.randrange(len(chars))
                op = rng.random()
                if op < 0.4:
                    del chars[at]
                elif op < 0.7:
                    chars.insert(at, chars[at])
                else:
                    chars[at] = rng.choice(_PIECES)
            text = "".join(chars)
        result = parse_boxes(fmt, text, (640, 480))
        assert result.error is None or isinstance(result.error, str)
        assert result.boxes or result.error
        for phrase, box in result.boxes:
            assert phrase is None or isinstance(phrase, str)
            assert 0 <= box.x1 < box.x2 <= 640 and 0 <= box.y1 < box.y2 <= 480


def test_plain_format_is_the_scenes_default_and_reads_back():
    from vlmkit.data import boxes
    from vlmkit.data.scenes import plain_boxes

    text = boxes.format_boxes("plain", [(16, 32, 48, 64), (0, 0, 8, 8)], (64, 64))
    assert text == "[25, 50, 75, 100] and [0, 0, 12, 12]" == plain_boxes([[16, 32, 48, 64], [0, 0, 8, 8]], (64, 64))
    parsed = boxes.parse_boxes("plain", f"it is at {text}", (64, 64))
    assert parsed.ok and [b.as_tuple() for _, b in parsed.boxes] == [(16, 32, 48, 64), (0, 0, 7.68, 7.68)]
    assert boxes.parse_boxes("plain", "at [25, 50, 75", (64, 64)).error.endswith("is not closed (was the answer "
                                                                                   "cut off?)")
