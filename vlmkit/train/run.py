"""A staged training run: build the model, then for each stage read its data, train, checkpoint.

Run directory layout:
  config.json          the resolved ArchConfig
  train_log.jsonl      one line per optimiser step (all stages)
  loss.png             the loss curve
  checkpoints/N-NAME/  the model after stage N (config.json + model.safetensors + tokenizer), atomic
  checkpoints/step-N-NAME-S/  resumable mid-stage checkpoints (--save-every), the newest --keep-last kept
  model/               the newest completed stage, what `vlmkit chat/eval/serve RUN` load
  summary.json         per-phase seconds, losses, skipped records
  runs/                TensorBoard events (--report-to tensorboard); wandb/ for --report-to wandb
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmkit.config import ArchConfig
from vlmkit.data.sources import DataSpec, build_dataset, stage_dataset  # noqa: F401 (build_dataset: public here too)
from vlmkit.data.sources import stage_sources
from vlmkit.errors import ConfigError, VlmkitError
from vlmkit.io import read_jsonl, resolve_device
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit.objectives import needs_llm
from vlmkit.train import checkpoint, distributed, report
from vlmkit.train.freeze import BATCH_NORM
from vlmkit.train.init import load_init
from vlmkit.train.loop import train_stage
from vlmkit.train.plot import plot_loss


def stage_fingerprint(config: ArchConfig, stage, data: DataSpec, world_size: int, init: str | None = None) -> dict:
    """What decides a stage's data order and its steps: a step checkpoint records it, and --resume with any of
    it changed would silently read other data in another order."""
    return {"preset": config.name, "stage": stage.name, "seed": config.seed,
            "data": [f"{s.source}={s.weight:g}" for s in stage_sources(config, stage, data)],
            "image_folder": data.image_folder or "", "batch_size": stage.batch_size, "grad_accum": stage.grad_accum,
            "pack_to": stage.pack_to, "share_prefix": stage.share_prefix, "world_size": world_size,
            "init": str(init or "")}


def _check_fingerprint(saved: dict, current: dict, found: Path) -> None:
    changed = [f"{key}: checkpoint {saved[key]!r}, now {current.get(key)!r}" for key in saved
               if saved[key] != current.get(key)]
    if changed:
        raise ConfigError(f"--resume: {found} was written by a run with other settings ({'; '.join(changed)}); "
                          "resuming would read other data in another order. Resume with the same settings, or "
                          "start over with --overwrite")


def _clear_or_refuse(run_dir: Path, overwrite: bool, log, delete: bool = True) -> None:
    """A fresh run must not mix with an older run's checkpoints (a later --resume would pick them up). Every
    rank checks (so all refuse together instead of waiting at a barrier for rank 0); `delete` on rank 0 only."""
    held = sorted(p.name for p in (run_dir / "checkpoints").iterdir()) if (run_dir / "checkpoints").is_dir() else []
    if not held:
        return
    if not overwrite:
        raise ConfigError(f"{run_dir} holds another run's checkpoints ({', '.join(held[:3])}"
                          f"{', …' if len(held) > 3 else ''}): continue it with --resume, or start over with "
                          "--overwrite (which deletes them), or pick another --run-dir")
    if not delete:
        return

    for name in ("checkpoints", "model", "runs"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in ("train_log.jsonl", "summary.json", "loss.png"):
        (run_dir / name).unlink(missing_ok=True)
    log(f"--overwrite: removed the previous run's checkpoints and logs in {run_dir}")


def train_run(config: ArchConfig, run_dir: str | Path, data: DataSpec | None = None, stages: list[str] | None = None,
              resume: bool = False, verbose: bool = True, log=print, overwrite: bool = False,
              report_to: list[str] | None = None, init: str | None = None, allow_pickle: bool = False) -> dict:
    """Train `config`'s stages (or those named) into `run_dir`. `init`: start from that model (a vlmkit run or
    checkpoint, or a Hugging Face LLaVA directory or hub id; see vlmkit.train.init) instead of the backbones
    `config` names; `config` is then that model's, with run and stage settings changed. `allow_pickle`: backbones
    and checkpoints with pickled weights only (pytorch_model.bin) load (with torch.load(weights_only=True));
    whether an LLM's own code runs is `config.llm.trust_remote_code`, which only the caller sets."""
    data = data or DataSpec()
    if config.keep_last < 1:
        raise ConfigError(f"--keep-last {config.keep_last}: keep at least 1 step checkpoint (a run that kept none "
                          "would have nothing to resume from)")
    _ignore_file_size_signal()
    info = distributed.setup()  # torchrun: join the process group; rank 0 alone writes
    report.check_reporters(report_to or ["none"])  # every rank: a missing package fails before the model is built
    if not info.is_main:
        verbose, log = False, _silent
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        _clear_or_refuse(run_dir, overwrite, log, delete=info.is_main)
    distributed.barrier()
    if info.is_main:
        (run_dir / "config.json").write_text(config.to_json())
    log_file = run_dir / "train_log.jsonl"
    summary = {"preset": config.name, "scale": config.scale, "stages": [], "skipped": {}}
    selected = [s for s in config.stages if stages is None or s.name in stages]
    if stages is not None and len(selected) != len(stages):
        raise ConfigError(f"unknown stage(s) in {stages}; preset {config.name!r} has {[s.name for s in config.stages]}")
    for stage in selected:  # before anything is built, not when a later stage starts
        if stage.batch_norm not in BATCH_NORM:
            raise ConfigError(f"--{stage.name}.batch-norm {stage.batch_norm!r}: one of {', '.join(BATCH_NORM)}")

    start = time.time()
    # where the model trains: torchrun's GPU for this rank, else --device; weights are loaded straight there
    if info.enabled:
        target = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        target = resolve_device(config.device)
    model, first, resume_from = None, 0, None
    if resume and info.is_main:
        for path in checkpoint.remove_partial(run_dir):
            log(f"removed {path.name}: a checkpoint whose writing was interrupted")
    found = checkpoint.latest_intact(run_dir, log) if resume and info.is_main else None
    found = distributed.broadcast_object(found) if info.enabled else found
    if found is not None:
        if checkpoint.is_step_checkpoint(found):
            resume_from = checkpoint.load_resume(found)
            if resume_from.state.fingerprint:  # checkpoints older than fingerprints carry none
                stage = config.stages[resume_from.state.stage_index]
                _check_fingerprint(resume_from.state.fingerprint,
                                   stage_fingerprint(config, stage, data, info.world_size, init), found)
            model = VisionLanguageModel.from_pretrained(found / checkpoint.MODEL_DIR, device=target,
                                                        allow_pickle=allow_pickle,
                                                        trust_remote_code=config.llm.trust_remote_code)
            first = resume_from.state.stage_index
            log(f"resuming stage {resume_from.state.stage!r} at step {resume_from.state.step} from {found}")
            if info.is_main:
                _truncate_log(log_file, config, resume_from.state)
        else:
            model = VisionLanguageModel.from_pretrained(found, device=target, allow_pickle=allow_pickle,
                                                        trust_remote_code=config.llm.trust_remote_code)
            first = int(found.name.split("-")[0])
            log(f"resuming after stage {config.stages[first - 1].name!r} from {found}")
            # the stages still to run use this run's settings (a --max-length or --template fixed after a failed
            # stage); the parts stay as built (the connector's config holds the sizes read from its BERT)
            saved = model.config
            model.config = dataclasses.replace(config, vision=saved.vision, connector=saved.connector,
                                               llm=dataclasses.replace(saved.llm,
                                                                       trust_remote_code=config.llm.trust_remote_code))
            if info.is_main:
                _truncate_log(log_file, config, checkpoint.TrainState(first, "", 0))
    elif resume:
        log(f"nothing to resume in {run_dir}: starting from the beginning")
    if model is None:
        if log_file.exists() and info.is_main:
            log_file.unlink()
        if info.is_main:  # a fresh start: the TensorBoard events of an earlier run in this directory go too

            shutil.rmtree(run_dir / "runs", ignore_errors=True)
        if init:
            model = load_init(init, device=target, allow_pickle=allow_pickle,
                              trust_remote_code=config.llm.trust_remote_code)
            model.config = config  # its own config, with this run's stage settings
            log(f"--init: starting from {init} ({config.name}, template {config.template})")
        else:  # without its LLM when the first stage to run does not use one (BLIP-2's stage 1)
            model = VisionLanguageModel.from_config(config, verbose=verbose, device=target, allow_pickle=allow_pickle,
                                                    with_llm=_stage_needs_llm(selected[0]) if selected else True)
    model.to(target)  # a no-op for what was loaded there; buffers made at init
    if model.device.type == "cuda":  # TF32 matmuls on Ampere and later, as LLaVA's scripts set (--tf32 True)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    distributed.barrier()
    summary["build_seconds"] = time.time() - start
    reporter = report.Reporter()  # rank 0 alone reports (TensorBoard in RUN_DIR/runs, wandb)
    if info.is_main:
        purge = report.global_step_offset(log_file) + 1 if found is not None else None
        reporter = report.open_reporters(report_to or ["none"], run_dir, json.loads(config.to_json()),
                                         purge_step=purge)
    try:
        run = StageRun(config, run_dir, data, info, log_file, summary, reporter, verbose, log, init, allow_pickle)
        _run_stages(model, run, selected, first, resume_from)
    finally:
        reporter.close()
    summary["seconds"] = time.time() - start
    summary["processes"] = info.world_size
    if info.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return {"model": model, **summary}


@dataclass
class StageRun:
    """What every stage of one `train` call shares: the config, where it writes, the data, this process's rank,
    the summary it fills, how it reports."""
    config: ArchConfig
    run_dir: Path
    data: object
    info: distributed.DistInfo
    log_file: Path
    summary: dict
    reporter: object
    verbose: bool
    log: Callable
    init: str | None
    allow_pickle: bool = False


def _run_stages(model, run: StageRun, selected: list, first: int, resume_from) -> None:
    """Train the `selected` stages from index `first` on (`resume_from`: the step checkpoint the first continues
    from), writing each stage's checkpoint and the run's model."""
    config, info, log = run.config, run.info, run.log
    log(f"model: {config.name} ({config.scale}); {model.num_image_tokens} image tokens per image; "
        f"{sum(p.numel() for p in model.parameters()):,} parameters")

    sharded = info.enabled and config.distributed == "fsdp"  # every rank writes its optimizer shards
    base_size = model.image_transform.crop[0]  # the preprocessor's: stages without an image_size use it
    for index, stage in enumerate(config.stages):
        if index < first or stage not in selected:
            continue
        phase = time.time()
        if model.llm is None and _stage_needs_llm(stage):
            model.attach_llm(verbose=run.verbose, allow_pickle=run.allow_pickle)
            log(f"stage {stage.name!r}: loaded the language model {config.llm.name_or_path} "
                f"({sum(p.numel() for p in model.llm.parameters()):,} parameters)")
        if stage.image_size or base_size != model.image_transform.crop[0]:
            model.set_image_size(stage.image_size or base_size)
            log(f"stage {stage.name!r}: images at {model.image_transform.crop[0]} px, {model.vision.num_tokens} vision "
                f"tokens -> {model.num_image_tokens} image tokens")
        dataset = stage_dataset(model, config, stage, run.data, verbose=run.verbose)
        source = dataset.source
        if dataset.skipped.total:
            log(f"{source}: {dataset.skipped.summary()}")
            run.summary["skipped"][stage.name] = dict(dataset.skipped.counts)
        per_source = dataset.mixture.per_source()
        log(f"stage {index + 1}/{len(config.stages)} {stage.name!r}: {len(dataset)} records from {source}, "
            f"{len(dataset.images)} images, trains {stage.train}")
        if len(per_source) > 1:
            log("  mixture, samples per epoch: " + ", ".join(f"{n} {name}" for name, n in per_source.items()))
        run.summary.setdefault("samples_per_epoch", {})[stage.name] = per_source
        stage_resume = resume_from if resume_from is not None and resume_from.state.stage_index == index else None
        result = train_stage(model, stage, dataset, seed=config.seed + index,
                             log_file=run.log_file if info.is_main else None, bf16=config.bf16, verbose=run.verbose,
                             log=log,
                             stage_index=index, save_every=config.save_every, strategy=config.distributed,
                             workers=config.workers, feature_cache_gb=config.feature_cache_gb,
                             gradient_checkpointing=config.gradient_checkpointing,
                             deepspeed_config=config.deepspeed_config, scratch=run.run_dir / ".deepspeed-scratch",
                             save=_step_saver(model, run.run_dir, config.keep_last, log, sharded)
                             if (info.is_main or sharded) and config.distributed != "deepspeed" else None,
                             resume=stage_resume,
                             fingerprint=stage_fingerprint(config, stage, run.data, info.world_size, run.init),
                             reporter=run.reporter if info.is_main else None,
                             step_offset=report.global_step_offset(run.log_file, stage.name) if info.is_main else 0)
        state = distributed.full_state_dict(model) if distributed.is_sharded(model) else None  # all ranks gather
        if info.is_main:
            _write_or_explain(model, run.run_dir / "checkpoints" / f"{index + 1}-{stage.name}", run.run_dir, state)
            _write_or_explain(model, run.run_dir / "model", run.run_dir, state)
            checkpoint.prune(run.run_dir, 0)  # the stage is complete: its step checkpoints are no longer needed
            plot_loss(run.log_file, run.run_dir / "loss.png")
        distributed.barrier()
        result["train_seconds"] = result.pop("seconds")
        result["seconds"] = time.time() - phase  # data reading + training + checkpoint
        run.summary["stages"].append(result)


def _ignore_file_size_signal() -> None:
    """Past a file-size limit (ulimit -f) a write raises SIGXFSZ, whose default action kills the process; ignored,
    the write fails with EFBIG instead, which a checkpoint write reports while training goes on."""
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _stage_needs_llm(stage) -> bool:
    return "llm" in stage.train or needs_llm(stage.objective)


def _silent(*_args, **_kwargs) -> None:
    pass


try:
    from safetensors import SafetensorError
except ImportError:  # older safetensors
    from safetensors.safetensors_rust import SafetensorError

# what a failed write raises: the OS's errors, and safetensors' own for the same (its "No space left on device")
WRITE_ERRORS = (OSError, SafetensorError)


def _why(exc: BaseException) -> str:
    """The OS's words for a failed write ("No space left on device"), also out of safetensors' longer message."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    found = re.search(r"I/O error: (.+?) \(os error \d+\)", text)
    return found.group(1) if found else text


def _step_saver(model, run_dir: Path, keep_last: int, log, sharded: bool = False):
    def save(optimizer, scheduler, state: checkpoint.TrainState) -> Path | None:
        target = run_dir / "checkpoints" / checkpoint.step_dir_name(state.stage_index, state.stage, state.step)
        if sharded:  # a collective: every rank writes, rank 0 renames (a failed write stops the run)
            checkpoint.save_sharded_checkpoint(target, model, optimizer, scheduler, state)
            if distributed.current().is_main:
                checkpoint.prune(run_dir, keep_last)
                log(f"checkpoint: {target}")
            return target
        previous = checkpoint.latest(run_dir)
        try:
            checkpoint.save_checkpoint(target, model, optimizer, scheduler, state)
        except WRITE_ERRORS as exc:  # disk full, file too large, quota, permissions: training goes on
            log(f"warning: could not write checkpoint {target.name} ({_why(exc)}); "
                + (f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists")
                + "; training goes on")
            return None
        checkpoint.prune(run_dir, keep_last)
        log(f"checkpoint: {target}")
        return target
    return save


def _write_or_explain(model, target: Path, run_dir: Path, state_dict: dict | None = None) -> None:
    try:
        model.save_pretrained(target, state_dict=state_dict)
    except WRITE_ERRORS as exc:
        previous = checkpoint.latest(run_dir)
        raise VlmkitError(f"could not write {target} ({_why(exc)}); "
                          + (f"the previous checkpoint {previous} is intact" if previous else
                             "there is no earlier checkpoint")) from None


def _truncate_log(log_file: Path, config: ArchConfig, state: checkpoint.TrainState) -> None:
    """Drop log lines written after the checkpoint being resumed (the killed run got further)."""
    if not log_file.exists():
        return
    order = {stage.name: i for i, stage in enumerate(config.stages)}
    kept = []
    for entry in read_jsonl(log_file):  # a line torn by the crash is dropped with the rest after the checkpoint
        if "stage" not in entry or "step" not in entry:
            continue
        index = order.get(entry["stage"], -1)
        if index < state.stage_index or (index == state.stage_index and entry["step"] <= state.step):
            kept.append(json.dumps(entry))
    log_file.write_text("".join(f"{line}\n" for line in kept))
