"""`vlmkit train --init`: fine-tune a released model (here a tiny random Hugging Face LLaVA whose tokenizer is
of the Llama family, as llava-hf/llava-1.5-7b-hf's is) on a small JSON, as LLaVA's finetune_task.sh does."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from test_hf_llava import CASES, build_hf_llava

from vlmkit.cli import main

COLOURS = {"red": (230, 30, 30), "blue": (30, 60, 230), "green": (30, 200, 60)}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tiny HF LLaVA with a Llama-family (SentencePiece-style) tokenizer and the task data."""
    from families import build_tokenizer

    root = tmp_path_factory.mktemp("init")
    tokenizer = build_tokenizer("llama")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    case = dict(CASES["default-penultimate-gqa"], pad=True)
    build_hf_llava(root / "hf", tokenizer, case)
    records = []
    for name, rgb in COLOURS.items():
        Image.new("RGB", (36, 30), rgb).save(root / f"{name}.png")
    for i in range(12):
        name = list(COLOURS)[i % 3]
        records.append({"id": f"r{i}", "image": f"{name}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": name}]})
    (root / "task.json").write_text(json.dumps(records))
    return root


def test_finetune_a_released_hf_llava(released, tmp_path, capsys):
    from transformers import LlavaForConditionalGeneration

    from vlmkit.model.vlm import VisionLanguageModel

    run = tmp_path / "run"
    args = ["train", "--init", str(released / "hf"), "--run-dir", str(run), "--data", str(released / "task.json"),
            "--image-folder", str(released), "--instruct.max-steps", "30", "--instruct.batch-size", "4",
            "--instruct.lr.llm", "1e-2", "--instruct.lr.connector", "1e-2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "--init" in out and "stage(s) instruct" in out and "stage align" not in out
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert {e["stage"] for e in log} == {"instruct"} and len(log) == 30
    first, last = log[0]["loss"], sum(e["loss"] for e in log[-5:]) / 5
    print(f"--init fine-tuning loss {first:.3f} -> {last:.3f}")
    assert last < 0.3 * first
    # it kept the released model's parts and template, and its weights changed
    model = VisionLanguageModel.from_pretrained(run / "model")
    assert model.config.template == "vicuna_v1" and model.config.connector.type == "mlp2x_gelu"
    original = LlavaForConditionalGeneration.from_pretrained(released / "hf")
    assert not torch.equal(model.llm.causal_lm.lm_head.weight, original.lm_head.weight)
    # chat answers are the trained word and stop there (no template text after the answer)
    for name in COLOURS:
        assert main(["chat", str(run), "--image", str(released / f"{name}.png"), "--max-new-tokens", "8",
                     "What color is the shape?"]) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1] == name
    # to-hf loads in transformers with the new weights
    assert main(["convert", "to-hf", str(run), str(tmp_path / "out")]) == 0
    exported = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert torch.equal(exported.lm_head.weight, model.llm.causal_lm.lm_head.weight)
    assert torch.equal(exported.model.multi_modal_projector.linear_2.weight, model.connector.linear_2.weight)
    assert not torch.equal(exported.model.multi_modal_projector.linear_2.weight,
                           original.model.multi_modal_projector.linear_2.weight)


def test_init_keeps_the_parts_and_names_bad_sources(released, tmp_path, capsys):
    common = ["--run-dir", str(tmp_path / "run"), "--data", str(released / "task.json"), "--image-folder",
              str(released)]
    assert main(["train", "--init", str(released / "hf"), "--connector.type", "linear", *common]) == 2
    assert "--init keeps the model's parts" in capsys.readouterr().err
    assert main(["train", "--init", str(tmp_path / "nowhere"), *common]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", "--init", str(tmp_path / "empty"), *common]) == 2
    assert "without config.json" in capsys.readouterr().err


def test_init_from_a_vlmkit_run_continues_from_its_weights(backbones, released, tmp_path, capsys):
    """A vlmkit run as the source (LoRA this time, as finetune_task_lora.sh): its weights are the start."""
    first = tmp_path / "first"
    base = ["--data", str(released / "task.json"), "--image-folder", str(released), "--instruct.batch-size", "4"]
    assert main(["train", "--init", str(released / "hf"), "--run-dir", str(first), "--instruct.max-steps", "3",
                 *base]) == 0
    second = tmp_path / "second"
    assert main(["train", "--init", str(first), "--run-dir", str(second), "--instruct.max-steps", "3",
                 "--instruct.lora.r", "4", *base]) == 0
    a = [json.loads(line)["loss"] for line in (first / "train_log.jsonl").read_text().splitlines()]
    b = [json.loads(line)["loss"] for line in (second / "train_log.jsonl").read_text().splitlines()]
    assert b[0] < a[0]  # it starts where the first run ended, not from the released weights
