"""LoRA on the language model, through `peft`.

A stage with `lora.r > 0` wraps the LLM in a `peft` model: the LLM's own weights stay frozen and only the
low-rank adapters train. At the end of the stage the adapters are merged into the weights (`save="merge"`:
the checkpoint is a plain model) or kept (`save="adapter"`: the checkpoint records the LoRA config, so
`from_pretrained` re-attaches them, and `adapter/` holds them in peft's own format for use elsewhere).
QLoRA (`quantize="4bit"`) loads the frozen LLM in 4-bit NF4 with bitsandbytes, on a CUDA GPU only.
"""
from __future__ import annotations

import dataclasses

import torch

from vlmkit.config import LoRAConfig
from vlmkit.errors import ConfigError

ADAPTER_DIR = "adapter"


def has_lora(llm) -> bool:
    return llm is not None and hasattr(llm.model, "peft_config")  # None: a model without an LLM (BLIP-2 stage 1)


def check_quantization(lora: LoRAConfig) -> None:
    if lora.quantize not in ("", "4bit"):
        raise ConfigError(f"lora.quantize={lora.quantize!r}; use '' or '4bit'")
    if lora.quantize and not torch.cuda.is_available():
        raise ConfigError("QLoRA (lora.quantize='4bit') needs a CUDA GPU and bitsandbytes; this machine has no GPU. "
                          "Use plain LoRA (lora.quantize='') on CPU")
    if lora.quantize:
        try:
            import bitsandbytes  # noqa: F401 (optional dependency: QLoRA only)
        except ImportError:
            raise ConfigError("QLoRA needs bitsandbytes: pip install bitsandbytes") from None


def quantization_config(lora: LoRAConfig):
    """The `from_pretrained` quantization config for a QLoRA stage (None without one)."""
    if not lora.quantize:
        return None
    check_quantization(lora)
    from transformers import BitsAndBytesConfig  # start-up: transformers, 0.76 s

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def attach_lora(llm, lora: LoRAConfig, token_ids=()) -> int:
    """Wrap `llm.model` with fresh adapters; only they train, with the embedding (and tied LM-head) rows of
    `token_ids` (peft's trainable_token_indices: tokens a base model lacks, such as coordinate tokens). Returns
    the number of trainable parameters."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # start-up: peft, 3 s

    if has_lora(llm):
        raise ConfigError("the language model already carries LoRA adapters (a kept adapter from an earlier stage); "
                          "merge them first (lora.save='merge')")
    if lora.r <= 0:
        raise ConfigError(f"lora.r must be positive to attach adapters, not {lora.r}")
    if lora.save not in ("merge", "adapter"):
        raise ConfigError(f"lora.save={lora.save!r}; use 'merge' or 'adapter'")
    check_quantization(lora)
    targets = lora.target_modules
    targets = "all-linear" if list(targets) == ["all-linear"] else list(targets)
    if getattr(llm.model, "is_loaded_in_4bit", False):
        llm.model = prepare_model_for_kbit_training(llm.model)
    try:
        extra = {"trainable_token_indices": _token_rows(llm.model, list(token_ids))} if token_ids else {}
        llm.model = get_peft_model(llm.model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                         target_modules=targets, task_type="CAUSAL_LM", **extra))
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(f"lora.target_modules={lora.target_modules}: {exc}") from None
    llm.lora = lora
    llm.lora_token_ids = list(token_ids)
    return sum(p.numel() for p in llm.model.parameters() if p.requires_grad)


def _token_rows(model, token_ids: list[int]):
    """peft's trainable_token_indices: the ids alone when the LM head is tied to the embeddings (peft trains the
    shared rows), else the same rows of both, by module name (an untied head's new rows must train too, or the
    model can read the new tokens but never write them)."""
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is embeddings.weight:  # identity, not storage: meta tensors have none
        return token_ids
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    return {names[id(embeddings)]: token_ids, names[id(head)]: token_ids}


def restore_token_originals(model) -> None:
    """peft keeps a copy of each trainable-token row's original value (`trainable_tokens_original`, used to unmerge)
    in a non-persistent buffer: a model built on the meta device and then loaded has none, so take it again
    from the loaded base rows."""
    for module in model.modules():
        originals, indices = getattr(module, "trainable_tokens_original", None), getattr(module, "token_indices", None)
        base = getattr(module, "base_layer", None)
        if originals is None or not indices or base is None or getattr(module, "tied_adapter", None) is not None:
            continue
        for adapter, ids in indices.items():
            if adapter in originals and originals[adapter].is_meta:
                originals[adapter] = base.weight.detach()[torch.tensor(ids, device=base.weight.device)].clone()


def merge_lora(llm) -> None:
    """Fold the adapters into the weights and drop the peft wrapper."""
    if has_lora(llm):
        llm.model = llm.model.merge_and_unload()
        llm.lora = None


def finish_stage(llm, lora: LoRAConfig) -> None:
    if has_lora(llm) and lora.save == "merge":
        merge_lora(llm)


def lora_record(llm) -> dict | None:
    """What a checkpoint's config.json says about kept adapters."""
    if not has_lora(llm):
        return None
    token_ids = getattr(llm, "lora_token_ids", [])
    return dict(dataclasses.asdict(llm.lora), **({"trainable_token_indices": token_ids} if token_ids else {}))
