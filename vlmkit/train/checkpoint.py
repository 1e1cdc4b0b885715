"""Resumable checkpoints: everything a stage needs to continue as if it had never stopped.

A step checkpoint `checkpoints/step-N-STAGE-SSSSSSS/` holds
  model/                  the model (a vlmkit checkpoint: config.json + model.safetensors + tokenizer…)
  optimizer.safetensors   the optimizer's tensors (AdamW moments and step counts) and the RNG states
  trainer_state.json      stage, step, data position (epoch, micro-batch within it), losses so far,
                          the optimizer's parameter groups and the scheduler's state
Under FSDP the optimizer state stays sharded: every rank writes its own shards with
`torch.distributed.checkpoint` into `optimizer.dcp/` (instead of optimizer.safetensors, which then holds only
the RNG states), and a resumed run reads them back into its own shards; the model is gathered once into model/.
It is written into a temporary directory, fsynced with a manifest of its files (sizes, SHA-256) written last,
and renamed into place (vlmkit.io.atomic_dir), so a crash, a kill or a power cut at any moment leaves either the
previous set of checkpoints or the new one; `--resume` verifies the manifest and falls back to the previous
complete checkpoint when the newest is damaged.
Checkpoints are taken between optimiser steps, so the gradient-accumulation position is always 0.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from vlmkit.errors import ConfigError
from vlmkit.io import atomic_dir, verify_manifest
from vlmkit.train import distributed

STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
SHARDED_OPTIMIZER = "optimizer.dcp"
MODEL_DIR = "model"
STEP_PREFIX = "step-"


@dataclass
class TrainState:
    """Where a stage is: `step` optimiser steps done; the next micro-batch is `batch_in_epoch` of `epoch`."""
    stage_index: int
    stage: str
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    losses: list[float] = field(default_factory=list)
    fingerprint: dict = field(default_factory=dict)  # what decides the data order (see run.stage_fingerprint)


@dataclass
class Resume:
    """A loaded step checkpoint: its state plus the optimizer/scheduler/RNG payload to restore."""
    directory: Path
    state: TrainState
    optimizer: dict
    scheduler: dict
    rng: dict[str, torch.Tensor]


def step_dir_name(stage_index: int, stage: str, step: int) -> str:
    return f"{STEP_PREFIX}{stage_index + 1}-{stage}-{step:07d}"


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    return tensors


def save_checkpoint(directory: Path, model, optimizer, scheduler, state: TrainState) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    optimizer_state = optimizer.state_dict()
    for index, values in optimizer_state["state"].items():
        for key, value in values.items():
            tensors[f"state.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors.update(_rng_tensors())
    with atomic_dir(directory) as tmp:
        (tmp / MODEL_DIR).mkdir()
        model._write(tmp / MODEL_DIR)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / OPTIMIZER_NAME))
        payload = {"state": asdict(state), "optimizer_param_groups": optimizer_state["param_groups"],
                   "scheduler": scheduler.state_dict()}
        (tmp / STATE_NAME).write_text(json.dumps(payload, indent=1))
    return directory


def save_sharded_checkpoint(directory: Path, model, optimizer, scheduler, state: TrainState) -> Path:
    """The FSDP step checkpoint; every rank calls it. The optimizer's shards go through
    torch.distributed.checkpoint (each rank writes its own), the model is gathered and written by rank 0,
    and rank 0 renames the finished directory into place after every rank's shards are on disk."""
    info = distributed.current()
    full = distributed.full_state_dict(model)  # collective: rank 0 receives the gathered model
    tmp = directory.parent / f".{directory.name}.tmp-sharded"  # one name every rank agrees on
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / MODEL_DIR).mkdir(parents=True)
    dist.barrier()
    import torch.distributed.checkpoint as dcp  # start-up: torch.distributed.checkpoint, FSDP runs only

    dcp.save({"optimizer": distributed.sharded_optimizer_state(model, optimizer)},
             checkpoint_id=str(tmp / SHARDED_OPTIMIZER))
    if info.is_main:
        try:
            model._write(tmp / MODEL_DIR, full)
            save_file({k: v.contiguous().cpu() for k, v in _rng_tensors().items()}, str(tmp / OPTIMIZER_NAME))
            payload = {"state": asdict(state), "sharded_optimizer": SHARDED_OPTIMIZER,
                       "world_size": info.world_size, "scheduler": scheduler.state_dict()}
            (tmp / STATE_NAME).write_text(json.dumps(payload, indent=1))
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            dist.barrier()
    else:
        dist.barrier()
    return directory


def load_resume(directory: Path) -> Resume:
    payload = json.loads((directory / STATE_NAME).read_text())
    tensors = load_file(str(directory / OPTIMIZER_NAME))
    state: dict[int, dict] = {}
    rng = {}
    for key, value in tensors.items():
        if key.startswith("rng."):
            rng[key[4:]] = value
        else:
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    if payload.get("sharded_optimizer"):  # FSDP: the shards are read into the sharded optimizer by restore()
        optimizer = {"sharded": str(directory / payload["sharded_optimizer"])}
    else:
        optimizer = {"state": state, "param_groups": payload["optimizer_param_groups"]}
    return Resume(directory, TrainState(**payload["state"]), optimizer, payload["scheduler"], rng)


def restore(resume: Resume, optimizer, scheduler, model=None) -> None:
    if "sharded" in resume.optimizer:
        if model is None or not distributed.is_sharded(model):
            raise ConfigError(f"{resume.directory} holds a sharded (FSDP) optimizer state: resume it under torchrun "
                              "with --distributed fsdp")
        distributed.load_sharded_optimizer_state(model, optimizer, resume.optimizer["sharded"])
    else:
        optimizer.load_state_dict(resume.optimizer)
    scheduler.load_state_dict(resume.scheduler)
    torch.set_rng_state(resume.rng["torch"])
    cuda = [resume.rng[k] for k in sorted(resume.rng) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# -- finding and pruning ------------------------------------------------------------------------------------
def _key(path: Path) -> tuple[int, float] | None:
    """(stage number, step) of a complete checkpoint directory; a stage-end checkpoint sorts after its steps."""
    name = path.name
    if name.startswith("."):
        return None  # a temporary directory of an interrupted write
    if name.startswith(STEP_PREFIX):
        number, _, rest = name[len(STEP_PREFIX):].partition("-")
        step = rest.rsplit("-", 1)[-1]
        if number.isdigit() and step.isdigit() and (path / STATE_NAME).exists():
            return int(number), int(step)
        return None
    number, _, _ = name.partition("-")
    if number.isdigit() and (path / "model.safetensors").exists():
        return int(number), math.inf
    return None


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = [(key, path) for path in root.iterdir() if path.is_dir() and (key := _key(path)) is not None] \
        if root.exists() else []
    return [path for _, path in sorted(found)]


def latest(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def damage(path: Path) -> str | None:
    """What is wrong with a checkpoint (None: it is complete and readable): its manifest's files, sizes and
    checksums, and for a step checkpoint its state file."""
    problem = verify_manifest(path)  # a step checkpoint's manifest lists its model/ files too
    if problem:
        return problem
    if is_step_checkpoint(path):
        try:
            payload = json.loads((path / STATE_NAME).read_text())
            TrainState(**payload["state"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"its {STATE_NAME} is unreadable ({type(exc).__name__}: {exc})"
        if not (path / MODEL_DIR / "model.safetensors").exists() and not (path / MODEL_DIR / "config.json").exists():
            return "its model is missing"
    return None


def latest_intact(run_dir: Path, log=print) -> Path | None:
    """The newest checkpoint that is complete; each damaged newer one is reported and set aside (renamed to
    `.damaged-NAME`, which the next --resume deletes) so that pruning and later resumes skip it."""
    for path in reversed(checkpoints(run_dir)):
        problem = damage(path)
        if problem is None:
            return path
        aside = path.parent / f".damaged-{path.name}"
        shutil.rmtree(aside, ignore_errors=True)
        path.rename(aside)
        log(f"warning: checkpoint {path.name} is damaged ({problem}); set aside as {aside.name}, "
            "using the previous complete one")
    return None


def finished_stages(run_dir: Path) -> dict[str, Path]:
    """{stage name: its newest `N-stage` checkpoint directory} of the stages a run finished."""
    return {c.name.split("-", 1)[1]: c for c in checkpoints(Path(run_dir)) if not is_step_checkpoint(c)}


def is_step_checkpoint(path: Path) -> bool:
    return path.name.startswith(STEP_PREFIX)


def remove_partial(run_dir: Path) -> list[Path]:
    """Delete temporary directories that a killed write left behind; returns what was removed."""
    root = Path(run_dir) / "checkpoints"
    partial = [p for p in root.glob(".*") if p.is_dir()] if root.exists() else []
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step checkpoints (stage-end checkpoints are kept)."""
    steps = [p for p in checkpoints(run_dir) if is_step_checkpoint(p)]
    for path in steps[:max(0, len(steps) - keep_last)]:
        shutil.rmtree(path, ignore_errors=True)
