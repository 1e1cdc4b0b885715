"""Parity with transformers' Blip2ForConditionalGeneration (decoder-only LLM): import, logits, greedy generations.

Tiny random BLIP-2 models are built here (no network) in configurations that change the computation: the
cross-attention frequency, the query count, OPT and Llama text models. Every weight is perturbed so none is left at
its initial zero or one.
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlmkit.convert import from_hf
from vlmkit.errors import ConfigError

CASES = {
    "opt-every-other-layer": dict(queries=4, frequency=2, layers=3,
                                  text=dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                            num_attention_heads=4, word_embed_proj_dim=32)),
    "llama-every-layer": dict(queries=6, frequency=1, layers=2,
                              text=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)),
}
PROMPT = "Question: what colour is the shape? Answer:"


@pytest.fixture(scope="module")
def tokenizer(backbones):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(backbones["tokenizer"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def build_hf_blip2(directory, tokenizer, case: dict, seed: int = 0, t5: bool = False):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    text = dict(vocab_size=len(tokenizer) + 8, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                max_position_embeddings=256)
    text.update(case["text"])
    config = Blip2Config(
        vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, num_hidden_layers=case["layers"], num_attention_heads=4,
                            intermediate_size=48, cross_attention_frequency=case["frequency"], encoder_hidden_size=48),
        text_config=text, num_query_tokens=case["queries"],
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # random init leaves biases at zero and norms at one; make every weight matter
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(directory)
    processor = Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, num_query_tokens=case["queries"])
    processor.save_pretrained(directory)
    return model, processor


def sample_inputs(processor):
    torch.manual_seed(1)
    image = Image.fromarray((torch.rand(30, 44, 3) * 255).to(torch.uint8).numpy())
    # OPT's tokenizer opens every text with its BOS; the project's tokenizer adds none, so it is written out
    text = processor.tokenizer.bos_token + PROMPT
    return image, processor(images=[image], text=[text], return_tensors="pt")


@pytest.mark.parametrize("name", list(CASES))
def test_import_parity(name, tokenizer, tmp_path):
    from vlmkit.infer.generate import GenerationConfig, generate

    hf, processor = build_hf_blip2(tmp_path / "hf", tokenizer, CASES[name])
    image, inputs = sample_inputs(processor)
    with torch.no_grad():
        expected = hf(**inputs).logits
    model = from_hf(tmp_path / "hf", verbose=False)
    assert model.config.connector.type == "qformer" and model.num_image_tokens == CASES[name]["queries"]
    ids = inputs["input_ids"][0].tolist()
    queries = CASES[name]["queries"]
    assert ids[:queries] == [model.image_token_id] * queries and ids[queries] == tokenizer.bos_token_id
    with torch.no_grad():
        _, logits = model(inputs["input_ids"], attention_mask=inputs["attention_mask"], image_counts=[1],
                          pixel_values=inputs["pixel_values"])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.image_transform(image), inputs["pixel_values"][0], atol=2e-2, rtol=0)

    # vlmkit's renderer writes the same prompt as Blip2Processor: [queries][BOS] text
    from vlmkit.data.render import render_conversation
    from vlmkit.data.templates import get_template

    rendered = render_conversation([{"role": "user", "content": "<image>\nwhat colour is the shape?"}],
                                   get_template("blip2"), model.tokenizer, num_image_tokens=queries,
                                   add_generation_prompt=True)
    assert rendered.input_ids == ids

    steps = 6
    ours = generate(model, [ids], [1], pixel_values=inputs["pixel_values"],
                    config=GenerationConfig(max_new_tokens=steps), stop_ids=set())[0]
    out = hf.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    assert ours == out[0, inputs["input_ids"].shape[1]:].tolist()

    # saved as a vlmkit checkpoint and loaded back: the same logits
    model.save_pretrained(tmp_path / "ours")
    from vlmkit.model.vlm import VisionLanguageModel

    again = VisionLanguageModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        _, relogits = again(inputs["input_ids"], attention_mask=inputs["attention_mask"], image_counts=[1],
                            pixel_values=inputs["pixel_values"])
    torch.testing.assert_close(relogits, expected, atol=1e-4, rtol=1e-4)

    # exported back: transformers loads it and computes the same logits, from the same processor inputs
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from vlmkit.convert import to_hf

    to_hf(again, tmp_path / "back")
    back = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    back_inputs = Blip2Processor.from_pretrained(tmp_path / "back")(images=[image], text=[
        processor.tokenizer.bos_token + PROMPT], return_tensors="pt")
    assert back_inputs["input_ids"].tolist() == inputs["input_ids"].tolist()
    torch.testing.assert_close(back_inputs["pixel_values"], inputs["pixel_values"], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(back(**back_inputs).logits, expected, atol=1e-4, rtol=1e-4)


def test_a_model_outside_the_format_is_refused_by_to_hf(make_model, tmp_path):
    from vlmkit.convert import to_hf

    with pytest.raises(ConfigError, match="Blip2VisionModel"):
        to_hf(make_model("blip2"), tmp_path / "out")


T5_CASE = dict(queries=4, frequency=2, layers=2,
               text=dict(model_type="t5", d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                         d_kv=8, relative_attention_num_buckets=8, decoder_start_token_id=0,
                         feed_forward_proj="gated-gelu", tie_word_embeddings=False))


@pytest.fixture(scope="module")
def t5_tokenizer():
    from families import build_tokenizer

    tokenizer = build_tokenizer("t5")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def test_flan_t5_variant_parity(t5_tokenizer, tmp_path):
    """BLIP-2 with an encoder-decoder LLM (Flan-T5's gated-GELU T5): the queries and prompt go to the encoder, the
    answer comes from the decoder. Same logits as transformers for given decoder inputs, same greedy tokens, the
    renderer writes Blip2Processor's prompt, and the model survives save/load and to-hf."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from vlmkit.convert import to_hf
    from vlmkit.data.render import render_conversation
    from vlmkit.data.templates import get_template
    from vlmkit.infer.generate import GenerationConfig, generate
    from vlmkit.model.vlm import VisionLanguageModel

    hf, processor = build_hf_blip2(tmp_path / "hf", t5_tokenizer, T5_CASE)
    torch.manual_seed(1)
    image = Image.fromarray((torch.rand(30, 44, 3) * 255).to(torch.uint8).numpy())
    inputs = processor(images=[image], text=[PROMPT], return_tensors="pt")
    queries = T5_CASE["queries"]
    decoder_ids = torch.tensor([[0, 17, 5, 42, 9]])
    with torch.no_grad():
        expected = hf(**inputs, decoder_input_ids=decoder_ids).logits
    model = from_hf(tmp_path / "hf", verbose=False)
    assert model.llm.is_encoder_decoder and model.config.template == "blip2_t5"
    ids = inputs["input_ids"][0].tolist()
    assert ids[:queries] == [model.image_token_id] * queries and ids[-1] == t5_tokenizer.eos_token_id
    rendered = render_conversation([{"role": "user", "content": "<image>\nwhat colour is the shape?"}],
                                   get_template("blip2_t5"), model.tokenizer, num_image_tokens=queries,
                                   add_generation_prompt=True)
    assert rendered.input_ids == ids
    with torch.no_grad():
        _, logits = model(inputs["input_ids"], attention_mask=inputs["attention_mask"], image_counts=[1],
                          pixel_values=inputs["pixel_values"], decoder_input_ids=decoder_ids)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)

    steps = 6
    out = hf.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, eos_token_id=None)
    for use_cache in (True, False):
        ours = generate(model, [ids], [1], pixel_values=inputs["pixel_values"], stop_ids=set(),
                        config=GenerationConfig(max_new_tokens=steps, use_cache=use_cache))[0]
        assert ours == out[0, 1:].tolist()  # transformers' output opens with the decoder start token

    # the training loss is the decoder's cross-entropy on the answer, as transformers computes it from labels
    answer = render_conversation([{"role": "user", "content": "<image>\nwhat colour is the shape?"},
                                  {"role": "assistant", "content": "red"}], get_template("blip2_t5"),
                                 model.tokenizer, num_image_tokens=queries)
    input_ids, labels = answer.tensors()
    first = next(i for i, label in enumerate(answer.labels) if label != -100)
    assert answer.input_ids[:first] == ids and answer.input_ids[-1] == t5_tokenizer.eos_token_id
    target = torch.tensor([answer.input_ids[first:]])
    with torch.no_grad():
        expected_loss = hf(**inputs, labels=target).loss
        loss, _ = model(input_ids[None], labels=labels[None], image_counts=[1], pixel_values=inputs["pixel_values"])
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)

    model.save_pretrained(tmp_path / "ours")
    again = VisionLanguageModel.from_pretrained(tmp_path / "ours").eval()
    assert again.llm.is_encoder_decoder
    with torch.no_grad():
        _, relogits = again(inputs["input_ids"], attention_mask=inputs["attention_mask"], image_counts=[1],
                            pixel_values=inputs["pixel_values"], decoder_input_ids=decoder_ids)
    torch.testing.assert_close(relogits, expected, atol=1e-4, rtol=1e-4)
    to_hf(again, tmp_path / "back")
    back = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    back_inputs = Blip2Processor.from_pretrained(tmp_path / "back")(images=[image], text=[PROMPT],
                                                                   return_tensors="pt")
    assert back_inputs["input_ids"].tolist() == inputs["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(back(**back_inputs, decoder_input_ids=decoder_ids).logits, expected,
                                   atol=1e-4, rtol=1e-4)


def test_minigpt4_projection_on_a_blip2_checkpoint(tokenizer, tmp_path):
    """MiniGPT-4's released file holds only llama_proj: the ViT and Q-Former come from the BLIP-2 checkpoint (same
    query outputs as transformers'), the LLM from --llm, the projection from the (pickled) file."""
    from vlmkit.convert import from_minigpt4

    hf, processor = build_hf_blip2(tmp_path / "hf", tokenizer, CASES["llama-every-layer"])
    hf.language_model.save_pretrained(tmp_path / "vicuna")
    tokenizer.save_pretrained(tmp_path / "vicuna")
    torch.manual_seed(5)
    weight, bias = torch.randn(32, 32), torch.randn(32)
    torch.save({"model": {"llama_proj.weight": weight, "llama_proj.bias": bias}}, tmp_path / "minigpt4.pth")
    with pytest.raises(ConfigError, match="--allow-pickle"):
        from_minigpt4(tmp_path / "minigpt4.pth", str(tmp_path / "hf"), str(tmp_path / "vicuna"), verbose=False)
    model = from_minigpt4(tmp_path / "minigpt4.pth", str(tmp_path / "hf"), str(tmp_path / "vicuna"),
                          allow_pickle=True, verbose=False)
    assert model.config.name == "minigpt4" and model.num_image_tokens == CASES["llama-every-layer"]["queries"]
    assert torch.equal(model.connector.language_projection.weight, weight)
    assert torch.equal(model.connector.language_projection.bias, bias)
    image, inputs = sample_inputs(processor)
    with torch.no_grad():
        features = hf.vision_model(inputs["pixel_values"]).last_hidden_state
        expected = hf.qformer(query_embeds=hf.query_tokens, encoder_hidden_states=features).last_hidden_state
        ours = model.connector.query_outputs(model.encode_images(model.image_transform(image)[None]))
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="projection"):  # a projection for another LLM width is refused
        torch.save({"model": {"llama_proj.weight": torch.randn(64, 32), "llama_proj.bias": torch.randn(64)}},
                   tmp_path / "other.pth")
        from_minigpt4(tmp_path / "other.pth", str(tmp_path / "hf"), str(tmp_path / "vicuna"), allow_pickle=True,
                      verbose=False)


def test_an_opt_whose_embeddings_are_narrower_than_its_width_is_refused_in_one_line(tokenizer, tmp_path):
    """BLIP-2 with an OPT whose word_embed_proj_dim differs from hidden_size: transformers loads it and mixes the
    widths silently; the import names the two fields instead."""
    case = {**CASES["opt-every-other-layer"]}
    case["text"] = {**case["text"], "word_embed_proj_dim": 16}
    build_hf_blip2(tmp_path / "hf", tokenizer, case)
    with pytest.raises(ConfigError, match=r"word_embed_proj_dim=16 but text_config.hidden_size=32") as info:
        from_hf(tmp_path / "hf", verbose=False)
    assert "\n" not in str(info.value)
