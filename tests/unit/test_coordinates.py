"""Coordinate tokens (config.coordinate_tokens), a stage's image size, and the grounding presets' tiny tower."""
from __future__ import annotations

import torch

from vlmkit.data import boxes


def test_each_grid_value_of_a_format_is_one_token_text():
    assert boxes.coordinate_tokens("minigpt_v2")[:3] == ["<0>", "<1>", "<2>"]
    assert boxes.coordinate_tokens("minigpt_v2")[-1] == "<100>" and len(boxes.coordinate_tokens("minigpt_v2")) == 101
    assert boxes.coordinate_tokens("qwen_vl")[[0, 7, 999][1]] == "7" and len(boxes.coordinate_tokens("qwen_vl")) == 1000
    assert boxes.coordinate_tokens("cogvlm")[7] == "007"


def test_coordinates_are_whole_tokens_with_smooth_rows_and_survive_decoding(make_model):
    from vlmkit.infer.generate import decode_answer
    from vlmkit.model.vlm import coordinate_token_ids

    model = make_model("minigpt-v2", coordinate_tokens=True)
    text = "<p>the red circle</p> {<7><0><100><55>}<delim>{<1><2><3><4>}"
    ids = model.tokenizer(text, add_special_tokens=False).input_ids
    pieces = model.tokenizer.convert_ids_to_tokens(ids)
    start = pieces.index("<7>")
    assert pieces[start - 1:start + 5] == ["{", "<7>", "<0>", "<100>", "<55>", "}"]
    assert pieces[-6:] == ["{", "<1>", "<2>", "<3>", "<4>", "}"]
    assert decode_answer(model, ids) == text
    coords = coordinate_token_ids(model)
    assert len(coords) == 101 and make_model("minigpt-v2", coordinate_tokens=False).tokenizer.get_vocab().get("<50>") is None
    rows = torch.nn.functional.normalize(model.llm.causal_lm.get_input_embeddings().weight[coords].detach(), dim=-1)
    similarity = rows @ rows.T
    near = torch.diagonal(similarity, 1).mean()  # value v against v + 1
    far = similarity[torch.arange(50), torch.arange(50) + 50].mean()  # v against v + 50
    assert near > 0.9 and far < near - 0.3
    assert coordinate_token_ids(make_model("minigpt-v2", coordinate_tokens=False)) == []


def test_qwen_vl_numbers_become_coordinate_tokens(make_model):
    model = make_model("qwen-vl", coordinate_tokens=True)
    ids = model.tokenizer("<box>(123,7),(999,40)</box>", add_special_tokens=False).input_ids
    pieces = model.tokenizer.convert_ids_to_tokens(ids)
    assert [p for p in pieces if p.isdigit()] == ["123", "7", "999", "40"]
    assert model.tokenizer.decode(ids) == "<box>(123,7),(999,40)</box>"


def test_a_lora_stage_trains_the_coordinate_rows_and_merges_them(make_model):
    from vlmkit.config import LoRAConfig
    from vlmkit.llm.lora import merge_lora
    from vlmkit.model.vlm import coordinate_token_ids
    from vlmkit.train.freeze import apply_stage_freezing

    model = make_model("minigpt-v2", coordinate_tokens=True)
    coords = coordinate_token_ids(model)
    before = model.llm.causal_lm.get_input_embeddings().weight.detach().clone()
    head_before = model.llm.causal_lm.get_output_embeddings().weight.detach().clone()  # the test LLM is untied
    apply_stage_freezing(model, ["connector", "llm"], log=lambda *_: None,
                         lora=LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in model.llm.named_parameters() if p.requires_grad]
    assert any("trainable_tokens_delta" in n for n in trainable) and all(
        "lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([[model.tokenizer.bos_token_id, coords[3], coords[40], coords[90]]])
    for _ in range(3):
        loss, _ = model(input_ids=ids, labels=ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    merge_lora(model.llm)
    after = model.llm.causal_lm.get_input_embeddings().weight.detach()
    changed = set((after != before).any(1).nonzero().flatten().tolist())
    assert changed and changed <= set(coords)  # only coordinate rows moved; the text vocabulary is untouched
    head = model.llm.causal_lm.get_output_embeddings().weight.detach()
    changed_head = set((head != head_before).any(1).nonzero().flatten().tolist())
    assert changed_head and changed_head <= set(coords)  # an untied head's new rows train too, so it can write them


def test_a_stage_image_size_changes_the_grid_but_not_the_resamplers_tokens(make_model):
    model = make_model("qwen-vl", vision="resnet", feature_layer=-1, connector={"num_queries": 4})
    assert model.image_transform.crop == (32, 32)
    tokens, vision_tokens = model.num_image_tokens, model.vision.num_tokens
    model.set_image_size(64)
    assert model.image_transform.crop == (64, 64) and model.image_transform(
        __import__("PIL.Image").Image.new("RGB", (50, 40))).shape[-1] == 64
    assert model.vision.num_tokens == 4 * vision_tokens and model.num_image_tokens == tokens == 4
    features = model.encode_images(torch.zeros(2, 3, 64, 64))
    assert model.connector(features).shape[:2] == (2, 4)


def test_a_vit_tower_interpolates_its_positions_at_a_new_size(make_model):
    model = make_model("llava-1.5", connector={"type": "linear"})
    model.set_image_size(64)  # CLIP at 32 px with 8-px patches -> 64 px
    assert model.vision.interpolates and model.vision.num_tokens == 64 and model.num_image_tokens == 64
    assert model.encode_images(torch.zeros(1, 3, 64, 64)).shape[1] == 64


def test_scenes_vision_tower_is_built_and_loads(tmp_path, monkeypatch):
    import json

    from vlmkit.data.images import ImageTransform
    from vlmkit.encoders import load_vision_tower
    from vlmkit.tiny import build

    monkeypatch.setattr(build, "SCENES_TRAIN", 32)
    monkeypatch.setattr(build, "SCENES_HELD_OUT", 16)
    monkeypatch.setattr(build, "SCENES_STEPS", 2)
    monkeypatch.setattr(build, "SCENES_BATCH", 8)
    build.build_scenes_vision(tmp_path / "tower", verbose=False)
    info = json.loads((tmp_path / "tower" / "vlmkit_build.json").read_text())
    assert info["image_size"] == 128 and 0 <= info["held_out"]["box_iou_at_0.5"] <= 1
    assert ImageTransform.from_pretrained(tmp_path / "tower").crop == (128, 128)
    tower = load_vision_tower(str(tmp_path / "tower"))
    assert tower(pixel_values=torch.zeros(1, 3, 128, 128)).last_hidden_state.shape[-2:] == (8, 8)


def test_kept_adapters_with_trained_coordinate_rows_reload_the_same(make_model, tmp_path):
    from vlmkit.config import LoRAConfig
    from vlmkit.llm.lora import attach_lora, has_lora
    from vlmkit.model.vlm import VisionLanguageModel, coordinate_token_ids

    torch.manual_seed(3)
    model = make_model("minigpt-v2", coordinate_tokens=True)
    coords = coordinate_token_ids(model)
    attach_lora(model.llm, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], save="adapter"),
                coords)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                parameter.normal_(std=0.5)  # adapters and rows that change the logits
    model.save_pretrained(tmp_path / "model")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "model")
    assert has_lora(loaded.llm) and loaded.llm.lora_token_ids == coords
    ids = torch.tensor([[model.tokenizer.bos_token_id, coords[5], coords[60], 7]])
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids)[1], loaded(input_ids=ids)[1], atol=1e-5)


def test_the_demo_builds_only_the_tiny_backbones_its_preset_names():
    from vlmkit.archs import from_name
    from vlmkit.tiny import used_by

    assert used_by(from_name("llava-1.5")) == ["tokenizer", "llama", "vision"]  # not the scenes tower
    assert used_by(from_name("minigpt-v2")) == ["tokenizer", "llama", "scenes-vision"]
    assert used_by(from_name("llava-1.5", llm={"name_or_path": "/some/hf/llm"})) == ["tokenizer", "vision"]
    assert used_by(from_name("llava-1.5", scale="paper")) == []
