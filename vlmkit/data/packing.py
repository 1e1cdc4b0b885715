"""Sequence packing: several examples per row, as Qwen-VL trains (samples packed into 2048-token rows).

Padding a batch to its longest sample wastes compute on pad tokens when lengths vary; packing concatenates
samples into rows of at most `pack_to` tokens instead. Samples in a row must not see each other, so a packed
batch carries `sequence_ids` (which sample each token belongs to), from which the model makes a block-diagonal
causal mask (`block_diagonal_mask`) and position ids that restart at 0 for every sample (its `position_ids`,
`vlmkit.llm.sample_positions`; the batch's own `position_ids` are the same numbers, for reading):

    rows = pack_examples(dataset.examples, pack_to=2048)
    batch = collate_packed([[dataset[i] for i in row] for row in rows[:4]], tokenizer.pad_token_id)
    loss, _ = model(batch.input_ids, batch.attention_mask, batch.labels, image_counts=batch.image_counts,
                    pixel_values=dataset.pixel_values[batch.image_indices], sequence_ids=batch.sequence_ids)

The 2-D `attention_mask` of a packed batch only marks padding; passing it to the model instead of the
block-diagonal mask lets samples attend across their boundaries.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from vlmkit.data.dataset import Example, collate_states
from vlmkit.data.render import IGNORE_INDEX
from vlmkit.errors import ConfigError
from vlmkit.llm import sample_positions


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
    text_inputs: dict | None = None  # the connector's own tokens of the batch's text (as in Batch)
    # (B,) tokens at the start of each row that all its samples attend to (`collate_shared`); None = 0 everywhere
    prefix_lengths: torch.Tensor | None = None
    states: dict | None = None  # PaLM-E's state vectors, kind by kind, in token order (as in Batch)


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


def _empty_rows(count: int, length: int, pad_token_id: int) -> tuple[torch.Tensor, ...]:
    """(input_ids, labels, attention_mask, sequence_ids) of `count` all-padding rows."""
    shape = (count, length)
    return (torch.full(shape, pad_token_id, dtype=torch.long), torch.full(shape, IGNORE_INDEX, dtype=torch.long),
            torch.zeros(shape, dtype=torch.long), torch.full(shape, -1, dtype=torch.long))


def collate_packed(rows: list[list[Example]], pad_token_id: int) -> PackedBatch:
    """One batch from rows of examples (e.g. from `pack_examples`): each row's samples concatenated."""
    length = max(sum(len(e.input_ids) for e in row) for row in rows)
    input_ids, labels, attention_mask, sequence_ids = _empty_rows(len(rows), length, pad_token_id)
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
            sequence_ids[r, span] = s
            start += n
    image_indices = torch.tensor([i for row in rows for e in row for i in e.image_indices], dtype=torch.long)
    return PackedBatch(input_ids, attention_mask, labels, image_indices,
                       [sum(len(e.image_indices) for e in row) for row in rows],
                       [[e.record_id for e in row] for row in rows], sample_positions(attention_mask, sequence_ids),
                       sequence_ids, states=collate_states([e for row in rows for e in row]))


def block_diagonal_mask(sequence_ids: torch.Tensor, dtype: torch.dtype = torch.float32,
                        prefix_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Additive attention mask (B, 1, L, L): 0 where query i may attend key j (same sample, j <= i, or j in the
    row's shared prefix: `prefix_lengths`), the dtype's minimum elsewhere. Padding queries attend to themselves
    only, so their softmax has no NaN."""
    length = sequence_ids.shape[1]
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    if prefix_lengths is not None:  # every sample of a row also sees the row's first prefix_lengths[row] tokens
        positions = torch.arange(length, device=sequence_ids.device)
        same = same | (positions[None, None, :] < prefix_lengths.to(sequence_ids.device)[:, None, None])
    causal = torch.ones(length, length, dtype=torch.bool, device=sequence_ids.device).tril()
    allowed = same & causal & (sequence_ids[:, None, :] >= 0)
    allowed |= torch.eye(length, dtype=torch.bool, device=sequence_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=sequence_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def _first_supervised(example: Example) -> int:
    labels = np.asarray(example.labels)
    hits = np.flatnonzero(labels != IGNORE_INDEX)
    return int(hits[0]) if len(hits) else len(labels)


def shared_prefix_length(examples: list[Example], image_token_id: int) -> int:
    """How many leading tokens `examples` (one image's questions) can share: their common prefix, ending before
    any sample's first supervised token (the token after the prefix is a sample's first, and nothing predicts it)
    and covering every image placeholder (the image is spliced once, into the prefix). 0 when that is impossible."""
    ids = [np.asarray(e.input_ids) for e in examples]
    limit = min(min(len(a) for a in ids), min(_first_supervised(e) for e in examples) - 1)
    length = 0
    while length < limit and all(a[length] == ids[0][length] for a in ids[1:]):
        length += 1
    last_image = max((int(np.flatnonzero(a == image_token_id)[-1]) if (a == image_token_id).any() else -1)
                     for a in ids)
    return length if length > last_image else 0


def collate_shared(examples: list[Example], pad_token_id: int, image_token_id: int,
                   per_row: int = 0) -> PackedBatch:
    """One row per image: the image's samples in the micro-batch share their common prefix (the system prompt and
    the image), written once, and each sample follows it as its own branch, attending to the prefix and to itself
    only, at the positions it would have alone. So every sample's logits and loss are those of the unshared batch
    (`collate`), with the image's tokens computed once per row instead of once per question — as evaluation's
    prefix cache does. Samples without an image, or whose prefix cannot be shared, get a row of their own.
    `per_row` > 0 caps the samples of a row (an image with more gets several rows, each with the prefix): a
    row's attention is quadratic in its length, most of it masked."""
    if any(example.states for example in examples):
        raise ConfigError("share_prefix with state vectors (PaLM-E): a prefix's <obj> tokens would be one sample's; "
                          "train without share_prefix (pack_to packs them)")
    groups: dict[tuple, list[Example]] = {}
    for position, example in enumerate(examples):
        key = tuple(example.image_indices) if example.image_indices else ("alone", position)
        groups.setdefault(key, []).append(example)
    if per_row > 0:
        groups = {(key, start): group[start:start + per_row] for key, group in groups.items()
                  for start in range(0, len(group), per_row)}
    rows: list[tuple[int, list[Example]]] = []  # (prefix length, samples)
    for group in groups.values():
        prefix = shared_prefix_length(group, image_token_id) if len(group) > 1 else 0
        rows += [(prefix, group)] if prefix else [(0, [e]) for e in group]
    length = max(prefix + sum(len(e.input_ids) - prefix for e in group) for prefix, group in rows)
    input_ids, labels, attention_mask, sequence_ids = _empty_rows(len(rows), length, pad_token_id)
    for r, (prefix, group) in enumerate(rows):
        first = group[0]
        input_ids[r, :prefix] = torch.as_tensor(np.asarray(first.input_ids[:prefix]), dtype=torch.long)
        sequence_ids[r, :prefix] = 0
        start = prefix
        for s, example in enumerate(group):
            n = len(example.input_ids) - prefix
            span = slice(start, start + n)
            input_ids[r, span] = torch.as_tensor(np.asarray(example.input_ids[prefix:]), dtype=torch.long)
            labels[r, span] = torch.as_tensor(np.asarray(example.labels[prefix:]), dtype=torch.long)
            labels[r, start] = IGNORE_INDEX  # unsupervised by construction (shared_prefix_length)
            sequence_ids[r, span] = s + 1
            start += n
        attention_mask[r, :start] = 1
    image_indices = torch.tensor([i for _, group in rows for i in group[0].image_indices], dtype=torch.long)
    prefix_lengths = torch.tensor([prefix for prefix, _ in rows], dtype=torch.long)
    return PackedBatch(input_ids, attention_mask, labels, image_indices,
                       [len(group[0].image_indices) for _, group in rows],
                       [[e.record_id for e in group] for _, group in rows],
                       sample_positions(attention_mask, sequence_ids, prefix_lengths), sequence_ids,
                       prefix_lengths=prefix_lengths)


def image_grouped_batches(image_keys: list[tuple], batch_size: int, seed: int,
                          indices: list[int] | None = None) -> list[list[int]]:
    """Shuffled batches in which an image's samples come together (for `collate_shared`): the images are shuffled,
    then their samples, and the sequence is cut every `batch_size` samples. Each sample once per epoch, as with
    `length_grouped_batches`; an image's samples may straddle two batches."""
    rng = random.Random(seed)
    order = list(range(len(image_keys))) if indices is None else list(indices)
    groups: dict[tuple, list[int]] = {}
    for index in order:
        key = image_keys[index] if image_keys[index] else ("alone", index)
        groups.setdefault(key, []).append(index)
    blocks = list(groups.values())
    rng.shuffle(blocks)
    flat = []
    for block in blocks:
        rng.shuffle(block)
        flat += block
    return [flat[i:i + batch_size] for i in range(0, len(flat), batch_size)]


class SharedPrefixCollate:
    """A loader's collate for `share_prefix` stages: `collate_shared` with the model's image placeholder id."""

    def __init__(self, image_token_id: int, per_row: int = 0):
        self.image_token_id, self.per_row = image_token_id, per_row

    def __call__(self, examples: list[Example], pad_token_id: int) -> PackedBatch:
        return collate_shared(examples, pad_token_id, self.image_token_id, self.per_row)


class PackingCollate:
    """A loader's collate for packed stages: the micro-batch's samples packed into rows of `pack_to` tokens."""

    def __init__(self, pack_to: int):
        self.pack_to = pack_to

    def __call__(self, examples: list[Example], pad_token_id: int) -> PackedBatch:
        rows = pack_examples(examples, self.pack_to)
        return collate_packed([[examples[i] for i in row] for row in rows], pad_token_id)
