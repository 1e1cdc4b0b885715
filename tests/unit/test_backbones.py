"""Any transformers vision tower (CLIP, SigLIP) and causal LM (Llama, Qwen2, OPT) slot in, in any dtype.

Tiny random models of each class are saved to local directories, as a user's hub checkpoints would be.
"""
import pytest
import torch

from vlmkit.archs import from_name
from vlmkit.data.images import ImageTransform
from vlmkit.model.vlm import VisionLanguageModel


@pytest.fixture(scope="module")
def more_backbones(backbones, tmp_path_factory):
    from transformers import (AutoTokenizer, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM, SiglipConfig,
                              SiglipModel)

    root = tmp_path_factory.mktemp("more")
    tokenizer = AutoTokenizer.from_pretrained(backbones["tokenizer"])
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    models = {
        "qwen2": Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, **ids)),
        "opt": OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                        word_embed_proj_dim=32, max_position_embeddings=256, **ids)),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    siglip = SiglipModel(SiglipConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4)))
    siglip.save_pretrained(root / "siglip")
    ImageTransform(size=32, crop=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, resize_exact=True).save(root / "siglip")
    return {**backbones, **{name: str(root / name) for name in ("qwen2", "opt", "siglip")}}


def build(paths, vision, llm, **kwargs):
    config = from_name("llava-1.5", scale="paper", vision={"name_or_path": paths[vision], "feature_layer": -1},
                       llm={"name_or_path": paths[llm]})
    return VisionLanguageModel.from_config(config, verbose=False, **kwargs)


@pytest.mark.parametrize("vision,llm", [("siglip", "llm"), ("clip", "qwen2"), ("clip", "opt"), ("siglip", "opt")])
def test_swapped_backbones_train_and_generate(more_backbones, vision, llm):
    from vlmkit.infer.generate import GenerationConfig, generate

    model = build(more_backbones, vision, llm)
    assert model.num_image_tokens == 16  # 32 px / 8 px patches; SigLIP has no CLS, CLIP's is dropped
    n = model.num_image_tokens
    ids = torch.tensor([[1] + [model.image_token_id] * n + [10, 11, 12, 13]])
    labels = torch.full_like(ids, -100)
    labels[0, -3:] = ids[0, -3:]
    pixels = torch.randn(1, 3, 32, 32)
    model.train()
    loss, _ = model(ids, labels=labels, image_counts=[1], pixel_values=pixels)
    loss.backward()
    assert torch.isfinite(loss) and model.connector.linear_1.weight.grad.abs().sum() > 0
    model.eval()
    cached = generate(model, [ids[0].tolist()], [1], pixel_values=pixels, config=GenerationConfig(max_new_tokens=5),
                      stop_ids=set())
    uncached = generate(model, [ids[0].tolist()], [1], pixel_values=pixels,
                        config=GenerationConfig(max_new_tokens=5, use_cache=False), stop_ids=set())
    assert cached == uncached and len(cached[0]) == 5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loading_and_device_map(more_backbones, dtype):
    model = build(more_backbones, "clip", "qwen2", dtype=dtype, device_map="cpu")
    assert {p.dtype for p in model.parameters()} == {dtype}
    ids = torch.tensor([[1] + [model.image_token_id] * model.num_image_tokens + [10, 11]])
    with torch.no_grad():
        _, logits = model(ids, image_counts=[1], pixel_values=torch.randn(1, 3, 32, 32))
    assert logits.dtype == dtype and torch.isfinite(logits.float()).all()
    model.to(device="cpu", dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32} and model.device.type == "cpu"


def _tower(kind: str):
    from transformers import (CLIPVisionConfig, CLIPVisionModel, ConvNextConfig, ConvNextModel, ResNetConfig,
                              ResNetModel, SiglipVisionConfig, SiglipVisionModel)

    torch.manual_seed(0)
    vit = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
               num_attention_heads=4)
    if kind == "clip":
        return CLIPVisionModel(CLIPVisionConfig(**vit))
    if kind == "siglip":
        return SiglipVisionModel(SiglipVisionConfig(**vit))
    if kind == "resnet":
        return ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"))
    return ConvNextModel(ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1]))


@pytest.mark.parametrize("kind,layer,final_norm", [("clip", -2, False), ("clip", -1, False), ("clip", [-3, -1], False),
                                                    ("siglip", -2, False), ("siglip", -1, True), ("resnet", -1, False),
                                                    ("resnet", -2, False), ("convnext", -1, False)])
def test_unused_tower_modules_are_exactly_those_without_a_gradient(kind, layer, final_norm):
    """What `unused_modules` names (and a stage that trains the tower freezes) is what backward never reaches."""
    from vlmkit.config import VisionConfig
    from vlmkit.encoders import VisionEncoder

    encoder = VisionEncoder(_tower(kind), VisionConfig(feature_layer=layer, final_norm=final_norm,
                                                       select="patch"), image_size=32)
    encoder(torch.randn(2, 3, 32, 32)).square().sum().backward()
    no_gradient = {name for name, p in encoder.named_parameters() if p.grad is None}
    ids = {id(p) for module in encoder.unused_modules() for p in module.parameters()}
    named_unused = {name for name, p in encoder.named_parameters() if id(p) in ids}
    assert named_unused == no_gradient
    assert bool(no_gradient) == ((kind, layer) != ("resnet", -1))  # every other case leaves something out
