"""Grounding evaluation (vlmkit.eval.grounding): metrics on hand-made answers, the plain box parser, the
report and its image grid, and `vlmkit eval --task` / `vlmkit chat --draw` on a tiny minigpt-v2 run."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from vlmkit.archs import from_name
from vlmkit.eval import grounding as G


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMKIT_HOME", str(tmp_path / "home"))


def rec_record(answer: str, box=(10, 20, 50, 60), size=(100, 100), rid="r") -> dict:
    return {"id": rid, "task": "rec", "image_size": list(size), "boxes": [list(box)], "phrase": "the red circle",
            "conversations": [{"from": "human", "value": "<image>\nWhere is the red circle?"},
                              {"from": "gpt", "value": answer}]}


def test_rec_perfect_off_and_malformed_answers():
    reference = "{<10><20><50><60>}"
    answers = [reference,                      # perfect: IoU 1
               "{<60><60><90><90>}",           # a box, but elsewhere: a miss
               "{<10><20><50>}",               # three coordinates
               "the circle is in the middle",  # no box
               "{<10><20><50><6",              # cut off
               "{<10><20><300><60>}"]          # off the grid
    report = G.rec_metrics(answers, [rec_record(reference, rid=f"r{i}") for i in range(len(answers))], "minigpt_v2")
    assert report["total"] == 6 and report["hits"] == 1 and report["accuracy"] == pytest.approx(1 / 6)
    assert report["rows"][0]["iou"] == 1.0 and report["rows"][0]["hit"]
    assert report["rows"][1]["iou"] == 0.0 and not report["rows"][1]["hit"] and report["rows"][1]["box_pred"]
    assert report["mean_iou"] == pytest.approx(1 / 6) and report["mean_iou_parsed"] == pytest.approx(0.5)
    assert report["parsed"] == 2 and report["unparsed"] == 4
    assert report["unparsed_by_reason"] == {"coordinate_count": 1, "no_box": 1, "cut_off": 1, "out_of_range": 1}
    assert "expected 4" in report["unparsed_examples"]["coordinate_count"]["error"]
    assert report["reference"] == {"accuracy": 1.0, "mean_iou": 1.0}  # the reference answers parse to the truth

    perfect = G.rec_metrics([reference], [rec_record(reference)], "minigpt_v2")
    assert perfect["accuracy"] == 1.0 and perfect["mean_iou"] == 1.0 and perfect["unparsed"] == 0


def test_rec_takes_the_first_box_and_counts_extras_and_partial_parses():
    answers = ["{<10><20><50><60>}<delim>{<60><60><90><90>}", "{<10><20><50><60>} and then {<1><2>"]
    report = G.rec_metrics(answers, [rec_record("", rid=f"r{i}") for i in range(2)], "minigpt_v2")
    assert report["hits"] == 2 and report["multiple_boxes"] == 1
    assert report["malformed_after_box"] == {"cut_off": 1} and report["unparsed"] == 0


def test_plain_and_qwen_formats():
    # the scenes' plain format: [x1, y1, x2, y2] on 0-100, several joined by ' and '
    parsed = G.parse_answer("plain", "[10, 20, 50, 60] and [0, 0, 100, 100]", (200, 100))
    assert parsed.ok and [b.as_tuple() for _, b in parsed.boxes] == [(20, 20, 100, 60), (0, 0, 200, 100)]
    assert G.failure_reason(G.parse_answer("plain", "[10, 20, 50]", (64, 64)).error) == "coordinate_count"
    assert G.failure_reason(G.parse_answer("plain", "[10, 20, 5, 60]", (64, 64)).error) == "empty_or_inverted"
    assert G.failure_reason(G.parse_answer("plain", "[10, 20, 50, 6", (64, 64)).error) == "cut_off"
    assert G.failure_reason(G.parse_answer("plain", "[a, 20, 50, 60]", (64, 64)).error) == "not_integer"
    assert G.failure_reason(G.parse_answer("plain", "somewhere", (64, 64)).error) == "no_box"
    report = G.rec_metrics(["[10, 20, 50, 60]"], [rec_record("[10, 20, 50, 60]")], "plain")
    assert report["accuracy"] == 1.0 and report["mean_iou"] == 1.0
    qwen = G.rec_metrics(["<box>(100,200),(500,600)</box>", "<box>(1,2)(3,4)</box>"],
                         [rec_record("", rid="a"), rec_record("", rid="b")], "qwen_vl")
    assert qwen["hits"] == 1 and qwen["unparsed_by_reason"] == {"box_syntax": 1}


def test_reg_exact_valid_partial_and_f1():
    objects = [{"shape": "circle", "color": "red", "size": "small", "box": [2, 2, 12, 12]},
               {"shape": "circle", "color": "red", "size": "large", "box": [30, 30, 60, 60]}]
    record = {"id": "g", "task": "reg", "image_size": [64, 64], "boxes": [[2, 2, 12, 12]], "targets": [0],
              "objects": objects, "phrase": "the small red circle",
              "conversations": [{"from": "human", "value": "<image>\nWhat is the object at {<3><3><18><18>}?"},
                                {"from": "gpt", "value": "the small red circle"}]}
    answers = ["The small red circle.", "the left red circle", "the red circle", "the blue circle",
               "the red circle and the blue square"]
    report = G.reg_metrics(answers, [record] * len(answers))
    rows = report["rows"]
    assert [r["exact"] for r in rows] == [True, False, False, False, False]
    assert [r["valid"] for r in rows] == [True, True, False, False, False]  # "left" also names only it
    assert [r["partial"] for r in rows] == [True, True, True, False, False]
    assert rows[0]["token_f1"] == 1.0 and rows[2]["token_f1"] == pytest.approx(0.8) and rows[3]["token_f1"] < 0.5
    assert report["exact"] == pytest.approx(0.2) and report["valid"] == pytest.approx(0.4)
    assert report["partial"] == pytest.approx(0.6) and report["total"] == 5


def test_caption_mentions_precision_recall():
    objects = [{"shape": "circle", "color": "red", "size": "large", "box": [1, 1, 20, 20]},
               {"shape": "square", "color": "blue", "size": "small", "box": [30, 30, 40, 40]},
               {"shape": "square", "color": "blue", "size": "small", "box": [45, 45, 55, 55]}]
    record = {"id": "c", "task": "caption", "image_size": [64, 64], "objects": objects,
              "conversations": [{"from": "human", "value": "<image>\nDescribe the image briefly."},
                                {"from": "gpt", "value": "a large red circle and two small blue squares"}]}
    assert G.mentions("a large red circle and two small blue squares") == {("red", "circle"): 1,
                                                                            ("blue", "square"): 2}
    report = G.caption_metrics(["a large red circle and two small blue squares", "a red circle and a green star"],
                               [record, record])
    first, second = report["rows"]
    assert first["precision"] == 1.0 and first["recall"] == 1.0 and first["complete"] and first["exact"]
    assert second["precision"] == 0.5 and second["recall"] == pytest.approx(1 / 3, abs=1e-4) and not second["complete"]
    assert report["precision"] == pytest.approx(4 / 5) and report["recall"] == pytest.approx(4 / 6)
    assert report["complete"] == 0.5


def test_vqa_accuracy_by_question_type():
    def q(answer, qtype, i):
        return {"id": f"q{i}", "task": "vqa", "question_type": qtype, "answer": answer,
                "conversations": [{"from": "human", "value": "<image>\n?"}, {"from": "gpt", "value": answer}]}
    records = [q("2", "count", 0), q("3", "count", 1), q("red", "color", 2), q("yes", "exists", 3),
               q("no", "position", 4)]
    report = G.vqa_metrics(["two", "2", "Red.", "no", "no"], records)
    assert report["correct"] == 3 and report["total"] == 5 and report["accuracy"] == pytest.approx(0.6)
    assert report["per_type"]["count"] == {"accuracy": 0.5, "correct": 1, "total": 2}
    assert report["per_type"]["color"]["accuracy"] == 1.0 and report["per_type"]["exists"]["accuracy"] == 0.0
    assert report["macro_accuracy"] == pytest.approx((0.5 + 1 + 0 + 1) / 4)


def test_default_source_follows_the_training_scenes_and_json_renders_like_the_source(home, tmp_path):
    from vlmkit.data import scenes
    from vlmkit.data.sources import Source, source_records

    config = from_name("minigpt-v2")
    assert G.default_source(config, "rec") == "scenes:rec:test:n1000:size128:shapes3:seed0"  # the tiny mixtures' size
    small = from_name("minigpt-v2", stages=[{"mixture": "scenes:rec:shapes1:size96=1"}] * 3)
    assert G.default_source(small, "rec") == "scenes:rec:test:n1000:size96:shapes1:seed0"
    assert G.default_source(small, "vqa") == "scenes:vqa:test:n1000:size64:shapes3:seed0"  # never trained: defaults
    # a scene source without a split reads the test split, never the training scenes
    records, source = G.task_records(config, "rec", "scenes:rec:n5")
    assert source == "scenes:rec:n5:test" and all(r["scene"].startswith("scenes-test-") for r in records)
    # a JSON of `vlmkit data scenes` is rendered exactly as the built-in source is for this preset
    scenes.write_scenes(tmp_path / "data", 5, split="test", kinds=("rec", "vqa"))
    from_json, _ = G.task_records(config, "rec", str(tmp_path / "data" / "test_rec.json"))
    builtin = source_records(config, config.stages[-1], Source("scenes:rec:test:n5"))
    assert [r["conversations"] for r in from_json] == [r["conversations"] for r in builtin]
    assert from_json[0]["conversations"][0]["value"].startswith("<image>\n[refer] ")
    assert Image.open(from_json[0]["image"]).size == (64, 64)  # image paths relative to the JSON's folder


def test_grid_png_and_drawn_answer(tmp_path):
    image = tmp_path / "scene.png"
    Image.new("RGB", (100, 100), (255, 255, 255)).save(image)
    rows = G.rec_metrics(["{<10><20><50><60>}"] * 5 + ["nothing"],
                         [{**rec_record("{<10><20><50><60>}", rid=f"r{i}"), "image": str(image)} for i in range(6)],
                         "minigpt_v2")["rows"]
    out = G.draw_grid("rec", rows, tmp_path / "grid.png")
    assert Image.open(out).size == G.grid_size(6) == (4 * G.TILE, 2 * (G.TILE + G.LABEL_LINES * G.LINE_HEIGHT + 4))
    drawn, error = G.draw_answer_boxes(str(image), "<p>the circle</p> {<10><20><50><60>}", "minigpt_v2",
                                       tmp_path / "drawn.png")
    assert drawn == 1 and error is None
    picture = Image.open(tmp_path / "drawn.png")
    assert picture.size == (200, 200)  # small images are enlarged by a whole factor
    assert picture.getpixel((20, 80)) == G.PRED_COLOUR  # the box's left edge (x1 = 10 px, scaled 2x)
    assert G.draw_answer_boxes(str(image), "{<10><20>}", "minigpt_v2", tmp_path / "none.png") == \
        (0, "'{<10><20>}' has 2 coordinates, expected 4")
    assert (tmp_path / "none.png").exists()


def test_eval_task_and_chat_draw_on_a_tiny_minigpt_v2(backbones, home, tmp_path, capsys):
    from test_grounding import staged_train_args

    from vlmkit.cli import main

    mixture = "scenes:rec:n20=1,scenes:caption:n20=0.5"
    run = tmp_path / "run"
    assert main(staged_train_args("minigpt-v2", run, backbones, mixture, "--vision.feature-layer", "-2")) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--task", "rec", "--limit", "8"]) == 0
    out = capsys.readouterr().out
    assert "REC accuracy@IoU0.5" in out and "scenes:rec:test:n1000" in out
    report = json.loads((run / "eval_rec.json").read_text())
    assert report["total"] == 8 and len(report["predictions"]) == 8
    for key in ("accuracy", "mean_iou", "mean_iou_parsed", "hits", "unparsed", "unparsed_by_reason",
                "reference", "source", "preset", "box_format", "max_new_tokens", "skipped", "seconds"):
        assert key in report, key
    assert report["preset"] == "minigpt-v2" and report["box_format"] == "minigpt_v2"
    assert report["hits"] + report["unparsed"] <= 8 and sum(report["unparsed_by_reason"].values()) == \
        report["unparsed"]
    assert report["reference"]["accuracy"] == 1.0  # what the preset writes parses back onto the true boxes
    row = report["predictions"][0]
    assert row["id"].startswith("scenes-test-") and set(row) >= {"box_true", "box_pred", "iou", "hit", "reason"}
    assert Image.open(run / "eval_rec.png").size == G.grid_size(8)

    assert main(["eval", str(run), "--task", "vqa", "--data", "scenes:vqa:test:n3", "--limit", "5"]) == 0
    vqa = json.loads((run / "eval_vqa.json").read_text())
    assert vqa["total"] == 5 and sum(t["total"] for t in vqa["per_type"].values()) == 5

    image = report["predictions"][0]["image"]
    capsys.readouterr()
    assert main(["chat", str(run), "--image", image, "--max-new-tokens", "8", "--draw", str(tmp_path / "a.png"),
                 "[refer] give me the location of the circle"]) == 0
    captured = capsys.readouterr()
    assert (tmp_path / "a.png").exists() and str(tmp_path / "a.png") in captured.err
    # an untrained model may answer with no box (or nothing): the message says which, the image is written either way
    assert ("drew " in captured.err) != ("no box drawn" in captured.err)
    assert main(["chat", str(run), "--draw", str(tmp_path / "b.png"), "where?"]) == 2  # --draw needs --image
