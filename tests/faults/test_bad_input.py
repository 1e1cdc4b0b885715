"""The bad-input corpus (tests/data/bad) through `vlmkit train` and `vlmkit eval`.

Every bad record stops the command with exactly one line naming the file, the record and the problem,
exit status 2 and no traceback; with --skip-bad the command goes on and counts the skip by reason.
Whole-file problems (malformed JSON, not UTF-8) cannot be skipped and always stop with one line.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmkit.cli import main

BAD = Path(__file__).parent.parent / "data" / "bad"
RECORDS = json.loads((BAD / "records.json").read_text())
EXPECTED = {  # record -> (skip reason, words the error line must contain)
    "corrupt_image": ("corrupt_image", "cannot decode image"),
    "empty_image": ("corrupt_image", "cannot decode image"),
    "bomb_image": ("image_too_large", "declares 400,000,000 pixels"),
    "missing_image": ("missing_image", "image file not found"),
    "no_conversations": ("schema", "has no 'conversations' list"),
    "image_count": ("image_count", "1 image(s) but 2 <image> placeholder(s)"),
    "turns_alternate": ("turns", "turns do not alternate"),
    "empty_answer": ("turns", "empty assistant turn"),
    "too_long": ("too_long", "more than max_length=1024"),
}
GOOD = [{"id": f"good-{i}", "image": "good.png", "conversations": [
    {"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": "red"}]}
    for i in range(4)]


def data_with(tmp_path, name: str) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(GOOD[:2] + [RECORDS[name]] + GOOD[2:]))
    return path


def train_argv(backbones, run, data, *extra):
    return ["train", "--run-dir", str(run), "--data", str(data), "--image-folder", str(BAD), "--stages", "instruct",
            "--instruct.max-steps", "1", "--instruct.batch-size", "2", "--vision-tower", backbones["clip"],
            "--vision.feature-layer", "-2", "--llm", backbones["llm"], *extra]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]  # progress bars aside
    assert len(lines) == 1, err
    assert lines[0].startswith("vlmkit: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def trained_run(backbones, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bad-input-run")
    data = tmp_path / "good.json"
    data.write_text(json.dumps(GOOD))
    assert main(train_argv(backbones, tmp_path / "run", data)) == 0
    return tmp_path / "run"


@pytest.mark.parametrize("name", list(EXPECTED))
def test_bad_record_in_train_and_eval(name, backbones, trained_run, tmp_path, capsys):
    reason, words = EXPECTED[name]
    data = data_with(tmp_path, name)
    record_id = RECORDS[name]["id"]
    capsys.readouterr()
    assert main(train_argv(backbones, tmp_path / "run", data)) == 2
    line = one_error_line(capsys)
    assert str(data) in line and f"record '{record_id}'" in line and words in line, line

    assert main(train_argv(backbones, tmp_path / "run", data, "--skip-bad")) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped"] == {"instruct": {reason: 1}}

    capsys.readouterr()
    eval_argv = ["eval", str(trained_run), "--data", str(data), "--image-folder", str(BAD)]
    assert main(eval_argv) == 2
    line = one_error_line(capsys)
    assert f"record '{record_id}'" in line and words in line, line
    assert main(eval_argv + ["--skip-bad"]) == 0
    report = json.loads((trained_run / f"eval_{name}.json").read_text())
    assert report["total"] == len(GOOD) and report["skipped"] == {reason: 1}


@pytest.mark.parametrize("name,words", [("malformed.json", "malformed JSON at line 3"),
                                        ("not_utf8.json", "not UTF-8 text")])
def test_bad_file_in_train_and_eval(name, words, backbones, trained_run, tmp_path, capsys):
    capsys.readouterr()
    for argv in (train_argv(backbones, tmp_path / "run", BAD / name, "--skip-bad"),
                 ["eval", str(trained_run), "--data", str(BAD / name), "--skip-bad"]):
        assert main(argv) == 2
        line = one_error_line(capsys)
        assert str(BAD / name) in line and words in line, line


def test_pickle_checkpoints_are_refused_unless_allowed(trained_run, tmp_path, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file

    checkpoint = tmp_path / "pickled"
    shutil.copytree(trained_run / "model", checkpoint)
    torch.save(load_file(checkpoint / "model.safetensors"), checkpoint / "model.bin")
    (checkpoint / "model.safetensors").unlink()
    capsys.readouterr()
    assert main(["chat", str(checkpoint), "--max-new-tokens", "2", "hi"]) == 2
    line = one_error_line(capsys)
    assert "model.bin is a pickle file" in line and "--allow-pickle" in line
    assert main(["chat", str(checkpoint), "--max-new-tokens", "2", "--allow-pickle", "hi"]) == 0
