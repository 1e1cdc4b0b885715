import pytest
import torch
import torch.nn.functional as F

from vlmkit.data.dataset import Example, collate
from vlmkit.data.packing import block_diagonal_mask, collate_packed, pack_examples
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
