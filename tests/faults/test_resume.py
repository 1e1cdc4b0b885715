"""Faults: SIGKILL at any moment (even mid-checkpoint), Ctrl-C, and a full disk lose nothing.

Each test trains the same small run twice — uninterrupted, and interrupted then resumed with --resume —
in real subprocesses, and compares the per-step losses in train_log.jsonl. Same seed, CPU, same thread
count: the resumed run repeats the uninterrupted one bit for bit (the comparison allows 1e-6 relative for
float noise, and the measured difference is printed).
"""
from __future__ import annotations

import errno
import signal
import time
from pathlib import Path

import pytest
from runs import STEPS, argv, finish, losses, make_images, start

from vlmkit.train import checkpoint

HERE = Path(__file__).parent


def wait_for(condition, process, timeout=240.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended before the condition: {process.stdout.read()}")
        time.sleep(0.02)
    process.kill()
    raise AssertionError("timed out waiting for the run")


def logged_steps(run) -> int:
    log = Path(run) / "train_log.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def assert_same_losses(resumed, reference):
    assert len(resumed) == len(reference) == STEPS
    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(resumed, reference))
    print(f"largest relative loss difference, resumed vs uninterrupted: {worst:.3g}")
    assert worst <= 1e-6


def variant_args(variant: str, tmp_path) -> list[str]:
    """LoRA dropout consumes the RNG; a mixture at weight 1.5 draws a different random half every epoch (12
    records at batch 4: 5 batches an epoch, so the 12 steps cross two epoch boundaries)."""
    return {"full": [], "lora": ["--instruct.lora.r", "4", "--instruct.lora.dropout", "0.1"],
            "mixture": ["--instruct.mixture", f"{tmp_path / 'data.json'}=1.5"]}[variant]


@pytest.fixture(scope="module")
def reference(backbones, tmp_path_factory):
    """The uninterrupted run's per-step losses for each variant."""
    out = {}
    for name in ("full", "lora", "mixture"):
        tmp_path = tmp_path_factory.mktemp(f"reference-{name}")
        make_images(tmp_path)
        finish(argv(backbones, tmp_path, tmp_path / "run", *variant_args(name, tmp_path)))
        out[name] = losses(tmp_path / "run")
    return out


@pytest.mark.parametrize("variant", ["full", "lora", "mixture"])
def test_sigkill_mid_stage_then_resume_repeats_the_losses(backbones, tmp_path, reference, variant):
    make_images(tmp_path)
    extra = variant_args(variant, tmp_path)
    run = tmp_path / "run"
    process = start(argv(backbones, tmp_path, run, *extra))
    wait_for(lambda: logged_steps(run) >= 8, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    steps = [p.name for p in checkpoint.checkpoints(run)]
    # --keep-last 2: a new checkpoint is written before the oldest is pruned, so a kill between the two leaves 3
    assert steps and all(name.startswith("step-2-instruct-") for name in steps) and len(steps) <= 3
    out = finish(argv(backbones, tmp_path, run, *extra, "--resume"))
    assert "resuming stage 'instruct' at step" in out
    assert_same_losses(losses(run), reference[variant])
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")]  # pruned at stage end


def test_sigkill_while_a_checkpoint_is_written(backbones, tmp_path, reference):
    make_images(tmp_path)
    run = tmp_path / "run"
    process = start(argv(backbones, tmp_path, run), script=HERE / "slow_checkpoint.py")
    half_written = lambda: any(p.name.startswith(".step-") and (p / checkpoint.OPTIMIZER_NAME).exists()  # noqa: E731
                               for p in (run / "checkpoints").glob(".*"))
    wait_for(lambda: (run / "checkpoints").exists() and half_written(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.latest(run) is None  # the first checkpoint never completed: nothing to resume from
    out = finish(argv(backbones, tmp_path, run, "--resume"))
    assert "nothing to resume" in out
    assert_same_losses(losses(run), reference["full"])
    assert not list((run / "checkpoints").glob(".*"))  # the half-written directory was cleaned up


def test_ctrl_c_writes_a_checkpoint_and_exits_cleanly(backbones, tmp_path, reference):
    make_images(tmp_path)
    run = tmp_path / "run"
    process = start(argv(backbones, tmp_path, run, "--save-every", "100"))
    wait_for(lambda: logged_steps(run) >= 5, process)
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 130, out
    assert "Traceback" not in out and "SIGINT: stopped stage 'instruct' after step" in out
    stopped = checkpoint.latest(run)
    assert stopped is not None and checkpoint.is_step_checkpoint(stopped)
    finish(argv(backbones, tmp_path, run, "--resume"))
    assert_same_losses(losses(run), reference["full"])


def test_failed_checkpoint_write_keeps_the_previous_one(backbones, tmp_path, monkeypatch, capsys):
    """A disk that fills up after the first checkpoint: training goes on and says the first is intact."""
    from vlmkit.cli import main

    make_images(tmp_path)
    run = tmp_path / "run"
    real_save_file, calls = checkpoint.save_file, []

    def full_disk(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    assert main(argv(backbones, tmp_path, run, "--instruct.max-steps", "7")) == 0
    out = capsys.readouterr().out
    first = run / "checkpoints" / checkpoint.step_dir_name(1, "instruct", 3)
    assert f"could not write checkpoint {checkpoint.step_dir_name(1, 'instruct', 6)} (No space left on device); " \
           f"the previous checkpoint {first} is intact" in out
    assert not list((run / "checkpoints").glob(".*"))  # the failed write left no temporary directory
    assert (run / "checkpoints" / "2-instruct" / "model.safetensors").exists()


def test_a_fresh_run_refuses_old_checkpoints_and_resume_refuses_other_settings(backbones, tmp_path, capsys):
    from vlmkit.cli import main

    make_images(tmp_path)
    run = tmp_path / "run"
    assert main(argv(backbones, tmp_path, run, "--instruct.max-steps", "4")) == 0
    assert main(argv(backbones, tmp_path, run, "--instruct.max-steps", "4")) == 2  # not --resume, not --overwrite
    err = capsys.readouterr().err
    assert "holds another run's checkpoints" in err and "--overwrite" in err and "Traceback" not in err
    # a run stopped mid-stage, resumed with another batch size: refused, naming the field
    process = start(argv(backbones, tmp_path, run, "--overwrite"))
    wait_for(lambda: logged_steps(run) >= 5, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert main(argv(backbones, tmp_path, run, "--resume", "--instruct.batch-size", "2")) == 2
    err = capsys.readouterr().err
    assert "batch_size: checkpoint 4, now 2" in err and "Traceback" not in err
    assert main(argv(backbones, tmp_path, run, "--resume", "--seed", "7")) == 2
    assert "seed: checkpoint 0, now 7" in capsys.readouterr().err
    finish(argv(backbones, tmp_path, run, "--resume"))  # the same settings resume
    assert len(losses(run)) == STEPS
