import pytest
import torch
import torch.nn.functional as F

from vlmkit.data.dataset import Example, collate
from vlmkit.data.packing import (block_diagonal_mask, collate_packed, collate_shared, image_grouped_batches,
                                 pack_examples, shared_prefix_length)
from vlmkit.data.render import IGNORE_INDEX, render_conversation
from vlmkit.data.templates import get_template
from vlmkit.errors import ConfigError

CONVERSATIONS = [  # (turns, number of images)
    ([("user", "<image>\nwhat colour is the shape?"), ("assistant", "red")], 1),
    ([("user", "hello"), ("assistant", "hi there, how can I help you today?")], 0),
    ([("user", "<image>\nwhat shape is it?"), ("assistant", "circle"), ("user", "and its colour?"),
      ("assistant", "blue")], 1),
    ([("user", "name a colour"), ("assistant", "green")], 0),
    ([("user", "<image> and <image>\ncompare the two shapes"), ("assistant", "the first is larger")], 2),
    ([("user", "count to three"), ("assistant", "one two three"), ("user", "and back"),
      ("assistant", "three two one"), ("user", "thanks"), ("assistant", "you are welcome")], 0),
]


@pytest.fixture(scope="module")
def model(make_model):
    return make_model("llava-1.5", vision="clip").eval()


@pytest.fixture(scope="module")
def examples(model):
    out, next_image = [], 0
    for i, (turns, images) in enumerate(CONVERSATIONS):
        messages = [{"role": role, "content": text} for role, text in turns]
        r = render_conversation(messages, get_template("vicuna_v1"), model.tokenizer,
                                num_image_tokens=model.num_image_tokens)
        out.append(Example(f"rec-{i}", r.input_ids, r.labels, list(range(next_image, next_image + images))))
        next_image += images
    return out


def ex(record_id: str, n: int) -> Example:
    return Example(record_id, list(range(n)), [IGNORE_INDEX] + list(range(1, n)), [])


def sample_losses(logits, labels, sequence_ids) -> dict[tuple[int, int], torch.Tensor]:
    """Summed next-token loss of each (row, sample), never pairing tokens of two samples."""
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], reduction="none")
    same = sequence_ids[:, 1:] == sequence_ids[:, :-1]
    out = {}
    for row in range(sequence_ids.shape[0]):
        for sample in sequence_ids[row].unique().tolist():
            if sample >= 0:
                out[row, sample] = losses[row][same[row] & (sequence_ids[row, 1:] == sample)].sum()
    return out


def test_pack_examples_respects_pack_to_and_is_deterministic():
    lengths = [7, 3, 9, 2, 5, 5, 1, 8, 4]
    examples = [ex(str(i), n) for i, n in enumerate(lengths)]
    rows = pack_examples(examples, pack_to=10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert rows == pack_examples(examples, pack_to=10)
    assert rows == [[2, 6], [7, 3], [0, 1], [4, 5], [8]]  # first-fit decreasing, ties in input order
    assert pack_examples(examples, pack_to=100) == [[2, 7, 0, 4, 5, 8, 1, 3, 6]]


def test_pack_examples_refuses_an_example_longer_than_pack_to():
    with pytest.raises(ConfigError, match="'long-one' has 12 tokens, more than pack_to=10"):
        pack_examples([ex("a", 4), ex("long-one", 12)], pack_to=10)


def test_collate_packed_restarts_positions_and_masks_boundaries():
    a, b, c = ex("a", 3), ex("b", 2), ex("c", 4)
    a.labels = [5, 6, 7]  # a first label that is not ignored must still be ignored once packed
    a.image_indices, c.image_indices = [0], [1, 2]
    batch = collate_packed([[a, b], [c]], pad_token_id=99)
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch.sequence_ids.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, -1]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch.input_ids[1, 4] == 99
    assert batch.labels.tolist() == [[-100, 6, 7, -100, 1], [-100, 1, 2, 3, -100]]
    assert batch.image_counts == [1, 2] and batch.image_indices.tolist() == [0, 1, 2]
    assert batch.record_ids == [["a", "b"], ["c"]]


def test_block_diagonal_mask_blocks_other_samples_future_and_padding():
    sequence_ids = torch.tensor([[0, 0, 1, 1, 1, -1]])
    mask = block_diagonal_mask(sequence_ids, torch.float32)
    assert mask.shape == (1, 1, 6, 6)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [0, 0, 1, 0, 0, 0],
                       [0, 0, 1, 1, 0, 0],
                       [0, 0, 1, 1, 1, 0],
                       [0, 0, 0, 0, 0, 1]]  # padding attends to itself only
    assert set(mask.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
    assert block_diagonal_mask(sequence_ids, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_matches_each_sample_alone(model, examples, attn):
    model.llm.causal_lm.set_attn_implementation(attn)
    try:
        torch.manual_seed(0)
        pixels = torch.rand(sum(len(e.image_indices) for e in examples), 3, 32, 32)
        rows = pack_examples(examples, pack_to=3 * max(len(e.input_ids) for e in examples) // 2)
        assert len(rows) < len(examples) and max(len(row) for row in rows) >= 2
        batch = collate_packed([[examples[i] for i in row] for row in rows], model.tokenizer.pad_token_id)
        assert (batch.sequence_ids == -1).any()  # padding is covered too
        mask = block_diagonal_mask(batch.sequence_ids, torch.float32)
        with torch.no_grad():
            _, logits = model(batch.input_ids, mask, image_counts=batch.image_counts,
                              pixel_values=pixels[batch.image_indices], position_ids=batch.position_ids)
            assert torch.isfinite(logits).all()
            packed = sample_losses(logits, batch.labels, batch.sequence_ids)
            assert len(packed) == len(examples)
            for r, row in enumerate(rows):
                for s, index in enumerate(row):
                    e = examples[index]
                    alone = collate([e], model.tokenizer.pad_token_id)
                    _, own = model(alone.input_ids, alone.attention_mask, image_counts=alone.image_counts,
                                   pixel_values=pixels[alone.image_indices] if e.image_indices else None)
                    expected = sample_losses(own, alone.labels, torch.zeros_like(alone.input_ids))[0, 0]
                    assert expected > 0
                    torch.testing.assert_close(packed[r, s], expected, atol=1e-5, rtol=0,
                                               msg=lambda m: f"{e.record_id} (row {r}, sample {s}): {m}")

            # the check can fail: a padding-only 2-D mask lets samples see the ones before them in the row
            _, leaky = model(batch.input_ids, batch.attention_mask, image_counts=batch.image_counts,
                             pixel_values=pixels[batch.image_indices], position_ids=batch.position_ids)
            leaked = sample_losses(leaky, batch.labels, batch.sequence_ids)
            assert max(abs(leaked[k] - packed[k]).item() for k in packed) > 1e-3

            # the model's own loss, a mean over supervised tokens, equals the padded batch's loss
            loss_packed, _ = model(batch.input_ids, mask, batch.labels, image_counts=batch.image_counts,
                                   pixel_values=pixels[batch.image_indices], position_ids=batch.position_ids)
            padded = collate(examples, model.tokenizer.pad_token_id)
            loss_padded, _ = model(padded.input_ids, padded.attention_mask, padded.labels,
                                   image_counts=padded.image_counts, pixel_values=pixels[padded.image_indices])
            torch.testing.assert_close(loss_packed, loss_padded, atol=1e-6, rtol=1e-6)
    finally:
        model.llm.causal_lm.set_attn_implementation("sdpa")


# -- shared prefixes: an image's questions in one row, the system prompt and image computed once -------------------

QUESTIONS = [("what colour is the shape?", "red"), ("is there a circle?", "no"), ("what shape is it?", "triangle"),
             ("does the image contain a red shape?", "yes")]


def _question_examples(model, image: int, questions=QUESTIONS) -> list[Example]:
    out = []
    for q, (text, answer) in enumerate(questions):
        messages = [{"role": "user", "content": f"<image>\n{text}"}, {"role": "assistant", "content": answer}]
        r = render_conversation(messages, get_template("vicuna_v1"), model.tokenizer,
                                num_image_tokens=model.num_image_tokens)
        out.append(Example(f"img{image}-q{q}", r.input_ids, r.labels, [image]))
    return out


def test_shared_prefix_length_stops_before_the_answers_and_covers_the_image():
    image = 50
    a = Example("a", [1, 2, image, image, 3, 4, 5, 6], [IGNORE_INDEX] * 6 + [5, 6], [0])
    b = Example("b", [1, 2, image, image, 3, 7, 8], [IGNORE_INDEX] * 6 + [8], [0])
    assert shared_prefix_length([a, b], image) == 5  # [1, 2, img, img, 3]
    # the same question twice: the prefix ends one token before the first answer token, never inside it
    assert shared_prefix_length([a, a], image) == 5
    # an image placeholder after the common part cannot be spliced into the prefix: nothing is shared
    c = Example("c", [1, 9, image, image, 3, 7, 8], [IGNORE_INDEX] * 6 + [8], [0])
    assert shared_prefix_length([a, c], image) == 0


def test_collate_shared_lays_out_one_row_per_image():
    image = 50
    a = Example("a", [1, 2, image, 3, 4, 5], [IGNORE_INDEX] * 4 + [4, 5], [7])
    b = Example("b", [1, 2, image, 3, 6, 8, 9], [IGNORE_INDEX] * 5 + [8, 9], [7])
    c = Example("c", [1, 2, 4], [IGNORE_INDEX, IGNORE_INDEX, 4], [])
    batch = collate_shared([a, c, b], pad_token_id=0, image_token_id=image)
    assert batch.record_ids == [["a", "b"], ["c"]] and batch.image_counts == [1, 0]
    assert batch.image_indices.tolist() == [7]  # the image once, for the row that shares it
    assert batch.prefix_lengths.tolist() == [3, 0]
    assert batch.input_ids.tolist() == [[1, 2, image, 3, 4, 5, 3, 6, 8, 9], [1, 2, 4] + [0] * 7]
    assert batch.position_ids.tolist()[0] == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6]  # each branch where it was alone
    assert batch.sequence_ids.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1] + [-1] * 7]
    assert batch.labels.tolist()[0] == [IGNORE_INDEX] * 4 + [4, 5] + [IGNORE_INDEX] * 2 + [8, 9]
    assert int((batch.labels != IGNORE_INDEX).sum()) == 5  # every supervised token kept
    allowed = (block_diagonal_mask(batch.sequence_ids, prefix_lengths=batch.prefix_lengths)[0, 0] == 0).int()
    assert allowed[6].tolist() == [1, 1, 1, 0, 0, 0, 1, 0, 0, 0]  # b's first token: the prefix and itself
    assert allowed[5].tolist() == [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]  # a's last token: the prefix and a
    assert allowed[9].tolist() == [1, 1, 1, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prefix_loss_and_gradient_equal_the_unshared_batch(model, attn):
    model.llm.causal_lm.set_attn_implementation(attn)
    try:
        examples = _question_examples(model, 0) + _question_examples(model, 1, QUESTIONS[:2]) + \
            _question_examples(model, 2, QUESTIONS[2:3])
        torch.manual_seed(0)
        pixels = torch.rand(3, 3, 32, 32)
        batch = collate_shared(examples, model.tokenizer.pad_token_id, model.image_token_id)
        assert batch.image_counts == [1, 1, 1] and batch.prefix_lengths[:2].min() > model.num_image_tokens
        padded = collate(examples, model.tokenizer.pad_token_id)
        assert batch.input_ids.numel() < 0.7 * padded.input_ids.numel()

        def loss_and_grad(*args, **kw):
            model.zero_grad()
            loss, _ = model(*args, **kw)
            loss.backward()
            return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        mask = block_diagonal_mask(batch.sequence_ids, prefix_lengths=batch.prefix_lengths)
        shared, shared_grads = loss_and_grad(batch.input_ids, mask, batch.labels, image_counts=batch.image_counts,
                                             pixel_values=pixels[batch.image_indices], position_ids=batch.position_ids)
        plain, plain_grads = loss_and_grad(padded.input_ids, padded.attention_mask, padded.labels,
                                           image_counts=padded.image_counts, pixel_values=pixels[padded.image_indices])
        torch.testing.assert_close(shared, plain, atol=1e-6, rtol=1e-5)
        assert shared_grads.keys() == plain_grads.keys() and shared_grads
        for name in plain_grads:
            torch.testing.assert_close(shared_grads[name], plain_grads[name], atol=1e-6, rtol=1e-4, msg=name)
        # the check can fail: without the prefix in the mask the branches see neither the prompt nor the image
        with torch.no_grad():
            blind, _ = model(batch.input_ids, block_diagonal_mask(batch.sequence_ids), batch.labels,
                             image_counts=batch.image_counts, pixel_values=pixels[batch.image_indices],
                             position_ids=batch.position_ids)
        assert abs(blind - plain) > 1e-3
    finally:
        model.zero_grad()
        model.llm.causal_lm.set_attn_implementation("sdpa")


def test_image_grouped_batches_keep_an_images_samples_together():
    keys = [(i % 5,) for i in range(23)] + [(), ()]
    batches = image_grouped_batches(keys, batch_size=4, seed=3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(25)) and all(len(b) == 4 for b in batches[:-1])
    runs = [keys[i] if keys[i] else ("alone", i) for i in flat]
    assert len([k for j, k in enumerate(runs) if j == 0 or runs[j - 1] != k]) == 7  # 5 images + 2 text-only
    assert batches == image_grouped_batches(keys, batch_size=4, seed=3)
    assert batches != image_grouped_batches(keys, batch_size=4, seed=4)
    # a mixture's epoch may repeat a sample: it stays with its image
    repeated = image_grouped_batches(keys, 4, 0, indices=[0, 5, 0, 1])
    assert sorted(i for b in repeated for i in b) == [0, 0, 1, 5]
