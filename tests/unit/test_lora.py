"""LoRA through peft: only adapters train, merge equals adapters, kept adapters round-trip, QLoRA refuses CPU."""
import json

import pytest
import torch

from vlmkit.archs import from_name

from vlmkit.config import LoRAConfig, StageConfig
from vlmkit.data.dataset import ConversationDataset
from vlmkit.data.templates import get_template
from vlmkit.errors import ConfigError
from vlmkit.llm.lora import attach_lora, has_lora, merge_lora
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit.train.loop import train_stage


def tiny_dataset(model, image_files):
    records = [{"id": f"r{i}", "image": image_files[i % 3], "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": colour}]}
        for i, colour in enumerate(["red", "blue", "green"] * 4)]
    return ConversationDataset(records, model.tokenizer, get_template("vicuna_v1"), model.image_transform,
                               num_image_tokens=model.num_image_tokens, max_length=512, verbose=False)


def logits_of(model, image_files):
    ids = torch.tensor([[model.tokenizer.bos_token_id] + [model.image_token_id] * model.num_image_tokens + [7, 8, 9]])
    pixels = model.image_transform(__import__("PIL.Image").Image.open(image_files[0]).convert("RGB"))[None]
    with torch.no_grad():
        return model(ids, image_counts=[1], pixel_values=pixels)[1]


def with_random_adapters(model, lora: LoRAConfig) -> None:
    """Attach adapters and give B non-zero values (peft starts it at zero, which would hide a broken merge)."""
    attach_lora(model.llm, lora)
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.eval()


def test_lora_stage_trains_only_adapters_and_connector(make_model, image_files):
    model = make_model()
    dataset = tiny_dataset(model, image_files)
    before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    connector_before = model.connector.linear_1.weight.clone()
    stage = StageConfig(name="instruct", train=["connector", "llm"], lr={"connector": 1e-2, "llm": 1e-2},
                        max_steps=12, batch_size=4, warmup_ratio=0.0,
                        lora=LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], save="adapter"))
    result = train_stage(model, stage, dataset, seed=0, verbose=False, log=lambda *_: None)
    assert result["final_loss"] < result["first_loss"]
    assert has_lora(model.llm)
    trained = {k: v for k, v in model.llm.state_dict().items() if "lora_" in k}
    assert trained and all(".q_proj." in k or ".v_proj." in k for k in trained)
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)  # B starts at zero; it moved
    base = {k.replace("base_model.model.", "", 1).replace(".base_layer", ""): v
            for k, v in model.llm.state_dict().items() if "lora_" not in k}
    assert base.keys() == before.keys()
    assert all(torch.equal(base[k], before[k]) for k in before)  # the LLM's own weights did not move
    assert not torch.equal(model.connector.linear_1.weight, connector_before)


def test_merge_gives_the_same_model(make_model, image_files):
    model = make_model()
    with_random_adapters(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    with_adapters = logits_of(model, image_files)
    merge_lora(model.llm)
    assert not has_lora(model.llm) and not any("lora" in k for k in model.llm.state_dict())
    torch.testing.assert_close(logits_of(model, image_files), with_adapters, atol=1e-5, rtol=1e-5)


def test_kept_adapters_round_trip_and_export(make_model, image_files, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from vlmkit.convert import to_hf

    model = make_model()
    with_random_adapters(model, LoRAConfig(r=4, alpha=8, dropout=0.0, save="adapter"))
    expected = logits_of(model, image_files)
    model.save_pretrained(tmp_path / "ckpt")
    adapter_config = json.loads((tmp_path / "ckpt" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["peft_type"] == "LORA"
    assert (tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors").exists()
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    assert has_lora(loaded.llm)
    torch.testing.assert_close(logits_of(loaded, image_files), expected)
    to_hf(loaded, tmp_path / "hf")  # export merges the adapters
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[loaded.tokenizer.bos_token_id] + [loaded.image_token_id] * loaded.num_image_tokens + [7, 8, 9]])
    pixels = loaded.image_transform(__import__("PIL.Image").Image.open(image_files[0]).convert("RGB"))[None]
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, pixel_values=pixels).logits, expected, atol=1e-4, rtol=1e-4)


def test_lora_preset_and_errors(make_model):
    paper = from_name("llava-1.5-lora", scale="paper")
    assert paper.stage("instruct").lora.r == 128 and paper.stage("instruct").lora.alpha == 256
    assert paper.stage("instruct").lr == {"connector": 2e-5, "llm": 2e-4} and paper.stage("align").lora.r == 0
    model = make_model()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="QLoRA .* needs a CUDA GPU"):
            attach_lora(model.llm, LoRAConfig(r=4, quantize="4bit"))
    with pytest.raises(ConfigError, match="target_modules"):
        attach_lora(model.llm, LoRAConfig(r=4, target_modules=["no_such_layer"]))
