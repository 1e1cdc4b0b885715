"""Every preset's run is served: saved, loaded as `vlmkit serve` loads it, asked with an image through the
official client, answered as the library answers — including a run whose LoRA adapters were kept apart."""
from __future__ import annotations

import pytest
import torch
from live import LiveServer, image_message, png_uri

from vlmkit.archs import names

openai = pytest.importorskip("openai")


def _served_answer(path, question, uri):
    from vlmkit.cli import load_run
    from vlmkit.serve import ServeSettings, create_app

    model, _ = load_run(str(path))
    with LiveServer(create_app(model, "run", ServeSettings(max_tokens=10))) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="run", messages=[image_message(question, uri)])
    return model, reply.choices[0].message.content


def _library_answer(model, question, uri):
    import base64
    import io

    from PIL import Image

    from vlmkit.infer.chat import answer
    from vlmkit.infer.generate import GenerationConfig

    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    return answer(model, [{"role": "user", "content": f"<image>\n{question}"}], [image],
                  GenerationConfig(max_new_tokens=10))


@pytest.mark.parametrize("preset,vision", [(name, "clip") for name in names()] + [("llava-1.5", "resnet")])
def test_every_preset_is_served(make_model, tmp_path, preset, vision):
    torch.manual_seed(1)
    make_model(preset, vision=vision).save_pretrained(tmp_path / "model")
    uri = png_uri((30, 90, 200), size=(50, 40))
    model, served = _served_answer(tmp_path, "what shape is it?", uri)
    assert model.config.name == preset
    assert served == _library_answer(model, "what shape is it?", uri)


def test_a_run_with_kept_lora_adapters_is_served(make_model, tmp_path):
    from vlmkit.config import LoRAConfig
    from vlmkit.llm.lora import attach_lora, has_lora

    torch.manual_seed(2)
    model = make_model("llava-1.5-lora")
    attach_lora(model.llm, LoRAConfig(r=4, alpha=8, dropout=0.0, save="adapter"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)  # adapters that change the answer, not peft's zero start
    model.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "adapter").is_dir()
    uri = png_uri((200, 40, 40))
    loaded, served = _served_answer(tmp_path, "what color is it?", uri)
    assert has_lora(loaded.llm)
    assert served == _library_answer(model, "what color is it?", uri)


def test_blip2_with_an_encoder_decoder_llm_is_served(backbones, tmp_path):
    """BLIP-2's Flan-T5 variant: the server's batches run the prompt through the T5 encoder and decode from it."""
    from vlmkit.archs import from_name
    from vlmkit.model.vlm import VisionLanguageModel

    config = from_name("blip2", scale="tiny", vision={"name_or_path": backbones["clip"], "feature_layer": -1},
                       llm={"name_or_path": backbones["t5"]}, template="blip2_t5",
                       connector={"name_or_path": backbones["bert"], "num_layers": 2, "num_queries": 4})
    torch.manual_seed(3)
    model = VisionLanguageModel.from_config(config, verbose=False)
    with torch.no_grad():
        for param in model.llm.parameters():  # a T5 at its init answers one token; make the answer longer
            param.add_(torch.randn_like(param) * 0.3)
    model.save_pretrained(tmp_path / "model")
    uri = png_uri((30, 200, 90), size=(40, 40))
    loaded, served = _served_answer(tmp_path, "what shape is it?", uri)
    assert loaded.llm.is_encoder_decoder
    assert served == _library_answer(loaded, "what shape is it?", uri) and served
