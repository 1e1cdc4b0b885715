"""Freezing: the one function that decides what trains in a stage."""
from __future__ import annotations

import torch

from vlmkit.config import LoRAConfig
from vlmkit.errors import ConfigError
from vlmkit.llm.lora import attach_lora, has_lora
from vlmkit.model.vlm import coordinate_token_ids

BATCH_NORM = ("frozen", "train")


def apply_stage_freezing(model, train: list[str], log=print, lora: LoRAConfig | None = None,
                         batch_norm: str = "frozen") -> dict[str, int]:
    """`requires_grad_(True)` on the named parts, False on all others; frozen parts go to eval mode.

    With `lora.r > 0` the LLM trains through LoRA adapters only (vlmkit.llm.lora): its own weights stay
    frozen.

    BatchNorm layers stay in eval mode even in a part that trains unless `batch_norm='train'`: fine-tuning
    batches are often small, and re-estimating the pretrained running statistics from them can wash the features
    out (measured: colour answers collapsed when a ResNet tower trained with BatchNorm in train mode at batch 8).
    Logs and returns the trainable parameter count per part."""
    if batch_norm not in BATCH_NORM:
        raise ConfigError(f"batch_norm must be one of {', '.join(map(repr, BATCH_NORM))}, not {batch_norm!r}")
    parts = model.parts()
    unknown = {name for name in train if name.split(".", 1)[0] not in parts}
    if unknown:
        raise ConfigError(f"stage trains unknown module(s) {sorted(unknown)}; modules: {list(parts)} (or a part "
                          "inside one, e.g. connector.language_projection)")
    inner = {name: trained_submodule(model, name) for name in train if "." in name}
    counts = {}
    for name, module in parts.items():
        trains = name in train
        module.requires_grad_(trains)
        module.train(trains)
        if name == "vision" and trains:  # blocks and heads the features never go through get no gradient
            for unused in module.unused_modules():
                unused.requires_grad_(False)
        for full, sub in inner.items():  # a part inside a frozen module trains alone (MiniGPT-4's projection)
            if full.split(".", 1)[0] == name:
                sub.requires_grad_(True)
                sub.train(True)
        for sub in module.modules():
            if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm):
                sub.train(trains and batch_norm == "train")
        if name == "llm" and trains and lora is not None and lora.r > 0:
            if has_lora(model.llm):  # resumed mid-stage: the checkpoint carried the adapters
                for pname, param in module.named_parameters():
                    param.requires_grad_("lora_" in pname or "trainable_tokens_delta" in pname)
            else:
                attach_lora(model.llm, lora, coordinate_token_ids(model))
            model.llm.train(True)
        counts[name] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    lines = ", ".join(f"{name} {n:,}" + (" (frozen)" if not n else "") +
                      (f" (LoRA r={lora.r})" if name == "llm" and n and lora is not None and lora.r > 0 else "")
                      for name, n in counts.items())
    log(f"trainable parameters: {lines}; {sum(counts.values()):,} of {total:,}")
    return counts


def trained_submodule(model, name: str) -> torch.nn.Module:
    """`connector.language_projection` -> that module; a clear error naming what the part does have."""
    top, _, path = name.partition(".")
    part = model.parts()[top]
    try:
        return part.get_submodule(path)
    except AttributeError:
        children = [child for child, _ in part.named_children()]
        raise ConfigError(f"stage trains {name!r}, but {top} has no module {path!r}; its modules: "
                          f"{', '.join(children)}") from None


def trains(stage, part: str) -> bool:
    """Whether a stage trains `part` or something inside it (`connector.language_projection`)."""
    return any(name == part or name.startswith(part + ".") for name in stage.train)
