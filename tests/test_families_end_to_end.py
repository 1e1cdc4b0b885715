"""Train through the CLI with an LLM of each tokenizer family and its natural template; answers must stop.
`t5` is an encoder-decoder LM (Flan-T5's shape) behind llava-1.5's connector: the prompt in its encoder, the answer
from its decoder.

A random tiny Llama LM carries each family's tokenizer (tests/families.py). After a short instruction stage on
three colours, greedy answers are the right colour and end on the template's stop before the token budget,
with no stop text shown — what failed before for Qwen2 (`yes</s>>>>`) and Llama (refused records).
"""
import json

import pytest

from families import save_family_llm
from vlmkit.cli import main

COLOURS = {"red": (230, 20, 20), "blue": (20, 60, 230), "green": (30, 200, 40)}


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("colours")
    records = []
    for i in range(24):
        name = list(COLOURS)[i % 3]
        shade = tuple(max(0, min(255, c + (i * 7) % 30 - 15)) for c in COLOURS[name])
        Image.new("RGB", (32, 32), shade).save(root / f"c{i}.png")
        records.append({"id": f"c{i}", "image": f"c{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": name}]})
    (root / "data.json").write_text(json.dumps(records))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("family, template", [("llama", "vicuna_v1"), ("llama-legacy", "llama2"),
                                              ("qwen2", "chatml"), ("qwen2", "vicuna_v1"), ("gpt2", "minigpt4"),
                                              ("t5", "blip2_t5")])
def test_each_family_trains_and_its_answers_stop(backbones, colour_data, tmp_path, family, template, capsys):
    from vlmkit.data.templates import get_template, resolve_stop
    from vlmkit.infer.chat import answer
    from vlmkit.infer.generate import GenerationConfig, decode_answer, generate, model_stop
    from vlmkit.model.vlm import VisionLanguageModel

    llm = save_family_llm(family, tmp_path / "llm")
    run = tmp_path / "run"
    argv = ["train", "--preset", "llava-1.5", "--run-dir", str(run), "--data", str(colour_data / "data.json"),
            "--image-folder", str(colour_data), "--stages", "instruct", "--template", template,
            "--instruct.max-steps", "120", "--instruct.batch-size", "8", "--instruct.lr.llm", "3e-3",
            "--instruct.lr.connector", "3e-3", "--vision-tower", backbones["clip"], "--llm", llm]
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped"] == {}
    model = VisionLanguageModel.from_pretrained(run / "model")
    stop = resolve_stop(get_template(template), model.tokenizer)
    assert model_stop(model) == stop
    from PIL import Image
    budget = 8
    for name in COLOURS:
        image = Image.new("RGB", (32, 32), COLOURS[name])
        messages = [{"role": "user", "content": "<image>\nwhat color is the shape?"}]
        reply = answer(model, messages, [image], GenerationConfig(max_new_tokens=budget))
        assert reply == name, (family, template, reply)
        # the answer ended on the stop, well inside the budget
        from vlmkit.infer.chat import render_prompt
        prompt = render_prompt(model, messages)
        tokens = generate(model, [prompt.input_ids], [1], pixel_values=model.image_transform(image)[None],
                          config=GenerationConfig(max_new_tokens=budget))[0]
        assert len(tokens) < budget and not stop.ids & set(tokens)
        assert decode_answer(model, tokens) == name  # a stop string is cut from the answer
        if stop.strings:
            assert model.tokenizer.decode(tokens).strip() == name + stop.text
    capsys.readouterr()
    image_path = str(colour_data / "c0.png")
    assert main(["chat", str(run), "--image", image_path, "--max-new-tokens", str(budget),
                 "what color is the shape?"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "red"
