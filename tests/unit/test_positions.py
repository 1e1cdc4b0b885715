"""The model owns positions and decoding (issue 33, item 2): one `position_ids` for every batch layout (right-padded
training, left-padded generation, packed rows, shared-prefix rows) and one `decode` / `decode_step` that generation
calls. For every preset: cached generation gives the tokens the uncached one does and a left-padded batch the tokens
of each prompt alone, a shared prefix gives the tokens the whole prompts do, and packed or shared-prefix training rows give each sample's loss as its own batch does."""
import pytest
import torch

from vlmkit.archs import from_name, names, preset_data
from vlmkit.data.dataset import collate
from vlmkit.data.packing import collate_packed, collate_shared
from vlmkit.data.render import render_conversation
from vlmkit.data.templates import get_template
from vlmkit.infer.generate import GenerationConfig, generate
from vlmkit.llm import sample_positions
from vlmkit.model.vlm import VisionLanguageModel

QUESTIONS = ["what color is the shape?", "is there not a blue shape in the image?", "what?"]


def test_positions_of_every_layout():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert sample_positions(right)[:, :3].tolist() == [[0, 1, 2], [0, 1, 2]]
    left = torch.tensor([[0, 0, 1, 1, 1]])
    assert sample_positions(left)[0, 2:].tolist() == [0, 1, 2]
    packed = torch.tensor([[0, 0, 0, 1, 1, 2, -1], [0, 0, 0, 0, 0, 0, 0]])
    assert sample_positions(None, packed).tolist() == [[0, 1, 2, 0, 1, 0, 0], [0, 1, 2, 3, 4, 5, 6]]
    # a shared-prefix row: the prefix (sample 0), then each branch where it would follow the prefix alone; a row
    # without a prefix (0) numbers its one sample from 0
    shared = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, -1], [1, 1, 1, -1, -1, -1, -1, -1, -1]])
    assert sample_positions(None, shared, torch.tensor([3, 0])).tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0],
                                                                             [0, 1, 2, 0, 0, 0, 0, 0, 0]]


@pytest.fixture(scope="module")
def preset_model(backbones):
    made = {}

    def make(preset):
        if preset not in made:
            torch.manual_seed(0)
            overrides = {}
            if preset_data(preset)["connector"]["type"] == "qformer":
                overrides["connector"] = {"name_or_path": backbones["bert"], "num_layers": 2}
            llm = backbones["t5"] if preset == "blip2-t5" else backbones["llm"]
            config = from_name(preset, scale="tiny", vision={"name_or_path": backbones["clip"], "feature_layer": -2,
                                                             "select": "patch"},
                               llm={"name_or_path": llm}, **overrides)
            model = VisionLanguageModel.from_config(config, verbose=False).eval()
            with torch.no_grad():  # a connector that is not at its initialisation: the image decides the tokens
                for param in model.connector.parameters():
                    param.add_(torch.randn_like(param) * 0.05)
            made[preset] = model
        return made[preset]
    return make


def prompts(model, questions):
    template = get_template(model.config.template)
    return [render_conversation([{"role": "user", "content": f"<image>\n{q}"}], template, model.tokenizer,
                                num_image_tokens=model.num_image_tokens, add_generation_prompt=True).input_ids
            for q in questions]


@pytest.mark.parametrize("preset", names())
def test_cached_generation_equals_uncached_for_every_preset(preset_model, preset):
    model = preset_model(preset)
    ids = prompts(model, QUESTIONS)
    assert len({len(i) for i in ids}) == 3  # left padding in play
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32)
    cached = generate(model, ids, [1, 1, 1], pixel_values=pixels, config=GenerationConfig(max_new_tokens=10),
                      stop_ids=set())
    uncached = generate(model, ids, [1, 1, 1], pixel_values=pixels,
                        config=GenerationConfig(max_new_tokens=10, use_cache=False), stop_ids=set())
    assert cached == uncached
    assert all(len(tokens) == 10 for tokens in cached)
    # left padding moves no row's positions: each prompt alone gives its row's tokens
    alone = [generate(model, [ids[i]], [1], pixel_values=pixels[i:i + 1], config=GenerationConfig(max_new_tokens=10),
                      stop_ids=set())[0] for i in range(3)]
    assert alone == cached
    if model.llm.is_encoder_decoder or getattr(model.connector, "reads_instruction", False):
        return  # no prefix to share: the encoder reads the whole prompt, or the image tokens read the question
    from vlmkit.eval.vqa import _prefix_end

    cut = _prefix_end(ids[0], model.image_token_id)
    owners = [0, 1, 0]
    whole = generate(model, ids, [1, 1, 1], pixel_values=pixels[:2][owners],
                     config=GenerationConfig(max_new_tokens=10), stop_ids=set())
    shared = generate(model, [i[cut:] for i in ids], pixel_values=pixels[:2], config=GenerationConfig(max_new_tokens=10),
                      stop_ids=set(), prefix=(torch.tensor([ids[0][:cut]] * 2), owners))
    assert shared == whole


def _examples(model, count=4):
    from vlmkit.data.dataset import Example

    template = get_template(model.config.template)
    answers = ["red", "no, it is a green circle", "yes", "blue"]
    examples = []
    for i in range(count):
        rendered = render_conversation([{"role": "user", "content": f"<image>\n{QUESTIONS[i % 3]}"},
                                        {"role": "assistant", "content": answers[i]}], template, model.tokenizer,
                                       num_image_tokens=model.num_image_tokens)
        examples.append(Example(f"r{i}", rendered.input_ids, rendered.labels, [i // 2]))  # two questions per image
    return examples


# blip2: its Q-Former reads the question; blip2-t5: an encoder-decoder; cogvlm numbers its images itself and refuses
# packed rows (tests/unit/test_visual_expert.py)
@pytest.mark.parametrize("preset", [n for n in names() if n not in ("blip2-t5", "blip2", "cogvlm")])
def test_packed_and_shared_prefix_rows_give_each_samples_own_loss(preset_model, preset):
    """Each sample's loss (summed over its supervised tokens) in packed rows and in shared-prefix rows equals its
    loss alone; the model makes the rows' masks and positions from `sequence_ids` / `prefix_lengths`."""
    model = preset_model(preset)
    examples = _examples(model)
    torch.manual_seed(2)
    pixels = torch.randn(2, 3, 32, 32)
    pad = model.tokenizer.pad_token_id

    def per_sample(batch):
        with torch.no_grad():
            logits, targets = model.supervised_logits(
                batch.input_ids, batch.attention_mask, batch.labels, batch.image_counts,
                pixels[batch.image_indices], sequence_ids=getattr(batch, "sequence_ids", None),
                prefix_lengths=getattr(batch, "prefix_lengths", None))
        return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")

    alone = [per_sample(collate([e], pad)).sum() for e in examples]
    if getattr(model.connector, "reads_instruction", False):
        return  # a row's images would read one question: train_stage refuses both layouts for such a connector
    shared = collate_shared(examples, pad, model.image_token_id)
    assert int(shared.prefix_lengths.min()) > 0  # both images' questions share their prefix
    layouts = {"packed": per_sample(collate_packed([examples[:2], examples[2:]], pad)), "shared": per_sample(shared)}
    for name, losses in layouts.items():
        # supervised tokens come out in row order, and each row's samples in order: split them back per sample
        sizes = [int((torch.tensor(e.labels[1:]) != -100).sum()) for e in examples]
        parts = losses.split(sizes)
        for e, part, expected in zip(examples, parts, alone):
            torch.testing.assert_close(part.sum(), expected, atol=2e-4, rtol=1e-5,
                                       msg=lambda m: f"{preset} {name} {e.record_id}: {m}")


@pytest.fixture(scope="module")
def absolute_model(backbones, tmp_path_factory):
    """llava-1.5 over an OPT LM (BLIP-2's paper LLM), whose positions are a learned table: a position that is off
    by a constant changes its output, which rotary positions (the Llama of the other tests) would not show."""
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    directory = tmp_path_factory.mktemp("opt")
    tokenizer = AutoTokenizer.from_pretrained(backbones["llm"])
    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                             num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=512,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    config = from_name("llava-1.5", scale="tiny", vision={"name_or_path": backbones["clip"], "select": "patch"},
                       llm={"name_or_path": str(directory)})
    model = VisionLanguageModel.from_config(config, verbose=False).eval()
    with torch.no_grad():
        for param in model.llm.parameters():  # positions that matter: a table far from its small initialisation
            param.add_(torch.randn_like(param) * 0.5)
    return model


def test_absolute_positions_batched_shared_and_packed_equal_alone(absolute_model):
    model = absolute_model
    ids = prompts(model, QUESTIONS)
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32)
    config = GenerationConfig(max_new_tokens=8)
    batched = generate(model, ids, [1, 1, 1], pixel_values=pixels, config=config, stop_ids=set())
    alone = [generate(model, [ids[i]], [1], pixel_values=pixels[i:i + 1], config=config, stop_ids=set())[0]
             for i in range(3)]
    assert batched == alone
    assert batched == generate(model, ids, [1, 1, 1], pixel_values=pixels, stop_ids=set(),
                               config=GenerationConfig(max_new_tokens=8, use_cache=False))
    from vlmkit.eval.vqa import _prefix_end

    cut = _prefix_end(ids[0], model.image_token_id)
    shared = generate(model, [i[cut:] for i in ids], pixel_values=pixels, config=config, stop_ids=set(),
                      prefix=(torch.tensor([ids[0][:cut]] * 3), [0, 1, 2]))
    assert shared == batched
    examples = _examples(model)
    pad = model.tokenizer.pad_token_id
    pixels = pixels[:2]

    def per_sample(batch):
        with torch.no_grad():
            logits, targets = model.supervised_logits(
                batch.input_ids, batch.attention_mask, batch.labels, batch.image_counts, pixels[batch.image_indices],
                sequence_ids=getattr(batch, "sequence_ids", None), prefix_lengths=getattr(batch, "prefix_lengths", None))
        return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")

    alone = torch.stack([per_sample(collate([e], pad)).sum() for e in examples])
    sizes = [int((torch.tensor(e.labels[1:]) != -100).sum()) for e in examples]
    for batch in (collate_packed([examples[:2], examples[2:]], pad), collate_shared(examples, pad, model.image_token_id)):
        parts = torch.stack([part.sum() for part in per_sample(batch).split(sizes)])
        torch.testing.assert_close(parts, alone, atol=2e-4, rtol=1e-5)


def test_the_llm_sees_which_tokens_are_image_tokens_in_every_forward(preset_model):
    """The routing mask (CogVLM's visual expert would send image tokens to their own weights) reaches the LLM
    wrapper with every forward of generation, cached and not, with a shared prefix too: one flag per new token,
    true exactly on the image's tokens."""
    model = preset_model("llava-1.5")
    ids = prompts(model, QUESTIONS)
    pixels = torch.randn(3, 3, 32, 32)
    seen = []
    original = model.llm.forward

    def recording(inputs_embeds, *args, image_token_mask=None, **kwargs):
        seen.append((tuple(inputs_embeds.shape[:2]), None if image_token_mask is None else image_token_mask.clone()))
        return original(inputs_embeds, *args, image_token_mask=image_token_mask, **kwargs)

    model.llm.forward = recording
    try:
        for use_cache in (True, False):
            seen.clear()
            generate(model, ids, [1, 1, 1], pixel_values=pixels, stop_ids=set(),
                     config=GenerationConfig(max_new_tokens=3, use_cache=use_cache))
            assert len(seen) == 3
            for shape, mask in seen:
                assert mask is not None and tuple(mask.shape) == shape
                assert mask.sum(1).tolist() == [model.num_image_tokens] * 3 or (use_cache and not mask.any())
            assert seen[0][1].sum(1).tolist() == [model.num_image_tokens] * 3  # the prefill holds the images
        seen.clear()
        from vlmkit.eval.vqa import _prefix_end

        cut = _prefix_end(ids[0], model.image_token_id)
        generate(model, [i[cut:] for i in ids], pixel_values=pixels[:1], stop_ids=set(),
                 config=GenerationConfig(max_new_tokens=2), prefix=(torch.tensor([ids[0][:cut]]), [0, 0, 0]))
        (prefix_shape, prefix_mask), (_, suffix_mask), (_, step_mask) = seen
        assert prefix_mask.sum().item() == model.num_image_tokens and not suffix_mask.any() and not step_mask.any()
    finally:
        del model.llm.forward
