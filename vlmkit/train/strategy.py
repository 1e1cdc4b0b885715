"""How a stage's optimiser steps run on an engine, one class per engine as prismatic-vlms has them: a
`Strategy` prepares the model (wraps or shards it) and makes the optimizer and schedule, takes each
micro-batch's backward, takes the step (clipping, AdamW, schedule) and finishes the stage.

- `Strategy`: one process, or torch DDP under torchrun (`vlmkit.train.distributed.prepare`); bf16 by autocast.
- `FSDP`: FSDP2 `fully_shard` (each decoder layer a unit); bf16 by its mixed-precision policy; gradients are
  sharded DTensors, so the clipped norm is gathered.
- `DeepSpeed`: ZeRO's engine (`vlmkit.train.zero`) takes backward, clipping and the step itself, at the
  accumulation boundary, and hands the trained fp32 weights back to the plain model at the end.

The training loop (`vlmkit.train.loop.train_stage`) only calls these methods.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from vlmkit.config import StageConfig
from vlmkit.errors import ConfigError
from vlmkit.train import distributed, zero


class Strategy:
    """One process, or DistributedDataParallel under torchrun (the base every engine specialises)."""
    name = "ddp"

    def __init__(self, info: distributed.DistInfo, bf16: bool = False):
        self.info, self.bf16 = info, bf16
        self.optimizer = self.schedule = None

    def check(self, stage: StageConfig, resume, save_every: int) -> None:
        """A ConfigError for what this engine cannot do, before anything is built."""

    def prepare(self, model, param_groups, lr_lambda) -> object:
        """Wrap or shard the model, then make the optimizer over `param_groups()` (called after the wrap: FSDP
        replaces the parameters) and the schedule; returns what the loop calls as the forward."""
        forward = distributed.prepare(model, self.info, self.name, bf16=self.bf16)
        # the fused kernel does the same update in one pass instead
        # of a Python loop over parameters (measured: the optimizer step 272 -> 56 ms on the benchmark's 'small'
        # model); FSDP's sharded DTensors use the default
        self.optimizer = torch.optim.AdamW(param_groups(), betas=(0.9, 0.999), eps=1e-8,
                                           fused=not distributed.is_sharded(model))
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        return forward

    def caches_features(self, model) -> bool:
        """Whether a frozen tower's features may be computed once before the stage (a sharded one runs inside
        the forward)."""
        return not distributed.is_sharded(model)

    def autocast(self, model):
        """bf16 autocast where the model is (CUDA or CPU); the optimizer keeps the fp32 master weights."""
        return torch.autocast(model.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_grad_norm: float):
        """Clip, step, schedule, zero the gradients; returns the gradient norm before clipping (None unclipped)."""
        trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm) if max_grad_norm else None
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a sharded DTensor
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def finish(self, model) -> None:
        """After the stage's last step: the model is a plain module again."""


class FSDP(Strategy):
    """FSDP2 `fully_shard` under torchrun (each decoder layer a unit; bf16 by its mixed-precision policy too)."""
    name = "fsdp"

    def check(self, stage, resume, save_every):
        if stage.lora.r > 0 and self.info.enabled:
            raise ConfigError(f"stage {stage.name!r}: LoRA under FSDP is not supported yet; use --distributed ddp")


class DeepSpeed(Strategy):
    """DeepSpeed ZeRO's engine under torchrun: it takes backward, clipping and the step itself."""
    name = "deepspeed"

    def __init__(self, info, bf16=False, config_path: str = "", scratch: Path | None = None,
                 batch_size: int = 1, grad_accum: int = 1, max_grad_norm: float = 0.0):
        super().__init__(info, bf16)
        self.config_path, self.scratch = config_path, scratch or Path(".vlmkit-deepspeed")
        self.batch_size, self.grad_accum, self.max_grad_norm = batch_size, grad_accum, max_grad_norm
        self.engine = None

    def check(self, stage, resume, save_every):
        if not self.info.enabled or resume is not None or save_every:
            raise ConfigError("--distributed deepspeed: " + (
                "launch under torchrun (it needs the process group: torchrun --nproc_per_node N -m vlmkit train …)"
                if not self.info.enabled else "step checkpoints and --resume are not supported under DeepSpeed yet: "
                "use --save-every 0 (each stage still ends with a checkpoint), or --distributed fsdp, which has both"))

    def prepare(self, model, param_groups, lr_lambda):
        self.optimizer = torch.optim.AdamW(param_groups(), betas=(0.9, 0.999), eps=1e-8, fused=False)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self.home = model.device
        self.buffers = {name: b.detach().clone() for name, b in model.as_tensor_module().named_buffers()}
        self.engine = zero.initialize(model, self.optimizer, self.schedule, zero.fill_config(
            self.config_path, world_size=self.info.world_size, batch_size=self.batch_size,
            grad_accum=self.grad_accum, bf16=self.bf16, hidden=model.llm_hidden, max_grad_norm=self.max_grad_norm))
        return self.engine

    def caches_features(self, model):
        return False

    def autocast(self, model):  # the engine holds the module in bf16 itself
        return contextlib.nullcontext()

    def backward(self, loss):
        # the engine steps (clip, AdamW, schedule, zero_grad) at the accumulation boundary; the loss is normalised
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def step(self, max_grad_norm):
        return self.engine.get_global_grad_norm() if max_grad_norm else None

    def finish(self, model):
        zero.finish(self.engine, model, self.scratch, self.buffers, self.home)


def make_strategy(name: str, info: distributed.DistInfo, stage: StageConfig, *, bf16: bool = False,
                  deepspeed_config: str = "", scratch: Path | None = None) -> Strategy:
    """The engine `name` names (ddp, fsdp, deepspeed); on one process 'ddp' and 'fsdp' run alike."""
    if name not in distributed.STRATEGIES:
        raise ConfigError(f"distributed={name!r}; use one of {', '.join(distributed.STRATEGIES)}")
    if name == "deepspeed":
        return DeepSpeed(info, bf16, deepspeed_config, scratch, stage.batch_size, stage.grad_accum,
                         stage.max_grad_norm)
    return FSDP(info, bf16) if name == "fsdp" else Strategy(info, bf16)
