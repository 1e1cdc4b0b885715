"""An encoder-decoder LLM (Flan-T5-shaped T5, T5 tokenizer) behind the Q-Former: the encoder/decoder split of
rendered samples, batched generation, training through the CLI's run, save/load, chat and serve."""
from __future__ import annotations

import json

import pytest
import torch

from vlmkit.archs import from_name
from vlmkit.data.render import IGNORE_INDEX, render_conversation
from vlmkit.data.templates import get_template
from vlmkit.errors import BadRecord, ConfigError
from vlmkit.model.vlm import VisionLanguageModel, split_for_encoder_decoder


def t5_config(backbones, **overrides):
    return from_name("blip2", scale="tiny", vision={"name_or_path": backbones["clip"], "feature_layer": -1},
                     llm={"name_or_path": backbones["t5"]},
                     connector={"name_or_path": backbones["bert"], "num_layers": 2, "num_queries": 4},
                     template="blip2_t5", stages__generative__template="blip2_t5_caption", **overrides)


def test_the_split_puts_the_prompt_in_the_encoder_and_the_rest_in_the_decoder():
    IMG, PAD, START = 9, 0, 0
    L = IGNORE_INDEX
    # row 0: two turns (the second question is read by the decoder, not learned); row 1 shorter, right-padded
    ids = torch.tensor([[IMG, IMG, 5, 6, 21, 22, 1, 7, 8, 23, 1],
                        [IMG, IMG, 5, 31, 1, PAD, PAD, PAD, PAD, PAD, PAD]])
    labels = torch.tensor([[L, L, L, L, 21, 22, 1, L, L, 23, 1],
                           [L, L, L, 31, 1, L, L, L, L, L, L]])
    mask = (torch.arange(11)[None] < torch.tensor([[11], [5]])).long()
    enc, enc_mask, dec, dec_mask, targets = split_for_encoder_decoder(ids, labels, mask, START, PAD, IMG)
    assert enc.tolist() == [[IMG, IMG, 5, 6], [IMG, IMG, 5, PAD]] and enc_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert dec.tolist() == [[START, 21, 22, 1, 7, 8, 23], [START, 31, PAD, PAD, PAD, PAD, PAD]]
    assert dec_mask.tolist() == [[1] * 7, [1, 1, 0, 0, 0, 0, 0]]
    assert targets.tolist() == [[21, 22, 1, L, L, 23, 1], [31, 1, L, L, L, L, L]]
    # left padding reads the same
    left = torch.tensor([[PAD] * 6 + [IMG, IMG, 5, 31, 1]])
    left_labels = torch.tensor([[L] * 6 + [L, L, L, 31, 1]])
    out = split_for_encoder_decoder(left, left_labels, (left != PAD).long(), START, PAD, IMG)
    assert out[0].tolist() == [[IMG, IMG, 5]] and out[4].tolist() == [[31, 1]]
    with pytest.raises(BadRecord, match="image after its first answer") as info:
        split_for_encoder_decoder(torch.tensor([[IMG, 5, 21, IMG]]), torch.tensor([[L, L, 21, L]]), None, START, PAD,
                                  IMG, record_ids=["rec-7"])
    assert "rec-7" in str(info.value)


def test_batched_t5_generation_equals_one_prompt_at_a_time(backbones):
    from vlmkit.infer.generate import GenerationConfig, generate

    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(t5_config(backbones), verbose=False).eval()
    with torch.no_grad():
        for param in model.llm.parameters():  # a random T5 from init answers with one token: make it vary
            param.add_(torch.randn_like(param) * 0.3)
    template = get_template("blip2_t5")
    prompts = [render_conversation([{"role": "user", "content": f"<image>\n{q}"}], template, model.tokenizer,
                                   num_image_tokens=model.num_image_tokens, add_generation_prompt=True).input_ids
               for q in ("what color is the shape?", "is there a circle in the image at all?", "shape?")]
    assert len({len(p) for p in prompts}) == 3
    pixels = torch.rand(3, 3, *model.image_transform.crop)
    config = GenerationConfig(max_new_tokens=5)
    together = generate(model, prompts, [1, 1, 1], pixel_values=pixels, config=config)
    alone = [generate(model, [p], [1], pixel_values=pixels[i:i + 1], config=config)[0] for i, p in enumerate(prompts)]
    assert together == alone
    assert len({tuple(t) for t in together}) > 1  # the rows are not all the same answer
    # rows that finish leave the batch; the others go on unchanged. The early stop id: a token some row writes
    # after its first without having written it before (a random T5 may repeat one token all along)
    r, k = next((r, k) for r, row in enumerate(together) for k in range(1, len(row)) if row[k] not in row[:k])
    stop = together[r][k]
    stopped = generate(model, prompts, [1, 1, 1], pixel_values=pixels, config=config, stop_ids={stop})
    assert stopped[r] == together[r][:k]
    for tokens, full in zip(stopped, together):
        assert tokens == (full[:full.index(stop)] if stop in full else full)


def test_blip2_with_flan_t5_trains_saves_reloads_and_chats(backbones, tmp_path):
    from vlmkit.infer.chat import answer
    from vlmkit.infer.generate import GenerationConfig
    from vlmkit.train.run import train_run

    config = t5_config(backbones, stages__generative__mixture="scenes:caption:n32:shapes1",
                       stages__generative__max_steps=4, stages__generative__batch_size=4,
                       stages__vqa__mixture="scenes:vqa:n32:shapes2", stages__vqa__max_steps=4,
                       stages__vqa__batch_size=4)
    torch.manual_seed(0)
    before = VisionLanguageModel.from_config(config, verbose=False)
    result = train_run(config, tmp_path / "run", stages=["generative", "vqa"], verbose=False, log=lambda *a: None)
    model = result["model"]
    assert model.llm.is_encoder_decoder
    after = model.connector.state_dict()
    assert any(not torch.equal(value, after[key]) for key, value in before.connector.state_dict().items())
    for key, value in before.llm.state_dict().items():  # the LLM is frozen in both stages
        assert torch.equal(value, model.llm.state_dict()[key]), key
    entries = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in entries if "loss" in e]
    assert len(losses) == 8 and all(loss == loss and 0 < loss < 50 for loss in losses)
    again = VisionLanguageModel.from_pretrained(tmp_path / "run" / "model")
    assert again.llm.is_encoder_decoder and again.config.template == "blip2_t5"
    from PIL import Image

    image = Image.new("RGB", (40, 30), (200, 30, 30))
    messages = [{"role": "user", "content": "<image>\nhow many shapes are there?"}]
    first = answer(model.eval(), messages, [image], GenerationConfig(max_new_tokens=6))
    assert answer(again, messages, [image], GenerationConfig(max_new_tokens=6)) == first
    # packing needs a decoder-only LLM: said, not a wrong loss
    with pytest.raises(ConfigError, match="encoder-decoder"):
        again(torch.tensor([[1, 2]]), labels=torch.tensor([[-100, 2]]), position_ids=torch.tensor([[0, 1]]))
