"""How a preset writes grounding data: its box format and, for MiniGPT-v2, its task tokens.

Generated scenes (vlmkit.data.scenes) carry boxes as placeholders (`<box:i>`, `<ref>phrase</ref>`) and pixel
boxes beside the text; `record_renderer(config)` turns them into the preset's own text (vlmkit.data.boxes),
so one data set serves every preset. MiniGPT-v2 tells its tasks apart by a token after the image
(`[INST] <Img><ImageHere></Img> [refer] give me the location of … [/INST]`): with `task_prompts` each
record's question gets the token of its task.
"""
from __future__ import annotations

import re

from vlmkit.data import boxes as box_formats
from vlmkit.data.scenes import plain_boxes
from vlmkit.errors import ConfigError

# MiniGPT-v2's task tokens for the scene record kinds (its released datasets' prompts)
TASK_TOKENS = {"caption": "[caption]", "grounded_caption": "[grounding]", "rec": "[refer]", "reg": "[identify]",
               "detection": "[detection]", "vqa": "[vqa]"}
BOX_FORMATS = ("plain", *box_formats.FORMATS)


def formatters(box_format: str):
    """(format_boxes(boxes, size) -> str, format_ref(phrase) -> str) for a box format."""
    if box_format == "plain":
        return plain_boxes, (lambda phrase: phrase)
    if box_format not in box_formats.FORMATS:
        raise ConfigError(f"box_format={box_format!r}; use one of {', '.join(BOX_FORMATS)}")
    if box_format == "minigpt_v2":
        return (lambda found, size: box_formats.format_boxes("minigpt_v2", found, size)), \
            (lambda phrase: f"<p>{phrase}</p> ")
    if box_format == "qwen_vl":
        return (lambda found, size: box_formats.format_boxes("qwen_vl", found, size)), \
            (lambda phrase: f"<ref>{phrase}</ref>")
    return (lambda found, size: box_formats.format_boxes("cogvlm", found, size)), (lambda phrase: f"{phrase} ")


def with_task_token(record: dict) -> dict:
    """The record with its task's token at the start of the first question (after the image placeholder)."""
    token = TASK_TOKENS.get(record.get("task", ""))
    if token is None:
        return record
    first, *rest = record["conversations"]
    value = first["value"]
    image, newline, question = value.partition("<image>\n")
    text = f"{image}{newline}{token} {question}" if newline else f"{token} {value}"
    return {**record, "conversations": [{**first, "value": text}, *rest]}


def plain_phrases_in_questions(record: dict) -> dict:
    """MiniGPT-v2 marks phrases with <p>…</p> in answers (grounded captions) but writes them plainly in questions
    (`[refer] give me the location of the red circle`)."""
    turns = [{**turn, "value": re.sub(r"<p>(.*?)</p> ?", r"\1", turn["value"])} if turn["from"] == "human" else turn
             for turn in record["conversations"]]
    return {**record, "conversations": turns}
