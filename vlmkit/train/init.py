"""`vlmkit train --init SOURCE`: fine-tune a model that already exists instead of assembling backbones.

What LLaVA users run most (`finetune_task.sh`, `finetune_task_lora.sh`) starts from a released model. SOURCE
is a vlmkit run directory or checkpoint, or a Hugging Face `LlavaForConditionalGeneration` directory or hub
id (read through `vlmkit.convert.from_hf`). The model keeps its parts (tower, connector, LLM and their
weights), tokenizer, template and preset; the command line changes only run and stage settings (data,
steps, learning rates, LoRA…), and the stages it names run (default: the preset's last stage, the
instruction tuning those scripts do). Weights load in fp32, the optimizer's master copy.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmkit.config import ArchConfig, apply_dotted, deep_merge, without_remote_code
from vlmkit.convert.hf_llava import from_hf, hf_arch
from vlmkit.errors import ConfigError
from vlmkit.io import check_local_path
from vlmkit.model.vlm import VisionLanguageModel

_PARTS = ("vision", "connector", "llm", "states")


def _vlmkit_dir(source) -> Path | None:
    """The checkpoint directory if `source` is a vlmkit run or checkpoint, else None."""
    path = Path(source)
    for candidate in (path / "model", path):
        config = candidate / "config.json"
        if config.exists():
            try:
                if json.loads(config.read_text()).get("format") == "vlmkit":
                    return candidate
            except ValueError:
                raise ConfigError(f"--init {source}: {config} is not valid JSON") from None
    return None


def init_config(source: str) -> ArchConfig:
    """The config of the model at `source`, from its config files alone (no weights are read)."""
    found = _vlmkit_dir(source)
    if found is not None:
        return without_remote_code(ArchConfig.from_dict(json.loads((found / "config.json").read_text())["arch"]))
    check_local_path(source, "--init")
    if Path(source).is_dir() and not (Path(source) / "config.json").exists():
        raise ConfigError(f"--init {source}: a directory without config.json (expected a vlmkit run or checkpoint, "
                          "or a Hugging Face LLaVA directory)")

    return hf_arch(str(source))[0]


def with_overrides(config: ArchConfig, overrides: dict) -> ArchConfig:
    """`config` with the command line's run and stage settings; the parts are the model's own."""
    parts = sorted(key.replace("__", ".") for key in overrides if key.split("__")[0] in _PARTS
                   and key != "llm__trust_remote_code")  # not a part: whether this command runs the LLM's code
    if parts:
        raise ConfigError(f"--init keeps the model's parts and their weights; {', '.join('--' + p for p in parts)} "
                          "cannot change them (train from backbones without --init to pick other parts)")
    nested = {k: v for k, v in overrides.items() if "__" not in k}
    dotted = {k.replace("__", "."): v for k, v in overrides.items() if "__" in k}
    return ArchConfig.from_dict(apply_dotted(deep_merge(config.to_dict(), nested), dotted))


def load_init(source: str, device=None, allow_pickle: bool = False, trust_remote_code: bool = False):
    """The model at `source`, in fp32, loaded straight onto `device`."""
    found = _vlmkit_dir(source)
    if found is not None:
        return VisionLanguageModel.from_pretrained(found, device=device, dtype=torch.float32,
                                                   allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)

    target = torch.device(device) if device is not None else torch.device("cpu")
    return from_hf(str(source), dtype=torch.float32, device_map=target if target.type != "cpu" else None,
                   verbose=False)
