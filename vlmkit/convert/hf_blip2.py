"""Hugging Face's BLIP-2 format (`Blip2ForConditionalGeneration`, decoder-only LLM) into vlmkit.

The directory is read with `transformers` itself and its modules move into a vlmkit model without copying: the
`Blip2VisionModel` as the tower (read through its `post_layernorm`, as BLIP-2 does), the query tokens, Q-Former
and `language_projection` into a `qformer` connector with the same keys, and the causal LM as it is. Every Q-Former
config field that changes the computation is mapped or refused. A checkpoint whose LLM is an encoder-decoder
(Flan-T5) keeps it as one: the prompt with the queries goes to its encoder, the answer comes from its decoder
(templates `blip2_t5`, `blip2_t5_caption`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from vlmkit.archs import from_name
from vlmkit.convert.hf_llava import _image_processor_config
from vlmkit.data.images import ImageTransform
from vlmkit.data.render import IMAGE_TOKEN
from vlmkit.errors import ConfigError
from vlmkit.io import atomic_dir
from vlmkit.llm import LanguageModel
from vlmkit.llm.lora import merge_lora
from vlmkit.model.vlm import VisionLanguageModel, prepare_tokenizer
from vlmkit.model.weights import hf_from_pretrained


def arch_from_hf_config(hf_config, src: str, image_processor: dict):
    """The `blip2` preset's paper-scale config with this checkpoint's sizes, or a ConfigError naming the field."""
    q = hf_config.qformer_config
    for field, expected in (("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
        value = getattr(q, field, expected)
        if value != expected:
            raise ConfigError(f"{src}: qformer_config.{field}={value!r}; vlmkit's Q-Former uses {expected!r}")
    if q.encoder_hidden_size != hf_config.vision_config.hidden_size:
        raise ConfigError(f"{src}: qformer_config.encoder_hidden_size={q.encoder_hidden_size} but the vision tower is "
                          f"{hf_config.vision_config.hidden_size} wide")
    text = hf_config.text_config
    embed = getattr(text, "word_embed_proj_dim", None)
    if embed is not None and embed != text.hidden_size:
        raise ConfigError(f"{src}: text_config.word_embed_proj_dim={embed} but text_config.hidden_size="
                          f"{text.hidden_size}: language_projection writes {text.hidden_size}-wide tokens where the "
                          f"LLM's input embeddings are {embed} wide (transformers mixes the two silently); vlmkit "
                          "does not import this checkpoint")
    transform = ImageTransform.from_config(image_processor, source=f"{src} image processor")
    return from_name("blip2", scale="paper",
                     vision={"name_or_path": str(src), "feature_layer": -1, "select": "cls_patch", "final_norm": True,
                             "pad_to_square": transform.pad_to_square},
                     connector={"type": "qformer", "name_or_path": "", "num_queries": hf_config.num_query_tokens,
                                "embed_dim": q.hidden_size, "num_layers": q.num_hidden_layers,
                                "num_heads": q.num_attention_heads, "intermediate_size": q.intermediate_size,
                                "cross_attention_frequency": q.cross_attention_frequency,
                                "text_input": bool(q.use_qformer_text_input), "instruction_aware": False,
                                "proj_dim": hf_config.image_text_hidden_size},
                     llm={"name_or_path": str(src)},
                     # Flan-T5: the prompt ends with </s> and the answer is the decoder's (templates blip2_t5*)
                     **({} if hf_config.use_decoder_only_language_model else T5_TEMPLATES))


# the blip2 preset's templates for an encoder-decoder LLM (Flan-T5): `--template blip2_t5
# --generative.template blip2_t5_caption` on the command line
T5_TEMPLATES = {"template": "blip2_t5", "stages__generative__template": "blip2_t5_caption"}


def from_hf(src: str | os.PathLike, *, dtype=None, device_map=None, verbose: bool = True):
    """A vlmkit `VisionLanguageModel` from a `Blip2ForConditionalGeneration` directory or hub id (OPT or T5)."""
    from transformers import AutoConfig, AutoTokenizer, Blip2ForConditionalGeneration  # start-up: transformers, 0.76 s

    src = str(src)
    hf_config = AutoConfig.from_pretrained(src)
    image_processor = _image_processor_config(src)
    arch = arch_from_hf_config(hf_config, src, image_processor)
    tokenizer = AutoTokenizer.from_pretrained(src)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if IMAGE_TOKEN in tokenizer.get_vocab() else None
    if image_token_id != hf_config.image_token_id:
        raise ConfigError(f"{src}: image_token_id={hf_config.image_token_id} but vlmkit's image placeholder "
                          f"{IMAGE_TOKEN!r} is id {image_token_id} in its tokenizer")
    kwargs = {"attn_implementation": "sdpa"}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    hf = hf_from_pretrained(Blip2ForConditionalGeneration, src, **kwargs)
    llm = LanguageModel(hf.language_model)
    transform = ImageTransform.from_config(image_processor, pad_to_square=arch.vision.pad_to_square)
    model = VisionLanguageModel._assemble(arch, hf.vision_model, llm, prepare_tokenizer(tokenizer, llm), transform)
    connector = model.connector
    weight = hf.language_projection.weight
    connector.to(device=weight.device, dtype=weight.dtype)
    state = {"query_tokens": hf.query_tokens, **{f"qformer.{k}": v for k, v in hf.qformer.state_dict().items()},
             **{f"language_projection.{k}": v for k, v in hf.language_projection.state_dict().items()}}
    try:
        missing, unexpected = connector.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        mismatch = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise ConfigError(f"{src}: the Q-Former's weights disagree with its config.json: {mismatch}") from None
    missing = [k for k in missing if not k.startswith(_STAGE1_PARTS)]
    if missing or unexpected:
        raise ConfigError(f"{src}: the Q-Former's weights do not map onto vlmkit's (missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]})")
    with torch.no_grad():
        connector.query_tokens.copy_(hf.query_tokens)
    return model.eval()


# the stage-1 heads a Blip2ForConditionalGeneration checkpoint does not have (they stay as initialised)
_STAGE1_PARTS = ("embeddings.", "vision_projection.", "text_projection.", "itm_head.", "temp", "itg_head.")


def to_hf(model, out: str | os.PathLike):
    """Write a Q-Former model as a `Blip2ForConditionalGeneration` + `Blip2Processor` directory (atomically).

    The format holds BLIP-2's own parts only: a `Blip2VisionModel` tower read at its last layer through its final
    LayerNorm (all tokens, CLS included), the Q-Former's image side (the stage-1 text side and heads are left out,
    as Hugging Face's checkpoints leave them out), the projection and a decoder-only LLM."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor  # start-up
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil  # start-up

    tower = model.vision.tower
    vision = model.config.vision
    problems = []
    if model.config.connector.type != "qformer":
        problems.append(f"its connector is {model.config.connector.type!r}, not a Q-Former")
    elif model.config.connector.instruction_aware:
        problems.append("its Q-Former reads the question (connector.instruction_aware); Blip2ForConditionalGeneration's "
                        "reads the image alone (InstructBLIP's format would hold it)")
    if getattr(tower.config, "model_type", "") != "blip_2_vision_model":
        problems.append(f"its vision tower is {getattr(tower.config, 'model_type', type(tower).__name__)!r}; the "
                        "format's tower is a Blip2VisionModel (EVA ViT)")
    if (vision.feature_layer, vision.select, vision.final_norm) != (-1, "cls_patch", True):
        problems.append(f"it reads the tower at feature_layer={vision.feature_layer}, select={vision.select!r}, "
                        f"final_norm={vision.final_norm}; the format reads the last layer, all tokens, normalised")
    if not model.image_transform.resize_exact:
        problems.append("its images are resized and centre-cropped; BLIP-2's image processor resizes exactly")
    if model.llm is None:
        problems.append("it has no language model (a stage-1 run)")
    if problems:
        raise ConfigError("cannot export to Blip2ForConditionalGeneration: " + "; ".join(problems))
    merge_lora(model.llm)
    llm = model.llm.model
    text_config = llm.config
    q = model.connector.hf_config
    qformer_config = q.to_dict()
    qformer_config["use_qformer_text_input"] = False
    config = Blip2Config(vision_config=tower.config.to_dict(), qformer_config=qformer_config,
                         text_config=text_config.to_dict(), num_query_tokens=model.config.connector.num_queries,
                         image_text_hidden_size=model.config.connector.proj_dim, image_token_index=model.image_token_id,
                         tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))
    connector = model.connector.state_dict()
    text_side = re.compile(r"^qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")
    state = {"query_tokens": connector["query_tokens"]}
    state.update({key: value for key, value in connector.items()
                  if key.startswith(("qformer.", "language_projection.")) and not text_side.match(key)})
    with torch.device("meta"):
        hf = Blip2ForConditionalGeneration(config)
    hf.vision_model = tower
    hf.language_model = llm
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    missing = [key for key in missing if not key.startswith(("vision_model.", "language_model."))]
    if missing or unexpected:
        raise ConfigError(f"the Q-Former does not map onto Blip2ForConditionalGeneration (missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]})")
    hf.config.dtype = next(model.parameters()).dtype
    fields = model.image_transform.to_config()
    image_processor = BlipImageProcessorPil(size={"height": model.image_transform.crop[0],
                                                  "width": model.image_transform.crop[1]},
                                            image_mean=fields.get("image_mean"), image_std=fields.get("image_std"),
                                            resample=fields.get("resample"))
    processor = Blip2Processor(image_processor=image_processor, tokenizer=model.tokenizer,
                               num_query_tokens=model.config.connector.num_queries)
    out = Path(out)
    with atomic_dir(out) as tmp:
        hf.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out
