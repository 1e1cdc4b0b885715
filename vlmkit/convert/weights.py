"""Reading checkpoint weights: safetensors (one file or a sharded index), and pickle only when asked.

A `.bin`/`.pt` file is a pickle, which can run code when loaded; vlmkit refuses it unless the caller
passes `allow_pickle=True`, and even then loads with `torch.load(weights_only=True)` (tensors only).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from vlmkit.errors import ConfigError


def weight_files(directory: str | Path) -> tuple[list[Path], bool]:
    """The weight files of a checkpoint directory and whether they are pickles."""
    directory = Path(directory)
    for index_name, pickled in (("model.safetensors.index.json", False), ("pytorch_model.bin.index.json", True)):
        index = directory / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [directory / shard for shard in shards], pickled
    if (directory / "model.safetensors").exists():
        return [directory / "model.safetensors"], False
    pickles = sorted(directory.glob("*.bin")) + sorted(directory.glob("*.pt"))
    if pickles:
        return pickles, True
    raise ConfigError(f"{directory}: no model.safetensors, sharded safetensors index or .bin weights")


def read_state_dict(directory: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    files, pickled = weight_files(directory)
    if pickled and not allow_pickle:
        raise ConfigError(f"{files[0]} is a pickle file, which can run code when loaded; vlmkit loads safetensors "
                          "only. If you trust it, pass --allow-pickle (tensors only, torch.load(weights_only=True)), "
                          "or convert it to safetensors first")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if pickled:
            state.update(_load_pickle(path))
        else:
            state.update(load_file(path))
    return state


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    error = None
    for mmap in (True, False):  # mmap needs the zip format of torch >= 1.6; older files load without it
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as exc:  # weights_only refuses anything that is not plain tensors
            error = exc
    raise ConfigError(f"{path}: cannot be read as plain tensors ({str(error).splitlines()[0]})")
