"""Memory planning for `vlmkit train --dry-run`: per stage and per GPU, what training would hold, before any
weight is read.

The model is built on PyTorch's meta device from the backbones' configs alone (`AutoConfig.from_pretrained`:
a local directory or one small config.json from the hub; no weights are downloaded or allocated): the vision
tower the way `vlmkit.encoders.load_vision_tower` picks it (the image half of a CLIP/SigLIP checkpoint), the
LLM with `AutoModelForCausalLM.from_config` (seq-to-seq for an encoder-decoder), the connector with `vlmkit.connectors.build_connector`. Parameter
counts are therefore exact; memory is estimated from them with the rules below. GB in this module means GiB
(2**30 bytes): an "80 GB" A100/H100 holds 80 GiB.

Rules
-----
Precision, `precision="bf16"` (the default; the convention of LLaVA's scripts, DeepSpeed with --bf16):
weights in bf16 (2 bytes per parameter, frozen or not), gradients in bf16 (2 bytes per trainable parameter),
optimizer state = fp32 master copy + AdamW's fp32 m and v (12 bytes per trainable parameter): 16 bytes per
trainable and 2 per frozen parameter. `precision="fp32"` is vlmkit's own loop with fp32 parameters and
--bf16 autocast (the optimizer steps the fp32 weights): 4 + 4 + 8 = 16 bytes per trainable, 4 per frozen
parameter, and larger activations (an fp32 residual stream). Note that vlmkit loads a checkpoint in the dtype
its config names (transformers >= 5 defaults to dtype="auto"); see docs/memory.md.

Strategies (`strategy`, one row each; `None` = all that apply):
- ddp: every GPU holds everything. With more than one GPU, DistributedDataParallel keeps its own gradient
  buckets beside .grad (vlmkit does not set gradient_as_bucket_view), so gradients count twice.
- zero2: gradients and optimizer state divided by the GPU count, weights replicated (DeepSpeed ZeRO-2, what
  LLaVA's pretrain.sh uses; vlmkit has no ZeRO-2: a reference row).
- fsdp: weights, gradients and optimizer state divided by the GPU count (FSDP2 full shard as vlmkit wires it,
  ~ DeepSpeed ZeRO-3), plus what is gathered at a time: the root unit (everything outside the decoder layers:
  vision tower, connector, embeddings, head) and two decoder layers (the one running and the prefetched one),
  and their unsharded gradients.
- lora: the LLM's own weights frozen, adapters on its Linear layers train (rank, alpha, dropout and target
  modules from the stage's `lora`, or LLaVA's finetune_lora.sh r=128 on all linear layers where the stage sets
  none). Adapter parameters = sum over targeted Linear layers of r * (in + out), the count peft creates. On
  DDP replicas: vlmkit refuses LoRA under FSDP.
- qlora: lora with the LLM's Linear weights in 4-bit NF4 with double quantisation: 0.5 bytes per weight +
  0.127 bits of quantisation constants (QLoRA paper); the LLM's other parameters (embeddings, head, norms) and
  the adapters in fp32, as peft's prepare_model_for_kbit_training leaves them. prepare_model_for_kbit_training
  also turns gradient checkpointing on, so qlora rows always checkpoint.
lora and qlora rows appear for stages that train the LLM. The row marked `configured` is the one the config
as written would run: the stage's LoRA/QLoRA if it sets lora.r, else `config.distributed` (ddp on one GPU).

Activations (per GPU; micro-batch = ceil(stage.batch_size / gpus), since a stage's batch_size is the global
micro-batch that the ranks share; rows of `seq_len` tokens, by default `config.max_length`, which in vlmkit
includes the image tokens; `text_len` gives LLaVA's convention instead, image tokens + text tokens; a packed
stage has rows of `pack_to` tokens). The form is Korthikanti et al., "Reducing Activation Recomputation in
Large Transformer Models" (2022): per decoder layer s*b*h*(34 + 5*a*s/h) bytes without recomputation, ~2*s*b*h
with full-layer checkpointing plus one layer recomputed in full. Their 34 and 5 are for GPT-3's layer (a 4h
GELU MLP, dropout). The coefficients here were measured instead on transformers' Llama layer as vlmkit runs
it (bytes of the tensors autograd saves, `torch.autograd.graph.saved_tensors_hooks`; `tests/unit/test_plan.py`
checks the estimate against such a measurement), per token and layer, h = hidden size, i = MLP width:
  bf16 weights, layer trains: 24 h + 8 i        layer frozen (gradients only pass through): 16 h + 6 i
  fp32 weights + autocast:    42 h + 14 i                                                       24 h + 12 i
  eager attention adds 6 (trains) / 5 (frozen) bytes * heads * s; SDPA (vlmkit's default) stores no s*s
  scores. A LoRA adapter adds, per targeted Linear with input width d, 8 d (bf16) / 6 d (fp32) bytes with
  dropout, 4 d / 2 d without, + 4 r. The final norm adds ~6 h per token (bf16), ~9 h (fp32).
  Gradient checkpointing keeps the layer inputs (2 h per token and layer in bf16, 4 h in fp32) plus one layer
  in full. vlmkit checkpoints every stage when `config.gradient_checkpointing` is set (a frozen LLM too: the
  gradient crosses its layers to the connector); `checkpointing=` overrides that.
A frozen vision tower stores nothing (no gradient flows into it). A trained ViT tower: per layer and image
token 16 h + 6 i (bf16), 40 h + 14 i (fp32). The connector: (2 d_vision + 4 h) bytes per image token.
Logits: vlmkit applies the LM head only at supervised positions; at most every text position is supervised,
so N = micro-batch * (seq_len - image tokens), and the loss holds N * vocab * 10 bytes at its peak (the bf16
logits, their fp32 copy and the fp32 log-softmax that cross-entropy keeps for the backward pass).

Not counted: the CUDA context and allocator fragmentation (often 1-3 GiB and 5-10 %: treat a row within ~10 %
of the GPU's memory as marginal), the data loader's pinned buffers, and the few embedding rows vlmkit adds
for new special tokens (<image>, template tokens). Sequences are planned at their maximum length; real
batches are padded only to their longest record (vlmkit groups by length), so typical steps use less.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from vlmkit.config import ArchConfig, LoRAConfig, StageConfig
from vlmkit.connectors import build_connector, connector_class
from vlmkit.connectors.states import StateEncoders
from vlmkit.data.images import ImageTransform
from vlmkit.encoders import _VISION_HALF, VisionEncoder
from vlmkit.errors import ConfigError
from vlmkit.io import check_local_path, configs_only, loading, resolve_name
from vlmkit.llm import _auto_class
from vlmkit.llm.visual_expert import Route, add_visual_experts
from vlmkit.train.distributed import decoder_layers

GiB = 2 ** 30
STRATEGIES = ("ddp", "zero2", "fsdp", "lora", "qlora")
PRECISIONS = ("bf16", "fp32")
# LLaVA's scripts/v1_5/finetune_lora.sh, for the lora/qlora rows of a stage that sets no LoRA of its own
DEFAULT_LORA = LoRAConfig(r=128, alpha=256.0, dropout=0.05, target_modules=["all-linear"])

# bytes per parameter: (weights, gradients, optimizer state)
_BYTES = {"bf16": (2, 2, 12), "fp32": (4, 4, 8)}
NF4_BYTES = 0.5 + 0.127 / 8  # 4 bits + double-quantised absmax constants (Dettmers et al., QLoRA, 2023)

# activation bytes per token and decoder layer = C_H * h + C_I * i (+ C_ATT * heads * s for eager attention)
_LAYER = {("bf16", True): (24.0, 8.0, 6.0), ("bf16", False): (16.0, 6.0, 5.0),
          ("fp32", True): (42.0, 14.0, 6.0), ("fp32", False): (24.0, 12.0, 5.0)}
_FINAL_NORM = {"bf16": 6.5, "fp32": 9.0}          # x h bytes per token, once
_CHECKPOINT = {"bf16": 2.0, "fp32": 4.0}          # x h bytes per token and layer: the saved layer input
_LORA_INPUT = {("bf16", True): 8.0, ("bf16", False): 4.0, ("fp32", True): 6.0, ("fp32", False): 2.0}
_VIT_LAYER = {"bf16": (16.0, 6.0), "fp32": (40.0, 14.0)}
_LOGIT_BYTES = 10.0                               # bf16 logits + fp32 copy + fp32 log-softmax


@dataclass
class MetaModel:
    """The parts of a config's model on the meta device, and the shapes the plan needs."""
    vision: nn.Module
    connector: nn.Module
    causal_lm: nn.Module
    num_image_tokens: int
    vision_hidden: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    layer_params: int                     # the largest decoder layer: one FSDP unit
    quantizable: int                      # the LLM's Linear weights but the LM head (what 4-bit covers)
    vision_shape: dict | None = None      # ViT: hidden, intermediate, layers, tokens per image (CLS included)
    params: dict[str, int] = field(default_factory=dict)
    states: nn.Module | None = None       # PaLM-E's state MLPs (config.states), when the config has kinds

    def parts(self) -> dict[str, nn.Module]:
        parts = {"vision": self.vision, "connector": self.connector, "llm": self.causal_lm, "states": self.states}
        return {name: part for name, part in parts.items() if part is not None}

    @property
    def total(self) -> int:
        return sum(self.params.values())


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared (tied) tensors once, as the optimizer sees them


def _crop_size(vision_path: str) -> int | None:
    """The preprocessor's crop size when the tower's directory has one (convolutional towers need it)."""
    try:
        return ImageTransform.from_pretrained(vision_path).crop[0]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_meta(config: ArchConfig) -> MetaModel:
    """The config's vision tower, connector and LLM on the meta device: configs are read, weights never (a tiny
    backbone is not pretrained for it: `configs_only`)."""
    with configs_only():
        return _build_meta(config)


def _build_meta(config: ArchConfig) -> MetaModel:
    import transformers  # start-up: transformers, 0.76 s
    from transformers import AutoConfig, AutoModel  # start-up: transformers, 0.76 s

    vision_path = resolve_name(config.vision.name_or_path, verbose=False)
    llm_path = resolve_name(config.llm.name_or_path, verbose=False)
    check_local_path(vision_path, "--vision.name-or-path")
    check_local_path(llm_path, "--llm.name-or-path")

    with loading("--vision.name-or-path", vision_path):
        vision_hf = AutoConfig.from_pretrained(vision_path)
    with loading("--llm.name-or-path", llm_path):
        llm_hf = AutoConfig.from_pretrained(llm_path)
    with torch.device("meta"):
        if vision_hf.model_type in _VISION_HALF:  # the image half of a dual encoder, as load_vision_tower takes it
            class_name, sub = _VISION_HALF[vision_hf.model_type]
            tower = getattr(transformers, class_name)._from_config(getattr(vision_hf, sub))
        else:
            tower = AutoModel.from_config(vision_hf)
        if hasattr(tower, "vision_model") and hasattr(tower, "text_model"):
            raise ConfigError(f"{vision_path}: a {vision_hf.model_type} dual encoder; vlmkit knows how to take the "
                              f"vision half of {sorted(_VISION_HALF)} only")
        causal_lm = _auto_class(llm_hf).from_config(llm_hf)  # an encoder-decoder LLM (Flan-T5) too
        if config.llm.visual_expert:  # CogVLM: the experts count with the LLM (and train with it, or alone)
            causal_lm.visual_experts = add_visual_experts(causal_lm, Route())
    vision = VisionEncoder(tower, config.vision, _crop_size(vision_path))
    hidden = causal_lm.get_input_embeddings().embedding_dim

    connector_config, _ = connector_class(config.connector).resolve_pretrained(config.connector)  # the Q-Former's
    with torch.device("meta"):  # sizes are its BERT's (or its trained checkpoint's)
        connector = build_connector(connector_config, vision.hidden_size, hidden, vision.num_tokens)
    text = causal_lm.config.get_text_config() if hasattr(causal_lm.config, "get_text_config") else causal_lm.config
    try:
        blocks = decoder_layers(causal_lm)
    except ConfigError:
        blocks = []
    head = causal_lm.get_output_embeddings()
    quantizable = sum(m.weight.numel() for m in causal_lm.modules() if isinstance(m, nn.Linear) and m is not head)
    tower_hf = tower.config
    vision_shape = None
    if all(hasattr(tower_hf, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "patch_size",
                                          "image_size")):
        side = tower_hf.image_size // tower_hf.patch_size
        vision_shape = {"hidden": tower_hf.hidden_size, "intermediate": tower_hf.intermediate_size,
                        "layers": tower_hf.num_hidden_layers, "tokens": side * side + (1 if vision.has_cls else 0)}
    meta = MetaModel(
        vision=vision, connector=connector, causal_lm=causal_lm, num_image_tokens=connector.num_output_tokens,
        vision_hidden=vision.hidden_size, hidden=hidden,
        layers=len(blocks) or getattr(text, "num_hidden_layers", 0),
        heads=getattr(text, "num_attention_heads", 1),
        intermediate=getattr(text, "intermediate_size", None) or 4 * hidden,
        vocab=head.out_features if isinstance(head, nn.Linear) else getattr(text, "vocab_size", 0),
        layer_params=max((_count(b) for b in blocks), default=0), quantizable=quantizable,
        vision_shape=vision_shape)
    if config.states.kinds:
        with torch.device("meta"):
            meta.states = StateEncoders(config.states.kinds, hidden, config.states.hidden)
    meta.params = {name: _count(module) for name, module in meta.parts().items()}
    return meta


# -- LoRA ---------------------------------------------------------------------------------------------------
def lora_targets(causal_lm: nn.Module, lora: LoRAConfig) -> list[tuple[str, nn.Module]]:
    """The modules peft wraps for `lora.target_modules` (peft's rules: a name matches a target if it equals it
    or ends with '.' + target; 'all-linear' = the last name part of every Linear but the output layer)."""
    modules = list(causal_lm.named_modules())
    head = causal_lm.get_output_embeddings()
    if list(lora.target_modules) == ["all-linear"]:
        suffixes = {name.rsplit(".", 1)[-1] for name, m in modules if isinstance(m, nn.Linear)}
        suffixes -= {name.rsplit(".", 1)[-1] for name, m in modules if m is head}
    else:
        suffixes = set(lora.target_modules)
    matched = [(name, m) for name, m in modules
               if name and (name in suffixes or any(name.endswith("." + s) for s in suffixes))
               and isinstance(m, (nn.Linear, nn.Embedding))]
    if not matched:
        raise ConfigError(f"lora.target_modules={lora.target_modules}: none of them is a Linear layer of the LLM")
    return matched


def lora_params(causal_lm: nn.Module, lora: LoRAConfig) -> int:
    """Trainable adapter parameters: r * (in + out) per targeted Linear (A is r x in, B is out x r, no
    biases); r * (rows + width) per targeted Embedding."""
    total = 0
    for _, m in lora_targets(causal_lm, lora):
        if isinstance(m, nn.Linear):
            total += lora.r * (m.in_features + m.out_features)
        else:
            total += lora.r * (m.num_embeddings + m.embedding_dim)
    return total


# -- activations --------------------------------------------------------------------------------------------
def activation_bytes(meta: MetaModel, train: list[str], rows: int, seq_len: int, *, precision: str = "bf16",
                     attention: str = "sdpa", checkpointing: bool = False, lora: LoRAConfig | None = None,
                     images_per_row: int = 1) -> dict[str, float]:
    """Bytes kept for the backward pass in one micro-batch of `rows` x `seq_len` tokens (rules: module doc)."""
    tokens = rows * seq_len
    h, i = meta.hidden, meta.intermediate
    llm_trains = "llm" in train and lora is None
    c_h, c_i, c_att = _LAYER[(precision, llm_trains)]
    per_layer = c_h * h + c_i * i + (c_att * meta.heads * seq_len if attention == "eager" else 0.0)
    if lora is not None:
        k = _LORA_INPUT[(precision, lora.dropout > 0)]
        for _, m in lora_targets(meta.causal_lm, lora):
            width = m.in_features if isinstance(m, nn.Linear) else 0
            per_layer += (k * width + 4 * lora.r) / max(meta.layers, 1)
    per_layer *= tokens
    if checkpointing:
        llm = meta.layers * _CHECKPOINT[precision] * h * tokens + per_layer
    else:
        llm = meta.layers * per_layer
    llm += _FINAL_NORM[precision] * h * tokens
    image_tokens = rows * images_per_row * meta.num_image_tokens
    connector = 0.0
    if "connector" in train or "vision" in train:
        connector = (2 * meta.vision_hidden + 4 * h) * image_tokens * (2 if precision == "fp32" else 1)
    vision = 0.0
    if "vision" in train and meta.vision_shape:
        v = meta.vision_shape
        v_h, v_i = _VIT_LAYER[precision]
        vision = v["layers"] * (v_h * v["hidden"] + v_i * v["intermediate"]) * rows * images_per_row * v["tokens"]
    supervised = rows * max(seq_len - images_per_row * meta.num_image_tokens, 1)
    logits = supervised * (_LOGIT_BYTES * meta.vocab + 2 * h)
    return {"llm": llm, "connector": connector, "vision": vision, "logits": logits}


# -- the plan -----------------------------------------------------------------------------------------------
def _stage_lora(stage: StageConfig) -> LoRAConfig:
    return stage.lora if stage.lora.r > 0 else DEFAULT_LORA


def configured_strategy(config: ArchConfig, stage: StageConfig, gpus: int) -> str:
    if stage.lora.r > 0:
        return "qlora" if stage.lora.quantize else "lora"
    return config.distributed if gpus > 1 else "ddp"


def _strategies(stage: StageConfig, gpus: int, strategy: str | None) -> list[str]:
    if strategy is not None:
        if strategy not in STRATEGIES:
            raise ConfigError(f"strategy={strategy!r}; use one of {', '.join(STRATEGIES)}")
        if strategy in ("lora", "qlora") and "llm" not in stage.train:
            return []
        return [strategy]
    names = ["ddp"] + (["zero2", "fsdp"] if gpus > 1 else [])
    return names + (["lora", "qlora"] if "llm" in stage.train else [])


_NOTES = {"zero2": "DeepSpeed ZeRO-2 reference; not in vlmkit", "lora": "DDP replicas", "qlora": "DDP; CUDA only"}


def plan_memory(config: ArchConfig, gpus: int = 1, gpu_memory_gb: float = 80.0, strategy: str | None = None,
                micro_batch: int | None = None, seq_len: int | None = None, *, text_len: int | None = None,
                precision: str = "bf16", attention: str = "sdpa", checkpointing: bool | None = None,
                meta: MetaModel | None = None) -> list[dict]:
    """One row per (stage, strategy): parameters, per-GPU memory in GiB by kind, and whether it fits.

    `micro_batch` is per GPU (default: the stage's global batch_size shared by the GPUs); `seq_len` is the
    tokens of a row, image tokens included (default config.max_length); `text_len` instead gives image tokens
    + text_len, as LLaVA's model_max_length counts. `checkpointing` overrides vlmkit's rule; `meta` reuses a
    `build_meta(config)` result. The rules are in this module's docstring."""
    if gpus < 1:
        raise ConfigError(f"gpus must be at least 1, not {gpus}")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}; use one of {', '.join(PRECISIONS)}")
    if attention not in ("sdpa", "eager"):
        raise ConfigError(f"attention={attention!r}; use 'sdpa' or 'eager'")
    if seq_len is not None and text_len is not None:
        raise ConfigError("give seq_len (tokens per row, images included) or text_len (text tokens), not both")
    meta = meta or build_meta(config)
    w_bytes, g_bytes, o_bytes = _BYTES[precision]
    total = meta.total
    llm_params = meta.params["llm"]
    root_params = total - meta.layers * meta.layer_params
    rows_out = []
    for stage in config.stages:
        trained = list(dict.fromkeys(n.split(".", 1)[0] for n in stage.train))  # a part inside a module: the module
        unknown = set(trained) - set(meta.params)
        if unknown:
            raise ConfigError(f"stage {stage.name!r} trains unknown module(s) {sorted(unknown)}")
        rows = micro_batch or math.ceil(stage.batch_size / gpus)
        if seq_len is not None:
            length = seq_len
        elif text_len is not None:
            length = meta.num_image_tokens + text_len
        else:
            length = stage.pack_to or config.max_length
        for name in _strategies(stage, gpus, strategy):
            uses_lora = name in ("lora", "qlora")
            lora = _stage_lora(stage) if uses_lora else None
            others = sum(meta.params[p] for p in {n.split(".", 1)[0] for n in stage.train} - {"llm"})  # a part
            # inside a module (connector.language_projection) counts as its module: an upper bound
            adapters = lora_params(meta.causal_lm, lora) if uses_lora else 0
            full_llm = "llm" in stage.train and not uses_lora
            trainable = others + adapters + (llm_params if full_llm else 0)
            if name == "qlora":  # vision/connector by the convention; quantised LLM Linears; fp32 rest + adapters
                non_llm = total - llm_params
                weights = (non_llm * w_bytes + meta.quantizable * NF4_BYTES
                           + (llm_params - meta.quantizable) * 4 + adapters * 4)
                grads = others * g_bytes + adapters * 4
                optimizer = others * o_bytes + adapters * 8
            else:
                weights = (total + adapters) * w_bytes
                grads = trainable * g_bytes
                optimizer = trainable * o_bytes
            if name in ("ddp", "lora", "qlora") and gpus > 1:
                grads *= 2  # DDP's gradient buckets beside .grad
            if name == "zero2" and gpus > 1:
                grads, optimizer = grads / gpus, optimizer / gpus
            if name == "fsdp" and gpus > 1:
                root_trainable = trainable - (meta.layers * meta.layer_params if full_llm else 0)
                layer_trainable = meta.layer_params if full_llm else 0
                weights = weights / gpus + (root_params + 2 * meta.layer_params) * w_bytes
                grads = grads / gpus + (root_trainable + layer_trainable) * g_bytes
                optimizer = optimizer / gpus
            ckpt = checkpointing if checkpointing is not None else config.gradient_checkpointing
            if name == "qlora":
                ckpt = True if checkpointing is None else checkpointing
            act = activation_bytes(meta, trained, rows, length,
                                   precision="fp32" if name == "qlora" else precision, attention=attention,
                                   checkpointing=ckpt, lora=lora)
            activations = act["llm"] + act["connector"] + act["vision"]
            row_total = weights + grads + optimizer + activations + act["logits"]
            rows_out.append({
                "stage": stage.name, "strategy": name,
                "configured": name == configured_strategy(config, stage, gpus),
                "gpus": gpus, "micro_batch": rows, "seq_len": length, "checkpointing": bool(ckpt),
                "precision": precision, "lora_r": lora.r if lora else 0,
                "trainable_params": trainable, "total_params": total + adapters,
                "weights_gb": weights / GiB, "grads_gb": grads / GiB, "optimizer_gb": optimizer / GiB,
                "activations_gb": activations / GiB, "logits_gb": act["logits"] / GiB,
                "total_gb": row_total / GiB, "gpu_memory_gb": float(gpu_memory_gb),
                "fits": row_total / GiB <= gpu_memory_gb, "note": _NOTES.get(name, ""),
            })
    return rows_out


# -- printing -----------------------------------------------------------------------------------------------
def _n(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count:,}"


def format_plan(rows: list[dict]) -> str:
    """An aligned table (GiB, one decimal; * = the configured row) and one line per stage on what fits."""
    if not rows:
        return "(no rows)"
    head = ["stage", "strategy", "trainable", "of total", "batch/GPU", "seq", "ckpt", "weights", "grads",
            "optim", "activ", "logits", "total", "fits", "note"]
    body = []
    for r in rows:
        body.append([r["stage"], r["strategy"] + ("*" if r["configured"] else "") + (f" r={r['lora_r']}"
                                                                                      if r["lora_r"] else ""),
                     _n(r["trainable_params"]), _n(r["total_params"]), str(r["micro_batch"]), str(r["seq_len"]),
                     "yes" if r["checkpointing"] else "no",
                     *(f"{r[k]:.1f}" for k in ("weights_gb", "grads_gb", "optimizer_gb", "activations_gb",
                                               "logits_gb", "total_gb")),
                     "yes" if r["fits"] else "NO", r["note"]])
    widths = [max(len(line[c]) for line in [head, *body]) for c in range(len(head))]
    numeric = {2, 3, 4, 5, 7, 8, 9, 10, 11, 12}
    lines = ["  ".join(cell.rjust(w) if c in numeric else cell.ljust(w)
                       for c, (cell, w) in enumerate(zip(line, widths))).rstrip() for line in [head, *body]]
    lines.insert(1, "-" * len(lines[0]))
    first = rows[0]
    lines.append("")
    lines.append(f"per GPU, GiB; {first['gpus']} GPU(s) x {first['gpu_memory_gb']:g} GiB; * = the row this "
                 "config runs; CUDA context and fragmentation not included")
    for stage in dict.fromkeys(r["stage"] for r in rows):
        mine = [r for r in rows if r["stage"] == stage]
        fits = [f"{r['strategy']} ({r['total_gb']:.1f})" for r in mine if r["fits"]]
        too_big = [f"{r['strategy']} ({r['total_gb']:.1f})" for r in mine if not r["fits"]]
        configured = next((r for r in mine if r["configured"]), None)
        verdict = ""
        if configured is not None:
            verdict = (f"as configured ({configured['strategy']}) it " +
                       ("fits" if configured["fits"] else f"does NOT fit ({configured['total_gb']:.1f} > "
                                                          f"{configured['gpu_memory_gb']:g} GiB)") + "; ")
        lines.append(f"{stage}: {verdict}fits: {', '.join(fits) or 'none'}"
                     + (f"; too big: {', '.join(too_big)}" if too_big else ""))
    return "\n".join(lines)


def _detect(gpus: int | None, gpu_memory_gb: float | None) -> tuple[int, float]:
    if gpus is None:
        gpus = int(os.environ.get("WORLD_SIZE", "0")) or (torch.cuda.device_count() if torch.cuda.is_available()
                                                          else 0) or 1
    if gpu_memory_gb is None:
        gpu_memory_gb = (torch.cuda.get_device_properties(0).total_memory / GiB if torch.cuda.is_available()
                         else 80.0)
    return gpus, gpu_memory_gb


def memory_plan_main(config: ArchConfig, gpus: int | None = None, gpu_memory_gb: float | None = None,
                     print_fn=print, **kwargs) -> int:
    """What `vlmkit train --dry-run` runs: build on meta, print the plan. `gpus` / `gpu_memory_gb` None = this
    machine's (WORLD_SIZE or the visible CUDA devices, else 1; the first GPU's memory, else 80). Further
    keywords go to plan_memory. Returns 0 when every stage fits as configured, 1 otherwise."""
    gpus, gpu_memory_gb = _detect(gpus, gpu_memory_gb)
    meta = build_meta(config)
    rows = plan_memory(config, gpus=gpus, gpu_memory_gb=gpu_memory_gb, meta=meta, **kwargs)
    p = meta.params
    print_fn(f"{config.name} ({config.scale}), built on the meta device (configs only, no weights): "
             f"{' + '.join(f'{name} {_n(n)}' for name, n in p.items())} = {_n(meta.total)} parameters; "
             f"{meta.num_image_tokens} image tokens per image; "
             f"{kwargs.get('precision', 'bf16')} convention (vlmkit.train.plan)")
    print_fn(format_plan(rows))
    if any(not r["checkpointing"] for r in rows):
        print_fn("note: rows without gradient checkpointing keep every layer's activations "
                 "(--gradient-checkpointing recomputes them, in every stage)")
    return 0 if all(r["fits"] for r in rows if r["configured"]) else 1
