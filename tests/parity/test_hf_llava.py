"""Parity with transformers' LlavaForConditionalGeneration: import, export, logits, greedy generations.

Tiny random HF LLaVA models are built here (no network) in several configurations that change the
computation: both select strategies, feature layers (negative, non-negative, a list), grouped-query
attention, tied embeddings, RoPE scaling, projector activation and bias, CLIP and SigLIP towers, Llama and
Qwen2 text models.
"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vlmkit.convert import from_hf, to_hf
from vlmkit.errors import ConfigError

VISION = {
    "clip": dict(model_type="clip_vision_model", image_size=32, patch_size=8, hidden_size=48, intermediate_size=64,
                 num_hidden_layers=3, num_attention_heads=4),
    "siglip": dict(model_type="siglip_vision_model", image_size=32, patch_size=8, hidden_size=48,
                   intermediate_size=64, num_hidden_layers=3, num_attention_heads=4),
}
CASES = {
    "default-penultimate-gqa": dict(vision="clip", strategy="default", layer=-2,
                                    text=dict(model_type="llama", num_key_value_heads=2)),
    "full-layer-list-tied": dict(vision="clip", strategy="full", layer=[-3, -1], act="gelu_pytorch_tanh",
                                 bias=False, text=dict(model_type="llama", num_key_value_heads=4,
                                                       tie_word_embeddings=True)),
    "nonnegative-layer-rope-scaling": dict(vision="clip", strategy="default", layer=1, pad=True,
                                           text=dict(model_type="llama", num_key_value_heads=1,
                                                     rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                      "rope_theta": 500000.0})),
    "siglip-qwen2": dict(vision="siglip", strategy="full", layer=-1,
                         text=dict(model_type="qwen2", num_key_value_heads=2)),
}


@pytest.fixture(scope="module")
def tokenizer(backbones):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(backbones["tokenizer"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def build_hf_llava(directory, tokenizer, case: dict, seed: int = 0):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    text = dict(vocab_size=len(tokenizer) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, max_position_embeddings=256)
    text.update(case["text"])
    config = LlavaConfig(vision_config=dict(VISION[case["vision"]]), text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy=case["strategy"], vision_feature_layer=case["layer"],
                         projector_hidden_act=case.get("act", "gelu"),
                         multimodal_projector_bias=case.get("bias", True),
                         tie_word_embeddings=text.get("tie_word_embeddings", False))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random init leaves some parts at zero; make every weight matter
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(directory)
    if case["vision"] == "siglip":
        image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    elif case.get("pad"):
        image_processor = LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 do_pad=True)
    else:
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy=case["strategy"],
                               num_additional_image_tokens=1 if case["vision"] == "clip" else 0)
    processor.save_pretrained(directory)
    return model, processor


def sample_inputs(processor):
    torch.manual_seed(1)
    image = Image.fromarray((torch.rand(30, 44, 3) * 255).to(torch.uint8).numpy())
    inputs = processor(images=[image], text=["USER: <image>\nWhat colour is the shape? ASSISTANT:"],
                       return_tensors="pt")
    return image, inputs


def our_logits(model, inputs):
    with torch.no_grad():
        _, logits = model(inputs["input_ids"], attention_mask=inputs["attention_mask"], image_counts=[1],
                          pixel_values=inputs["pixel_values"])
    return logits


def hf_greedy(hf, inputs, steps: int) -> list[int]:
    out = hf.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("name", list(CASES))
def test_import_export_parity(name, tokenizer, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlmkit.infer.generate import GenerationConfig, generate

    hf, processor = build_hf_llava(tmp_path / "hf", tokenizer, CASES[name])
    image, inputs = sample_inputs(processor)
    with torch.no_grad():
        expected = hf(**inputs).logits
    model = from_hf(tmp_path / "hf", verbose=False)
    assert model.num_image_tokens == int((inputs["input_ids"] == hf.config.image_token_index).sum())
    torch.testing.assert_close(our_logits(model, inputs), expected, atol=1e-4, rtol=1e-4)

    # the image transform reads the same processor config (PIL resampling differs by rounding only)
    torch.testing.assert_close(model.image_transform(image), inputs["pixel_values"][0], atol=2e-2, rtol=0)

    steps = 8
    ours = generate(model, [inputs["input_ids"][0].tolist()], [1], pixel_values=inputs["pixel_values"],
                    config=GenerationConfig(max_new_tokens=steps), stop_ids=set())[0]
    assert ours == hf_greedy(hf, inputs, steps)

    # export -> transformers loads it -> same logits; and back into vlmkit -> same logits
    to_hf(model, tmp_path / "export")
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    reprocessor = AutoProcessor.from_pretrained(tmp_path / "export")
    reinputs = reprocessor(images=[image], text=["USER: <image>\nWhat colour is the shape? ASSISTANT:"],
                           return_tensors="pt")
    assert torch.equal(reinputs["input_ids"], inputs["input_ids"])
    torch.testing.assert_close(reinputs["pixel_values"], inputs["pixel_values"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-4, rtol=1e-4)
    again = from_hf(tmp_path / "export", verbose=False)
    torch.testing.assert_close(our_logits(again, inputs), expected, atol=1e-4, rtol=1e-4)


def test_exported_chat_template_renders_like_vlmkit(tokenizer, tmp_path):
    from transformers import AutoProcessor

    from vlmkit.data.render import render_conversation
    from vlmkit.data.templates import get_template

    build_hf_llava(tmp_path / "hf", tokenizer, CASES["default-penultimate-gqa"])
    model = from_hf(tmp_path / "hf", verbose=False)
    to_hf(model, tmp_path / "export")
    processor = AutoProcessor.from_pretrained(tmp_path / "export")
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "circle"}]},
        {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]},
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    ours = render_conversation([{"role": "user", "content": "<image>\nWhat shape is it?"},
                                {"role": "assistant", "content": "circle"},
                                {"role": "user", "content": "And its colour?"}],
                               get_template(model.config.template), model.tokenizer, num_image_tokens=1,
                               add_generation_prompt=True)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ours.input_ids


def test_export_round_trip_keeps_the_preset(make_model, tmp_path):
    model = make_model("llava-1.5", answer_prompt="Short answer.")
    to_hf(model, tmp_path / "export")
    back = from_hf(tmp_path / "export", verbose=False)
    assert back.config.answer_prompt == "Short answer." and back.config.template == model.config.template
    assert back.config.stages == model.config.stages
    ids = torch.tensor([[model.tokenizer.bos_token_id] + [model.image_token_id] * model.num_image_tokens + [5, 6]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(ids, image_counts=[1], pixel_values=pixels)[1],
                                   model(ids, image_counts=[1], pixel_values=pixels)[1])


def test_what_the_hf_format_cannot_express_is_refused(make_model, tmp_path):
    with pytest.raises(ConfigError, match="connector 'linear' cannot be written"):
        to_hf(make_model("llava"), tmp_path / "a")
    with pytest.raises(ConfigError, match="vision tower 'resnet' cannot be written"):
        to_hf(make_model("llava-1.5", vision="resnet", feature_layer=-1), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_import_refuses_what_it_cannot_honour(tokenizer, tmp_path):
    build_hf_llava(tmp_path / "hf", tokenizer, dict(CASES["siglip-qwen2"], strategy="default"))
    with pytest.raises(ConfigError, match="has no CLS token"):
        from_hf(tmp_path / "hf", verbose=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.update(vision_feature_select_strategy="full", image_token_index=5)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="image_token_index=5 is token .* placeholder is '<image>'"):
        from_hf(tmp_path / "hf", verbose=False)


def write_original_llava(hf, directory, tower_dir, projector: str = "mlp2x_gelu", pickle: bool = False):
    """Lay out `hf`'s weights as the original LLaVA repository saves them (LlavaLlamaForCausalLM)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    config = hf.config.text_config.to_dict()
    config.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"], mm_vision_tower=str(tower_dir),
                  mm_projector_type=projector, mm_vision_select_layer=hf.config.vision_feature_layer,
                  mm_vision_select_feature="patch", mm_hidden_size=hf.config.vision_config.hidden_size,
                  image_aspect_ratio="pad", mm_use_im_start_end=False, mm_use_im_patch_token=False,
                  mm_patch_merge_type="flat")
    (directory / "config.json").write_text(json.dumps(config))
    state = {f"model.{k}": v for k, v in hf.model.language_model.state_dict().items()}
    state["lm_head.weight"] = hf.lm_head.weight
    projector_state = hf.model.multi_modal_projector.state_dict()
    state.update({f"model.mm_projector.{k.replace('linear_1', '0').replace('linear_2', '2')}": v
                  for k, v in projector_state.items()})
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    if pickle:
        torch.save(state, directory / "pytorch_model.bin")
    else:
        save_file(state, directory / "model.safetensors")
    hf.model.vision_tower.save_pretrained(tower_dir)


def test_original_llava_layout_imports_with_the_same_logits(tokenizer, backbones, tmp_path):
    from transformers import AutoTokenizer

    from vlmkit.convert import from_llava_original

    hf, processor = build_hf_llava(tmp_path / "hf", tokenizer, CASES["default-penultimate-gqa"])
    tower_dir = tmp_path / "clip-tower"
    write_original_llava(hf, tmp_path / "orig", tower_dir)
    processor.image_processor.save_pretrained(tower_dir)
    AutoTokenizer.from_pretrained(backbones["tokenizer"]).save_pretrained(tmp_path / "orig")  # no <image> token
    image, inputs = sample_inputs(processor)
    with torch.no_grad():
        expected = hf(**inputs).logits

    model = from_llava_original(tmp_path / "orig")
    assert model.config.connector.type == "mlp2x_gelu" and model.config.vision.pad_to_square
    ids = inputs["input_ids"].clone()
    ids[ids == hf.config.image_token_index] = model.image_token_id  # vlmkit added its own placeholder token
    with torch.no_grad():
        _, logits = model(ids, attention_mask=inputs["attention_mask"], image_counts=[1],
                          pixel_values=inputs["pixel_values"])
    torch.testing.assert_close(logits[..., :expected.shape[-1]], expected, atol=1e-4, rtol=1e-4)

    # pickled weights are refused unless the user says they trust them
    write_original_llava(hf, tmp_path / "orig-bin", tower_dir, pickle=True)
    AutoTokenizer.from_pretrained(backbones["tokenizer"]).save_pretrained(tmp_path / "orig-bin")
    with pytest.raises(ConfigError, match="pytorch_model.bin is a pickle file.*--allow-pickle"):
        from_llava_original(tmp_path / "orig-bin")
    trusted = from_llava_original(tmp_path / "orig-bin", allow_pickle=True)
    with torch.no_grad():
        torch.testing.assert_close(trusted(ids, attention_mask=inputs["attention_mask"], image_counts=[1],
                                           pixel_values=inputs["pixel_values"])[1], logits)


def test_an_import_whose_tensors_disagree_with_its_config_is_refused_in_one_line(tokenizer, tmp_path):
    build_hf_llava(tmp_path / "hf", tokenizer, CASES["default-penultimate-gqa"])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["text_config"]["intermediate_size"] += 8  # the MLP's weights no longer fit the config
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"disagree with its config.json: .*mlp") as info:
        from_hf(tmp_path / "hf", verbose=False)
    assert "\n" not in str(info.value)
