"""Sequence packing: several examples per row, as Qwen-VL trains (samples packed into 2048-token rows).

Padding a batch to its longest sample wastes compute on pad tokens when lengths vary; packing concatenates
samples into rows of at most `pack_to` tokens instead. Samples in a row must not see each other, so a packed
batch carries `sequence_ids` (which sample each token belongs to) and the model gets a block-diagonal causal
mask from `block_diagonal_mask` plus `position_ids` that restart at 0 for every sample:

    rows = pack_examples(dataset.examples, pack_to=2048)
    batch = collate_packed([[dataset[i] for i in row] for row in rows[:4]], tokenizer.pad_token_id)
    loss, _ = model(batch.input_ids, block_diagonal_mask(batch.sequence_ids, dtype), batch.labels,
                    image_counts=batch.image_counts, pixel_values=dataset.pixel_values[batch.image_indices],
                    position_ids=batch.position_ids)

The 2-D `attention_mask` of a packed batch only marks padding; passing it to the model instead of the
block-diagonal mask lets samples attend across their boundaries.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkit.data.dataset import Example
from vlmkit.data.render import IGNORE_INDEX
from vlmkit.errors import ConfigError


@dataclass
class PackedBatch:
    input_ids: torch.Tensor       # (B, L) rows of concatenated samples, right-padded
    attention_mask: torch.Tensor  # (B, L) 1 on tokens, 0 on padding (not a packing-aware mask)
    labels: torch.Tensor          # (B, L) IGNORE_INDEX on padding and on each sample's first token
    image_indices: torch.Tensor   # (num_images,) indices into dataset.images, in token order
    image_counts: list[int]       # images per row (the sum over its samples), as the model splices per row
    record_ids: list[list[str]]   # the record ids of each row's samples, in order
    position_ids: torch.Tensor    # (B, L) restarting at 0 for every sample; 0 on padding
    sequence_ids: torch.Tensor    # (B, L) index of the sample within its row; -1 on padding
    pixel_values: torch.Tensor | None = None  # the batch's images, when a loader decoded them (as in Batch)


def pack_examples(examples: list[Example], pack_to: int) -> list[list[int]]:
    """Rows of example indices, each row's total length <= pack_to: first-fit decreasing.

    Deterministic: ties in length keep input order, and rows come out in the order they were opened.
    """
    lengths = [len(e.input_ids) for e in examples]
    for example, n in zip(examples, lengths):
        if n > pack_to:
            raise ConfigError(f"record {example.record_id!r} has {n} tokens, more than pack_to={pack_to}; "
                              "raise pack_to or cut the record with max_length")
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(examples)), key=lambda i: -lengths[i]):  # sorted() is stable
        row = next((r for r, room in enumerate(free) if room >= lengths[index]), None)
        if row is None:
            rows.append([])
            free.append(pack_to)
            row = len(rows) - 1
        rows[row].append(index)
        free[row] -= lengths[index]
    return rows


def collate_packed(rows: list[list[Example]], pad_token_id: int) -> PackedBatch:
    """One batch from rows of examples (e.g. from `pack_examples`): each row's samples concatenated."""
    length = max(sum(len(e.input_ids) for e in row) for row in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    sequence_ids = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for s, example in enumerate(row):
            n = len(example.input_ids)
            span = slice(start, start + n)
            input_ids[r, span] = torch.as_tensor(example.input_ids)
            labels[r, span] = torch.as_tensor(example.labels)
            # the model's next-token shift pairs this label with the previous sample's last token
            labels[r, start] = IGNORE_INDEX
            attention_mask[r, span] = 1
            position_ids[r, span] = torch.arange(n)
            sequence_ids[r, span] = s
            start += n
    image_indices = torch.tensor([i for row in rows for e in row for i in e.image_indices], dtype=torch.long)
    return PackedBatch(input_ids, attention_mask, labels, image_indices,
                       [sum(len(e.image_indices) for e in row) for row in rows],
                       [[e.record_id for e in row] for row in rows], position_ids, sequence_ids)


def block_diagonal_mask(sequence_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive attention mask (B, 1, L, L): 0 where query i may attend key j (same sample, j <= i), the
    dtype's minimum elsewhere. Padding queries attend to themselves only, so their softmax has no NaN."""
    length = sequence_ids.shape[1]
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=sequence_ids.device).tril()
    allowed = same & causal & (sequence_ids[:, None, :] >= 0)
    allowed |= torch.eye(length, dtype=torch.bool, device=sequence_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=sequence_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


class PackingCollate:
    """A loader's collate for packed stages: the micro-batch's samples packed into rows of `pack_to` tokens."""

    def __init__(self, pack_to: int):
        self.pack_to = pack_to

    def __call__(self, examples: list[Example], pad_token_id: int) -> PackedBatch:
        rows = pack_examples(examples, self.pack_to)
        return collate_packed([[examples[i] for i in row] for row in rows], pad_token_id)
