import pytest
import torch

from vlmkit.data.render import render_conversation
from vlmkit.data.templates import get_template
from vlmkit.infer.generate import GenerationConfig, generate, sample_next


def prompts(model, questions):
    template = get_template(model.config.template)
    return [render_conversation([{"role": "user", "content": f"<image>\n{q}"}], template, model.tokenizer,
                                num_image_tokens=model.num_image_tokens, add_generation_prompt=True).input_ids
            for q in questions]


def test_cached_greedy_equals_uncached(make_model):
    torch.manual_seed(0)
    model = make_model().eval()
    ids = prompts(model, ["what color is the shape?", "is there a circle in the image?", "what?"])
    pixels = torch.randn(3, 3, 32, 32)
    cached = generate(model, ids, [1, 1, 1], pixel_values=pixels,
                      config=GenerationConfig(max_new_tokens=12), stop_ids=set())
    uncached = generate(model, ids, [1, 1, 1], pixel_values=pixels,
                        config=GenerationConfig(max_new_tokens=12, use_cache=False), stop_ids=set())
    assert cached == uncached
    assert all(len(c) == 12 for c in cached)


def test_batched_left_padding_equals_one_by_one(make_model):
    model = make_model().eval()
    ids = prompts(model, ["what color is the shape?", "is there not a blue shape in the image?"])
    assert len(ids[0]) != len(ids[1])
    pixels = torch.randn(2, 3, 32, 32)
    config = GenerationConfig(max_new_tokens=8)
    together = generate(model, ids, [1, 1], pixel_values=pixels, config=config, stop_ids=set())
    alone = [generate(model, [ids[i]], [1], pixel_values=pixels[i:i + 1], config=config, stop_ids=set())[0]
             for i in range(2)]
    assert together == alone


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[4.0, 3.9, -10.0, -10.0]])
    draws = {int(sample_next(logits, 1.0, 0.5, torch.Generator().manual_seed(s))) for s in range(30)}
    assert draws == {0}  # top-p 0.5 keeps only the most likely token
    draws = {int(sample_next(logits, 1.0, 0.99, torch.Generator().manual_seed(s))) for s in range(30)}
    assert draws == {0, 1}
    a = sample_next(logits.repeat(5, 1), 1.0, 1.0, torch.Generator().manual_seed(3))
    b = sample_next(logits.repeat(5, 1), 1.0, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_rows_joining_and_leaving_mid_generation_get_their_solo_tokens(make_model):
    """Continuous batching: a row that joins a running batch (its cache left-padded into the others'), and
    rows that finish and leave (the cache trimmed), decode exactly as each would alone."""
    from vlmkit.infer.generate import Decoder, Row

    model = make_model().eval()
    ids = prompts(model, ["what color is the shape?", "is there not a blue shape in the image?", "what?"])
    pixels = torch.randn(3, 3, 32, 32)
    budgets = [9, 4, 5]
    alone = [generate(model, [ids[i]], [1], pixel_values=pixels[i:i + 1],
                      config=GenerationConfig(max_new_tokens=budgets[i]), stop_ids=set())[0] for i in range(3)]
    decoder = Decoder(model, stop_ids=set())
    rows = [Row(GenerationConfig(max_new_tokens=n)) for n in budgets]
    decoder.add([ids[0]], rows[:1], [1], pixel_values=pixels[:1])
    decoder.step()
    decoder.step()
    assert decoder.can_join
    decoder.add(ids[1:], rows[1:], [1, 1], pixel_values=pixels[1:])  # two rows join a running one
    assert len(decoder) == 3 and decoder.mask.shape[0] == 3
    left = []
    while len(decoder):
        decoder.step()
        left += decoder.drop_finished()
        if len(decoder):
            width = decoder.mask.shape[1]
            assert decoder.mask[:, 0].any()  # no column that is padding in every row survives a drop
            assert all(layer.keys.shape[2] == width for layer in decoder.cache.layers)
    assert [row.tokens for row in rows] == alone
    assert left == [rows[1], rows[2], rows[0]]  # they left in order of their budgets


def test_shared_prefix_prefill_equals_whole_prompts(make_model):
    """Decoder.add_with_prefix (the prompt up to the image run once per image, each question continuing from
    it) gives the same first-step logits' argmax chain as prefilling every whole prompt; random weights, so
    the 12 tokens each depend on everything before them."""
    from vlmkit.eval.vqa import _prefix_end

    torch.manual_seed(0)
    model = make_model().eval()
    questions = ["what color is the shape?", "is there not a blue shape in the image?", "what?", "circle?"]
    ids = prompts(model, questions)
    cut = _prefix_end(ids[0], model.image_token_id)
    assert all(i[:cut] == ids[0][:cut] for i in ids) and cut < min(map(len, ids))
    pixels = torch.randn(2, 3, 32, 32)
    owners = [0, 1, 1, 0]  # two images, questions interleaved
    config = GenerationConfig(max_new_tokens=12)
    whole = generate(model, ids, [1] * 4, pixel_values=pixels[owners], config=config, stop_ids=set())
    shared = generate(model, [i[cut:] for i in ids], pixel_values=pixels, config=config, stop_ids=set(),
                      prefix=(torch.tensor([ids[0][:cut]] * 2), owners))
    assert shared == whole
    assert len({tuple(t) for t in whole}) > 1


def test_eval_batches_questions_by_image_and_answers_as_without_sharing(make_model, image_files):
    from vlmkit.data.sources import DataSpec, build_dataset
    from vlmkit.eval.vqa import _shared_prefix_batches, generate_answers

    model = make_model().eval()
    records = [{"id": f"q{i}", "image": image_files[i % 3], "conversations": [
        {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "x"}]}
        for i, q in enumerate(["what color?", "is it red?", "a shape?", "is there not a circle?", "which?", "why"])]
    records.append({"id": "text", "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "x"}]})
    dataset = build_dataset(model, records, "mem", model.config.template, DataSpec(instructions="mem"), mode="prompt",
                            verbose=False)
    batches, rest = _shared_prefix_batches(dataset, model.image_token_id, batch_size=4)
    assert rest == [6]  # the text-only record takes the plain path
    assert [[members for _, members in images] for _, images in batches] == [[[0, 3], [1, 4]], [[2, 5]]]
    assert generate_answers(model, dataset, batch_size=4, verbose=False) == \
        generate_answers(model, dataset, batch_size=4, verbose=False, share_prefix=False)


@pytest.mark.parametrize("family,template", [("llama", "vicuna_v1"), ("qwen2", "chatml"), ("mistral", "llama2")])
def test_shared_prefix_eval_holds_for_real_families(backbones, image_files, tmp_path, family, template):
    """The per-image shared prefix with the Llama (SentencePiece) and Qwen2 (ChatML) tokenizers, and a Mistral
    LM (its cache has sliding-window layers): the same answers as whole prompts."""
    from families import save_family_llm
    from vlmkit.archs import from_name
    from vlmkit.data.sources import DataSpec, build_dataset
    from vlmkit.eval.vqa import generate_answers
    from vlmkit.model.vlm import VisionLanguageModel

    if family == "mistral":
        from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(backbones["tokenizer"])
        torch.manual_seed(0)
        MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         sliding_window=256, pad_token_id=tokenizer.pad_token_id,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
                           ).save_pretrained(tmp_path / "llm")
        tokenizer.save_pretrained(tmp_path / "llm")
        llm = str(tmp_path / "llm")
    else:
        llm = save_family_llm(family, tmp_path / "llm")
    config = from_name("llava-1.5", scale="tiny", vision={"name_or_path": backbones["clip"]},
                       llm={"name_or_path": llm}, template=template)
    model = VisionLanguageModel.from_config(config, verbose=False).eval()
    records = [{"id": f"q{i}", "image": image_files[i % 2], "conversations": [
        {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "x"}]}
        for i, q in enumerate(["what color is the shape?", "is there a red shape?", "a circle?", "is it not blue?"])]
    dataset = build_dataset(model, records, "mem", model.config.template, DataSpec(instructions="mem"), mode="prompt",
                            verbose=False)
    shared = generate_answers(model, dataset, verbose=False, max_new_tokens=6)
    assert shared == generate_answers(model, dataset, verbose=False, max_new_tokens=6, share_prefix=False)
