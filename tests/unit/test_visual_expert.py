"""CogVLM's visual expert (issue 34): routing, positions and logits against rules written here, independently.

Rules (THUDM's released code; SPEC.md): a token takes the expert when it and the next token are tokens of the same
image (the begin-image vector and the patches; not the end-image vector, not the last token of a sequence, not a
single decode step); an image takes three positions (begin, all patches, end), text continues, padding does not
advance; with experts that are fresh copies the model computes what the base LLM computes at those positions."""
import pytest
import torch

from vlmkit.archs import from_name
from vlmkit.data.render import render_conversation
from vlmkit.data.templates import get_template
from vlmkit.infer.generate import GenerationConfig, generate
from vlmkit.model.vlm import VisionLanguageModel

L, V = 0, 1


def reference_positions(types: list[int], per_image: int, real: list[int] | None = None) -> list[int]:
    """The rule, token by token: text +1; an image's first token +1, its first patch +1, the other patches +0,
    its last token +1; padding +0 (and numbered as the position before it)."""
    positions, current, index = [], -1, 0
    for t, kind in enumerate(types):
        if real is not None and not real[t]:
            positions.append(max(current, 0))
            continue
        if kind == V:
            current += 1 if index in (0, 1, per_image - 1) else 0
            index = (index + 1) % per_image
        else:
            current, index = current + 1, 0
        positions.append(current)
    return positions


def reference_routing(types: list[int], per_image: int) -> list[bool]:
    routed, index = [], 0
    for t, kind in enumerate(types):
        if kind != V:
            routed.append(False)
            index = 0
            continue
        nxt = types[t + 1] if t + 1 < len(types) else L
        routed.append(nxt == V and index != per_image - 1)
        index = (index + 1) % per_image
    return routed


def _expert_model(backbones, seed: int):
    """llava-1.5 over the test Llama with visual experts (fresh copies of its weights)."""
    torch.manual_seed(seed)
    config = from_name("llava-1.5", scale="tiny", vision={"name_or_path": backbones["clip"], "select": "patch"},
                       llm={"name_or_path": backbones["llm"], "visual_expert": True})
    return VisionLanguageModel.from_config(config, verbose=False).eval()


@pytest.fixture(scope="module")
def expert_model(backbones):
    return _expert_model(backbones, 0)


CASES = {  # name: (types, per image, attention)
    "spec example": ([L] + [V] * 6 + [L] * 3, 6, None),
    "two images, no text between": ([L] + [V] * 4 + [V] * 4 + [L, L], 4, None),
    "ends on an image token": ([L, L] + [V] * 3, 4, None),
    "left padding": ([L, L, L, L] + [V] * 4 + [L], 4, [0, 0, 1, 1, 1, 1, 1, 1, 1]),
    "right padding": ([L] + [V] * 4 + [L, L, L], 4, [1, 1, 1, 1, 1, 1, 0, 0]),
}


@pytest.mark.parametrize("case", CASES)
def test_positions_and_routing_follow_the_rules(expert_model, monkeypatch, case):
    types, per_image, real = CASES[case]
    model = expert_model
    monkeypatch.setattr(type(model), "num_image_tokens", property(lambda self: per_image))
    image = torch.tensor([types], dtype=torch.bool)
    mask = torch.tensor([real]) if real is not None else None
    assert model.position_ids(mask, image_token_mask=image)[0].tolist() == reference_positions(types, per_image, real)
    assert model.routing_mask(image)[0].tolist() == reference_routing(types, per_image)
    if case == "spec example":
        assert reference_positions(types, per_image) == [0, 1, 2, 2, 2, 2, 3, 4, 5, 6]  # SPEC.md's table


def prompts(model, questions):
    template = get_template(model.config.template)
    return [render_conversation([{"role": "user", "content": f"<image>\n{q}"}], template, model.tokenizer,
                                num_image_tokens=model.num_image_tokens, add_generation_prompt=True).input_ids
            for q in questions]


def test_fresh_experts_compute_what_the_base_llm_computes(expert_model, backbones):
    """Experts that are copies: the logits equal the base LLM's (no experts) given CogVLM's positions, fp32, images
    present; text-only input equals the base LLM exactly."""
    model = expert_model
    config = from_name("llava-1.5", scale="tiny", vision={"name_or_path": backbones["clip"], "select": "patch"},
                       llm={"name_or_path": backbones["llm"]})
    torch.manual_seed(0)
    base = VisionLanguageModel.from_config(config, verbose=False).eval()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if ".experts." not in k})
    ids = torch.tensor(prompts(model, ["what color is the shape?"]))
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        embeds, image = model.embed(ids, [1], pixels)
        positions = model.position_ids(None, image_token_mask=image)
        ours = model.logits(ids, None, [1], pixels)
        # with a mask: without one transformers reads repeated position ids as packed sequences' starts
        theirs = base.logits(ids, torch.ones_like(ids), [1], pixels, position_ids=positions)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        text = torch.tensor([model.tokenizer.encode("what color is the shape?")])
        assert torch.equal(model.logits(text), base.logits(text))


def _perturbed(model):
    with torch.no_grad():
        for param in model.llm.experts.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    return model


@pytest.fixture(scope="module")
def trained_expert_model(backbones):
    return _perturbed(_expert_model(backbones, 1))  # experts that differ from the LLM's weights


def test_each_expert_sees_exactly_its_routed_rows(trained_expert_model):
    """Forward hooks count the rows every expert Linear sees: the prefill's routed tokens (images mid-prompt, left
    padding), none in a decode step."""
    model = trained_expert_model
    ids = prompts(model, ["what color is the shape?", "what?"])
    rows = []
    hooks = [expert["q_proj"].register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
             for expert in model.llm.experts]
    try:
        generate(model, ids, [1, 1], pixel_values=torch.randn(2, 3, 32, 32), stop_ids=set(),
                 config=GenerationConfig(max_new_tokens=3))
    finally:
        for hook in hooks:
            hook.remove()
    layers = len(model.llm.experts)
    routed_per_image = model.num_image_tokens - 1  # every image token but the last
    assert rows == [2 * routed_per_image] * layers  # the prefill only: decode steps route nothing


def test_cached_greedy_equals_full_recompute_and_batches_equal_alone(trained_expert_model):
    model = trained_expert_model
    ids = prompts(model, ["what color is the shape?", "is there not a blue shape in the image?", "what?"])
    pixels = torch.randn(3, 3, 32, 32)
    config = GenerationConfig(max_new_tokens=10)
    cached = generate(model, ids, [1, 1, 1], pixel_values=pixels, config=config, stop_ids=set())
    full = generate(model, ids, [1, 1, 1], pixel_values=pixels, stop_ids=set(),
                    config=GenerationConfig(max_new_tokens=10, use_cache=False))
    alone = [generate(model, [ids[i]], [1], pixel_values=pixels[i:i + 1], config=config, stop_ids=set())[0]
             for i in range(3)]
    assert cached == full == alone
    assert len({tuple(t) for t in cached}) > 1


def reference_logits(model, embeds: torch.Tensor, types: list[int]) -> torch.Tensor:
    """Llama's forward written out token by token, each token's q/k/v/o and MLP taken from the expert or the LLM as
    the rule says, positions from the rule, causal attention over every token, shared norms and RoPE."""
    causal_lm = model.llm.causal_lm
    inner = causal_lm.get_decoder()
    per_image = model.num_image_tokens
    routed = reference_routing(types, per_image)
    positions = torch.tensor([reference_positions(types, per_image)])
    config = causal_lm.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    cos, sin = inner.rotary_emb(embeds, positions)

    def rotate(x):  # x (T, H, d)
        half = x.shape[-1] // 2
        turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos[0][:, None] + turned * sin[0][:, None]

    def linear(module, x):  # the module's own class forward, not the routed one on the instance
        return type(module).forward(module, x)

    hidden = embeds[0]
    length = hidden.shape[0]
    for layer, expert in zip(inner.layers, model.llm.experts):
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden)
        parts = {name: [] for name in ("q_proj", "k_proj", "v_proj")}
        for t in range(length):
            for name in parts:
                weights = expert[name] if routed[t] else getattr(attention, name)
                parts[name].append(linear(weights, normed[t]))
        q = rotate(torch.stack(parts["q_proj"]).view(length, heads, head_dim))
        k = rotate(torch.stack(parts["k_proj"]).view(length, kv_heads, head_dim))
        v = torch.stack(parts["v_proj"]).view(length, kv_heads, head_dim)
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        scores = torch.einsum("thd,shd->hts", q, k) / head_dim ** 0.5
        scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
        mixed = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(length, -1)
        out = torch.stack([linear(expert["o_proj"] if routed[t] else attention.o_proj, mixed[t])
                           for t in range(length)])
        hidden = hidden + out
        normed = layer.post_attention_layernorm(hidden)
        mlp = torch.stack([type(layer.mlp).forward(expert["mlp"] if routed[t] else layer.mlp, normed[t][None])[0]
                           for t in range(length)])
        hidden = hidden + mlp
    return causal_lm.get_output_embeddings()(inner.norm(hidden))[None]


def test_logits_equal_an_independent_per_token_reference(trained_expert_model):
    model = trained_expert_model
    ids = torch.tensor(prompts(model, ["what color is the shape?"]))
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        embeds, image = model.embed(ids, [1], pixels)
        ours = model.logits(ids, None, [1], pixels)
        theirs = reference_logits(model, embeds, image[0].long().tolist())
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_gradients_equal_with_and_without_gradient_checkpointing(trained_expert_model):
    from vlmkit.train.loop import checkpoint_layers

    model = trained_expert_model
    ids = torch.tensor(prompts(model, ["what color is the shape?"]) * 2)
    labels = ids.clone()
    labels[:, :-3] = -100
    pixels = torch.randn(2, 3, 32, 32)
    grads = []
    for checkpointed in (False, True):
        model.zero_grad(set_to_none=True)
        model.llm.experts.requires_grad_(True)
        undo = checkpoint_layers(model.llm.causal_lm) if checkpointed else None
        try:
            loss, _ = model(ids, torch.ones_like(ids), labels, [1, 1], pixels)
            loss.backward()
        finally:
            if undo:
                undo()
        grads.append({n: p.grad.clone() for n, p in model.llm.experts.named_parameters() if p.grad is not None})
        model.llm.experts.requires_grad_(False)
    assert grads[0] and set(grads[0]) == set(grads[1])
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_a_visual_expert_model_saves_and_reloads(trained_expert_model, tmp_path):
    model = trained_expert_model
    model.save_pretrained(tmp_path / "m")
    again = VisionLanguageModel.from_pretrained(tmp_path / "m")
    assert again.visual_expert and len(again.llm.experts) == len(model.llm.experts)
    ids = torch.tensor(prompts(model, ["what color is the shape?"]))
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.logits(ids, None, [1], pixels), again.logits(ids, None, [1], pixels))


def test_cogvlm_trains_both_stages_from_the_cli_and_chats(backbones, tmp_path, image_files, capsys):
    """The preset: pretraining trains the adapter and the experts only (the LLM's own weights stay as loaded), SFT
    the LLM too; the run saves, reloads with its experts, evaluates, chats; packing is refused for it."""
    import json

    from vlmkit.cli import main

    records = [{"id": f"r{i}", "image": image_files[i % 3].split("/")[-1], "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": c}]}
        for i, c in enumerate(["red", "blue", "green"] * 4)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    run = tmp_path / "run"
    argv = ["train", "--preset", "cogvlm", "--run-dir", str(run), "--data", str(data), "--caption-data", str(data),
            "--image-folder", str(tmp_path), "--pretrain.max-steps", "2", "--pretrain.batch-size", "4",
            "--grounding.mixture", f"{data}=1", "--grounding.max-steps", "1", "--grounding.batch-size", "4",
            "--sft.max-steps", "2", "--sft.batch-size", "4", "--vision.name-or-path", backbones["clip"],
            "--vision.feature-layer", "-2", "--vision.select", "patch", "--llm.name-or-path", backbones["llm"]]
    assert main(argv) == 0
    first = VisionLanguageModel.from_pretrained(run / "checkpoints" / "1-pretrain")
    final = VisionLanguageModel.from_pretrained(run / "model")
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(backbones["llm"])
    own = first.llm.causal_lm.state_dict()
    assert all(torch.equal(own[k], v) for k, v in llm.state_dict().items() if "layers." in k)  # frozen in pretraining
    layer = first.llm.causal_lm.get_decoder().layers[0]
    assert not torch.equal(first.llm.experts[0]["q_proj"].weight, layer.self_attn.q_proj.weight)  # experts trained
    assert final.visual_expert and final.num_image_tokens == 16 + 2  # the patches and the begin/end vectors
    assert not torch.equal(final.llm.causal_lm.get_decoder().layers[0].self_attn.q_proj.weight,
                           layer.self_attn.q_proj.weight)  # SFT trains the LLM
    capsys.readouterr()
    assert main(["chat", str(run), "--image", image_files[0], "--max-new-tokens", "3", "what", "color?"]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert main(["eval", str(run), "--data", str(data), "--image-folder", str(tmp_path)]) == 0
    packed = argv[:4] + [str(tmp_path / "packed")] + argv[5:] + ["--stages", "sft", "--sft.pack-to", "256"]
    assert main(packed) == 2
    assert "visual-expert" in capsys.readouterr().err.strip().splitlines()[-1]


def test_shared_prefix_generation_equals_whole_prompts_with_experts(trained_expert_model):
    from vlmkit.eval.vqa import _prefix_end

    model = trained_expert_model
    ids = prompts(model, ["what color is the shape?", "what?", "is it red?"])
    pixels = torch.randn(2, 3, 32, 32)
    owners = [0, 1, 0]
    config = GenerationConfig(max_new_tokens=8)
    whole = generate(model, ids, [1, 1, 1], pixel_values=pixels[owners], config=config, stop_ids=set())
    cut = _prefix_end(ids[0], model.image_token_id)
    shared = generate(model, [i[cut:] for i in ids], pixel_values=pixels, config=config, stop_ids=set(),
                      prefix=(torch.tensor([ids[0][:cut]] * 2), owners))
    assert shared == whole
