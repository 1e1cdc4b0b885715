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


def test_question_kinds_partition_the_test_split_and_follow_the_image():
    questions, _ = easyvqa.load_split("test")
    attrs = easyvqa.image_attributes(questions)
    kinds = Counter(easyvqa.question_kind(q, attrs.get(q.image_id, {})) for q in questions)
    assert set(kinds) == set(easyvqa.KINDS) and sum(kinds.values()) == len(questions)
    # 1 colour yes/no question in 8 names the image's own colour (8 colours, named at random)
    share = kinds["colour y/n match"] / (kinds["colour y/n match"] + kinds["colour y/n other"])
    assert 0.09 < share < 0.15
    red = easyvqa.Question("is there a red shape in the image?", "yes", 0)
    assert easyvqa.question_kind(red, {"color": "red"}) == "colour y/n match"
    assert easyvqa.question_kind(red, {"color": "blue"}) == "colour y/n other"
    assert easyvqa.question_kind(easyvqa.Question("is no circle present?", "no", 0), {}) == "shape y/n negated"
    assert easyvqa.question_kind(easyvqa.Question("what color is the shape?", "teal", 0), {}) == "what colour"


def test_kind_accuracy_counts_rows_of_the_split_only():
    questions, _ = easyvqa.load_split("test")
    attrs = easyvqa.image_attributes(questions)
    rows = [{"id": f"easyvqa-test-q{i}", "correct": i % 2 == 0} for i in range(200)]
    rows.append({"id": "mine-7", "correct": True})  # another source: not counted
    report = easyvqa.kind_accuracy(rows, "test")
    assert sum(v["total"] for v in report.values()) == 200
    for kind, v in report.items():
        expected = [i % 2 == 0 for i in range(200)
                    if easyvqa.question_kind(questions[i], attrs.get(questions[i].image_id, {})) == kind]
        assert (v["correct"], v["total"]) == (sum(expected), len(expected))
        assert v["accuracy"] == sum(expected) / len(expected)
