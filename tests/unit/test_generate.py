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
