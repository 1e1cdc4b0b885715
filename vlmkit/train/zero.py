"""DeepSpeed ZeRO as the engine of vlmkit's own loop (`--distributed deepspeed --deepspeed-config FILE`).

LLaVA's scripts train under DeepSpeed with `scripts/zero2.json` (pretraining) and `scripts/zero3.json`
(instruction tuning); those files work here as they are. Their "auto" values are filled from the stage the
way the Hugging Face Trainer fills them (transformers/integrations/deepspeed.py): the micro-batch per GPU is
the stage's global micro-batch over the process count, accumulation and bf16 from the stage and the run,
`reduce_bucket_size` = hidden², `stage3_prefetch_bucket_size` = 0.9·hidden², `stage3_param_persistence_
threshold` = 10·hidden. Gradient clipping is set from the stage's max_grad_norm even when the file has no
key for it (DeepSpeed's own default changed between releases). The optimizer (AdamW with a learning rate per
module) and the warm-up/cosine schedule stay vlmkit's; the engine takes the backward, clipping, optimizer
and schedule steps (docs/deepspeed.md has what was checked and why).

At the end of a stage the engine writes a ZeRO checkpoint into a temporary directory, the fp32 weights are
rebuilt from it (`zero_to_fp32`), the engine is taken apart and every rank's plain model gets them back, so
the stage checkpoint, evaluation and the next stage see an ordinary model. Under bf16 the engine holds the
whole module in bf16, frozen parts included (as in LLaVA's runs); those are saved with their bf16 values.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from vlmkit.errors import ConfigError
from vlmkit.model.weights import load_into
from vlmkit.train import distributed


def _require():
    try:
        import deepspeed  # optional dependency (the deepspeed extra)
    except ImportError:
        raise ConfigError("--distributed deepspeed needs the deepspeed package: pip install deepspeed") from None
    return deepspeed


def fill_config(path: str, *, world_size: int, batch_size: int, grad_accum: int, bf16: bool, hidden: int,
                max_grad_norm: float) -> dict:
    """The DeepSpeed config at `path` with its "auto" values filled for this stage."""
    if not path:
        raise ConfigError("--distributed deepspeed needs --deepspeed-config FILE (e.g. LLaVA's scripts/zero3.json)")
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed-config {path}: no such file") from None
    except ValueError as exc:
        raise ConfigError(f"--deepspeed-config {path}: not valid JSON ({exc})") from None
    if batch_size % world_size:
        raise ConfigError(f"--distributed deepspeed: the stage's batch size {batch_size} (the global micro-batch) "
                          f"must divide over {world_size} processes")
    micro = batch_size // world_size

    def put(node: dict, key: str, value, force: bool = False):
        if force or node.get(key) == "auto":
            node[key] = value
    put(config, "train_micro_batch_size_per_gpu", micro)
    put(config, "gradient_accumulation_steps", grad_accum)
    put(config, "train_batch_size", world_size * micro * grad_accum)
    put(config.setdefault("fp16", {}), "enabled", False)
    put(config.setdefault("bf16", {}), "enabled", bool(bf16))
    if config["fp16"].get("enabled") is True:
        raise ConfigError(f"--deepspeed-config {path}: fp16 is not supported by vlmkit (use bf16)")
    put(config, "gradient_clipping", float(max_grad_norm or 0.0), force=True)
    zero = config.setdefault("zero_optimization", {})
    put(zero, "reduce_bucket_size", hidden * hidden)
    put(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))
    put(zero, "stage3_param_persistence_threshold", 10 * hidden)
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ConfigError(f"--deepspeed-config {path}: has an '{key}' section; vlmkit brings its own (AdamW "
                              "with a learning rate per module, warm-up then cosine): remove it")
    left = [k for k, v in _flatten(config) if v == "auto"]
    if left:
        raise ConfigError(f"--deepspeed-config {path}: vlmkit cannot fill 'auto' for {', '.join(left)}")
    return config


def _flatten(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def initialize(model, optimizer, schedule, config: dict):
    """The engine that runs the forward, backward and optimizer step on `model`."""
    deepspeed = _require()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=config)
    return engine


def finish(engine, model, scratch: Path, buffers: dict[str, torch.Tensor], device: torch.device) -> None:
    """Give `model` its trained fp32 weights back as ordinary parameters and take the engine apart."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # optional dependency

    info = distributed.current()
    if info.is_main:
        shutil.rmtree(scratch, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(scratch), tag="final")
    dist.barrier()
    state = get_fp32_state_dict_from_zero_checkpoint(str(scratch), tag="final")
    engine.destroy()
    tensors = {k: v.to(device=device, copy=True) for k, v in state.items()}  # views of one flat buffer: copies
    tensors.update(buffers)  # buffers made at init (rotary tables) as they were, not the engine's bf16 copies
    load_into(model.as_tensor_module(), tensors.items(), source=f"the DeepSpeed checkpoint in {scratch}",
              shape_of=lambda p: getattr(p, "ds_shape", p.shape))  # ZeRO-3's partitioned placeholders
    dist.barrier()
    if info.is_main:
        shutil.rmtree(scratch, ignore_errors=True)
