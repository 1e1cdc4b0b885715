"""Faults: SIGKILL at any moment (even mid-checkpoint), Ctrl-C, and a full disk lose nothing.

Each test trains the same small run twice — uninterrupted, and interrupted then resumed with --resume —
in real subprocesses, and compares the per-step losses in train_log.jsonl. Same seed, CPU, same thread
count: the resumed run repeats the uninterrupted one bit for bit (the comparison allows 1e-6 relative for
float noise, and the measured difference is printed).
"""
from __future__ import annotations

import shutil
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


def _pause_at_first_checkpoint(backbones, tmp_path, run, *extra):
    process = start(argv(backbones, tmp_path, run, *extra), script=HERE / "pause_after_checkpoint.py")
    first = run / "checkpoints" / checkpoint.step_dir_name(1, "instruct", 3)
    wait_for(first.exists, process)
    return process, first


def _after_fault(process, first, cause: str) -> str:
    """The run went on past its failed checkpoints, then stopped at the stage's end with one clear line."""
    out, _ = process.communicate(timeout=240)
    assert "Traceback" not in out, out
    assert f"could not write checkpoint {checkpoint.step_dir_name(1, 'instruct', 6)} ({cause}); the previous " \
           f"checkpoint {first} is intact; training goes on" in out, out
    assert process.returncode == 2 and out.strip().splitlines()[-1].startswith("vlmkit: error: could not write"), out
    assert cause in out.strip().splitlines()[-1]
    assert checkpoint.damage(first) is None and not list(first.parent.glob(".*"))  # no half-written leftovers
    return out


def test_a_file_size_limit_mid_run_keeps_the_previous_checkpoint(backbones, tmp_path, reference):
    """RLIMIT_FSIZE lowered under the running process after its first checkpoint: every later write of a large
    file fails in the kernel (EFBIG; the run ignores SIGXFSZ, which would kill it), training goes on, and
    --resume repeats the uninterrupted run's losses from the last good checkpoint."""
    import resource

    make_images(tmp_path)
    run = tmp_path / "run"
    process, first = _pause_at_first_checkpoint(backbones, tmp_path, run)
    limit = 64 * 1024  # above the log's size, below the model's
    resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (limit, limit))
    _after_fault(process, first, "File too large")
    out = finish(argv(backbones, tmp_path, run, "--resume"))
    assert f"resuming stage 'instruct' at step 3 from {first}" in out
    assert_same_losses(losses(run), reference["full"])


def test_a_full_file_system_mid_run_keeps_the_previous_checkpoint(backbones, tmp_path, reference):
    """A real full disk: the run directory on a small tmpfs, filled up after the first checkpoint (safetensors
    raises its own SafetensorError for ENOSPC, which used to crash the run)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN); the file-size-limit test covers it")
    try:
        make_images(tmp_path)
        run = mount / "run"
        process, first = _pause_at_first_checkpoint(backbones, tmp_path, run)
        ballast = mount / "ballast"
        with open(ballast, "wb") as handle:  # fill the disk, leaving 32 KB for the log's lines
            free = shutil.disk_usage(mount).free
            handle.write(b"\0" * max(0, free - 32 * 1024))
        _after_fault(process, first, "No space left on device")
        ballast.unlink()
        out = finish(argv(backbones, tmp_path, run, "--resume"))
        assert f"resuming stage 'instruct' at step 3 from {first}" in out
        assert_same_losses(losses(run), reference["full"])
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.parametrize("damage", ["empty state", "changed byte"])  # the corpus checks more kinds of damage
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_used(backbones, tmp_path, reference, damage):
    """What a power cut can leave of files that were never fsynced, and a torn last log line: --resume names the
    damage, sets the checkpoint aside and repeats the uninterrupted run's losses from the previous one."""
    make_images(tmp_path)
    run = tmp_path / "run"
    process = start(argv(backbones, tmp_path, run, "--keep-last", "3"))
    wait_for(lambda: len([p for p in checkpoint.checkpoints(run)]) >= 2 and logged_steps(run) >= 8, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    *_, previous, newest = checkpoint.checkpoints(run)
    if damage == "empty state":
        (newest / checkpoint.STATE_NAME).write_text("")
    else:
        weights = newest / checkpoint.OPTIMIZER_NAME
        data = bytearray(weights.read_bytes())
        data[-7] ^= 0xFF
        weights.write_bytes(bytes(data))
    with open(run / "train_log.jsonl", "a") as log:
        log.write('{"stage": "instruct", "st')  # the line a crash tore
    out = finish(argv(backbones, tmp_path, run, "--resume"))
    assert f"warning: checkpoint {newest.name} is damaged (" in out, out
    step = int(previous.name.rsplit("-", 1)[1])
    assert f"resuming stage 'instruct' at step {step} from {previous}" in out
    assert_same_losses(losses(run), reference["full"])


def test_keep_last_below_one_is_refused(backbones, tmp_path, capsys):
    from vlmkit.cli import main

    make_images(tmp_path)
    assert main(argv(backbones, tmp_path, tmp_path / "run", "--keep-last", "0")) != 0
    assert "--keep-last 0: keep at least 1" in capsys.readouterr().err


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
