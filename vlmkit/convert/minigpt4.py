"""MiniGPT-4's released checkpoints: only its trained projection (`llama_proj`), the rest is BLIP-2's and Vicuna's.

`from_minigpt4(projection, blip2, llm)` builds the `minigpt4` preset from a BLIP-2 checkpoint (its ViT and Q-Former,
frozen in MiniGPT-4) and the LLM, then puts `llama_proj.weight` / `llama_proj.bias` into the connector's
`language_projection`. The released files are pickles (`torch.save` of {"model": {...}}): they are read only when
the caller allows it, and then with `torch.load(weights_only=True)` (tensors only, no code).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from vlmkit.archs import from_name
from vlmkit.errors import ConfigError
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit.model.weights import _load_pickle

KEYS = ("llama_proj.weight", "llama_proj.bias")


def read_projection(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """`llama_proj.weight` and `.bias` from a MiniGPT-4 checkpoint (safetensors, or a pickle when allowed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such MiniGPT-4 checkpoint file")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        if not allow_pickle:
            raise ConfigError(f"{path} is a pickle file, which can run code when loaded; pass --allow-pickle if you "
                              "trust it (it is then read as plain tensors, torch.load(weights_only=True))")

        state = _load_pickle(path)
    state = state.get("model", state) if isinstance(state, dict) else state
    missing = [key for key in KEYS if key not in state]
    if missing:
        raise ConfigError(f"{path}: no {', '.join(missing)} (a MiniGPT-4 checkpoint holds its llama_proj; found "
                          f"{', '.join(sorted(state)[:5])})")
    return {key: state[key] for key in KEYS}


def from_minigpt4(projection: str | os.PathLike, blip2: str, llm: str, allow_pickle: bool = False, dtype=None,
                  verbose: bool = True):
    tensors = read_projection(projection, allow_pickle)
    config = from_name("minigpt4", scale="paper", vision={"name_or_path": str(blip2)},
                       connector={"name_or_path": str(blip2)}, llm={"name_or_path": str(llm)})
    model = VisionLanguageModel.from_config(config, verbose=verbose, dtype=dtype)
    target = model.connector.language_projection
    for key, param in (("llama_proj.weight", target.weight), ("llama_proj.bias", target.bias)):
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise ConfigError(f"{projection}: {key} has shape {tuple(tensors[key].shape)}, but the Q-Former "
                              f"({model.config.connector.embed_dim} wide) -> LLM ({model.llm_hidden} wide) projection "
                              f"is {tuple(param.shape)}: is --llm the Vicuna it was trained for?")
        with torch.no_grad():
            param.copy_(tensors[key])
    return model.eval()
