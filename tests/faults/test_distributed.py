"""Data-parallel training under torchrun (gloo on CPU): 2 processes give 1 process's loss curve.

Both runs use the same global micro-batch (4 records; 2 per process under torchrun). The loss is weighted
by each rank's share of the global batch's supervised tokens, so the gradients are the same up to the
order of float additions in the all-reduce; the test allows 1e-4 relative and prints what it measured.
"""
from __future__ import annotations

import json

import torch

from runs import STEPS, argv, finish, losses, make_images, mixed_data, start


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
    data = mixed_data(tmp_path)
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


def _fsdp_reference(backbones, tmp_path):
    make_images(tmp_path)
    reference = tmp_path / "reference"
    finish(argv(backbones, tmp_path, reference, "--distributed", "fsdp"), processes=2)
    return losses(reference)


def _same(resumed, reference, what):
    assert len(resumed) == len(reference) == STEPS, (resumed, reference)
    worst = max(abs(a - b) / abs(b) for a, b in zip(resumed, reference))
    print(f"largest relative loss difference, FSDP {what} then resumed vs uninterrupted: {worst:.3g}")
    assert worst <= 1e-6, (resumed, reference)


def test_fsdp_sigkill_then_resume_repeats_the_losses(backbones, tmp_path):
    """FSDP step checkpoints: the optimizer's shards written by each rank through torch.distributed.checkpoint,
    the model gathered; a run killed (torchrun and its workers, SIGKILL) resumes exactly."""
    import os
    import signal

    from test_resume import logged_steps, wait_for

    from vlmkit.train import checkpoint

    reference = _fsdp_reference(backbones, tmp_path)
    run = tmp_path / "run"
    process = start(argv(backbones, tmp_path, run, "--distributed", "fsdp"), processes=2)
    wait_for(lambda: logged_steps(run) >= 7, process)  # after the step-6 checkpoint
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    found = checkpoint.latest(run)
    assert found is not None and checkpoint.is_step_checkpoint(found)
    assert (found / checkpoint.SHARDED_OPTIMIZER).is_dir()
    assert len(list((found / checkpoint.SHARDED_OPTIMIZER).glob("*.distcp"))) == 2  # one file of shards per rank
    finish(argv(backbones, tmp_path, run, "--distributed", "fsdp", "--resume"), processes=2)
    _same(losses(run), reference, "SIGKILL")


def _children(pid: int) -> list[int]:
    from pathlib import Path

    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if int(fields.get("PPid", "0").strip()) == pid:
            found.append(int(status.parent.name))
    return sorted(found)


def test_ranks_agree_on_a_stop_signal(backbones, tmp_path):
    """SIGTERM (preemption) reaches one rank only: both ranks still checkpoint after the same step and stop
    (a rank checkpointing alone would wait forever in the collective), and the run resumes exactly."""
    import os
    import signal

    from test_resume import logged_steps, wait_for

    from vlmkit.train import checkpoint

    reference = _fsdp_reference(backbones, tmp_path)
    run = tmp_path / "run"
    process = start(argv(backbones, tmp_path, run, "--distributed", "fsdp", "--save-every", "100"), processes=2)
    wait_for(lambda: logged_steps(run) >= 4, process)
    ranks = _children(process.pid)  # torchrun's workers
    assert len(ranks) == 2, ranks
    os.kill(max(ranks), signal.SIGTERM)  # one worker (rank 1, started second) is preempted
    out, _ = process.communicate(timeout=180)
    assert "a stop signal on another rank" in out or "SIGTERM: stopped stage" in out, out
    stopped = checkpoint.latest(run)
    assert stopped is not None and checkpoint.is_step_checkpoint(stopped), out
    finish(argv(backbones, tmp_path, run, "--distributed", "fsdp", "--resume"), processes=2)
    _same(losses(run), reference, "SIGTERM on one rank")


def test_fsdp_bf16_mixed_precision_matches_bf16_autocast(backbones, tmp_path):
    """--bf16 under FSDP is a MixedPrecisionPolicy (bf16 compute, fp32 reduction and master shards): on gloo it
    follows one process's bf16 autocast run within bf16's rounding (measured 5e-4)."""
    make_images(tmp_path)
    common = ("--instruct.max-steps", "6", "--save-every", "0", "--bf16")
    finish(argv(backbones, tmp_path, tmp_path / "one", *common))
    finish(argv(backbones, tmp_path, tmp_path / "fsdp", *common, "--distributed", "fsdp"), processes=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    worst = max(abs(a - b) / abs(a) for a, b in zip(one, two))
    print(f"largest relative loss difference, FSDP bf16 policy (2 processes) vs bf16 autocast (1): {worst:.3g}")
    assert len(one) == len(two) == 6 and worst <= 5e-3 and two[-1] < two[0], (one, two)
