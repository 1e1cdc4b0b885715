"""Data-parallel training under torchrun (gloo on CPU): 2 processes give 1 process's loss curve.

Both runs use the same global micro-batch (4 records; 2 per process under torchrun). The loss is weighted
by each rank's share of the global batch's supervised tokens, so the gradients are the same up to the
order of float additions in the all-reduce; the test allows 1e-4 relative and prints what it measured.
"""
from __future__ import annotations

import json

import torch

from runs import argv, finish, losses, make_images


def test_two_processes_match_one(backbones, tmp_path):
    make_images(tmp_path)
    single, double = tmp_path / "one", tmp_path / "two"
    finish(argv(backbones, tmp_path, single, "--instruct.max-steps", "8"))
    out = finish(argv(backbones, tmp_path, double, "--instruct.max-steps", "8"), processes=2)
    one, two = losses(single), losses(double)
    assert len(one) == len(two) == 8
    worst = max(abs(a - b) / abs(a) for a, b in zip(one, two))
    print(f"largest relative loss difference, 2 processes vs 1: {worst:.3g}")
    assert worst <= 1e-4, (one, two)
    assert one[-1] < one[0]
    summary = json.loads((double / "summary.json").read_text())
    assert summary["processes"] == 2
    assert out.count("stage instruct: 8 steps") == 1  # rank 0 alone reports (and writes)


def test_fsdp_two_processes_match_one(backbones, tmp_path):
    """FSDP2 (parameters, gradients and optimizer state sharded per LLM layer) on gloo, the part that runs on CPU."""
    from vlmkit.model.vlm import VisionLanguageModel

    make_images(tmp_path)
    single, sharded = tmp_path / "one", tmp_path / "fsdp"
    common = ("--instruct.max-steps", "6", "--save-every", "0")
    finish(argv(backbones, tmp_path, single, *common))
    finish(argv(backbones, tmp_path, sharded, *common, "--distributed", "fsdp"), processes=2)
    one, two = losses(single), losses(sharded)
    worst = max(abs(a - b) / abs(a) for a, b in zip(one, two))
    print(f"largest relative loss difference, FSDP 2 processes vs 1: {worst:.3g}")
    assert len(one) == len(two) == 6 and worst <= 1e-4, (one, two)
    # the gathered checkpoint is a whole model, equal to the single-process one up to the same float noise
    a = VisionLanguageModel.from_pretrained(single / "model").llm.causal_lm.lm_head.weight
    b = VisionLanguageModel.from_pretrained(sharded / "model").llm.causal_lm.lm_head.weight
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_text_only_and_image_batches_mixed_under_ddp(backbones, tmp_path):
    """Half the records have no image: some ranks' micro-batches leave the connector without gradients (and a
    trained tower's last block is never run with feature layer -2). 2 processes still match 1."""
    make_images(tmp_path)
    records = []
    for i, colour in enumerate(["red", "blue", "green"] * 4):
        if i % 2:
            records.append({"id": f"t{i}", "conversations": [
                {"from": "human", "value": "say a colour"}, {"from": "gpt", "value": colour}]})
        else:
            records.append({"id": f"i{i}", "image": f"img{i % 3}.png", "conversations": [
                {"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": colour}]})
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(records))
    extra = ("--instruct.max-steps", "6", "--data", str(data), "--instruct.train", "vision,connector,llm",
             "--instruct.lr.vision", "1e-4", "--save-every", "0")
    single, double = tmp_path / "one", tmp_path / "two"
    finish(argv(backbones, tmp_path, single, *extra))
    finish(argv(backbones, tmp_path, double, *extra), processes=2)
    one, two = losses(single), losses(double)
    worst = max(abs(a - b) / abs(a) for a, b in zip(one, two))
    print(f"largest relative loss difference, 2 processes vs 1 (text-only batches mixed in): {worst:.3g}")
    assert len(one) == len(two) == 6 and worst <= 1e-4, (one, two)


def test_every_rank_refuses_a_run_dir_with_old_checkpoints(backbones, tmp_path):
    """Under torchrun all ranks refuse together (rank 0 alone refusing would leave the others at a barrier)."""
    from runs import start

    make_images(tmp_path)
    run = tmp_path / "run"
    finish(argv(backbones, tmp_path, run, "--instruct.max-steps", "2"))
    process = start(argv(backbones, tmp_path, run, "--instruct.max-steps", "2"), processes=2)
    out, _ = process.communicate(timeout=180)
    assert process.returncode != 0 and out.count("holds another run's checkpoints") >= 2, out
