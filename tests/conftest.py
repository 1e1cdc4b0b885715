"""Shared fixtures: tiny random backbones saved as Hugging Face directories (no network, seconds to build)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def backbones(tmp_path_factory):
    """Directories: tokenizer (the project's BPE), a random Llama LM, CLIP and ResNet vision towers, a BERT, a T5."""
    from transformers import (AutoTokenizer, CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM, ResNetConfig,
                              ResNetModel)

    from vlmkit.data.images import ImageTransform
    from vlmkit.tiny.build import build_tokenizer

    root = tmp_path_factory.mktemp("backbones")
    build_tokenizer(root / "tokenizer", verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4), projection_dim=16))
    clip.save_pretrained(root / "clip")
    ImageTransform(size=32, crop=(32, 32)).save(root / "clip")
    resnet = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                      downsample_in_first_stage=False))
    resnet.save_pretrained(root / "resnet")
    ImageTransform(size=32, crop=(32, 32)).save(root / "resnet")
    from vlmkit.tiny.build import build_bert

    build_bert(root / "bert", verbose=False)  # the Q-Former's (random BERT, WordPiece tokenizer)
    from families import save_family_llm

    save_family_llm("t5", root / "t5")  # a Flan-T5-shaped encoder-decoder LM with a T5 tokenizer
    return {name: str(root / name) for name in ("tokenizer", "llm", "clip", "resnet", "bert", "t5")}



@pytest.fixture(scope="session")
def make_model(backbones):
    from vlmkit.archs import from_name
    from vlmkit.model.vlm import VisionLanguageModel

    def make(preset: str = "llava-1.5", vision: str = "clip", **overrides):
        from vlmkit.archs import preset_data

        if preset_data(preset)["connector"]["type"] == "qformer":  # its BERT from the fixture, not the cache
            overrides["connector"] = {"name_or_path": backbones["bert"], "num_layers": 2,  # the BERT's depth
                                      **overrides.get("connector", {})}
        # patch tokens only unless asked: the tiny scale's extra pooled token is the vector the tiny tower was
        # pretrained on, which these random towers are not (and Hugging Face's LLaVA has no field for it)
        config = from_name(preset, scale="tiny", vision={"name_or_path": backbones[vision],
                                                         "feature_layer": overrides.pop("feature_layer", -2),
                                                         "select": overrides.pop("select", "patch")},
                           llm={"name_or_path": backbones["llm"]}, **overrides)
        return VisionLanguageModel.from_config(config, verbose=False)
    return make


@pytest.fixture
def image_files(tmp_path):
    """Three small PNGs of different colours."""
    from PIL import Image

    paths = []
    for i, colour in enumerate([(255, 0, 0), (0, 128, 255), (40, 200, 40)]):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (40, 30), colour).save(path)
        paths.append(str(path))
    return paths
