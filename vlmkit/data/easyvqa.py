"""easy-VQA (PyPI `easy-vqa`) as LLaVA-format records.

64x64 images of one coloured shape; 38,575 train and 9,673 test questions with 13 one-word answers.
Instruction records group an image's questions into one multi-turn conversation (as LLaVA-1.5 does for
VQAv2), so the image is encoded once per record. Caption records for stage 1 are made from the colour and
shape that the image's own training questions reveal.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache

import easy_vqa

COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SHAPES = ("circle", "rectangle", "triangle")


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    image_id: int


@lru_cache(maxsize=2)
def load_split(split: str) -> tuple[list[Question], dict[int, str]]:
    if split == "train":
        texts, answers, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        texts, answers, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"easy-VQA has splits 'train' and 'test', not {split!r}")
    return [Question(t, a, i) for t, a, i in zip(texts, answers, ids)], paths


def answers() -> list[str]:
    return list(easy_vqa.get_answers())


def image_attributes(questions: list[Question]) -> dict[int, dict[str, str]]:
    """Colour and shape of each image, read off its questions and answers."""
    attrs: dict[int, dict[str, str]] = {}
    for q in questions:
        found = attrs.setdefault(q.image_id, {})
        words = re.findall(r"[a-z]+", q.text.lower())
        mentioned_color = next((w for w in words if w in COLORS), None)
        mentioned_shape = next((w for w in words if w in SHAPES), None)
        if q.answer in COLORS:
            found["color"] = q.answer
        elif q.answer in SHAPES:
            found["shape"] = q.answer
        if q.answer in ("yes", "no"):
            negated = "not" in words or "no" in words
            present = (q.answer == "yes") != negated
            if not present:
                continue
        if mentioned_color:
            found["color"] = mentioned_color
        if mentioned_shape:
            found["shape"] = mentioned_shape
    return attrs


KINDS = ("what colour", "what shape", "colour y/n match", "colour y/n other", "shape y/n plain", "shape y/n negated")


def question_kind(question: Question, attrs: dict[str, str]) -> str:
    """The skill a question tests, for a per-kind breakdown of accuracy (`KINDS`): what colour / what shape;
    a yes/no colour question naming the image's own colour ("match": 1 in 8 of them, the hard ones) or another;
    a yes/no shape question, plain or negated ("is there not a circle?", "is no circle present?"). `attrs` is the
    image's entry of `image_attributes` for the question's split."""
    if question.answer in COLORS:
        return "what colour"
    if question.answer in SHAPES:
        return "what shape"
    words = re.findall(r"[a-z]+", question.text.lower())
    colour = _named(words, COLORS)
    if colour is not None:
        return "colour y/n match" if attrs.get("color") == colour else "colour y/n other"
    return "shape y/n negated" if {"not", "no"} & set(words) else "shape y/n plain"


def kind_accuracy(rows: list[dict], split: str = "test") -> dict[str, dict]:
    """Accuracy per `question_kind` of evaluation rows (`{"id": "easyvqa-{split}-q{i}", "correct": ...}`, as
    `question_records` names them); rows of other sources are left out."""
    questions, _ = load_split(split)
    attrs = image_attributes(questions)
    tally = {kind: [0, 0] for kind in KINDS}
    prefix = f"easyvqa-{split}-q"
    for row in rows:
        if not row["id"].startswith(prefix):
            continue
        question = questions[int(row["id"][len(prefix):])]
        counts = tally[question_kind(question, attrs.get(question.image_id, {}))]
        counts[0] += bool(row["correct"])
        counts[1] += 1
    return {kind: {"accuracy": c / n, "correct": c, "total": n} for kind, (c, n) in tally.items() if n}


def caption_of(attrs: dict[str, str]) -> str | None:
    if "color" in attrs and "shape" in attrs:
        return f"a {attrs['color']} {attrs['shape']}"
    if "shape" in attrs:
        return f"a {attrs['shape']}"
    if "color" in attrs:
        return f"a {attrs['color']} shape"
    return None


def _question_turn(text: str, answer_prompt: str) -> str:
    return f"{text}\n{answer_prompt}" if answer_prompt else text


def instruction_records(split: str = "train", answer_prompt: str = "", seed: int = 0,
                        max_turns: int = 0) -> list[dict]:
    """One multi-turn record per image (questions shuffled, seeded); `max_turns` > 0 splits longer ones."""
    questions, paths = load_split(split)
    by_image: dict[int, list[Question]] = {}
    for q in questions:
        by_image.setdefault(q.image_id, []).append(q)
    rng = random.Random(seed)
    records = []
    for image_id in sorted(by_image):
        qs = list(by_image[image_id])
        rng.shuffle(qs)
        chunks = [qs[i:i + max_turns] for i in range(0, len(qs), max_turns)] if max_turns > 0 else [qs]
        for part, chunk in enumerate(chunks):
            conversation = []
            for turn, q in enumerate(chunk):
                prefix = "<image>\n" if turn == 0 else ""
                conversation.append({"from": "human", "value": prefix + _question_turn(q.text, answer_prompt)})
                conversation.append({"from": "gpt", "value": q.answer})
            records.append({"id": f"easyvqa-{split}-{image_id}" + (f"-{part}" if part else ""),
                            "image": paths[image_id], "conversations": conversation})
    return records


def question_records(split: str = "test", answer_prompt: str = "") -> list[dict]:
    """One single-turn record per question, for evaluation; the answer is in `answer`."""
    questions, paths = load_split(split)
    return [{"id": f"easyvqa-{split}-q{i}", "image": paths[q.image_id], "question": q.text, "answer": q.answer,
             "conversations": [{"from": "human", "value": "<image>\n" + _question_turn(q.text, answer_prompt)},
                               {"from": "gpt", "value": q.answer}]}
            for i, q in enumerate(questions)]


def caption_records(split: str = "train", caption_prompt: str = "Describe the image briefly.") -> list[dict]:
    """Stage-1 records: the image and a caption made from its training questions (train split only)."""
    if split != "train":
        raise ValueError("captions are derived from training questions; use split='train'")
    questions, paths = load_split(split)
    records = []
    for image_id, attrs in sorted(image_attributes(questions).items()):
        caption = caption_of(attrs)
        if caption is None:
            continue
        records.append({"id": f"easyvqa-caption-{image_id}", "image": paths[image_id],
                        "conversations": [{"from": "human", "value": f"<image>\n{caption_prompt}"},
                                          {"from": "gpt", "value": caption}]})
    return records


def _named(words: list[str], names: tuple[str, ...]) -> str | None:
    return next((w for w in words if w in names), None)


def match_records(split: str = "train", answer_prompt: str = "") -> list[dict]:
    """Yes/no questions whose named colour or shape is the image's own, one single-turn record each.

    easy-VQA asks "is there a red shape?" about an image of 1 colour in 8, so 88% of its plain colour questions
    are non-matches ("no"), and a tiny model can answer them all from the question (issue 15: it learnt negation
    and never a colour match). For every yes/no question of the split that names another colour (or shape) than
    the image's, this writes its twin: the same sentence naming the image's own, with the opposite answer. The
    image's colour and shape are read off its own questions (`image_attributes`); nothing comes from the test split.
    Mixed in with a weight (`easy-vqa:matches=0.25`), a seeded share of the twins is drawn anew every epoch.
    """
    questions, paths = load_split(split)
    attrs = image_attributes(questions)
    records, seen = [], set()
    for i, q in enumerate(questions):
        if q.answer not in ("yes", "no"):
            continue
        words = re.findall(r"[a-z]+", q.text.lower())
        own = attrs.get(q.image_id, {})
        for kind, names in (("color", COLORS), ("shape", SHAPES)):
            named = _named(words, names)
            if named is None or kind not in own or own[kind] == named:
                continue
            text = re.sub(rf"\b{named}\b", own[kind], q.text)
            if (q.image_id, text) in seen:  # "is there a red shape?" and "is there a blue shape?" share a twin
                continue
            seen.add((q.image_id, text))
            answer = "no" if q.answer == "yes" else "yes"
            records.append({"id": f"easyvqa-{split}-match{i}", "image": paths[q.image_id],
                            "conversations": [{"from": "human", "value": "<image>\n" + _question_turn(text, answer_prompt)},
                                              {"from": "gpt", "value": answer}]})
    return records
