import pytest
import torch

from vlmkit.data.render import render_conversation
from vlmkit.data.templates import get_template
from vlmkit.errors import BadRecord
from vlmkit.model.vlm import VisionLanguageModel, splice_image_features
from vlmkit.train.freeze import apply_stage_freezing


def test_splice_places_each_image_in_order():
    embeds = torch.zeros(3, 8, 4)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, 1:3] = True          # sample 0: one image (2 tokens)
    mask[2, 0:2] = True          # sample 2: two images, at two places
    mask[2, 5:7] = True          # sample 1: none
    images = torch.arange(3 * 2 * 4, dtype=torch.float).reshape(3, 2, 4) + 1
    out = splice_image_features(embeds, mask, images, [1, 0, 2])
    assert torch.equal(out[0, 1:3], images[0])
    assert torch.equal(out[2, 0:2], images[1]) and torch.equal(out[2, 5:7], images[2])
    assert torch.equal(out[~mask], torch.zeros(int((~mask).sum()), 4))


def test_splice_mismatch_names_the_sample():
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, :3] = True
    with pytest.raises(BadRecord, match="'rec-b'.*3 image placeholder tokens but 1 image"):
        splice_image_features(torch.zeros(2, 6, 4), mask, torch.ones(1, 2, 4), [0, 1], record_ids=["rec-a", "rec-b"])


@pytest.mark.parametrize("vision", ["clip", "resnet"])
def test_forward_with_several_images_and_none(make_model, image_files, vision):
    model = make_model(vision=vision, feature_layer=-1 if vision == "resnet" else -2)
    template = get_template(model.config.template)
    conversations = [
        [{"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "red"}],
        [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}],
        [{"from": "human", "value": "<image> and <image>\ncompare"}, {"from": "gpt", "value": "blue"}],
    ]
    rendered = [render_conversation(c, template, model.tokenizer, num_image_tokens=model.num_image_tokens)
                for c in conversations]
    from vlmkit.data.dataset import Example, collate

    batch = collate([Example(str(i), r.input_ids, r.labels, []) for i, r in enumerate(rendered)],
                    model.tokenizer.pad_token_id)
    pixels = torch.stack([model.image_transform(__import__("PIL.Image").Image.open(p).convert("RGB"))
                          for p in image_files])
    loss, logits = model(batch.input_ids, batch.attention_mask, batch.labels, image_counts=[1, 0, 2],
                         pixel_values=pixels)
    assert torch.isfinite(loss)
    supervised = (batch.labels[:, 1:] != -100).sum()
    assert logits.shape == (supervised, len(model.tokenizer))
    # the image actually reaches the loss: a different image gives a different loss
    loss_other, _ = model(batch.input_ids, batch.attention_mask, batch.labels, image_counts=[1, 0, 2],
                          pixel_values=pixels.flip(0))
    assert not torch.allclose(loss, loss_other)


def test_vision_features_follow_the_feature_layer(make_model):
    model = make_model(feature_layer=-2)
    pixels = torch.randn(2, 3, 32, 32)
    hidden = model.vision.tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    features = model.encode_images(pixels)
    assert features.shape == (2, 16, 48)
    torch.testing.assert_close(features, hidden[-2][:, 1:])
    model.vision.config.select = "cls_patch"
    torch.testing.assert_close(model.encode_images(pixels), hidden[-2])


@pytest.mark.parametrize("vision", ["clip", "resnet"])
def test_patch_mean_adds_the_mean_of_the_patches_as_a_last_token(backbones, vision):
    from vlmkit.archs import from_name

    def build(select):
        config = from_name("llava-1.5", scale="tiny", vision={"name_or_path": backbones[vision], "select": select},
                           llm={"name_or_path": backbones["llm"]})
        return VisionLanguageModel.from_config(config, verbose=False)
    plain, pooled = build("patch"), build("patch_mean")
    pixels = torch.randn(2, 3, 32, 32)
    patches, features = plain.encode_images(pixels), pooled.encode_images(pixels)
    assert features.shape == (2, patches.shape[1] + 1, patches.shape[2])
    assert pooled.num_image_tokens == plain.num_image_tokens + 1 == features.shape[1]
    torch.testing.assert_close(features[:, :-1], patches)
    torch.testing.assert_close(features[:, -1], patches.mean(1))


def test_save_load_round_trip_is_bit_exact(make_model, tmp_path):
    model = make_model()
    with torch.no_grad():
        for p in model.connector.parameters():
            p.normal_()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    assert loaded.config == model.config
    assert loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    ids = torch.tensor([[model.tokenizer.bos_token_id] + [model.image_token_id] * model.num_image_tokens + [10, 11]])
    pixels = torch.randn(1, 3, 32, 32)
    model.eval()
    assert torch.equal(model(ids, image_counts=[1], pixel_values=pixels)[1],
                       loaded(ids, image_counts=[1], pixel_values=pixels)[1])
    assert not list(tmp_path.glob(".ckpt.tmp-*")), "the temporary directory must be gone after the rename"


def test_freezing_per_stage(make_model):
    model = make_model()
    logs = []
    for stage in model.config.stages:
        counts = apply_stage_freezing(model, stage.train, log=logs.append, batch_norm=stage.batch_norm)
        for name, module in model.parts().items():
            total = sum(p.numel() for p in module.parameters())
            if name == "vision":  # the tower's last block (feature layer -2) and final norm never get a gradient
                total -= sum(p.numel() for m in module.unused_modules() for p in m.parameters())
            assert counts[name] == (total if name in stage.train else 0)
            assert module.training == (name in stage.train)
    assert model.config.stages[0].train == ["connector"]
    assert model.config.stages[1].train == ["connector", "llm", "vision"]  # the tiny scale trains the tower too
    assert "vision 0 (frozen)" in logs[0] and "llm 0 (frozen)" in logs[0]


def test_batch_norm_trains_only_when_asked_and_only_in_a_trained_part(make_model):
    from vlmkit.errors import ConfigError

    model = make_model(vision="resnet", feature_layer=-1)
    norms = [m for m in model.vision.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    apply_stage_freezing(model, ["connector", "llm", "vision"], log=lambda *_: None)
    assert model.vision.training and not any(m.training for m in norms)  # default: running statistics kept
    pixels = torch.rand(4, 3, 32, 32)
    before = [m.running_mean.clone() for m in norms]
    model.vision(pixels)
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, norms))
    apply_stage_freezing(model, ["connector", "llm", "vision"], log=lambda *_: None, batch_norm="train")
    assert all(m.training for m in norms)
    model.vision(pixels)  # normalised by the batch; the running statistics move towards it
    assert all(not torch.equal(b, m.running_mean) for b, m in zip(before, norms))
    apply_stage_freezing(model, ["connector", "llm"], log=lambda *_: None, batch_norm="train")
    assert not model.vision.training and not any(m.training for m in norms)  # a frozen part stays frozen
    with pytest.raises(ConfigError, match="batch_norm must be one of 'frozen', 'train', not 'on'"):
        apply_stage_freezing(model, ["connector"], log=lambda *_: None, batch_norm="on")


def test_a_text_only_training_batch_keeps_a_training_tower_in_the_graph(make_model):
    """Every trained part gets a gradient, zero for a text-only batch, so every engine steps it alike; the tower's
    BatchNorm statistics are not moved by the blank image that carries it."""
    model = make_model(vision="resnet", feature_layer=-1)
    apply_stage_freezing(model, ["connector", "llm", "vision"], log=lambda *_: None, batch_norm="train")
    model.keep_connector_in_graph = model.keep_vision_in_graph = True
    norms = [m for m in model.vision.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [(m.running_mean.clone(), m.num_batches_tracked.clone()) for m in norms]
    ids = torch.tensor([[model.tokenizer.bos_token_id, 10, 11, 12]])
    loss = model(ids, image_counts=[0], labels=ids)[0]
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad and (name.startswith("vision.") or name.startswith("connector.")):
            assert param.grad is not None and not param.grad.any(), name
    assert all(torch.equal(m.running_mean, mean) and torch.equal(m.num_batches_tracked, count)
               for m, (mean, count) in zip(norms, before))
    model.keep_vision_in_graph = False  # a frozen tower is not run: its parameters have no gradient at all
    model.zero_grad(set_to_none=True)
    model(ids, image_counts=[0], labels=ids)[0].backward()
    assert all(p.grad is None for p in model.vision.parameters())


def test_checkpoint_with_other_parameter_names_is_a_clear_error(make_model, tmp_path):
    from safetensors.torch import load_file, save_file

    from vlmkit.errors import ConfigError

    make_model().save_pretrained(tmp_path / "ckpt")
    weights = load_file(tmp_path / "ckpt" / "model.safetensors")
    weights["connector.fc1.weight"] = weights.pop("connector.linear_1.weight")
    save_file(weights, tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(ConfigError, match="does not match the model.*connector.linear_1.weight"):
        VisionLanguageModel.from_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize("layer", [-2, -1, 0, 1, [-3, -1], [0, 2]])
def test_vision_encoder_skips_unused_blocks_exactly(layer):
    """Blocks past the deepest selected hidden state are not run; the features equal the full tower's."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from vlmkit.config import VisionConfig
    from vlmkit.encoders import VisionEncoder

    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=3, num_attention_heads=4)).eval()
    encoder = VisionEncoder(tower, VisionConfig(feature_layer=layer))
    calls = []
    hooks = [block.register_forward_hook(lambda *_: calls.append(1)) for block in encoder._encoder().layers]
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = encoder(pixels)
        for hook in hooks:
            hook.remove()
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    layers = layer if isinstance(layer, list) else [layer]
    torch.testing.assert_close(ours, torch.cat([hidden[i][:, 1:] for i in layers], dim=-1), rtol=0, atol=0)
    assert len(calls) == max(1, max(i % 4 for i in layers))
    assert len(encoder._encoder().layers) == 3  # the tower is whole again (saving and export see every block)


def test_initialisation_does_not_depend_on_a_cold_backbone_cache(backbones, monkeypatch):
    """Building tiny backbones on a cold cache consumes the RNG; the connector must start the same anyway."""
    import vlmkit.tiny
    from vlmkit.archs import from_name
    from vlmkit.model.vlm import VisionLanguageModel

    config = from_name("llava-1.5", vision={"name_or_path": backbones["clip"]}, llm={"name_or_path": backbones["llm"]})
    warm = VisionLanguageModel.from_config(config, verbose=False)
    resolve = vlmkit.tiny.resolve

    def cold(name, verbose=True):  # what a build does to the global RNG
        torch.randn(1000)
        return resolve(name, verbose)

    monkeypatch.setattr(vlmkit.tiny, "resolve", cold)
    built = VisionLanguageModel.from_config(config, verbose=False)
    for (name, a), (_, b) in zip(warm.connector.state_dict().items(), built.connector.state_dict().items()):
        assert torch.equal(a, b), name
