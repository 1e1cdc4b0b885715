"""Data-parallel training on an existing engine: `torch.distributed` + DistributedDataParallel.

Launched by `torchrun --nproc_per_node N -m vlmkit train …` (which sets RANK/WORLD_SIZE/LOCAL_RANK): gloo
on CPU, NCCL on GPUs. Every rank builds the same model from the same seed (DDP also broadcasts rank 0's
weights), reads the same data order, and takes its share of each global micro-batch; the loss is
normalised by the number of supervised tokens in the *global* micro-batch, so N processes compute the
gradient one process would on the whole batch. Rank 0 alone writes logs and checkpoints.

For paper-scale models on a GPU node, see docs/distributed.md (FSDP / DeepSpeed ZeRO through accelerate).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from vlmkit.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, indices: list[int]) -> tuple[list[int], bool]:
        """This rank's share of a global micro-batch, and whether it is real (a rank left without samples
        runs the first one with zero weight, so every rank still joins the gradient all-reduce)."""
        mine = indices[self.rank::self.world_size]
        return (mine, True) if mine else (indices[:1], False)


def setup() -> DistInfo:
    """Join the process group torchrun describes in the environment; a no-op for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def all_reduce_sum(values: list[float], device=None) -> list[float]:
    """Sum `values` over the ranks. NCCL reduces only CUDA tensors, so under it they go to this rank's GPU."""
    if device is None and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(value):
    """Rank 0's `value` on every rank (a picklable object made by this program, never read from a file)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


STRATEGIES = ("ddp", "fsdp", "deepspeed")


def prepare(model, info: DistInfo, strategy: str, bf16: bool = False):
    """The module the training loop calls: `model` itself (one process, or FSDP-sharded in place) or a DDP
    wrapper. FSDP (FSDP2 `fully_shard`) makes each LLM decoder layer a unit and the whole model the root, so
    everything outside the layers (vision tower, connector, embeddings, head) is gathered for the forward.
    With `bf16`, FSDP gathers the parameters in bf16 for the forward/backward and reduces gradients in fp32,
    while the sharded fp32 parameters stay the optimizer's master weights (LLaVA's --bf16 under ZeRO)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"distributed={strategy!r}; use one of {', '.join(STRATEGIES)}")
    if not info.enabled or strategy == "deepspeed":  # DeepSpeed's engine is made with the optimizer (vlmkit.train.zero)
        return model
    if strategy == "ddp":
        device_ids = [info.local_rank] if torch.cuda.is_available() else None
        # a step may leave trainable parameters without gradients: a text-only micro-batch never runs the
        # connector (LLaVA-1.5's mix665k has text-only ShareGPT records), and a trained tower whose features
        # come from layer -2 never runs its last block
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False,
                                       find_unused_parameters=True)
    if not getattr(model, "_fsdp_sharded", False):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # start-up: torch.distributed.fsdp

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
            MixedPrecisionPolicy()
        for layer in decoder_layers(model.llm.causal_lm) if model.llm is not None else []:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        model._fsdp_sharded = True
    return model


def is_sharded(model) -> bool:
    return getattr(model, "_fsdp_sharded", False)


def decoder_layers(causal_lm) -> list:
    """The repeated blocks of a transformers causal LM (the unit FSDP shards)."""
    names = getattr(causal_lm, "_no_split_modules", None) or []
    layers = [m for m in causal_lm.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"{type(causal_lm).__name__} does not name its decoder layer class (_no_split_modules); "
                          "use distributed='ddp'")
    return layers


def full_state_dict(model) -> dict:
    """All ranks call this (it gathers shards); returns the full state on the CPU."""
    from torch.distributed.checkpoint.state_dict import (  # start-up: torch.distributed.checkpoint
        StateDictOptions, get_model_state_dict)

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def sharded_optimizer_state(model, optimizer) -> dict:
    """This rank's shards of the optimizer state, keyed by parameter name (for torch.distributed.checkpoint)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict  # start-up: torch.distributed.ckpt

    return get_optimizer_state_dict(model, optimizer)


def load_sharded_optimizer_state(model, optimizer, directory) -> None:
    """Read a sharded optimizer state written by `torch.distributed.checkpoint` into `optimizer` (every rank)."""
    import torch.distributed.checkpoint as dcp  # start-up: torch.distributed.checkpoint, FSDP runs only
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict  # start-up: as above

    state = {"optimizer": sharded_optimizer_state(model, optimizer)}  # the layout to fill (zero moments)
    dcp.load(state, checkpoint_id=str(directory))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
