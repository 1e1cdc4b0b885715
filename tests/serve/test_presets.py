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


def test_palm_e_is_served_with_state_vectors(make_model, tmp_path):
    """PaLM-E's state vectors travel in the request's `states` (beside the OpenAI fields) and fill the question's
    `<obj>` placeholders as the library's `answer` fills them; a wrong width or a missing vector is a 400 naming
    `states`, and the server goes on."""
    import httpx

    from vlmkit.cli import load_run
    from vlmkit.infer.chat import answer
    from vlmkit.infer.generate import GenerationConfig
    from vlmkit.serve import ServeSettings, create_app

    torch.manual_seed(3)
    original = make_model("palm-e")
    with torch.no_grad():
        for parameter in original.states.parameters():
            parameter.normal_(std=0.5)  # encoders whose output changes the answer
    original.save_pretrained(tmp_path / "model")
    model, _ = load_run(str(tmp_path))
    question = "Object 1 is <obj>. Object 2 is <obj>. What colour is obj_2?"
    states = {"obj": [[0.2, 0.0, 0.2, 0.2, 0.9, 0.1, 0.1], [0.7, 0.0, 0.1, 0.1, 0.1, 0.1, 0.9]]}
    swapped = {"obj": states["obj"][::-1]}
    messages = [{"role": "user", "content": question}]
    with LiveServer(create_app(model, "run", ServeSettings(max_tokens=10))) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        replies = [client.chat.completions.create(model="run", messages=messages, extra_body={"states": s})
                   .choices[0].message.content for s in (states, swapped)]
        bad = [httpx.post(live.url + "/v1/chat/completions", json={"messages": messages, "states": s}, timeout=60)
               for s in ({"obj": [states["obj"][0][:5], states["obj"][1]]}, {"obj": states["obj"][:1]}, None,
                         {"obj": "x"})]
        again = client.chat.completions.create(model="run", messages=messages, extra_body={"states": states})
    library = [answer(model, messages, [], GenerationConfig(max_new_tokens=10), states=s) for s in (states, swapped)]
    assert replies == library and again.choices[0].message.content == replies[0]
    assert [r.status_code for r in bad] == [400, 400, 400, 400]
    errors = [r.json()["error"] for r in bad]
    assert [e["param"] for e in errors] == ["states"] * 4
    assert "has 5 numbers; the model's obj vectors have 7" in errors[0]["message"]
    assert "2 <obj> placeholder(s) but 1 obj state vector(s)" in errors[1]["message"]
    assert "no 'states'" in errors[2]["message"]
