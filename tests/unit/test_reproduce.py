"""`vlmkit reproduce` (vlmkit.tiny.reproduce): a preset's recipe over seeds, its skills measured, the scoreboard
written, resumed and refused; on the test backbones with 2-step stages (the real tiny recipes take minutes)."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from vlmkit import archs
from vlmkit.archs import from_name
from vlmkit.tiny import reproduce as R


def small(backbones, preset: str) -> dict:
    """Overrides: the test backbones and every stage 2 steps of 4."""
    from vlmkit.archs import from_name

    overrides = {"vision": {"name_or_path": backbones["clip"], "feature_layer": -2, "select": "patch"},
                 "llm": {"name_or_path": backbones["llm"]}}
    for stage in from_name(preset).stages:
        overrides[f"stages__{stage.name}__max_steps"] = 2
        overrides[f"stages__{stage.name}__batch_size"] = 4
    return overrides


def test_every_preset_lists_skills_the_scoreboard_measures():
    for name in archs.names():
        skills = archs.skills(name)
        assert skills and set(skills) <= set(R.SKILLS), name
        for spec in skills.values():
            assert spec["target"] is None or 0 < spec["target"] <= 1
    assert archs.skills("llava-1.5")["easy-vqa"]["target"] == 0.99  # the demo's target
    for name in archs.names():
        config = from_name(name)
        for skill, spec in archs.skills(name).items():
            if "stage" in spec:  # a stage the tiny recipe runs
                assert spec["stage"] in [s.name for s in config.stages], (name, skill)
            if skill == "retrieval":  # a Q-Former's image-text side
                assert config.connector.type == "qformer", name


def entry(preset, seed, skills, limit=0, seconds=60.0):
    return {"preset": preset, "seed": seed, "eval_limit": limit, "train_seconds": seconds, "skills": skills,
            "machine": {"cpu": "x86_64", "cores": 2, "flags": "avx2", "torch": "2.13.0"}, "errors": {}}


def test_table_judges_targets_on_every_seed_and_never_on_a_subset(tmp_path):
    data = {"results": [
        entry("llava-1.5", 0, {"easy-vqa": {"accuracy": 0.995}}),
        entry("llava-1.5", 1, {"easy-vqa": {"accuracy": 0.985}}, seconds=120.0),
        entry("llava", 0, {"easy-vqa": {"accuracy": 0.999}}),
        entry("minigpt4", 0, {"easy-vqa": {"accuracy": 0.95}}, limit=50),
        entry("minigpt-v2", 0, {"rec": {"Acc@0.5": 0.4, "mean IoU": 0.45},
                                "pope": {"F1 (adversarial)": 0.7, "yes-ratio (adversarial)": 0.6}}),
        entry("minigpt-v2", 1, {"rec": {"Acc@0.5": 0.5, "mean IoU": 0.5},
                                "pope": {"F1 (adversarial)": 0.8, "accuracy (random)": 0.9,
                                         "yes-ratio (adversarial)": 0.5}}),
    ]}
    rows = {(r["preset"], r["metric"]): r for r in R.rows(data)}
    two = rows[("llava-1.5", "accuracy")]
    assert two["mean"] == pytest.approx(0.99) and (two["min"], two["max"]) == (0.985, 0.995)
    assert two["met"] is False and two["train_minutes"] == 1.5  # one seed short of 0.99: not met
    assert rows[("llava", "accuracy")]["met"] is True
    assert rows[("minigpt4", "accuracy")]["met"] is None and rows[("minigpt4", "accuracy")]["subset"]
    assert rows[("minigpt-v2", "Acc@0.5")]["target"] == 0.9 and rows[("minigpt-v2", "mean IoU")]["target"] is None
    random_row = rows[("minigpt-v2", "accuracy (random)")]  # measured on one seed only: its own seed list
    assert random_row["values"] == [0.9] and random_row["seeds"] == [1]
    assert rows[("minigpt-v2", "F1 (adversarial)")]["headline"]
    table = R.markdown(data)
    assert "| llava-1.5 | easy-VQA | accuracy | 99.00% | 98.50%–99.50% (2) | ≥ 99.0% not met | 1.5 min |" in table
    assert "| llava | easy-VQA | accuracy | 99.90% | — (1) | ≥ 99.0% met |" in table
    assert "≥ 90.0% subset" in table and "--eval-limit 50" in table
    assert "| minigpt-v2 | POPE | F1 (adversarial) | 0.750 | 0.700–0.800 (2) | — |" in table
    assert "x86_64, 2 cores, avx2, torch 2.13.0" in table
    assert R.plot(data, tmp_path / "s.png").exists()


def test_scoreboard_over_seeds_resumes_and_writes_table_and_plot(backbones, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMKIT_HOME", str(tmp_path / "home"))
    out = tmp_path / "board"
    lines = []
    data = R.reproduce(["llava-1.5"], 2, out, eval_limit=6, overrides=small(backbones, "llava-1.5"), log=lines.append)
    assert [(e["preset"], e["seed"]) for e in data["results"]] == [("llava-1.5", 0), ("llava-1.5", 1)]
    for entry in data["results"]:
        accuracy = entry["skills"]["easy-vqa"]["accuracy"]
        run = out / "runs" / f"llava-1.5-s{entry['seed']}"
        report = json.loads((run / "eval_easy-vqa-test.json").read_text())
        assert report["total"] == 6 and accuracy == report["accuracy"]  # what the eval measured, not a copy
        assert json.loads((run / "config.json").read_text())["seed"] == entry["seed"]
        assert entry["train_seconds"] > 0
    saved = json.loads((out / "scoreboard.json").read_text())
    assert saved["results"] == data["results"] and saved["results"][0]["machine"]["cores"] >= 1
    table = (out / "scoreboard.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| llava-1.5 |"))
    values = [e["skills"]["easy-vqa"]["accuracy"] for e in data["results"]]
    assert f"{sum(values) / 2:.2%}" in row and "(2)" in row and "≥ 99.0%" in row
    assert "subset" in row and "met" not in row  # measured on 6 questions: the target is not judged
    assert Image.open(out / "scoreboard.png").size[0] > 400

    # a rerun keeps what is there and measures only what is new
    lines.clear()
    again = R.reproduce(["llava-1.5"], 2, out, eval_limit=6, overrides=small(backbones, "llava-1.5"),
                        log=lines.append)
    assert again["results"] == data["results"] and sum("already" in line for line in lines) == 2
    # measured on another subset: that seed is measured again and replaces the old entry
    third = R.reproduce(["llava-1.5"], 1, out, eval_limit=5, overrides=small(backbones, "llava-1.5"), log=lines.append)
    assert sorted((e["seed"], e["eval_limit"]) for e in third["results"]) == [(0, 5), (1, 6)]


def test_grounding_skills_and_pope_on_a_tiny_minigpt_v2(backbones, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMKIT_HOME", str(tmp_path / "home"))
    overrides = small(backbones, "minigpt-v2")
    for stage in ("pretrain", "multitask", "instruct"):
        overrides[f"stages__{stage}__mixture"] = "scenes:rec:n20=1,scenes:vqa:n20=1"
    data = R.reproduce(["minigpt-v2"], 1, tmp_path / "board", eval_limit=4, overrides=overrides,
                       log=lambda *_: None)
    skills = data["results"][0]["skills"]
    assert list(skills) == ["rec", "reg", "scene-vqa", "pope"]
    assert list(skills["pope"])[0] == "F1 (adversarial)" and 0 <= skills["pope"]["yes-ratio (adversarial)"] <= 1
    run = tmp_path / "board" / "runs" / "minigpt-v2-s0"
    pope = json.loads((run / "eval_pope.json").read_text())
    assert pope["scenes"] == 4 and skills["pope"]["accuracy (random)"] == pope["settings"]["random"]["accuracy"]
    assert json.loads((run / "eval_rec.json").read_text())["total"] == 4
    table = (tmp_path / "board" / "scoreboard.md").read_text()
    assert "| minigpt-v2 | REC | Acc@0.5 |" in table and "| minigpt-v2 | POPE | F1 (adversarial) |" in table
    assert "|  | POPE | yes-ratio (adversarial) |" in table


def test_bad_requests_are_refused_before_any_training(tmp_path, capsys):
    from vlmkit.cli import main

    assert main(["reproduce", "llava-1.5", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown preset(s) nope" in capsys.readouterr().err
    assert main(["reproduce", "llava-1.5", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert main(["reproduce", "llava-1.5", "--eval-limit", "-1", "--out", str(tmp_path)]) == 2
    (tmp_path / "scoreboard.json").write_text("{not json")
    assert main(["reproduce", "llava-1.5", "--out", str(tmp_path)]) == 2
    assert "not a scoreboard" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
