"""Helpers for tests that run `vlmkit train` in real subprocesses on a small, seeded setting."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

STEPS = 12


def write_data(tmp_path, image_files):
    records = [{"id": f"r{i}", "image": Path(image_files[i % 3]).name, "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": c}]}
        for i, c in enumerate(["red", "blue", "green"] * 4)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


def argv(backbones, tmp_path, run, *extra):
    data = write_data(tmp_path, [str(tmp_path / f"img{i}.png") for i in range(3)])
    return ["train", "--preset", "llava-1.5", "--run-dir", str(run), "--data", str(data), "--image-folder",
            str(tmp_path), "--stages", "instruct", "--instruct.max-steps", str(STEPS), "--instruct.batch-size", "4",
            "--vision-tower", backbones["clip"], "--vision.feature-layer", "-2", "--llm", backbones["llm"],
            "--save-every", "3", "--keep-last", "2", *extra]


def start(args, script=None, processes: int = 1):
    """`python -m vlmkit ARGS` (or a wrapper script), or under torchrun with several processes."""
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                   "-m", "vlmkit"]
    else:
        command = [sys.executable, str(script)] if script else [sys.executable, "-m", "vlmkit"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # its own process group: a test can kill torchrun and its workers together (os.killpg)
    return subprocess.Popen(command + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def finish(args, processes: int = 1):
    process = start(args, processes=processes)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    return out


def losses(run) -> list[float]:
    entries = [json.loads(line) for line in (Path(run) / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries] == list(range(1, len(entries) + 1))
    return [e["loss"] for e in entries]


def make_images(tmp_path):
    from PIL import Image

    for i, colour in enumerate([(255, 0, 0), (0, 128, 255), (40, 200, 40)]):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"img{i}.png")


def mixed_data(tmp_path) -> Path:
    """12 records, every other one text-only: some micro-batches never run the connector."""
    records = []
    for i, colour in enumerate(["red", "blue", "green"] * 4):
        if i % 2:
            records.append({"id": f"t{i}", "conversations": [
                {"from": "human", "value": "say a colour"}, {"from": "gpt", "value": colour}]})
        else:
            records.append({"id": f"i{i}", "image": f"img{i % 3}.png", "conversations": [
                {"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": colour}]})
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    return path
