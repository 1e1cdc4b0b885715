"""Batches and images read through `torch.utils.data.DataLoader` worker processes.

The training loop decides the order (seeded, length-grouped, each rank's share under torchrun); these
loaders only read it: `batch_loader` collates the given index lists — decoding their images in `workers`
processes when the batch needs pixels — and `image_loader` decodes images in order for feature encoding.
Memory holds the dataset's index and a few batches in flight, never the whole set of images. An image that
fails to decode in a worker comes back to the main process as the BadRecord naming its record.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from vlmkit.data.dataset import Batch, ConversationDataset, collate
from vlmkit.errors import BadRecord


def resolve_workers(workers: int) -> int:
    """`workers`, or for -1 half the CPU cores (at most 8), and none on 2 cores or fewer: measured on 2 cores,
    2 decoding workers beside 2 training threads lowered a trained-tower stage from 211 to 146 samples/s."""
    if workers >= 0:
        return workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 2 else min(8, cores // 2)


class _Failed:
    """A BadRecord raised in a worker, carried back intact (DataLoader would re-raise a mangled copy)."""

    def __init__(self, error: BadRecord):
        self.args = (error.record_id, error.reason, error.kind, error.source)


def _unwrap(item):
    if isinstance(item, _Failed):
        raise BadRecord(*item.args)
    return item


class _Indices(Dataset):
    """0..size-1: the samplers hand out indices, and the collate functions read the dataset by them."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return index


class _Collate:
    def __init__(self, dataset: ConversationDataset, collate_fn: Callable, pad_token_id: int, pixels: bool,
                 prepare: Callable | None = None):
        self.dataset, self.collate_fn, self.pad_token_id, self.pixels = dataset, collate_fn, pad_token_id, pixels
        self.prepare = prepare

    def __call__(self, indices: list[int]):
        examples = [self.dataset[i] for i in indices]
        batch = self.collate_fn(examples, self.pad_token_id)
        if self.prepare is not None:
            batch = self.prepare(batch)
        if self.pixels and len(batch.image_indices):
            try:
                batch.pixel_values = self.dataset.pixels(batch.image_indices)
            except BadRecord as error:
                return _Failed(error)
        return batch


def batch_loader(dataset: ConversationDataset, batches: Sequence[list[int]], pad_token_id: int, *, pixels: bool,
                 workers: int = 0, collate_fn: Callable = collate, prepare: Callable | None = None) -> Iterator[Batch]:
    """Collated batches for the given lists of example indices, in that order; `prepare(batch)` (the objective's:
    text in a connector's own tokens) runs on each where it is collated, in the worker when there are workers."""
    if not batches:
        return iter(())
    # without pixels a batch is a few lists of ints: worker processes would cost more than they save
    workers = resolve_workers(workers) if pixels else 0
    loader = DataLoader(_Indices(len(dataset)), batch_sampler=list(batches), num_workers=workers,
                        collate_fn=_Collate(dataset, collate_fn, pad_token_id, pixels, prepare),
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    return map(_unwrap, loader)


class _Decode:
    def __init__(self, dataset: ConversationDataset):
        self.dataset = dataset

    def __call__(self, indices: list[int]):
        try:
            return self.dataset.pixels(indices)
        except BadRecord as error:
            return _Failed(error)


def image_loader(dataset: ConversationDataset, batch_size: int = 256, workers: int = 0) -> Iterator[torch.Tensor]:
    """The dataset's images, decoded and transformed, in index order, `batch_size` at a time."""
    if not dataset.images:
        return iter(())
    workers = resolve_workers(workers)
    loader = DataLoader(_Indices(len(dataset.images)), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_Decode(dataset), prefetch_factor=2 if workers else None)
    return map(_unwrap, loader)
