"""The POPE-style hallucination probe (vlmkit.eval.pope): how negatives are chosen in each setting, the
metrics on hand-made answers, and the probe end to end on a tiny trained minigpt-v2 run."""
from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from vlmkit.data.scenes import COLORS, SHAPES
from vlmkit.eval import pope as P

KINDS = [(c, s) for c in COLORS for s in SHAPES]


def test_negatives_random_popular_adversarial():
    present = {("red", "circle"), ("blue", "square")}
    frequency = Counter({k: 10 for k in KINDS})
    frequency[("green", "star")] = 50
    frequency[("red", "circle")] = 99  # present: never a negative however popular
    frequency[("gray", "triangle")] = 40
    together = Counter({(("blue", "circle"), ("red", "circle")): 30})
    rng = random.Random(0)
    for setting in P.SETTINGS:
        chosen = P.choose_negatives(present, KINDS, 2, setting, rng, frequency, together)
        assert len(chosen) == len(set(chosen)) == 2 and not set(chosen) & present
    assert P.choose_negatives(present, KINDS, 2, "popular", rng, frequency, together) == \
        [("green", "star"), ("gray", "triangle")]
    adversarial = P.choose_negatives(present, KINDS, 3, "adversarial", rng, frequency, together)
    assert adversarial[0] == ("blue", "circle")  # shares the circle's shape and co-occurs most with it
    for color, shape in adversarial:  # every one shares a colour or a shape with an object present
        assert any(color == c or shape == s for c, s in present)
    draws = {tuple(P.choose_negatives(present, KINDS, 2, "random", random.Random(i), frequency, together))
             for i in range(20)}
    assert len(draws) > 10  # random is random, and seeded
    assert P.choose_negatives(present, KINDS, 2, "random", random.Random(3), frequency, together) == \
        P.choose_negatives(present, KINDS, 2, "random", random.Random(3), frequency, together)
    with pytest.raises(Exception, match="unknown POPE setting"):
        P.choose_negatives(present, KINDS, 1, "nearest", rng, frequency, together)


def manifest():
    return [{"id": "s0", "image": "test/000000.png", "image_size": [64, 64],
             "objects": [{"shape": "circle", "color": "red"}, {"shape": "circle", "color": "red"},
                         {"shape": "square", "color": "blue"}]},
            {"id": "s1", "image": "test/000001.png", "image_size": [64, 64],
             "objects": [{"shape": "star", "color": "green"}]}]


def test_questions_are_balanced_per_setting_and_asked_once():
    frequency, together = P.training_statistics([scene["objects"] for scene in manifest()] * 3)
    assert frequency[("red", "circle")] == 6 and together[(("blue", "square"), ("red", "circle"))] == 3
    records, ids = P.pope_questions(manifest(), "/data", frequency, together, COLORS, SHAPES, seed=0)
    assert len(ids["present"]) == 3  # the two red circles are one kind
    for setting in P.SETTINGS:
        assert len(ids[setting]) == 3
    assert len({r["id"] for r in records}) == len(records) == len(set(sum(ids.values(), [])))
    by_id = {r["id"]: r for r in records}
    assert {by_id[i]["answer"] for i in ids["present"]} == {"yes"}
    assert {by_id[i]["answer"] for s in P.SETTINGS for i in ids[s]} == {"no"}
    record = by_id["s0-red-circle"]
    assert record["conversations"][0]["value"] == "<image>\nIs there a red circle?"
    assert record["image"] == "/data/test/000000.png" and record["question_type"] == "present"
    assert by_id[ids["present"][-1]]["question"] == "Is there a green star?"
    again, _ = P.pope_questions(manifest(), "/data", frequency, together, COLORS, SHAPES, seed=0)
    assert again == records
    # the draw is seeded by a string (sha512 in CPython, not hash()): the same in every process, pinned here
    assert [by_id[i]["question"] for i in ids["random"]] == RANDOM_NEGATIVES


RANDOM_NEGATIVES = ["Is there a teal circle?", "Is there a black circle?", "Is there a black triangle?"]


def test_metrics_on_hand_made_answers():
    assert P.yes_no("Yes.") == "yes" and P.yes_no(" no, there is not") == "no" and P.yes_no("a circle") == "other"
    ids = {"present": ["p1", "p2", "p3", "p4"], "random": ["r1", "r2", "r3", "r4"],
           "popular": ["r1", "q2", "q3", "q4"], "adversarial": ["a1", "a2", "a3", "a4"]}
    said = {"p1": "yes", "p2": "yes", "p3": "yes", "p4": "other", "r1": "no", "r2": "no", "r3": "no", "r4": "no",
            "q2": "yes", "q3": "no", "q4": "no", "a1": "yes", "a2": "yes", "a3": "yes", "a4": "yes"}
    m = P.pope_metrics(said, ids)
    assert m["random"]["accuracy"] == 7 / 8 and m["random"]["precision"] == 1.0
    assert m["random"]["recall"] == 0.75 and m["random"]["yes_ratio"] == 3 / 8 and m["random"]["other"] == 1
    assert m["random"]["f1"] == pytest.approx(2 * 0.75 / 1.75)
    assert m["popular"]["accuracy"] == 6 / 8 and m["popular"]["precision"] == 0.75
    assert m["adversarial"]["accuracy"] == 3 / 8 and m["adversarial"]["yes_ratio"] == 7 / 8
    assert m["adversarial"]["precision"] == 3 / 7 and (m["adversarial"]["tp"], m["adversarial"]["fp"]) == (3, 4)
    # an answer that is neither yes nor no to an absent object is a false alarm, not a free pass
    noise = {**said, "r1": "other", "r2": "other", "r3": "other", "r4": "other"}
    m = P.pope_metrics(noise, ids)["random"]
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["other"]) == (3, 4, 0, 1, 5)
    assert m["precision"] == 3 / 7 and m["accuracy"] == 3 / 8 and m["yes_ratio"] == 3 / 8
    empty = P.pope_metrics({}, {"present": [], **{s: [] for s in P.SETTINGS}})
    assert empty["random"]["f1"] == 0.0 and empty["random"]["accuracy"] == 0.0


def test_probe_on_a_tiny_minigpt_v2_run(backbones, tmp_path, monkeypatch, capsys):
    from test_grounding import staged_train_args

    from vlmkit.cli import load_run, main

    monkeypatch.setenv("VLMKIT_HOME", str(tmp_path / "home"))
    run = tmp_path / "run"
    mixture = "scenes:vqa:n20=1"
    assert main(staged_train_args("minigpt-v2", run, backbones, mixture, "--vision.feature-layer", "-2")) == 0
    model, _ = load_run(str(run))
    capsys.readouterr()
    report = P.run_pope_eval(model, run, n=4, train_scenes=30, verbose=False)
    assert not list((tmp_path / "home" / "scenes").glob("*-train-n30-*"))  # counted, not rendered
    assert "POPE random acc" in capsys.readouterr().out
    saved = json.loads((run / "eval_pope.json").read_text())
    assert saved["settings"] == report["settings"] and saved["scenes"] == 4
    rows = saved["predictions"]
    assert len(rows) == saved["questions"] and saved["positives"] == sum(r["question_type"] == "present" for r in rows)
    assert rows[0]["question"].startswith("Is there") and rows[0]["image"].endswith(".png")
    yes_to_present = sum(P.yes_no(r["prediction"]) == "yes" for r in rows if r["question_type"] == "present")
    for m in saved["settings"].values():  # the same positives in every setting, as many negatives
        assert m["total"] == 2 * saved["positives"] and m["tp"] == yes_to_present
        assert m["tp"] + m["fn"] == saved["positives"] and m["fp"] + m["tn"] <= saved["positives"]
    assert main(["eval", str(run), "--task", "pope", "--limit", "2"]) == 0
    assert "on 2 scenes" in capsys.readouterr().out
    assert json.loads((run / "eval_pope.json").read_text())["scenes"] == 2
    assert main(["eval", str(run), "--task", "pope", "--data", "x.json"]) == 2
    assert "takes no --data" in capsys.readouterr().err
    assert main(["eval", str(run), "--task", "pope", "--split", "train"]) == 2
