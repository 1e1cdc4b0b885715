"""The one training loop: every preset and stage runs it; stages differ only in their StageConfig.

AdamW with a learning rate per module, linear warm-up then cosine decay, gradient clipping and
accumulation, seeded data order, a tqdm bar, the loss per step appended to a JSONL log. Batches are read
through DataLoader workers (`vlmkit.data.loader`); while the vision encoder is frozen its features are
computed once per image and reused for every epoch, if they fit the cache budget (`vlmkit.model.features`).
The loss comes from the stage's objective (`vlmkit.objectives`). Every `save_every` steps, and on
SIGINT/SIGTERM, the caller's `save` writes a step checkpoint (vlmkit.train.checkpoint); `resume` restarts
from one at the same data position with the same optimizer, schedule and RNG.
"""
from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.utils.checkpoint
from tqdm.auto import tqdm

from vlmkit.config import StageConfig
from vlmkit.data.dataset import ConversationDataset, length_grouped_batches
from vlmkit.data.loader import batch_loader
from vlmkit.data.packing import PackingCollate, SharedPrefixCollate, image_grouped_batches
from vlmkit.errors import ConfigError, VlmkitError
from vlmkit.llm.lora import finish_stage
from vlmkit.model.features import cache_features
from vlmkit.objectives import get_objective
from vlmkit.train import distributed
from vlmkit.train.checkpoint import Resume, TrainState, restore
from vlmkit.train.freeze import apply_stage_freezing, trained_submodule, trains
from vlmkit.train.probe import answer_probe
from vlmkit.train.strategy import make_strategy


def param_groups(model, stage: StageConfig) -> list[dict]:
    groups = []
    for name in stage.train:
        lr = stage.lr.get(name, stage.lr.get(name.split(".", 1)[0]))  # a part inside a module: its own, or the module's
        if lr is None:
            raise ConfigError(f"stage {stage.name!r} trains {name!r} but sets no lr for it (lr: {stage.lr})")
        module = trained_submodule(model, name) if "." in name else model.parts()[name]
        decay, no_decay = [], []
        for pname, p in module.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in pname.lower() else decay).append(p)
        groups.append({"params": decay, "lr": lr, "weight_decay": stage.weight_decay, "name": name})
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{name}.no_decay"})
    return [g for g in groups if g["params"]]


def checkpoint_layers(causal_lm):
    """Run each decoder layer under torch.utils.checkpoint (non-reentrant: gradients reach the inputs and
    LoRA adapters whether or not the layer's own weights train), in train or eval mode alike (transformers'
    own switch acts only in train mode, and a frozen LLM is in eval mode). Returns the function that undoes it."""
    layers = distributed.decoder_layers(causal_lm)
    for layer in layers:
        original = layer.forward

        def forward(*args, _original=original, **kwargs):
            return torch.utils.checkpoint.checkpoint(_original, *args, use_reentrant=False, **kwargs)
        layer.forward = forward

    def undo():
        for layer in layers:
            del layer.forward  # back to the class's forward
    return undo


def warmup_cosine(total_steps: int, warmup_ratio: float):
    warmup = max(1, math.ceil(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


class StopRequested:
    """SIGINT (Ctrl-C) / SIGTERM (preemption) set a flag that the loop reads between optimiser steps, so the
    checkpoint it then writes is consistent; a second signal interrupts at once."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class TrainingInterrupted(VlmkitError):
    """Training stopped on a signal after writing a checkpoint (or with nothing to save)."""


def stage_schedule(stage: StageConfig, epoch_size: int, steps_per_epoch: int) -> tuple[int, str]:
    """The stage's optimiser steps and a line saying how they were chosen (printed at the stage's start)."""
    per_step = f"batch {stage.batch_size}" + (f" x {stage.grad_accum} accumulated" if stage.grad_accum > 1 else "")
    head = f"{epoch_size:,} records per epoch, {per_step}: {steps_per_epoch:,} steps per epoch"
    if stage.max_steps:
        epochs = stage.max_steps / steps_per_epoch
        return stage.max_steps, f"{head}; max_steps {stage.max_steps:,} ({epochs:.2f} epochs)"
    total = max(1, math.ceil(stage.epochs * steps_per_epoch))
    epochs = f"{stage.epochs:g} epoch{'s' * (stage.epochs != 1)}"
    if total < stage.min_steps:
        return stage.min_steps, (f"{head}; {epochs} would be {total:,} steps, raised to the stage's floor "
                                 f"min_steps={stage.min_steps:,} ({stage.min_steps / steps_per_epoch:.2f} epochs; "
                                 f"--{stage.name}.min-steps 0 turns it off)")
    return total, f"{head}; {epochs} = {total:,} optimiser steps"


def _probe_frozen_features(features, dataset: ConversationDataset, stage: StageConfig, log) -> None:
    """Say how well the frozen encoder's features separate the stage's answers; suggest training it if badly."""
    result = answer_probe(features, dataset.question_answers)
    if result is None:
        return
    log(f"stage {stage.name}: {result.describe()}")
    if result.poor:
        log(f"warning: the frozen vision encoder separates this data's answers poorly; consider training it in this "
            f"stage: --{stage.name}.train {','.join(['vision', *stage.train])} --{stage.name}.lr.vision 3e-4 "
            "(with a frozen encoder the language model can only learn what these features already tell apart)")


def _layout(model, stage: StageConfig, dataset: ConversationDataset) -> tuple[dict, list | None]:
    """How the stage lays samples out in rows: ({"collate_fn": …} or {}, the image keys share_prefix groups by)."""
    if (stage.pack_to or stage.share_prefix > 0) and getattr(model.connector, "reads_instruction", False):
        raise ConfigError(f"stage {stage.name!r}: {'pack_to' if stage.pack_to else 'share_prefix'} cannot be used with "
                          "a connector that reads the instruction (the images of a row would all read its first "
                          "question)")
    if stage.pack_to:  # a micro-batch is still batch_size samples, packed into as few rows as fit
        longest = max(range(len(dataset)), key=lambda i: len(dataset[i].input_ids))
        if len(dataset[longest].input_ids) > stage.pack_to:
            raise ConfigError(f"stage {stage.name!r}: record {dataset[longest].record_id!r} has "
                              f"{len(dataset[longest].input_ids)} tokens, more than pack_to={stage.pack_to}")
        if stage.share_prefix > 0:
            raise ConfigError(f"stage {stage.name!r}: share_prefix and pack_to are two ways to lay out rows; set one")
        return {"collate_fn": PackingCollate(stage.pack_to)}, None
    if stage.share_prefix <= 0:
        return {}, None
    if model.llm is None or model.llm.is_encoder_decoder:
        raise ConfigError(f"stage {stage.name!r}: share_prefix needs a decoder-only LLM (the samples' branches "
                          "share the prefix's keys inside one sequence)")
    image_keys = [tuple(dataset[i].image_indices) for i in range(len(dataset))]
    return {"collate_fn": SharedPrefixCollate(model.image_token_id, stage.share_prefix)}, image_keys


def micro_batches(dataset: ConversationDataset, stage: StageConfig, state: TrainState, *, seed: int, info,
                  image_keys, pad_id: int, pixels: bool, workers: int, layout: dict, prepare=None):
    """(epoch, batch index in epoch, real, batch) from the state's saved position on, for ever: each epoch's
    seeded order (length-grouped, or grouped by image for share_prefix), this rank's share of each micro-batch."""
    epoch, skip = state.epoch, state.batch_in_epoch
    while True:
        indices = dataset.mixture.epoch(seed, epoch)
        order = image_grouped_batches(image_keys, stage.batch_size, seed + epoch, indices=indices) \
            if image_keys is not None else \
            length_grouped_batches(dataset.lengths(), stage.batch_size, seed + epoch, indices=indices)
        shares = [info.shard(batch) if info.enabled else (batch, True) for batch in order[skip:]]
        loader = batch_loader(dataset, [indices for indices, _ in shares], pad_id, pixels=pixels, workers=workers,
                              prepare=prepare, **layout)
        for position, (_, real), batch in zip(range(skip, len(order)), shares, loader):
            yield epoch, position, real, batch
        epoch, skip = epoch + 1, 0


def run_step(forward, objective, strategy, micro: list, cached, info, autocast, stop: StopRequested) -> dict:
    """Forward and backward of one optimiser step's micro-batches. The step's loss is normalised by its units
    (supervised tokens) over every micro-batch and rank; returns the step's loss, the objective's terms, rows
    (samples, or packed rows) and units, summed over the ranks, and whether any rank got a stop signal by the end
    of its backward (all ranks then checkpoint and stop after the same step; a later signal: the next step)."""
    units = [objective.units(batch) if real else 0 for _, _, real, batch in micro]
    total_units = sum(units)
    if info.enabled:
        total_units = int(distributed.all_reduce_sum([total_units])[0])
    total_units = max(total_units, 1)
    step_sum, term_sums = 0.0, {}
    for (_, _, _, batch), count in zip(micro, units):
        features = cached[batch.image_indices] if cached is not None and len(batch.image_indices) else None
        with autocast:
            loss, terms = objective(forward, batch, features)
        # this micro-batch's share of the step's units; DDP averages gradients over ranks, so the world size
        # turns that average back into the global sum (a rank without samples: weight 0)
        strategy.backward(loss * (count * info.world_size / total_units))
        step_sum += loss.item() * count
        for name, value in terms.items():  # the objective's parts (BLIP-2: itc, itm, itg), weighted alike
            term_sums[name] = term_sums.get(name, 0.0) + value * count
    rows = sum(int(batch.input_ids.shape[0]) for _, _, real, batch in micro if real)
    stopping = stop.signal_name is not None
    if info.enabled:
        names = sorted(term_sums)
        step_sum, rows, stops, *sums = distributed.all_reduce_sum(
            [step_sum, rows, float(stopping), *(term_sums[n] for n in names)])
        stopping = stops > 0
        term_sums = dict(zip(names, sums))
    return {"loss": step_sum / total_units, "terms": {n: v / total_units for n, v in term_sums.items()},
            "rows": int(rows), "units": total_units, "stopping": stopping}


def log_entry(stage: StageConfig, step: int, epoch: int, result: dict, optimizer, norm, start: float) -> dict:
    """The step's line of the JSONL log (float(norm) waits for the GPU: the writing rank only)."""
    entry = {"stage": stage.name, "step": step, "epoch": epoch, "loss": result["loss"],
             "lr": {g["name"]: g["lr"] for g in optimizer.param_groups if not g["name"].endswith(".no_decay")},
             "grad_norm": None if norm is None else float(norm), "tokens": result["units"], "rows": result["rows"],
             "seconds": round(time.time() - start, 3)}
    if result["terms"]:
        entry["terms"] = result["terms"]
    return entry


def train_stage(model, stage: StageConfig, dataset: ConversationDataset, *, seed: int, log_file: Path | None = None,
                bf16: bool = False, verbose: bool = True, log=print, stage_index: int = 0, save_every: int = 0,
                strategy: str = "ddp", workers: int = 0, feature_cache_gb: float = 4.0,
                save: Callable[[object, object, TrainState], Path | None] | None = None,
                resume: Resume | None = None, fingerprint: dict | None = None,
                gradient_checkpointing: bool = False, reporter=None, step_offset: int = 0,
                deepspeed_config: str = "", scratch: Path | None = None) -> dict:
    """Train `model` in place for one stage; returns a summary (steps, losses, seconds).

    `save(optimizer, scheduler, state)` is called every `save_every` steps and when a stop signal arrives;
    `resume` continues from a step checkpoint exactly (same data order, RNG, optimizer and schedule).
    """
    start = time.time()
    torch.manual_seed(seed)
    info = distributed.current()
    engine = make_strategy(strategy, info, stage, bf16=bf16, deepspeed_config=deepspeed_config, scratch=scratch)
    engine.check(stage, resume, save_every)
    undo = _enter_stage(model, stage, gradient_checkpointing, log)
    epoch_size = dataset.mixture.epoch_size()
    total_steps, schedule_text = stage_schedule(stage, epoch_size,
                                                math.ceil(epoch_size / (stage.batch_size * stage.grad_accum)))
    if resume is None:
        log(f"stage {stage.name}: {schedule_text}")
    forward = engine.prepare(model, lambda: param_groups(model, stage), warmup_cosine(total_steps, stage.warmup_ratio))
    autocast = engine.autocast(model)
    cached = cache_features(model, dataset, feature_cache_gb, workers, verbose=verbose, log=log) \
        if not trains(stage, "vision") and engine.caches_features(model) else None
    if cached is not None and "llm" in stage.train and info.is_main and resume is None:
        _probe_frozen_features(cached, dataset, stage, log)
    objective = get_objective(stage.objective)
    layout, image_keys = _layout(model, stage, dataset)
    state = TrainState(stage_index, stage.name, fingerprint=dict(fingerprint or {}))
    if resume is not None:
        restore(resume, engine.optimizer, engine.schedule, model)
        state = resume.state
        log(f"stage {stage.name}: resuming at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
    batches = micro_batches(dataset, stage, state, seed=seed, info=info, image_keys=image_keys,
                            pad_id=model.tokenizer.pad_token_id, pixels=cached is None, workers=workers,
                            layout=layout, prepare=objective.prepare(model))
    log_handle = open(log_file, "a") if log_file else None
    bar = tqdm(range(state.step, total_steps), desc=f"stage {stage.name}", disable=not verbose, mininterval=0.5,
               initial=state.step, total=total_steps)
    try:
        with StopRequested() as stop:
            for step in bar:
                micro = [next(batches) for _ in range(stage.grad_accum)]
                result = run_step(forward, objective, engine, micro, cached, info, autocast, stop)
                norm = engine.step(stage.max_grad_norm)
                state.step, state.epoch, state.batch_in_epoch = step + 1, micro[-1][0], micro[-1][1] + 1
                state.losses.append(result["loss"])
                bar.set_postfix(loss=f"{result['loss']:.4f}", epoch=state.epoch)
                if log_handle or reporter:
                    entry = log_entry(stage, step + 1, state.epoch, result, engine.optimizer, norm, start)
                    if log_handle:
                        log_handle.write(json.dumps(entry) + "\n")
                        log_handle.flush()
                    if reporter:
                        reporter.log(entry, step_offset + step + 1)
                periodic = save_every and state.step % save_every == 0 and state.step < total_steps
                if save is not None and (result["stopping"] or periodic):
                    save(engine.optimizer, engine.schedule, state)
                if result["stopping"]:
                    raise TrainingInterrupted(f"{stop.signal_name or 'a stop signal on another rank'}: stopped stage "
                                              f"{stage.name!r} after step {state.step}"
                                              + ("; continue with --resume" if save or info.enabled else ""))
    finally:
        batches.close()  # ends the epoch's loader and its worker processes
        if log_handle:
            log_handle.close()
    engine.finish(model)
    return _leave_stage(model, stage, undo, state.losses, total_steps, time.time() - start, log)


def _enter_stage(model, stage: StageConfig, gradient_checkpointing: bool, log):
    """Freeze and unfreeze as the stage says; returns what undoes the layer checkpointing (or None)."""
    if stage.lora.r > 0 and "llm" not in stage.train:
        raise ConfigError(f"stage {stage.name!r} sets lora.r={stage.lora.r} but does not train the llm")
    apply_stage_freezing(model, stage.train, log=log, lora=stage.lora, batch_norm=stage.batch_norm)
    # a text-only micro-batch still runs the connector (on nothing), as LLaVA's forward does: its gradient is zero
    # rather than missing, so every engine updates it alike (ZeRO-3 would otherwise re-apply the previous step's
    # gradient, and AdamW moves a parameter with a zero gradient but skips one without)
    model.keep_connector_in_graph = trains(stage, "connector")
    model.keep_vision_in_graph = trains(stage, "vision")
    # activations recomputed in the backward pass, layer by layer: in every stage, since even with the LLM frozen
    # (LLaVA's stage 1) the gradient reaches the connector through all its layers
    if gradient_checkpointing and model.llm is not None:
        return checkpoint_layers(model.llm.causal_lm)
    return None


def _leave_stage(model, stage: StageConfig, undo, losses: list[float], total_steps: int, seconds: float, log) -> dict:
    model.keep_connector_in_graph = model.keep_vision_in_graph = False
    if undo:
        undo()
    finish_stage(model.llm, stage.lora)  # merge LoRA adapters into the weights, or keep them
    model.eval()
    model.requires_grad_(False)
    tail = losses[-max(1, len(losses) // 10):]
    log(f"stage {stage.name}: {total_steps} steps, loss {losses[0]:.4f} -> {sum(tail) / len(tail):.4f}, {seconds:.0f}s")
    return {"stage": stage.name, "steps": total_steps, "first_loss": losses[0], "final_loss": sum(tail) / len(tail),
            "seconds": seconds}
