"""The original LLaVA repository's checkpoints (haotian-liu/LLaVA: `LlavaLlamaForCausalLM`).

Their config.json is the LLM's config plus `mm_*` keys (`mm_vision_tower`, `mm_projector_type`,
`mm_vision_select_layer`, `mm_vision_select_feature`, `image_aspect_ratio`); the weights are the LLM's
(`model.layers.*`, `lm_head.*`) plus the projector (`model.mm_projector.*`: `0`/`2` for the MLP, no index
for the single Linear). The vision tower is usually not in the checkpoint: it is loaded from the hub id in
`mm_vision_tower`, or from `vision_tower=` (a local copy) when given. The tokenizer has no `<image>` token
(LLaVA splices at id -200), so vlmkit adds one and grows the embedding table by a row that is never read.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from vlmkit.archs import from_name
from vlmkit.data.images import ImageTransform
from vlmkit.encoders import load_vision_tower
from vlmkit.errors import ConfigError
from vlmkit.llm import LanguageModel
from vlmkit.model.vlm import VisionLanguageModel, prepare_tokenizer
from vlmkit.model.weights import read_state_dict

_LLM_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral", "llava_mpt": "mpt"}
_PROJECTOR_PREFIX = "model.mm_projector."
_TOWER_PREFIX = "model.vision_tower.vision_tower."


def is_original_llava(config: dict) -> bool:
    return "mm_vision_tower" in config or "mm_projector_type" in config


def _check_supported(config: dict, src: str) -> None:
    checks = [
        ("mm_use_im_start_end", False, "image start/end tokens around each image"),
        ("mm_use_im_patch_token", False, "an extra patch token per image"),
    ]
    for key, supported, what in checks:
        if config.get(key, supported) != supported:
            raise ConfigError(f"{src}: {key}={config[key]} ({what}) is not supported by vlmkit")
    merge = config.get("mm_patch_merge_type", "flat")
    if merge != "flat":
        raise ConfigError(f"{src}: mm_patch_merge_type={merge!r} (LLaVA-NeXT tiling) is not supported; only 'flat'")
    aspect = config.get("image_aspect_ratio", "square")
    if aspect not in ("pad", "square", None):
        raise ConfigError(f"{src}: image_aspect_ratio={aspect!r} is not supported; vlmkit knows 'pad' and 'square'")
    if config.get("model_type") not in _LLM_TYPES:
        raise ConfigError(f"{src}: model_type {config.get('model_type')!r}; vlmkit imports {sorted(_LLM_TYPES)}")


def _projector(config: dict, state: dict, src: str) -> tuple[str, dict]:
    """(vlmkit connector type, its state dict) from the `model.mm_projector.*` weights."""
    kind = config.get("mm_projector_type", "linear")
    weights = {k[len(_PROJECTOR_PREFIX):]: v for k, v in state.items() if k.startswith(_PROJECTOR_PREFIX)}
    if not weights:
        raise ConfigError(f"{src}: no {_PROJECTOR_PREFIX}* weights in the checkpoint")
    if kind == "linear":
        return "linear", {f"proj.{k.split('.')[-1]}": v for k, v in weights.items()}
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if match and match.group(1) == "2":
        return "mlp2x_gelu", {k.replace("0.", "linear_1.", 1).replace("2.", "linear_2.", 1): v
                              for k, v in weights.items()}
    raise ConfigError(f"{src}: mm_projector_type={kind!r}; vlmkit imports 'linear' and 'mlp2x_gelu'")


def from_llava_original(src: str | os.PathLike, *, vision_tower: str | None = None, allow_pickle: bool = False,
                        dtype=None):
    """A vlmkit model from an original-LLaVA checkpoint directory."""
    from accelerate import init_empty_weights  # start-up: accelerate, 88 ms
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # start-up: transformers, 0.76 s

    src = Path(src)
    config = json.loads((src / "config.json").read_text())
    if not is_original_llava(config):
        raise ConfigError(f"{src}/config.json has no mm_vision_tower: not an original LLaVA checkpoint")
    _check_supported(config, str(src))
    state = read_state_dict(src, allow_pickle=allow_pickle)
    connector_type, connector_state = _projector(config, state, str(src))
    tower_path = vision_tower or config["mm_vision_tower"]
    select = config.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ConfigError(f"{src}: mm_vision_select_feature={select!r}; vlmkit knows 'patch' and 'cls_patch'")
    arch = from_name("llava-1.5" if connector_type == "mlp2x_gelu" else "llava", scale="paper",
                     vision={"name_or_path": str(tower_path), "feature_layer": int(config.get("mm_vision_select_layer", -2)),
                             "select": select, "pad_to_square": config.get("image_aspect_ratio") == "pad"},
                     connector={"type": connector_type, "act": "gelu", "bias": True},
                     llm={"name_or_path": str(src)})

    llm_fields = {k: v for k, v in config.items() if not k.startswith("mm_") and k not in
                  ("architectures", "image_aspect_ratio", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter",
                   "unfreeze_mm_vision_tower", "image_grid_pinpoints", "tokenizer_padding_side",
                   "tokenizer_model_max_length", "model_type", "_name_or_path")}
    llm_config = AutoConfig.for_model(_LLM_TYPES[config["model_type"]], **llm_fields)
    with init_empty_weights(include_buffers=False):  # parameters come from the checkpoint; buffers (RoPE) are made
        causal = AutoModelForCausalLM.from_config(llm_config, attn_implementation="sdpa")
    llm_state = {k: v for k, v in state.items() if not k.startswith((_PROJECTOR_PREFIX, "model.vision_tower."))}
    missing, unexpected = causal.load_state_dict(llm_state, strict=False, assign=True)
    tied = bool(getattr(llm_config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConfigError(f"{src}: LLM weights do not match a {type(causal).__name__} "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if tied:
        causal.tie_weights()
    llm = LanguageModel(causal)

    tower = load_vision_tower(str(tower_path))
    tower_state = {k[len(_TOWER_PREFIX):]: v for k, v in state.items() if k.startswith(_TOWER_PREFIX)}
    if tower_state:  # a checkpoint that fine-tuned the tower carries it: those weights win
        tower.load_state_dict(tower_state, strict=True)
    transform = ImageTransform.from_pretrained(tower_path, pad_to_square=arch.vision.pad_to_square)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(src), llm)
    model = VisionLanguageModel._assemble(arch, tower, llm, tokenizer, transform)
    model.connector.load_state_dict(connector_state, strict=True)
    model.eval()
    if dtype is not None:
        model.to(dtype)
    return model

