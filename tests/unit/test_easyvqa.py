import re
from collections import Counter

from vlmkit.data import easyvqa
from vlmkit.data.sources import BUILTIN


def _named(text, names):
    return [w for w in re.findall(r"[a-z]+", text.lower()) if w in names]


def test_attributes_agree_with_every_question_of_the_image():
    questions, _ = easyvqa.load_split("train")
    attrs = easyvqa.image_attributes(questions)
    assert len(attrs) == len({q.image_id for q in questions})
    for q in questions:
        own = attrs[q.image_id]
        if q.answer in easyvqa.COLORS:
            assert own["color"] == q.answer
        elif q.answer in easyvqa.SHAPES:
            assert own["shape"] == q.answer


def test_match_twins_name_the_images_own_value_with_the_opposite_answer():
    questions, paths = easyvqa.load_split("train")
    attrs = easyvqa.image_attributes(questions)
    records = easyvqa.match_records("train")
    by_path = {p: i for i, p in paths.items()}
    assert len(records) > 10_000 and len({r["id"] for r in records}) == len(records)
    kinds = Counter()
    for record in records:
        original = questions[int(record["id"].rsplit("match", 1)[1])]
        (human, gpt) = record["conversations"]
        text = human["value"].removeprefix("<image>\n")
        own = attrs[by_path[record["image"]]]
        assert by_path[record["image"]] == original.image_id
        assert gpt["value"] == {"yes": "no", "no": "yes"}[original.answer]
        colour, shape = _named(text, easyvqa.COLORS), _named(text, easyvqa.SHAPES)
        kind = "color" if colour else "shape"
        assert (colour or shape) == [own[kind]]            # the twin names the image's own value ...
        assert _named(original.text, easyvqa.COLORS if colour else easyvqa.SHAPES) != [own[kind]]  # ... the original not
        assert text.split() != original.text.split() and len(text.split()) == len(original.text.split())
        negated = bool({"not", "no"} & set(re.findall(r"[a-z]+", text)))
        assert (gpt["value"] == "yes") != negated           # a match: "is there" -> yes, "is there not" -> no
        kinds[kind] += 1
    assert kinds["color"] > kinds["shape"] > 1000
    # each (image, question) once
    assert len({(r["image"], r["conversations"][0]["value"]) for r in records}) == len(records)


def test_matches_are_a_builtin_source_with_the_answer_prompt():
    class Stage:
        max_turns = 1
    records = BUILTIN["easy-vqa:matches"](None, Stage(), "Answer briefly.")
    assert records[0]["conversations"][0]["value"].endswith("\nAnswer briefly.")
