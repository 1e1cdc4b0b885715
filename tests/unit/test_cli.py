import json

from vlmkit.cli import main


def test_presets_lists_parts_and_stages(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "llava-1.5" in out and "mlp2x_gelu" in out and "stage 2 instruct" in out
    assert main(["presets", "--scale", "paper"]) == 0
    assert "openai/clip-vit-large-patch14-336" in capsys.readouterr().out


def write_data(tmp_path, image_files, extra=()):
    records = [{"id": f"r{i}", "image": image_files[i % 3].split("/")[-1], "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": c}]}
        for i, c in enumerate(["red", "blue", "green"] * 4)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records + list(extra)))
    return path


def train_argv(backbones, tmp_path, data, *extra):
    return ["train", "--preset", "llava-1.5", "--run-dir", str(tmp_path / "run"), "--data", str(data),
            "--image-folder", str(tmp_path), "--stages", "instruct", "--instruct.max-steps", "3",
            "--instruct.batch-size", "4", "--vision.name-or-path", backbones["clip"], "--vision.feature-layer", "-2",
            "--vision.select", "patch",  # the tiny tower's pooled token: these runs export to transformers' LLaVA
            "--llm.name-or-path", backbones["llm"], *extra]


def test_train_eval_chat_on_user_json(backbones, tmp_path, image_files, capsys):
    data = write_data(tmp_path, image_files)
    assert main(train_argv(backbones, tmp_path, data)) == 0
    run = tmp_path / "run"
    assert (run / "model" / "model.safetensors").exists() and (run / "checkpoints" / "2-instruct").exists()
    assert len((run / "train_log.jsonl").read_text().splitlines()) == 3 and (run / "loss.png").exists()
    assert main(["eval", str(run), "--data", str(data), "--image-folder", str(tmp_path)]) == 0
    report = json.loads((run / "eval_data.json").read_text())
    assert report["total"] == 12 and 0 <= report["accuracy"] <= 1 and (run / "confusion_data.png").exists()
    capsys.readouterr()
    assert main(["chat", str(run), "--image", image_files[0], "--max-new-tokens", "3", "what", "color?"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_bad_record_is_one_line_and_exit_2(backbones, tmp_path, image_files, capsys):
    bad = {"id": "broken-7", "image": "missing.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}
    data = write_data(tmp_path, image_files, [bad])
    assert main(train_argv(backbones, tmp_path, data)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("vlmkit: error: ")
    assert "record 'broken-7'" in errors[0] and "image file not found" in errors[0] and "missing.png" in errors[0]
    assert "Traceback" not in err
    assert main(train_argv(backbones, tmp_path, data, "--skip-bad")) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped"] == {"instruct": {"missing_image": 1}}


def test_unknown_preset_and_missing_run_are_clear(capsys, tmp_path):
    assert main(["train", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["chat", str(tmp_path / "none"), "hi"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["train", "--run-dir", str(tmp_path / "bn"), "--instruct.batch-norm", "on"]) == 2
    err = capsys.readouterr().err
    assert "--instruct.batch-norm 'on': one of frozen, train" in err and "Traceback" not in err
    assert not (tmp_path / "bn" / "checkpoints").exists()  # refused before any stage ran


def test_train_with_swapped_backbones_then_export_and_reimport(backbones, tmp_path, image_files, capsys):
    """--vision-tower/--llm swap the backbones; `convert to-hf` output loads in transformers; `from-hf` returns."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlmkit.model.vlm import VisionLanguageModel

    data = write_data(tmp_path, image_files)
    argv = train_argv(backbones, tmp_path, data, "--vision-tower", backbones["clip"], "--llm", backbones["llm"],
                      "--vision.feature-layer=-3,-1")
    assert main(argv) == 0
    run = tmp_path / "run"
    model = VisionLanguageModel.from_pretrained(run / "model")
    assert model.config.vision.feature_layer == [-3, -1] and model.connector.linear_1.in_features == 2 * 48
    assert main(["convert", "to-hf", str(run), str(tmp_path / "hf")]) == 0
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    from PIL import Image
    inputs = processor(images=[Image.open(image_files[0])], text=["USER: <image>\nwhat color? ASSISTANT:"],
                       return_tensors="pt")
    with torch.no_grad():
        expected = hf(**inputs).logits
        ours = model(inputs["input_ids"], inputs["attention_mask"], image_counts=[1],
                     pixel_values=inputs["pixel_values"])[1]
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "back"), "--dtype", "bfloat16"]) == 0
    back = VisionLanguageModel.from_pretrained(tmp_path / "back")
    assert next(back.llm.parameters()).dtype == torch.bfloat16
    capsys.readouterr()
    assert main(["chat", str(tmp_path / "back"), "--image", image_files[0], "--max-new-tokens", "3", "what?"]) == 0


def test_convert_errors_are_one_line(backbones, tmp_path, capsys):
    assert main(["convert", "from-hf", backbones["llm"], str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmkit: error: ") and "model_type 'llama' is not Hugging Face's 'llava'" in err


def test_lora_run_resumes_and_exports(backbones, tmp_path, image_files, capsys):
    data = write_data(tmp_path, image_files)
    argv = train_argv(backbones, tmp_path, data, "--instruct.lora.r", "4", "--instruct.lora.save", "adapter")
    argv[argv.index("llava-1.5")] = "llava-1.5-lora"
    assert main(argv) == 0
    assert "LoRA r=4" in capsys.readouterr().out
    run = tmp_path / "run"
    assert (run / "model" / "adapter" / "adapter_config.json").exists()
    assert main(argv + ["--resume"]) == 0
    assert "resuming after stage 'instruct'" in capsys.readouterr().out
    assert main(["convert", "to-hf", str(run), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").exists()


def test_device_is_resolved_and_checked(backbones, tmp_path, image_files, capsys):
    import torch

    from vlmkit.io import resolve_device

    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    data = write_data(tmp_path, image_files)
    assert main(train_argv(backbones, tmp_path, data, "--device", "cpu")) == 0
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["chat", str(run), "--device", "cpu", "--image", image_files[0], "--max-new-tokens", "2", "hi"]) == 0
    if not torch.cuda.is_available():
        assert main(["chat", str(run), "--device", "cuda", "hi"]) == 2
        err = capsys.readouterr().err
        assert "--device cuda: no CUDA GPU is visible" in err and "Traceback" not in err
    assert main(["eval", str(run), "--device", "tpu", "--data", str(data), "--image-folder", str(tmp_path)]) == 2
    assert "--device 'tpu': not a device (auto, cpu, cuda, cuda:N)" in capsys.readouterr().err


def test_eval_chat_and_serve_flags_are_their_settings_fields():
    """Every field of EvalOptions, ChatOptions, ServerOptions and ServeSettings is a flag of its command with the
    field's default and help (written once, in the dataclass), and those commands have no other settings flags."""
    import argparse
    import dataclasses

    from vlmkit.cli import build_parser
    from vlmkit.eval import EvalOptions
    from vlmkit.infer.chat import ChatOptions
    from vlmkit.serve.protocol import ServeSettings, ServerOptions

    parser = build_parser(["eval"])
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    # the flags every command that loads a run shares, and the command's inputs
    common = {"help", "run", "allow_pickle", "device", "dtype", "max_image_pixels", "max_image_side",
              "max_image_aspect", "confine_images"}
    inputs = {"eval": set(), "chat": {"question", "image"}, "serve": set()}
    for command, classes in (("eval", [EvalOptions]), ("chat", [ChatOptions]), ("serve", [ServerOptions, ServeSettings])):
        actions = {a.dest: a for a in commands[command]._actions}
        fields = {f.name: f for cls in classes for f in dataclasses.fields(cls)}
        assert set(actions) - common - inputs[command] == set(fields) - common, command
        for name, f in fields.items():
            if name in common:
                continue
            default = [] if f.metadata.get("repeat") else f.default
            assert actions[name].default == default, (command, name)
            assert f.metadata["help"] in actions[name].help, (command, name)


def test_train_help_shows_the_fields_of_the_presets_connector_only(capsys):
    """Each ConnectorConfig field says which connector types read it; a preset's `train --help` lists those of its
    connector (another type's with --connector.type), and another connector's field is refused, not ignored."""
    import dataclasses

    import pytest

    from vlmkit.archs import preset_data
    from vlmkit.config import ConnectorConfig, connector_fields

    owners = {f.name: f.metadata.get("connectors") for f in dataclasses.fields(ConnectorConfig)}
    assert [name for name, types in owners.items() if types is None] == ["type"]  # every other field is marked
    for preset, argv in (("llava", []), ("minigpt-v2", []), ("qwen-vl", []), ("blip2", []),
                         ("llava-1.5", ["--connector.type", "resampler"])):
        with pytest.raises(SystemExit):
            main(["train", "--preset", preset, *argv, "--help"])
        shown = [line.split()[0].rstrip(",")[len("--connector."):] for line in capsys.readouterr().out.splitlines()
                 if line.strip().startswith("--connector.")]
        kind = argv[1] if argv else preset_data(preset)["connector"]["type"]
        assert shown == [name.replace("_", "-") for name in connector_fields(kind)], preset
    assert "merge" not in connector_fields("qformer") and "name_or_path" not in connector_fields("resampler")
    with pytest.raises(SystemExit):
        main(["train", "--preset", "llava-1.5", "--connector.merge", "2", "--dry-run"])
    assert "unrecognized arguments: --connector.merge 2" in capsys.readouterr().err.strip().splitlines()[-1]
