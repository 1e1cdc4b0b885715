"""Grounding evaluation on held-out generated scenes: REC, REG, captions and VQA by question type.

`vlmkit eval RUN --task rec|reg|caption|vqa` reads the test split of the scene generator (its layouts never
occur in the train split: vlmkit.data.scenes), renders it exactly as the run's preset wrote its training data
(box format, task tokens, answer and caption prompts: `vlmkit.data.sources.source_records` with the model's
own config), answers greedily with the batch generation of `vlmkit.eval.vqa` (stopped by the template's stop)
and scores the answers. Metrics, per task:

- **rec** (phrase -> box). The answer is parsed with the run's box format (`parse_answer`: vlmkit.data.boxes
  including 'plain' `[x1, y1, x2, y2]` on 0-100); its first well-formed
  box is compared with the true pixel box. `accuracy` = share of answers with IoU >= 0.5; `mean_iou` over
  every answer (a miss counts 0), `mean_iou_parsed` over answers with a box. An answer without a well-formed
  box is a miss, counted in `unparsed_by_reason` (no_box, cut_off, coordinate_count, not_integer,
  out_of_range, empty_or_inverted, text_in_box, box_syntax, not_text, other) with one example message each.
  Answers with a box and also a malformed expression are scored on the box and counted in
  `malformed_after_box`; answers with several boxes in `multiple_boxes`. `reference` scores the reference
  answers the same way: the grid's ceiling (a 0-100 grid on 64 px moves each side by < 1 px).
- **reg** (box -> phrase). Text is normalised as VQA does (lower case, no punctuation or articles, number
  words as digits). `exact`: the answer equals the reference phrase. `valid`: it equals any phrase that names
  the target and no other object (vlmkit.data.scenes.referring_phrases: "the left red circle" is as good as
  "the small red circle"); needs the record's `objects`/`targets`, else it is `exact`. `partial`: the
  answer names the reference's colour and shape and no other colour or shape (the disambiguating word may be
  wrong or missing). `token_f1`: mean token-level F1 (SQuAD's) against the reference.
- **caption**. Both captions are read as "colour shape" mentions with counts ("two small blue squares" ->
  2 x blue square; a plural without a number counts 2); the truth is the record's `objects` (else the
  reference caption). Per caption, matched = sum over colour+shape of min(predicted, true); `precision` =
  matched / predicted mentions, `recall` = matched / true objects, summed over the set (micro), `f1` theirs;
  `complete` = share of captions whose mentions equal the scene's objects exactly; `exact` = normalised
  caption equals the reference.
- **vqa**. Normalised exact match, overall and per `question_type` (count, color, shape, exists,
  position), with `macro_accuracy` the mean over types.

The report is `eval_<task>.json` in the run directory (the metrics, the data source, the model's preset and
box format, skipped records, every prediction) and `eval_<task>.png`: the first 16 test images, true boxes
green, predicted red, a small label under each.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from vlmkit.data import boxes as box_formats
from vlmkit.data import grounding, scenes
from vlmkit.data.boxes import ParseResult, iou
from vlmkit.data.dataset import load_llava_json
from vlmkit.data.scenes import COLORS, SHAPES, Scene, SceneObject, referring_phrases
from vlmkit.data.sources import SCENES, DataSpec, Source, build_dataset, parse_mixture, source_records
from vlmkit.errors import ConfigError, VlmkitError
from vlmkit.eval.vqa import generate_answers, normalise_answer

TASKS = ("rec", "reg", "caption", "vqa")
IOU_THRESHOLD = 0.5
DEFAULT_SCENES = 1_000  # test scenes of a default source (about 2,000 REC and 8,600 VQA records)

# ---- answers -> boxes ------------------------------------------------------------------------------------

def parse_answer(box_format: str, text, size) -> ParseResult:
    """The boxes of an answer written in `box_format` ('plain' or one of vlmkit.data.boxes.FORMATS)."""
    if box_format not in box_formats.GRIDS:
        raise ConfigError(f"box_format={box_format!r}; use one of plain, {', '.join(box_formats.FORMATS)}")
    return box_formats.parse_boxes(box_format, text, size)


def failure_reason(error: str | None) -> str:
    """A parse error message (vlmkit.data.boxes) as one of a few categories, for counting."""
    if not error:
        return "ok"
    if error == "no box in the answer":
        return "no_box"
    if error.startswith("the answer is not text"):
        return "not_text"
    if error.endswith("is not closed (was the answer cut off?)"):
        return "cut_off"
    if error.endswith("coordinates, expected 4"):
        return "coordinate_count"
    if error.endswith("is not an integer coordinate"):
        return "not_integer"
    if error.startswith("coordinate ") and " is outside " in error:
        return "out_of_range"
    if re.match(r"[xy]2 (<|==) [xy]1 in ", error):
        return "empty_or_inverted"
    if error.endswith("holds text outside its <number> tags"):
        return "text_in_box"
    if error.endswith("is not written (x1,y1),(x2,y2)"):
        return "box_syntax"
    return "other"


# ---- words -----------------------------------------------------------------------------------------------

def _scene_words():
    return tuple(COLORS), SHAPES


_ALIASES = {"grey": "gray"}
_SIZE_WORDS = ("small", "large")


def _tokens(text: str) -> list[str]:
    return [_ALIASES.get(w, w) for w in normalise_answer(text or "").split()]


def colours_and_shapes(text: str) -> tuple[set[str], set[str]]:
    """The colour words and shape words (singular or plural) a text names."""
    colours, shapes = _scene_words()
    words = _tokens(text)
    found_shapes = {s for s in shapes for w in words if w in (s, s + "s")}
    return {w for w in words if w in colours}, found_shapes


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 of the normalised texts (1.0 when both are empty)."""
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def mentions(text: str) -> Counter:
    """'colour shape' mentions with their counts: 'a large red circle and two small blue squares' ->
    {('red', 'circle'): 1, ('blue', 'square'): 2}. A plural without a number counts 2."""
    colours, shapes = _scene_words()
    words = _tokens(text)
    found: Counter = Counter()
    for i in range(1, len(words)):
        word = words[i]
        shape = next((s for s in shapes if word in (s, s + "s")), None)
        if shape is None or words[i - 1] not in colours:
            continue
        j = i - 2
        if j >= 0 and words[j] in _SIZE_WORDS:
            j -= 1
        if j >= 0 and words[j].isdigit():
            count = int(words[j])
        else:
            count = 2 if word != shape else 1
        found[(words[i - 1], shape)] += count
    return found


# ---- scoring ---------------------------------------------------------------------------------------------

def _reference(record: dict) -> str:
    turns = record.get("conversations") or []
    return turns[-1]["value"] if turns else ""


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def score_box_answer(box_format: str, answer: str, truth, image_size) -> dict:
    """One REC answer against its true pixel box: iou (0 for a miss), hit, the box used, the reason."""
    parsed = parse_answer(box_format, answer, image_size)
    truth = box_formats.as_box(truth)
    if not parsed.boxes:
        return {"iou": 0.0, "hit": False, "box": None, "boxes": 0, "reason": failure_reason(parsed.error),
                "error": parsed.error}
    box = parsed.boxes[0][1]
    value = iou(box, truth)
    return {"iou": value, "hit": value >= IOU_THRESHOLD, "box": [round(v, 2) for v in box.as_tuple()],
            "boxes": len(parsed.boxes), "reason": "ok" if parsed.error is None else failure_reason(parsed.error),
            "error": parsed.error}


def rec_metrics(predictions: list[str], records: list[dict], box_format: str) -> dict:
    """Accuracy at IoU >= 0.5 and mean IoU of REC answers; see the module docstring."""
    rows, unparsed, examples, after_box = [], Counter(), {}, Counter()
    reference_hits, reference_ious = 0, []
    for prediction, record in zip(predictions, records):
        truth, size = record["boxes"][0], tuple(record["image_size"])
        scored = score_box_answer(box_format, prediction, truth, size)
        if scored["box"] is None:
            unparsed[scored["reason"]] += 1
            examples.setdefault(scored["reason"], {"id": record.get("id"), "answer": prediction,
                                                   "error": scored["error"]})
        elif scored["error"] is not None:
            after_box[scored["reason"]] += 1
        reference = _reference(record)
        if reference:
            ref = score_box_answer(box_format, reference, truth, size)
            reference_hits += ref["hit"]
            reference_ious.append(ref["iou"])
        rows.append({"id": record.get("id"), "image": record.get("image"), "phrase": record.get("phrase"),
                     "answer": reference, "prediction": prediction, "box_true": list(truth),
                     "box_pred": scored["box"], "boxes_found": scored["boxes"], "iou": round(scored["iou"], 4),
                     "hit": scored["hit"], "reason": scored["reason"]})
    total = len(rows)
    parsed = [r for r in rows if r["box_pred"] is not None]
    hits = sum(r["hit"] for r in rows)
    return {
        "accuracy": _ratio(hits, total), "iou_threshold": IOU_THRESHOLD, "hits": hits, "total": total,
        "mean_iou": _ratio(sum(r["iou"] for r in rows), total),
        "mean_iou_parsed": _ratio(sum(r["iou"] for r in parsed), len(parsed)),
        "parsed": len(parsed), "unparsed": total - len(parsed),
        "unparsed_by_reason": dict(unparsed.most_common()), "unparsed_examples": examples,
        "malformed_after_box": dict(after_box.most_common()),
        "multiple_boxes": sum(r["boxes_found"] > 1 for r in rows),
        "reference": {"accuracy": _ratio(reference_hits, len(reference_ious)),
                      "mean_iou": _ratio(sum(reference_ious), len(reference_ious))},
        "rows": rows,
    }


def _valid_phrases(record: dict) -> list[str] | None:
    """Every phrase that names the record's target object and no other (None without objects/targets)."""
    objects, targets, size = record.get("objects"), record.get("targets"), record.get("image_size")
    if not objects or not targets or not size:
        return None
    scene = Scene("test", 0, int(size[0]), int(size[1]),
                  tuple(SceneObject(o["shape"], o["color"], o["size"], tuple(o["box"]), None) for o in objects))
    return referring_phrases(scene, int(targets[0]))


def reg_metrics(predictions: list[str], records: list[dict]) -> dict:
    """Exact, valid and partial match and token F1 of REG answers; see the module docstring."""
    rows = []
    for prediction, record in zip(predictions, records):
        reference = record.get("phrase") or _reference(record)
        guess = normalise_answer(prediction)
        exact = guess == normalise_answer(reference)
        phrases = _valid_phrases(record)
        valid = exact or (phrases is not None and guess in {normalise_answer(p) for p in phrases})
        ref_colours, ref_shapes = colours_and_shapes(reference)
        colours, shapes = colours_and_shapes(prediction)
        partial = bool(ref_colours and ref_shapes) and colours == ref_colours and shapes == ref_shapes
        rows.append({"id": record.get("id"), "image": record.get("image"), "answer": reference,
                     "prediction": prediction, "box_true": list(record["boxes"][0]) if record.get("boxes") else None,
                     "exact": exact, "valid": valid, "partial": partial,
                     "token_f1": round(token_f1(prediction, reference), 4)})
    total = len(rows)
    counts = {key: sum(r[key] for r in rows) for key in ("exact", "valid", "partial")}
    return {"exact": _ratio(counts["exact"], total), "valid": _ratio(counts["valid"], total),
            "partial": _ratio(counts["partial"], total), "token_f1": _ratio(sum(r["token_f1"] for r in rows), total),
            "counts": counts, "total": total, "rows": rows}


def caption_metrics(predictions: list[str], records: list[dict]) -> dict:
    """Precision and recall of 'colour shape' mentions against each scene's objects; see the module docstring."""
    rows = []
    matched_sum = predicted_sum = true_sum = 0
    for prediction, record in zip(predictions, records):
        reference = _reference(record)
        objects = record.get("objects")
        truth = Counter((o["color"], o["shape"]) for o in objects) if objects else mentions(reference)
        guess = mentions(prediction)
        matched = sum((guess & truth).values())
        matched_sum, predicted_sum, true_sum = (matched_sum + matched, predicted_sum + sum(guess.values()),
                                                true_sum + sum(truth.values()))
        rows.append({"id": record.get("id"), "image": record.get("image"), "answer": reference,
                     "prediction": prediction, "boxes_true": [o["box"] for o in objects] if objects else [],
                     "mentioned": [[c, s, n] for (c, s), n in sorted(guess.items())],
                     "objects": [[c, s, n] for (c, s), n in sorted(truth.items())],
                     "precision": round(_ratio(matched, sum(guess.values())), 4),
                     "recall": round(_ratio(matched, sum(truth.values())), 4),
                     "complete": guess == truth, "exact": normalise_answer(prediction) == normalise_answer(reference)})
    total = len(rows)
    precision, recall = _ratio(matched_sum, predicted_sum), _ratio(matched_sum, true_sum)
    return {"precision": precision, "recall": recall, "f1": _ratio(2 * precision * recall, precision + recall),
            "complete": _ratio(sum(r["complete"] for r in rows), total),
            "exact": _ratio(sum(r["exact"] for r in rows), total),
            "matched": matched_sum, "mentioned": predicted_sum, "objects": true_sum, "total": total, "rows": rows}


def vqa_metrics(predictions: list[str], records: list[dict]) -> dict:
    """Normalised exact-match accuracy, overall and per question type."""
    rows, per_type = [], defaultdict(lambda: [0, 0])
    for prediction, record in zip(predictions, records):
        reference = record.get("answer") or _reference(record)
        qtype = record.get("question_type") or "unknown"
        correct = normalise_answer(prediction) == normalise_answer(reference)
        per_type[qtype][0] += correct
        per_type[qtype][1] += 1
        rows.append({"id": record.get("id"), "image": record.get("image"), "question": record.get("question"),
                     "question_type": qtype, "answer": reference, "prediction": prediction, "correct": correct})
    total, correct = len(rows), sum(r["correct"] for r in rows)
    types = {t: {"accuracy": c / n, "correct": c, "total": n} for t, (c, n) in sorted(per_type.items())}
    return {"accuracy": _ratio(correct, total), "correct": correct, "total": total,
            "macro_accuracy": _ratio(sum(t["accuracy"] for t in types.values()), len(types)),
            "per_type": types, "rows": rows}


def score(task: str, predictions: list[str], records: list[dict], box_format: str) -> dict:
    if task == "rec":
        return rec_metrics(predictions, records, box_format)
    if task == "reg":
        return reg_metrics(predictions, records)
    if task == "caption":
        return caption_metrics(predictions, records)
    if task == "vqa":
        return vqa_metrics(predictions, records)
    raise ConfigError(f"unknown evaluation task {task!r}; tasks: {', '.join(TASKS)}")


def summary_line(task: str, report: dict) -> str:
    if task == "rec":
        reasons = ", ".join(f"{k} {n}" for k, n in report["unparsed_by_reason"].items())
        return (f"REC accuracy@IoU{report['iou_threshold']:g} {report['accuracy']:.2%} ({report['hits']}/"
                f"{report['total']}), mean IoU {report['mean_iou']:.3f}; unparsed {report['unparsed']}"
                + (f" ({reasons})" if reasons else ""))
    if task == "reg":
        return (f"REG exact {report['exact']:.2%}, valid phrase {report['valid']:.2%}, colour+shape "
                f"{report['partial']:.2%}, token F1 {report['token_f1']:.3f} on {report['total']}")
    if task == "caption":
        return (f"caption colour+shape precision {report['precision']:.2%}, recall {report['recall']:.2%}, "
                f"F1 {report['f1']:.3f}, complete {report['complete']:.2%} on {report['total']}")
    types = ", ".join(f"{t} {v['accuracy']:.0%}" for t, v in report["per_type"].items())
    return f"VQA accuracy {report['accuracy']:.2%} ({report['correct']}/{report['total']}); {types}"


# ---- data ------------------------------------------------------------------------------------------------

def trained_scene_options(config, task: str, stages_ran=None) -> dict:
    """size / max_shapes / seed of the scenes the run trained this task on (its last stage that read them; of
    the stages that ran, when `stages_ran` names them)."""
    for stage in reversed(getattr(config, "stages", []) or []):
        if stages_ran is not None and stage.name not in stages_ran:
            continue
        try:
            sources = parse_mixture(stage.mixture) if stage.mixture else []
        except ConfigError:
            continue
        for source in sources:
            if source.source.startswith(f"{SCENES}:"):
                try:
                    options = scenes.parse_source_name(source.source)
                except ConfigError:
                    continue
                if task in options["kinds"]:
                    return options
    return {"size": 64, "max_shapes": 3, "seed": 0}


def default_source(config, task: str, split: str = "test", n: int = DEFAULT_SCENES, stages_ran=None) -> str:
    """`scenes:<task>:<split>:n<N>` with the image size, shape count and seed of the run's training scenes."""
    options = trained_scene_options(config, task, stages_ran)
    return f"scenes:{task}:{split}:n{n}:size{options['size']}:shapes{options['max_shapes']}:seed{options['seed']}"


def render_scene_json(config, records: list[dict]) -> list[dict]:
    """Records of `vlmkit data scenes` (box and phrase placeholders) rendered as the preset's training data
    was (vlmkit.data.sources: the box format, MiniGPT-v2's plain phrases in questions and task tokens)."""
    format_boxes, format_ref = grounding.formatters(config.box_format)
    out = []
    for record in records:
        turns = [dict(turn) for turn in record["conversations"]]
        if record.get("task") == "vqa" and config.answer_prompt:
            turns[0]["value"] = f"{turns[0]['value']}\n{config.answer_prompt}"
        elif record.get("task") == "caption" and config.caption_prompt:
            turns[0]["value"] = f"<image>\n{config.caption_prompt}"
        record = scenes.render_record({**record, "conversations": turns}, format_boxes, format_ref)
        if config.box_format == "minigpt_v2":
            record = grounding.plain_phrases_in_questions(record)
        out.append(grounding.with_task_token(record) if config.task_prompts else record)
    return out


def task_records(config, task: str, data: str | None, split: str = "test",
                 image_folder: str | None = None, stages_ran=None) -> tuple[list[dict], str]:
    """(records of `task`, source name): a built-in scenes source (default: the test split) or a JSON file
    (image paths relative to `image_folder`, default the file's folder; placeholders rendered per preset)."""
    if task not in TASKS:
        raise ConfigError(f"unknown evaluation task {task!r}; tasks: {', '.join(TASKS)}")
    if data is None:
        data = default_source(config, task, split, stages_ran=stages_ran)
    if data.startswith(f"{SCENES}:"):
        options = scenes.parse_source_name(data)
        if task not in options["kinds"]:
            raise ConfigError(f"--data {data} holds {', '.join(options['kinds'])} records, not {task}")
        if not any(part in scenes.SPLIT_BUCKETS for part in data.split(":")[2:]):
            data = f"{data}:{split}"  # `split` (default test), not a scene source's own default (train)
            options["split"] = split
        if options["split"] != "test":
            print(f"note: {data} reads the {options['split']} split; its scenes may be the ones the run trained on")
        stage = config.stages[-1] if config.stages else None
        records = source_records(config, stage, Source(data))
        source = data
    elif data.endswith((".json", ".jsonl")):
        records = load_llava_json(data)
        folder = image_folder or str(Path(data).resolve().parent)
        fixed = []
        for record in records:
            if isinstance(record, dict) and isinstance(record.get("image"), str) \
                    and not os.path.isabs(record["image"]):
                record = {**record, "image": os.path.join(folder, record["image"])}
            fixed.append(record)
        records = fixed
        if any(isinstance(r, dict) and any(scenes.MARKUP.search(str(t.get("value", "")))
                                           for t in r.get("conversations") or [] if isinstance(t, dict))
               for r in records):
            records = render_scene_json(config, [r for r in records if isinstance(r, dict)])
        source = data
    else:
        raise ConfigError(f"--task {task} reads scene records: --data scenes:{task}[:test][:n<N>...] or a JSON "
                          f"file of such records (vlmkit data scenes), not {data!r}")
    tasks = Counter(r.get("task") for r in records if isinstance(r, dict))
    if any(t is not None for t in tasks):
        records = [r for r in records if isinstance(r, dict) and r.get("task", task) == task]
    if not records:
        raise VlmkitError(f"{source}: no {task} records (tasks there: "
                          f"{', '.join(sorted(str(t) for t in tasks)) or 'none'})")
    return records, source


def _check_fields(task: str, records: list[dict], source: str, skip_bad: bool) -> tuple[list[dict], Counter]:
    skipped: Counter = Counter()
    kept = []
    for position, record in enumerate(records):
        if task == "rec" and isinstance(record, dict) and not (record.get("boxes") and record.get("image_size")):
            if not skip_bad:
                raise VlmkitError(f"{source}: record {record.get('id', f'#{position}')!r} has no 'boxes' and "
                                  "'image_size' (REC needs the true pixel box); --skip-bad skips such records")
            skipped["no_boxes"] += 1
            continue
        kept.append(record)
    return kept, skipped


def _unique_ids(records: list[dict]) -> list[dict]:
    """Records whose ids are unique (the dataset names examples by them), keeping ids that already are."""
    seen, out = Counter(), []
    for position, record in enumerate(records):
        if not isinstance(record, dict):  # the dataset reports it (a record must be an object)
            out.append(record)
            continue
        record_id = str(record.get("id", f"#{position}"))
        seen[record_id] += 1
        out.append(record if seen[record_id] == 1 else {**record, "id": f"{record_id}#{position}"})
    return out


def auto_max_new_tokens(model, answers: list[str]) -> int:
    """A token budget: 1.25 x the longest reference answer plus 4 (at least 8)."""
    longest = max((len(model.tokenizer(a, add_special_tokens=False).input_ids) for a in answers), default=0)
    return max(8, math.ceil(longest * 1.25) + 4)


# ---- drawing ---------------------------------------------------------------------------------------------

TRUE_COLOUR, PRED_COLOUR = (0, 190, 0), (255, 0, 0)
TILE, LABEL_LINES, LINE_HEIGHT, GRID_COLUMNS = 192, 3, 12, 4


def grid_size(count: int, columns: int = GRID_COLUMNS, tile: int = TILE) -> tuple[int, int]:
    """(width, height) of a grid of `count` tiles: `columns` wide, each an image area of tile x tile and a
    label strip of LABEL_LINES lines."""
    columns = max(1, min(columns, count))
    rows = max(1, math.ceil(count / columns))
    return columns * tile, rows * (tile + LABEL_LINES * LINE_HEIGHT + 4)


def _font():
    return ImageFont.load_default()


def _fit(draw, text: str, width: int, font) -> str:
    """`text` cut (with an ellipsis) to `width` pixels in `font`."""
    text = " ".join(str(text).split())
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _scaled_box(box, sx: float, sy: float, ox: int, oy: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    return ox + x1 * sx, oy + y1 * sy, max(ox + x1 * sx, ox + x2 * sx - 1), max(oy + y1 * sy, oy + y2 * sy - 1)


def _tile_content(task: str, row: dict) -> tuple[list, list, list[str]]:
    """(true boxes, predicted boxes, label lines) of one report row."""
    if task == "rec":
        status = "hit" if row["hit"] else ("miss" if row["box_pred"] is not None else f"miss: {row['reason']}")
        return ([row["box_true"]], [row["box_pred"]] if row["box_pred"] else [],
                [f"IoU {row['iou']:.2f} {status}", f"{row.get('phrase') or ''}", f"pred: {row['prediction']}"])
    if task == "reg":
        mark = "exact" if row["exact"] else ("valid" if row["valid"] else ("partial" if row["partial"] else "wrong"))
        return [row["box_true"]] if row["box_true"] else [], [], [
            f"{mark}, F1 {row['token_f1']:.2f}", f"pred: {row['prediction']}", f"true: {row['answer']}"]
    if task == "caption":
        return row["boxes_true"], [], [f"P {row['precision']:.2f} R {row['recall']:.2f}",
                                       f"pred: {row['prediction']}", f"true: {row['answer']}"]
    return [], [], [f"{row['question_type']}: {'right' if row['correct'] else 'wrong'}",
                    f"{row.get('question') or ''}", f"pred: {row['prediction']} / true: {row['answer']}"]


def draw_grid(task: str, rows: list[dict], out_file, count: int = 16, columns: int = GRID_COLUMNS,
              tile: int = TILE) -> Path:
    """The first `count` rows' images in a grid, true boxes green, predicted red, small labels under each."""
    rows = [r for r in rows if r.get("image")][:count]
    width, height = grid_size(len(rows), columns, tile)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    columns = max(1, min(columns, len(rows)))
    tile_height = tile + LABEL_LINES * LINE_HEIGHT + 4
    for k, row in enumerate(rows):
        left, top = (k % columns) * tile, (k // columns) * tile_height
        try:
            with Image.open(row["image"]) as opened:
                image = opened.convert("RGB")
        except OSError:
            image = Image.new("RGB", (tile, tile), (230, 230, 230))
        scale = min((tile - 4) / image.width, (tile - 4) / image.height)
        shown = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.NEAREST)
        ox, oy = left + (tile - shown.width) // 2, top + (tile - shown.height) // 2
        canvas.paste(shown, (ox, oy))
        sx, sy = shown.width / image.width, shown.height / image.height
        true_boxes, pred_boxes, lines = _tile_content(task, row)
        for box in true_boxes:
            draw.rectangle(_scaled_box(box, sx, sy, ox, oy), outline=TRUE_COLOUR, width=2)
        for box in pred_boxes:
            draw.rectangle(_scaled_box(box, sx, sy, ox, oy), outline=PRED_COLOUR, width=2)
        draw.rectangle((left, top, left + tile - 1, top + tile_height - 1), outline=(200, 200, 200))
        for i, line in enumerate(lines[:LABEL_LINES]):
            draw.text((left + 3, top + tile + i * LINE_HEIGHT), _fit(draw, line, tile - 6, font), fill=(0, 0, 0),
                      font=font)
    out_file = Path(out_file)
    canvas.save(out_file)
    return out_file


def draw_answer_boxes(image_path: str, answer: str, box_format: str, out_file, min_side: int = 256) -> tuple[int, str | None]:
    """Draw the boxes `answer` holds (parsed with `box_format` against the image's size) on the image, in
    red with their phrases; an image smaller than `min_side` is enlarged by a whole factor first (pixels kept
    sharp). Returns (boxes drawn, the parse error or None); the image is written even with no box."""
    with Image.open(image_path) as opened:
        image = opened.convert("RGB")
    parsed = parse_answer(box_format, answer, image.size)
    factor = max(1, min_side // max(image.size))
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    font = _font()
    for phrase, box in parsed.boxes:
        x1, y1, x2, y2 = _scaled_box(box.as_tuple(), factor, factor, 0, 0)
        draw.rectangle((x1, y1, x2, y2), outline=PRED_COLOUR, width=2)
        if phrase:
            label = _fit(draw, phrase, image.width - int(x1) - 2, font)
            y = y1 - LINE_HEIGHT - 1 if y1 >= LINE_HEIGHT + 1 else y1 + 2
            text_box = draw.textbbox((x1 + 2, y), label, font=font)
            draw.rectangle(text_box, fill=(255, 255, 255))
            draw.text((x1 + 2, y), label, fill=PRED_COLOUR, font=font)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_file)
    return len(parsed.boxes), parsed.error


# ---- the command -----------------------------------------------------------------------------------------

def run_grounding_eval(model, task: str, data: str | None, out_dir, split: str = "test",
                       image_folder: str | None = None, skip_bad: bool = False, limit: int = 0,
                       batch_size: int = 128, max_new_tokens: int = 0, verbose: bool = True,
                       stages_ran=None) -> dict:
    """Evaluate `task` on held-out scenes (or a JSON), write eval_<task>.json and eval_<task>.png under
    `out_dir`, print one summary line; returns the report. `stages_ran` (the stage names of the run's
    checkpoints) picks the scenes the default test data mirrors when a run trained only some stages."""
    start = time.time()
    config = model.config
    records, source = task_records(config, task, data, split, image_folder, stages_ran)
    records, missing = _check_fields(task, _unique_ids(records), source, skip_bad)
    if limit:
        records = records[:limit]
    dataset = build_dataset(model, records, source, config.template,
                            DataSpec(instructions=source, skip_bad=skip_bad), mode="prompt", answer_prompt="",
                            verbose=verbose)
    by_id = {str(r.get("id", f"#{i}")): r for i, r in enumerate(records) if isinstance(r, dict)}
    kept = [by_id[e.record_id] for e in dataset.examples]
    budget = max_new_tokens or auto_max_new_tokens(model, [e.answer for e in dataset.examples])
    predictions = generate_answers(model, dataset, batch_size=batch_size, max_new_tokens=budget, verbose=verbose,
                                   feature_cache_gb=config.feature_cache_gb)
    metrics = score(task, predictions, kept, config.box_format)
    rows = metrics.pop("rows")
    skipped = Counter(dataset.skipped.counts) + missing
    report = {"task": task, **metrics, "source": source, "preset": config.name, "box_format": config.box_format,
              "template": config.template, "task_prompts": bool(config.task_prompts),
              "max_new_tokens": budget, "skipped": dict(skipped), "seconds": time.time() - start,
              "predictions": rows}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"eval_{task}.json"
    json_path.write_text(json.dumps(report, indent=1))
    png_path = draw_grid(task, rows, out_dir / f"eval_{task}.png")
    extra = f"; skipped {sum(skipped.values())} ({', '.join(f'{k}: {n}' for k, n in skipped.items())})" \
        if skipped else ""
    print(f"{summary_line(task, report)} on {source}{extra} in {report['seconds']:.0f}s; report {json_path}, "
          f"images {png_path}")
    return report
