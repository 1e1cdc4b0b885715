"""Hugging Face's LLaVA format (`LlavaForConditionalGeneration`) in and out.

Import reads the directory with `transformers` itself (so every key layout, shard index, dtype and
`device_map` it understands works here too) and moves its modules into a vlmkit model without copying:
the vision tower as is, the language model as a causal LM (base model + LM head), the projector into a
`mlp2x_gelu` connector. Every config field that changes the computation is mapped onto a vlmkit field;
one that has no vlmkit equivalent is a `ConfigError`, never a silent difference.

Export does the reverse and writes with `transformers`' own `save_pretrained`, plus a `LlavaProcessor`
(image processor, tokenizer, chat template) so `AutoProcessor.from_pretrained` works on the result.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from vlmkit.archs import from_name
from vlmkit.config import ArchConfig
from vlmkit.data.images import ImageTransform
from vlmkit.data.render import IMAGE_TOKEN
from vlmkit.data.templates import fill, get_template
from vlmkit.errors import ConfigError
from vlmkit.io import atomic_dir
from vlmkit.llm import LanguageModel
from vlmkit.llm.lora import merge_lora
from vlmkit.model.vlm import VisionLanguageModel, prepare_tokenizer
from vlmkit.model.weights import hf_from_pretrained

VLMKIT_SIDECAR = "vlmkit_arch.json"  # the preset (template, stages…) travels with an export for a lossless return
_VIT_TOWERS = {"clip_vision_model": True, "siglip_vision_model": False}  # model_type -> has a CLS token


def _image_processor_config(src: str) -> dict:
    from transformers.utils import cached_file  # start-up: transformers, 0.76 s

    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = cached_file(src, name, _raise_exceptions_for_missing_entries=False)
        if path:
            data = json.loads(Path(path).read_text())
            if key is None:
                return data
            if key in data:
                return data[key]
    raise ConfigError(f"{src}: no preprocessor_config.json or processor_config.json; the image size, mean and std "
                      "must be known")


def arch_from_hf_config(hf_config, src: str, image_processor: dict, preset: str = "llava-1.5") -> ArchConfig:
    """The vlmkit config equivalent to a `LlavaConfig`, or a ConfigError naming the field it cannot honour."""
    vision_type = hf_config.vision_config.model_type
    if vision_type not in _VIT_TOWERS:
        raise ConfigError(f"{src}: vision tower {vision_type!r} is not one vlmkit imports from the LLaVA format "
                          f"({', '.join(_VIT_TOWERS)})")
    strategy = hf_config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ConfigError(f"{src}: vision_feature_select_strategy={strategy!r}; vlmkit knows 'default' and 'full'")
    has_cls = _VIT_TOWERS[vision_type]
    if strategy == "default" and not has_cls:
        raise ConfigError(f"{src}: vision_feature_select_strategy='default' drops the first token, but a "
                          f"{vision_type} has no CLS token, so it would drop a real patch; vlmkit refuses that")
    layer = hf_config.vision_feature_layer
    layer = list(layer) if isinstance(layer, (list, tuple)) else int(layer)
    transform = ImageTransform.from_config(image_processor, source=f"{src} image processor")
    return from_name(preset, scale="paper",
                     vision={"name_or_path": str(src), "feature_layer": layer,
                             "select": "cls_patch" if has_cls and strategy == "full" else "patch",
                             "pad_to_square": transform.pad_to_square},
                     connector={"type": "mlp2x_gelu", "act": hf_config.projector_hidden_act,
                                "bias": bool(getattr(hf_config, "multimodal_projector_bias", True))},
                     llm={"name_or_path": str(src)})


def causal_lm_from_parts(text_config, base_model: torch.nn.Module, lm_head: torch.nn.Module) -> torch.nn.Module:
    """An `AutoModelForCausalLM` whose base model and head are the given modules (no weights copied)."""
    from transformers import AutoModelForCausalLM  # start-up: transformers, 0.76 s

    with torch.device("meta"):
        causal = AutoModelForCausalLM.from_config(text_config)
    setattr(causal, causal.base_model_prefix, base_model)
    causal.set_output_embeddings(lm_head)
    left = [name for name, t in [*causal.named_parameters(), *causal.named_buffers()] if t.is_meta]
    if left:
        raise ConfigError(f"{type(causal).__name__} has tensors outside its base model and head ({left[:3]}); "
                          "vlmkit cannot assemble it from a LLaVA checkpoint")
    return causal


def hf_arch(src: str, preset: str = "llava-1.5"):
    """The vlmkit config of a Hugging Face LLaVA directory or hub id, read from its config files alone (no
    weights): (ArchConfig, the HF config, the image-processor config)."""
    from transformers import AutoConfig  # start-up: transformers, 0.76 s

    hf_config = AutoConfig.from_pretrained(src)
    if hf_config.model_type != "llava":
        hint = " (an original LLaVA checkpoint: use `vlmkit convert from-llava`)" \
            if hf_config.model_type.startswith("llava_") else ""
        raise ConfigError(f"{src}: model_type {hf_config.model_type!r} is not Hugging Face's 'llava'{hint}")
    image_processor = _image_processor_config(src)
    arch = arch_from_hf_config(hf_config, src, image_processor, preset)
    sidecar = Path(src) / VLMKIT_SIDECAR
    if sidecar.exists():  # an export of ours: restore the template, prompts and stages it was trained with
        saved = ArchConfig.from_dict(json.loads(sidecar.read_text()))
        saved.vision, saved.connector, saved.llm = arch.vision, arch.connector, arch.llm
        arch = saved
    return arch, hf_config, image_processor


def from_hf(src: str | os.PathLike, *, preset: str = "llava-1.5", dtype=None, device_map=None, verbose: bool = True):
    """A vlmkit `VisionLanguageModel` from a `LlavaForConditionalGeneration` directory or hub id."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration  # start-up: transformers, 0.76 s

    src = str(src)
    arch, hf_config, image_processor = hf_arch(src, preset)

    tokenizer = AutoTokenizer.from_pretrained(src)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if IMAGE_TOKEN in tokenizer.get_vocab() else None
    if image_token_id != hf_config.image_token_index:
        found = tokenizer.convert_ids_to_tokens(hf_config.image_token_index) \
            if hf_config.image_token_index < len(tokenizer) else None
        raise ConfigError(f"{src}: image_token_index={hf_config.image_token_index} is token {found!r} in the "
                          f"tokenizer, but vlmkit's image placeholder is {IMAGE_TOKEN!r} (id {image_token_id})")

    kwargs = {"attn_implementation": "sdpa"}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    hf = hf_from_pretrained(LlavaForConditionalGeneration, src, **kwargs)
    llm = LanguageModel(causal_lm_from_parts(hf.config.text_config, hf.model.language_model, hf.lm_head))
    transform = ImageTransform.from_config(image_processor, pad_to_square=arch.vision.pad_to_square)
    model = VisionLanguageModel._assemble(arch, hf.model.vision_tower, llm, prepare_tokenizer(tokenizer, llm),
                                          transform)
    projector = hf.model.multi_modal_projector
    weight = projector.linear_1.weight
    model.connector.to(device=weight.device, dtype=weight.dtype)
    model.connector.load_state_dict(projector.state_dict())
    if model.num_image_tokens != hf_config.image_seq_length and verbose:
        print(f"note: {src} says image_seq_length={hf_config.image_seq_length}; its vision tower gives "
              f"{model.num_image_tokens} tokens per image, which vlmkit uses")
    return model.eval()


# -- export ---------------------------------------------------------------------------------------------------
def check_exportable(model) -> str:
    """Raise ConfigError unless the HF LLaVA format can express `model`; return the select strategy."""
    if model.config.connector.type != "mlp2x_gelu":
        raise ConfigError(f"connector {model.config.connector.type!r} cannot be written in Hugging Face's LLaVA "
                          "format: its projector is always Linear -> activation -> Linear (vlmkit's 'mlp2x_gelu')")
    tower_type = model.vision.tower.config.model_type
    if tower_type not in _VIT_TOWERS:
        raise ConfigError(f"vision tower {tower_type!r} cannot be written in Hugging Face's LLaVA format: it selects "
                          "ViT hidden states (B, tokens, dim); a convolutional tower's (B, C, H, W) maps would need "
                          "vlmkit's flattening")
    if model.config.vision.select == "patch_mean":
        raise ConfigError("vision.select='patch_mean' adds a mean-pooled image token that Hugging Face's LLaVA "
                          "format has no field for (its strategies are 'default' and 'full')")
    return "default" if model.vision.has_cls and model.config.vision.select == "patch" else "full"


def chat_template_jinja(template, tokenizer) -> str:
    """A Jinja chat template that renders exactly what vlmkit's renderer does, for `apply_chat_template`."""
    if "{n}" in template.image_format:
        raise ConfigError(f"template {template.name!r} numbers its images ({template.image_format!r}), which the "
                          "exported chat template does not do yet")

    def lit(text: str) -> str:
        return json.dumps(fill(text, tokenizer))

    user_before, user_after = template.user_format.split("{content}")
    assistant_before, assistant_after = template.assistant_format.split("{content}")
    system_before, system_after = template.system_format.split("{system}")
    system_text = "{{ " + lit(system_before) + " + system + " + lit(system_after) + " }}"
    return (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set messages = messages[1:] %}{% else %}{% set system = " + lit(template.system) + " %}{% endif %}"
        + ("{{ bos_token }}" if template.add_bos else "")
        + ("" if template.system_in_user else "{% if system %}" + system_text + "{% endif %}")
        + "{{ " + lit(template.begin) + " }}"
        + "{% for message in messages %}"
        "{% set ns = namespace(text='') %}"
        "{% if message['content'] is string %}{% set ns.text = message['content'] | replace('<image>', "
        + lit(template.image_format) + ") %}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}{% set ns.text = ns.text + "
        + lit(template.image_format) + " + '\\n' %}"
        "{% elif part['type'] == 'text' %}{% set ns.text = ns.text + part['text'] %}{% endif %}{% endfor %}{% endif %}"
        "{% set text = ns.text %}"
        "{% if message['role'] == 'user' %}"
        + ("{% if loop.first and system %}" + system_text.replace("}}", "") .replace("{{ ", "{% set text = ")
           + " + text %}{% endif %}" if template.system_in_user else "")
        + "{{ " + lit(user_before) + " + text + " + lit(user_after) + " + " + lit(template.assistant_prefix) + " }}"
        "{% else %}{{ " + lit(assistant_before) + " + text + " + lit(assistant_after) + " + " + lit(template.stop)
        + " + " + lit(template.turn_end) + " }}{% endif %}{% endfor %}"
    )


def to_hf(model, out: str | os.PathLike) -> Path:
    """Write `model` as a `LlavaForConditionalGeneration` + `LlavaProcessor` directory (atomically).

    LoRA adapters the model still carries are merged into its weights first (this changes `model`)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration  # start-up: transformers, 0.76 s

    strategy = check_exportable(model)
    merge_lora(model.llm)  # kept LoRA adapters are folded into the weights (in place): the format has no adapters
    llm = model.llm.model
    text_config = llm.config
    config = LlavaConfig(
        vision_config=model.vision.tower.config.to_dict(), text_config=text_config.to_dict(),
        image_token_index=model.image_token_id, image_seq_length=model.num_image_tokens,
        projector_hidden_act=model.config.connector.act,
        multimodal_projector_bias=model.config.connector.bias,
        vision_feature_layer=model.config.vision.feature_layer, vision_feature_select_strategy=strategy,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)
    hf.model.vision_tower = model.vision.tower
    hf.model.language_model = getattr(llm, llm.base_model_prefix)
    hf.lm_head = llm.get_output_embeddings()
    hf.model.multi_modal_projector.load_state_dict(model.connector.state_dict(), assign=True)
    hf.config.dtype = next(model.parameters()).dtype
    out = Path(out)
    with atomic_dir(out) as tmp:
        hf.save_pretrained(tmp)
        processor = _processor(model, strategy, chat_template_jinja(get_template(model.config.template), model.tokenizer))
        processor.save_pretrained(tmp)
        (Path(tmp) / VLMKIT_SIDECAR).write_text(model.config.to_json())
    return out


def _processor(model, strategy: str, chat_template: str):
    from transformers import LlavaProcessor  # start-up: transformers, 0.76 s
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # start-up
    from transformers.models.llava.image_processing_pil_llava import (  # start-up: transformers, 0.76 s
        LlavaImageProcessorPil,
    )
    from transformers.models.siglip.image_processing_pil_siglip import (  # start-up: transformers, 0.76 s
        SiglipImageProcessorPil,
    )

    fields = model.image_transform.to_config()
    kind = fields.pop("image_processor_type")
    if model.image_transform.pad_to_square:
        if kind != "CLIPImageProcessor":
            raise ConfigError("padding to a square with an exact resize has no Hugging Face image processor")
        image_processor = LlavaImageProcessorPil(do_pad=True, **fields)
    else:
        image_processor = (CLIPImageProcessorPil if kind == "CLIPImageProcessor" else SiglipImageProcessorPil)(**fields)
    return LlavaProcessor(image_processor=image_processor, tokenizer=model.tokenizer,
                          patch_size=model.vision.tower.config.patch_size,
                          vision_feature_select_strategy=strategy,
                          num_additional_image_tokens=1 if model.vision.has_cls else 0,
                          chat_template=chat_template)
