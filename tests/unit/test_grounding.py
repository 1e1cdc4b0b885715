"""Grounding data as a preset writes it (vlmkit.data.grounding), and the minigpt-v2 preset through its stages."""
from __future__ import annotations

import json

import pytest

from vlmkit.archs import from_name
from vlmkit.data import boxes
from vlmkit.data.sources import Source, source_records


def staged_train_args(preset: str, run, backbones, mixture: str, *extra: str) -> list[str]:
    """`vlmkit train` of a grounding preset with the test backbones: every stage on `mixture`, 2 steps of 4."""
    from vlmkit.archs import from_name

    args = ["train", "--preset", preset, "--run-dir", str(run), "--vision-tower", backbones["clip"],
            "--llm", backbones["llm"], *extra]
    for stage in from_name(preset).stages:
        args += [f"--{stage.name}.mixture", mixture, f"--{stage.name}.max-steps", "2", f"--{stage.name}.batch-size",
                 "4"]
    return args


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMKIT_HOME", str(tmp_path / "home"))


def test_minigpt_v2_writes_task_tokens_and_its_boxes(home):
    config = from_name("minigpt-v2")
    rec = source_records(config, config.stages[0], Source("scenes:rec:n30"))[0]
    question, answer = (turn["value"] for turn in rec["conversations"])
    assert question.startswith("<image>\n[refer] ") and "<p>" not in question  # plain phrase in the question
    parsed = boxes.parse_boxes("minigpt_v2", answer, rec["image_size"])
    assert parsed.ok and len(parsed.boxes) == 1
    truth = boxes.Box(*rec["boxes"][0])
    assert boxes.iou(parsed.boxes[0][1], truth) > 0.8  # the 0-100 grid loses at most a cell per side
    grounded = source_records(config, config.stages[0], Source("scenes:grounded_caption:n30"))[0]
    assert grounded["conversations"][0]["value"].startswith("<image>\n[grounding] ")
    assert "<p>" in grounded["conversations"][1]["value"]
    vqa = source_records(config, config.stages[0], Source("scenes:vqa:n30"))[0]
    assert vqa["conversations"][0]["value"].startswith("<image>\n[vqa] ")


def test_qwen_vl_boxes_and_no_task_tokens(home):
    config = from_name("llava-1.5", box_format="qwen_vl")
    rec = source_records(config, config.stages[0], Source("scenes:rec:n30"))[0]
    question, answer = (turn["value"] for turn in rec["conversations"])
    assert "[refer]" not in question and "<ref>" in question
    parsed = boxes.parse_boxes("qwen_vl", answer, rec["image_size"])
    assert parsed.ok and boxes.iou(parsed.boxes[0][1], boxes.Box(*rec["boxes"][0])) > 0.9


def test_minigpt_v2_trains_through_its_three_stages_and_chats(backbones, home, tmp_path, capsys):
    from vlmkit.cli import main
    from vlmkit.model.vlm import VisionLanguageModel

    mixture = "scenes:caption:n40=1,scenes:rec:n40=1,scenes:vqa:n40=0.2"
    run = tmp_path / "run"
    # the paper's LoRA (q_proj, v_proj) in the middle stage, the tiny scale's full training around it
    assert main(staged_train_args("minigpt-v2", run, backbones, mixture, "--vision.feature-layer", "-2",
                                  "--multitask.lora.r", "4", "--multitask.lora.alpha", "8")) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1-pretrain", "2-multitask", "3-instruct"]
    out = capsys.readouterr().out
    assert out.count("(LoRA r=4)") == 1
    model = VisionLanguageModel.from_pretrained(run / "model")
    assert model.config.connector.type == "concat4" and model.num_image_tokens == 16 // 4
    assert model.config.coordinate_tokens and "<100>" in model.tokenizer.get_vocab()
    assert model.config.template == "llama2" and model.config.box_format == "minigpt_v2"
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in log] == ["pretrain"] * 2 + ["multitask"] * 2 + ["instruct"] * 2
    image = next((tmp_path / "home" / "scenes").rglob("*.png"))
    capsys.readouterr()
    question = "[refer] give me the location of the circle"
    assert main(["chat", str(run), "--image", str(image), "--max-new-tokens", "6", question]) == 0
    # a model trained 2 steps per stage may well answer nothing; the CLI must print what the model says
    from vlmkit.infer.chat import answer, first_user_turn
    from vlmkit.infer.generate import GenerationConfig

    expected = answer(model, [{"role": "user", "content": first_user_turn(question, True)}], [str(image)],
                      GenerationConfig(max_new_tokens=6))
    assert capsys.readouterr().out == expected + "\n"


def test_qwen_vl_trains_through_its_stages_packed_and_numbers_its_images(backbones, home, tmp_path, capsys):
    from vlmkit.cli import main
    from vlmkit.data.render import render_conversation
    from vlmkit.data.templates import get_template
    from vlmkit.model.vlm import VisionLanguageModel

    mixture = "scenes:caption:n40=1,scenes:rec:n40=1"
    run = tmp_path / "run"
    assert main(staged_train_args("qwen-vl", run, backbones, mixture, "--multitask.pack-to", "256")) == 0
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    packed = [e for e in log if e["stage"] == "multitask"]
    assert all(e["rows"] < 4 for e in packed)  # 4 samples a micro-batch, packed into fewer rows
    out = capsys.readouterr().out  # stage 1 at low resolution, then higher: the CLIP tower's positions interpolated
    assert "'pretrain': images at 64 px, 64 vision tokens -> 16 image tokens" in out
    assert "'multitask': images at 128 px, 256 vision tokens -> 16 image tokens" in out
    model = VisionLanguageModel.from_pretrained(run / "model")
    assert model.config.connector.type == "resampler" and model.num_image_tokens == 16
    assert model.image_transform.crop == (128, 128) and model.vision.interpolates  # saved at the last stage's size
    messages = [{"role": "user", "content": "<image>\nfirst <image>\nsecond"}, {"role": "assistant", "content": "ok"}]
    rendered = render_conversation(messages, get_template("qwen_vl"), model.tokenizer,
                                   num_image_tokens=model.num_image_tokens)
    text = model.tokenizer.decode(rendered.input_ids)
    assert "Picture 1: <img>" in text and "Picture 2: <img>" in text and text.count("</img>") == 2
    # the answer's <ref>/<box> are special tokens of this tokenizer: decoding keeps them, drops the turn's end
    from vlmkit.infer.generate import decode_answer

    answer = "<ref>the red circle</ref><box>(100,200),(300,400)</box>"
    ids = model.tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)
    assert model.tokenizer.convert_tokens_to_ids("<box>") in ids and model.tokenizer.eos_token_id is not None
    assert decode_answer(model, [*ids, model.tokenizer.eos_token_id]) == answer
    assert boxes.parse_boxes("qwen_vl", decode_answer(model, ids), (128, 128)).ok
    image = next((tmp_path / "home" / "scenes").rglob("*.png"))
    capsys.readouterr()
    assert main(["chat", str(run), "--image", str(image), "--max-new-tokens", "6", "where is the circle?"]) == 0
