"""Freezing: the one function that decides what trains in a stage."""
from __future__ import annotations

from vlmkit.config import MODULES
from vlmkit.errors import ConfigError


def apply_stage_freezing(model, train: list[str], log=print) -> dict[str, int]:
    """`requires_grad_(True)` on the named parts, False on all others; frozen parts go to eval mode (so a
    frozen BatchNorm keeps its statistics). Logs and returns the trainable parameter count per part."""
    parts = model.parts()
    unknown = set(train) - set(parts)
    if unknown:
        raise ConfigError(f"stage trains unknown module(s) {sorted(unknown)}; modules: {list(MODULES)}")
    counts = {}
    for name, module in parts.items():
        trains = name in train
        module.requires_grad_(trains)
        module.train(trains)
        counts[name] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    lines = ", ".join(f"{name} {n:,}" + (" (frozen)" if not n else "") for name, n in counts.items())
    log(f"trainable parameters: {lines}; {sum(counts.values()):,} of {total:,}")
    return counts
