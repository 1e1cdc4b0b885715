"""Typed configuration: one place where every default lives.

An architecture is an `ArchConfig` made of part configs (vision encoder, connector, language model) and
a list of `StageConfig` (the paper's staged recipe). Presets in `vlmkit/archs/` are plain data that fill
these dataclasses; `vlmkit.archs.from_name("llava-1.5", scale="tiny", **overrides)` builds one. The command line is
derived from these fields (see `vlmkit.cli`), so a default is never written twice.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

MODULES = ("vision", "connector", "llm")


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


def _reads(connectors: tuple[str, ...], text: str, **kw) -> Any:
    """A ConnectorConfig field that only these connector types read (the others ignore it; `--help` shows it only
    for them, and setting it for another type is refused: `connector_fields`)."""
    return field(metadata={"help": text, "connectors": connectors}, **kw)


def option(default, text: str, kind: type | None = None, **metadata) -> Any:
    """A field of a command's settings dataclass (`ChatOptions`, `EvalOptions`, `ServerOptions`): its default, its
    `--help` text, and for the flag made from it (vlmkit.cli) the value type when the default is None (`kind`),
    `choices`, `metavar`."""
    return field(default=default, metadata={"help": text, **({"kind": kind} if kind else {}), **metadata})


@dataclass
class VisionConfig:
    name_or_path: str = _help("Hugging Face vision tower: a local directory or a hub id "
                              "(CLIPModel/CLIPVisionModel, SigLIP, ConvNeXt, ResNet).", default="tiny:vision")
    feature_layer: int | list[int] = _help("Which hidden state the features come from (-2 = penultimate layer); a "
                                           "list of layers concatenates their features.", default=-2)
    select: str = _help("'patch' drops the CLS token, 'cls_patch' keeps it, 'patch_mean' adds one token after the "
                        "patches: their mean (a whole-image summary that a small LLM finds in one place).",
                        default="patch")
    final_norm: bool = _help("Apply the tower's final LayerNorm (`post_layernorm`) to the selected hidden state: "
                             "BLIP-2 reads the ViT's last layer through it (LAVIS's ln_vision).", default=False)
    pad_to_square: bool = _help("Pad images to a square with the mean colour before resizing "
                                "(LLaVA-1.5's 'pad' aspect mode).", default=False)


@dataclass
class ConnectorConfig:
    type: str = _help("Connector registered in vlmkit.connectors ('linear', 'mlp2x_gelu', 'glu' = CogVLM's adapter, "
                      "'concat4' = MiniGPT-v2's token merge, 'resampler' = Qwen-VL's cross-attention resampler, "
                      "'qformer' = BLIP-2's querying transformer).", default="mlp2x_gelu")
    act: str = _reads(("mlp2x_gelu",), "Activation between the MLP's layers (a transformers ACT2FN name: gelu, "
                                       "gelu_pytorch_tanh, quick_gelu, silu...).", default="gelu")
    bias: bool = _reads(("linear", "mlp2x_gelu", "concat4"), "Whether the connector's Linear layers have biases.",
                        default=True)
    merge: int = _reads(("concat4",), "concat4: how many consecutive vision tokens (row-major, a 1 x merge strip of "
                                      "one row) are concatenated into one before the Linear; the token count must be a "
                                      "multiple of it.", default=4)
    num_queries: int = _reads(("resampler", "qformer"), "resampler: learned queries, i.e. tokens per image; a square "
                                                        "(a side x side grid for the 2-D position table), 256 = 16 x "
                                                        "16 in Qwen-VL.", default=256)
    num_heads: int = _reads(("resampler", "qformer"), "resampler: heads of its cross-attention (0 = Qwen-VL's rule, "
                                                      "embed_dim // 128, at least 1; 32 at width 4096); must divide "
                                                      "embed_dim.", default=0)
    embed_dim: int = _reads(("resampler", "qformer"), "resampler: width of the queries and the attention (0 = the "
                                                      "LLM's width, as in Qwen-VL); a multiple of 4 for the 2-D "
                                                      "sin-cos table. qformer: its BERT width (0 = 768, or the width "
                                                      "of the BERT named by connector.name_or_path).", default=0)
    name_or_path: str = _reads(("qformer",), "qformer: a BERT checkpoint (directory or hub id) whose layers initialise "
                                             "the Q-Former (BLIP-2 starts from bert-base-uncased) and whose tokenizer "
                                             "reads stage-1 text; '' = random layers of the sizes below.", default="")
    num_layers: int = _reads(("qformer",), "qformer: BERT layers (12 in BLIP-2).", default=12)
    intermediate_size: int = _reads(("qformer", "glu"), "qformer: feed-forward width (0 = 4 x embed_dim). glu: the "
                                                        "SwiGLU's inner width (0 = 8/3 of the LLM's width).", default=0)
    cross_attention_frequency: int = _reads(("qformer",), "qformer: a cross-attention to the image every this many "
                                                          "layers, starting at layer 0 (2 in BLIP-2).", default=2)
    text_input: bool = _reads(("qformer",), "qformer: the text side of the Q-Former exists (its embeddings, "
                                            "feed-forward weights and the stage-1 heads: ITC projections, ITM head, "
                                            "ITG decoder); False for a Q-Former that only ever reads images (a "
                                            "Blip2ForConditionalGeneration import).", default=True)
    proj_dim: int = _reads(("qformer",), "qformer: width of the ITC embedding space (256 in BLIP-2).", default=256)
    vocab_size: int = _reads(("qformer",), "qformer: the text side's vocabulary (0 = its tokenizer's length with "
                                           "BLIP-2's added [DEC] token; set when the model is built).", default=0)
    text_positions: int = _reads(("qformer",), "qformer: the text side's position embeddings (0 = 512, BERT's; set "
                                               "from the BERT when the model is built).", default=0)
    instruction_aware: bool = _reads(("qformer",), "qformer: the queries also read the text of the image's user turn "
                                                   "through the self-attention (BLIP-2's VQA fine-tuning gives the "
                                                   "Q-Former the question; InstructBLIP its instruction), so the "
                                                   "visual tokens depend on what is asked.", default=False)
    dropout: float = _reads(("qformer",), "qformer: dropout on its hidden states and attention probabilities (BERT's "
                                          "and BLIP-2's 0.1); a frozen Q-Former computes without it.", default=0.1)
    max_text_tokens: int = _reads(("qformer",), "qformer: stage-1 texts are cut and padded to this many Q-Former "
                                                "tokens (LAVIS's max_txt_len).", default=32)


def connector_fields(connector_type: str) -> list[str]:
    """The ConnectorConfig fields a connector type reads: `type` and the fields marked for it (all of them for a
    type registered elsewhere, whose reads vlmkit does not know)."""
    fields = dataclasses.fields(ConnectorConfig)
    marked = {t for f in fields for t in f.metadata.get("connectors", ())}
    if connector_type not in marked:
        return [f.name for f in fields]
    return [f.name for f in fields if connector_type in f.metadata.get("connectors", (connector_type,))]


_TYPED_NAMES = {"linear": "LinearConfig", "mlp2x_gelu": "MLPConfig", "concat4": "Concat4Config",
                "resampler": "ResamplerConfig", "qformer": "QFormerConfig", "glu": "GLUConfig"}
_TYPED: dict[str, type] = {}


def connector_config_class(connector_type: str) -> type:
    """One connector type's own typed config: a dataclass of `type` and the ConnectorConfig fields it reads, with
    their defaults and help (written once, in ConnectorConfig). A connector holds its config as this type, so a field
    it does not read is not there to read (`QFormerConfig` has no `merge`, `MLPConfig` no `num_queries`)."""
    if connector_type not in _TYPED:
        owned = connector_fields(connector_type)
        fields = [(f.name, f.type, field(default=connector_type if f.name == "type" else f.default,
                                         metadata=f.metadata))
                  for f in dataclasses.fields(ConnectorConfig) if f.name in owned]
        name = _TYPED_NAMES.get(connector_type) or connector_type.title().replace("_", "") + "Config"
        _TYPED[connector_type] = dataclasses.make_dataclass(name, fields, namespace={"__module__": __name__})
    return _TYPED[connector_type]


def typed_connector_config(config):
    """`config` (the ConnectorConfig a preset or checkpoint holds: every connector's fields) as its type's own
    config (`connector_config_class`); a typed config as it is."""
    if not isinstance(config, ConnectorConfig):
        return config
    cls = connector_config_class(config.type)
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


@dataclass
class LLMConfig:
    name_or_path: str = _help("Hugging Face causal LM: a local directory or a hub id.", default="tiny:llama")
    trust_remote_code: bool = _help("Run the model's own code from its directory (ChatGLM-6B ships its model as "
                                    "remote code): only for a checkpoint you trust. Taken from this command line or "
                                    "Python call alone: a preset, a saved config or --init never turns it on.",
                                    default=False)
    visual_expert: bool = _help("CogVLM: every decoder layer gets a visual expert (its own q/k/v/o projections and "
                                "MLP, initialised as copies of the layer's) that an image's tokens use, and an image "
                                "takes three positions (begin, all patches, end) instead of one per token.",
                                default=False)


@dataclass
class StateConfig:
    kinds: dict[str, int] = _help("PaLM-E: continuous observations written into the text. {'obj': 7} makes <obj> a "
                                  "token that each of a record's `states: {\"obj\": [[7 numbers], ...]}` vectors "
                                  "fills, in order, through an MLP of its own kind (the part `states`).",
                                  default_factory=dict)
    hidden: int = _help("Width of each state MLP's hidden layer (0 = the LLM's width).", default=0)


@dataclass
class LoRAConfig:
    r: int = _help("LoRA rank for the LLM in this stage (0 = no LoRA: the LLM's own weights train).", default=0)
    alpha: float = _help("LoRA alpha (the update is scaled by alpha / r).", default=16.0)
    dropout: float = _help("Dropout on the LoRA input.", default=0.05)
    target_modules: list[str] = _help("LLM Linear layers that get adapters ('all-linear' = every Linear but the "
                                      "LM head).", default_factory=lambda: ["all-linear"])
    save: str = _help("At the end of the stage: 'merge' the adapters into the weights, or keep them as an "
                      "'adapter' (also written in peft's format under adapter/).", default="merge")
    quantize: str = _help("'' or '4bit': QLoRA, the frozen LLM in 4-bit NF4 (needs a CUDA GPU and bitsandbytes).",
                          default="")


@dataclass
class StageConfig:
    name: str = _help("Stage name, used for its checkpoint directory.", default="stage")
    train: list[str] = _help("Modules that train in this stage; all others are frozen.",
                             default_factory=lambda: ["connector"])
    data: str = _help("Which data the stage reads: 'captions' (alignment) or 'instructions'.", default="instructions")
    template: str = _help("Conversation template for this stage ('' = the architecture's template).", default="")
    mixture: str = _help("Weighted data sources for this stage instead of its slot: 'SOURCE[=WEIGHT],...' (a LLaVA "
                         "JSON/JSONL path or a built-in source: easy-vqa:captions, easy-vqa:instructions, "
                         "easy-vqa:questions) or a .json file listing {source, weight, image_folder, template, "
                         "answer_prompt}. Weight 1 = each record once per epoch.", default="")
    objective: str = _help("Training objective (vlmkit.objectives): 'lm' = next-token loss on the "
                           "supervised tokens, normalised per token over the whole optimiser step.", default="lm")
    pack_to: int = _help("Pack samples into rows of this many tokens (0 = one sample per row, padded); attention "
                         "never crosses a sample and positions restart per sample.", default=0)
    share_prefix: int = _help("Rows of up to this many samples of one image after one copy of their common prefix "
                              "(system prompt, image) instead of one row per sample (0 = off): the stage batches an "
                              "image's samples together, each attends to the prefix and to itself at its own "
                              "positions, so the loss is the unshared one with fewer tokens computed (evaluation "
                              "shares prefixes the same way). For many short questions per image; decoder-only "
                              "LLMs. 4 measured best (benchmarks/shared_prefix.py).", default=0)
    image_size: int = _help("Image side in pixels for this stage (0 = the vision tower's preprocessor size). Qwen-VL "
                            "trains at 224 px and then at 448 px: a ViT's position embeddings are interpolated to the "
                            "new grid, a convolutional tower just sees more pixels, and the model is saved at the "
                            "last stage's size.", default=0)
    lr: dict[str, float] = _help("Peak learning rate per trained module.", default_factory=dict)
    max_turns: int = _help("easy-VQA instructions: questions per record (0 = all of an image's questions in one "
                           "multi-turn record).", default=0)
    epochs: float = _help("Passes over the stage's data (fractions allowed).", default=1.0)
    max_steps: int = _help("Stop after this many optimiser steps (0 = use epochs).", default=0)
    min_steps: int = _help("A floor on optimiser steps when epochs size the stage: a small data set gets more "
                           "passes instead of a schedule too short to learn (0 = no floor; ignored with max_steps).",
                           default=0)
    batch_size: int = _help("Records per micro-batch.", default=32)
    grad_accum: int = _help("Micro-batches per optimiser step.", default=1)
    warmup_ratio: float = _help("Fraction of steps spent in linear warm-up before the cosine decay.", default=0.03)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    max_grad_norm: float = _help("Gradient clipping norm (0 = off).", default=1.0)
    batch_norm: str = _help("BatchNorm layers of a part that trains: 'frozen' (eval mode, the pretrained running "
                            "statistics kept) or 'train' (normalised by each batch's statistics, running ones "
                            "updated, as in the tower's pretraining; for batches of 32 or more).", default="frozen")
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class ArchConfig:
    name: str = _help("Preset name.", default="custom")
    scale: str = _help("'tiny' (project-pretrained backbones, CPU) or 'paper' (the paper's hub checkpoints).",
                       default="tiny")
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    states: StateConfig = field(default_factory=StateConfig)
    template: str = _help("Conversation template (vlmkit.data.templates).", default="vicuna_v1")
    answer_prompt: str = _help("Appended to every question of short-answer VQA data and evaluation.", default="")
    caption_prompt: str = _help("The human turn of stage-1 caption records.", default="Describe the image briefly.")
    max_length: int = _help("Longest token sequence a record may render to.", default=1024)
    max_images: int = _help("Most images one record, chat or request may hold, each <image> anywhere in the text with "
                            "its own span of image tokens (1: a design that takes one image, as CogVLM was released).",
                            default=4)
    seed: int = _help("Seed for initialisation, data order and sampling.", default=0)
    device: str = _help("Where to train: auto (a CUDA GPU when one is visible, else the CPU), cpu, cuda, cuda:N. "
                        "Under torchrun each process takes its own GPU.", default="auto")
    bf16: bool = _help("bf16 autocast during training (measure first: slower than fp32 for tiny models on CPU).",
                       default=False)
    gradient_checkpointing: bool = _help("Recompute the LLM's layer activations in the backward pass instead of "
                                         "keeping them (less memory, about a third more compute; LLaVA trains with it).",
                                         default=False)
    save_every: int = _help("Write a resumable checkpoint (model, optimizer, schedule, RNG, data position) every N "
                            "optimiser steps; 0 = only at the end of each stage.", default=0)
    keep_last: int = _help("How many of those step checkpoints to keep (stage-end checkpoints are all kept).",
                           default=2)
    workers: int = _help("DataLoader worker processes that decode images for training batches and feature "
                         "encoding (0 = in the main process; -1 = auto: half the CPU cores up to 8, none on a "
                         "machine with 2 cores or fewer, where they take the cores training needs).", default=-1)
    feature_cache_gb: float = _help("Memory budget for a frozen encoder's cached features; larger data sets encode "
                                    "each batch as it is read instead.", default=4.0)
    box_format: str = _help("How boxes are written in the text of grounding data (generated scenes): 'plain', "
                            "'minigpt_v2' ({<x1><y1><x2><y2>} on 0-100, <p>phrase</p>), 'qwen_vl' "
                            "(<ref>phrase</ref><box>(x1,y1),(x2,y2)</box> on [0, 1000)) or 'cogvlm' ([[x0,y0,x1,y1]]).",
                            default="plain")
    task_prompts: bool = _help("Start each grounding question with MiniGPT-v2's task token ([vqa] [caption] "
                               "[grounding] [refer] [identify] [detection]).", default=False)
    coordinate_tokens: bool = _help("Give each grid value of the box format one whole token (MiniGPT-v2 <0>..<100>, "
                                    "Qwen-VL 0..999), with embeddings initialised along a smooth curve of the value "
                                    "that train even under LoRA (peft trainable_token_indices). The released models "
                                    "spell coordinates in their tokenizer's digits (false); a small LLM learns whole "
                                    "tokens far more easily.", default=False)
    distributed: str = _help("Under torchrun: 'ddp' (every process holds the whole model), 'fsdp' (parameters, "
                             "gradients and optimizer state sharded across processes, one unit per LLM layer) or "
                             "'deepspeed' (DeepSpeed ZeRO with --deepspeed-config, e.g. LLaVA's zero2.json/zero3.json "
                             "as they are; pip install deepspeed).", default="ddp")
    deepspeed_config: str = _help("A DeepSpeed JSON config for --distributed deepspeed; its 'auto' values are filled "
                                  "from the stage (batch size per GPU, accumulation, bf16, clipping, buckets) as the "
                                  "Hugging Face Trainer fills them.", default="")
    stages: list[StageConfig] = field(default_factory=list)

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ArchConfig":
        return _build(cls, data, path="config")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def stage(self, name: str) -> StageConfig:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"preset {self.name!r} has no stage {name!r}; stages: {[s.name for s in self.stages]}")


def _build(cls, data: dict, path: str):
    if not isinstance(data, dict):
        raise TypeError(f"{path}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {sorted(unknown)} for {cls.__name__}; known: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        sub = _NESTED.get((cls, name))
        if sub is StageConfig:
            kwargs[name] = [_build(StageConfig, s, f"{path}.{name}[{i}]") for i, s in enumerate(value)]
        elif sub is not None:
            kwargs[name] = _build(sub, value, f"{path}.{name}")
        else:
            kwargs[name] = copy.deepcopy(value)
    return cls(**kwargs)


_NESTED = {
    (ArchConfig, "vision"): VisionConfig,
    (ArchConfig, "connector"): ConnectorConfig,
    (ArchConfig, "llm"): LLMConfig,
    (ArchConfig, "states"): StateConfig,
    (ArchConfig, "stages"): StageConfig,
    (StageConfig, "lora"): LoRAConfig,
}


def deep_merge(base: dict, update: dict) -> dict:
    """Merge `update` into a copy of `base`; dicts merge, lists of stages merge by index or name."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key == "stages" and isinstance(value, (dict, list)) and isinstance(out.get(key), list):
            stages = out[key]
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for ref, stage_update in items:
                index = _stage_index(stages, ref)
                stages[index] = deep_merge(stages[index], stage_update)
        elif isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("lr", "lora"):
            out[key] = deep_merge(out[key], value)
        elif isinstance(value, dict) and key in ("lr", "lora") and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = copy.deepcopy(value)
    return out


def _stage_index(stages: list[dict], ref) -> int:
    if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
        index = int(ref)
        if not 0 <= index < len(stages):
            raise ValueError(f"stage index {index} out of range (the preset has {len(stages)} stages)")
        return index
    for i, stage in enumerate(stages):
        if stage.get("name") == ref:
            return i
    raise ValueError(f"no stage named {ref!r}; stages: {[s.get('name') for s in stages]}")


def apply_dotted(data: dict, dotted: dict[str, Any]) -> dict:
    """Turn {'vision.feature_layer': -1, 'stages.1.lr.llm': 1e-3} into a nested update and merge it."""
    update: dict = {}
    for key, value in dotted.items():
        parts = key.split(".")
        node = update
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return deep_merge(data, update)


def without_remote_code(data):
    """A config (dict or ArchConfig) from a preset or a file, with `llm.trust_remote_code` off: running a
    checkpoint's own Python is decided by the command that loads it, never by what a file or preset says."""
    if isinstance(data, ArchConfig):
        data.llm.trust_remote_code = False
        return data
    data = copy.deepcopy(data)
    if isinstance(data.get("llm"), dict):
        data["llm"]["trust_remote_code"] = False
    return data


def field_help(cls, name: str) -> str:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    return ""
