"""Hugging Face's BLIP-2 format (`Blip2ForConditionalGeneration`, decoder-only LLM) into vlmkit.

The directory is read with `transformers` itself and its modules move into a vlmkit model without copying: the
`Blip2VisionModel` as the tower (read through its `post_layernorm`, as BLIP-2 does), the query tokens, Q-Former
and `language_projection` into a `qformer` connector with the same keys, and the causal LM as it is. Every Q-Former
config field that changes the computation is mapped or refused. A checkpoint whose LLM is an encoder-decoder
(Flan-T5) is refused with a reason: vlmkit's assembly has no encoder-decoder path yet.
"""
from __future__ import annotations

import os

from vlmkit.config import from_name
from vlmkit.errors import ConfigError


def arch_from_hf_config(hf_config, src: str, image_processor: dict):
    """The `blip2` preset's paper-scale config with this checkpoint's sizes, or a ConfigError naming the field."""
    from vlmkit.data.images import ImageTransform

    if not hf_config.use_decoder_only_language_model:
        raise ConfigError(f"{src}: its language model is a {hf_config.text_config.model_type} encoder-decoder; vlmkit "
                          "imports BLIP-2 checkpoints with a decoder-only LLM (OPT, LLaMA-style) only, so far")
    q = hf_config.qformer_config
    for field, expected in (("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
        value = getattr(q, field, expected)
        if value != expected:
            raise ConfigError(f"{src}: qformer_config.{field}={value!r}; vlmkit's Q-Former uses {expected!r}")
    if q.encoder_hidden_size != hf_config.vision_config.hidden_size:
        raise ConfigError(f"{src}: qformer_config.encoder_hidden_size={q.encoder_hidden_size} but the vision tower is "
                          f"{hf_config.vision_config.hidden_size} wide")
    transform = ImageTransform.from_config(image_processor, source=f"{src} image processor")
    return from_name("blip2", scale="paper",
                     vision={"name_or_path": str(src), "feature_layer": -1, "select": "cls_patch", "final_norm": True,
                             "pad_to_square": transform.pad_to_square},
                     connector={"type": "qformer", "name_or_path": "", "num_queries": hf_config.num_query_tokens,
                                "embed_dim": q.hidden_size, "num_layers": q.num_hidden_layers,
                                "num_heads": q.num_attention_heads, "intermediate_size": q.intermediate_size,
                                "cross_attention_frequency": q.cross_attention_frequency,
                                "text_input": bool(q.use_qformer_text_input),
                                "proj_dim": hf_config.image_text_hidden_size},
                     llm={"name_or_path": str(src)})


def from_hf(src: str | os.PathLike, *, dtype=None, device_map=None, verbose: bool = True):
    """A vlmkit `VisionLanguageModel` from a `Blip2ForConditionalGeneration` directory or hub id."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, Blip2ForConditionalGeneration

    from vlmkit.convert.hf_llava import _image_processor_config
    from vlmkit.data.images import ImageTransform
    from vlmkit.data.render import IMAGE_TOKEN
    from vlmkit.llm import LanguageModel
    from vlmkit.model.vlm import VisionLanguageModel, prepare_tokenizer

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
    hf = Blip2ForConditionalGeneration.from_pretrained(src, **kwargs)
    llm = LanguageModel(hf.language_model)
    transform = ImageTransform.from_config(image_processor, pad_to_square=arch.vision.pad_to_square)
    model = VisionLanguageModel._assemble(arch, hf.vision_model, llm, prepare_tokenizer(tokenizer, llm), transform)
    connector = model.connector
    weight = hf.language_projection.weight
    connector.to(device=weight.device, dtype=weight.dtype)
    state = {"query_tokens": hf.query_tokens, **{f"qformer.{k}": v for k, v in hf.qformer.state_dict().items()},
             **{f"language_projection.{k}": v for k, v in hf.language_projection.state_dict().items()}}
    missing, unexpected = connector.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(_STAGE1_PARTS)]
    if missing or unexpected:
        raise ConfigError(f"{src}: the Q-Former's weights do not map onto vlmkit's (missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]})")
    with torch.no_grad():
        connector.query_tokens.copy_(hf.query_tokens)
    return model.eval()


# the stage-1 heads a Blip2ForConditionalGeneration checkpoint does not have (they stay as initialised)
_STAGE1_PARTS = ("embeddings.", "vision_projection.", "text_projection.", "itm_head.", "temp", "itg_head.")
