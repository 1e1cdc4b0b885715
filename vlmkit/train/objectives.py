"""Training objectives beside the loop: a stage names one, the loop asks it for loss, token count, metrics.

`objective(forward, batch, features)` returns the micro-batch's loss as a MEAN over its normalisation units
and the metrics to log; `objective.units(batch)` counts those units (supervised tokens for `lm`). The loop
weights every micro-batch by its share of the units of the whole optimiser step — all micro-batches, all
ranks — so the gradient is the same for batch 32 x accumulation 1 as for batch 16 x accumulation 2, however
the supervised tokens fall (and a single micro-batch on one process is left exactly as it is). BLIP-2's
contrastive, matching and generation losses are `blip2_qformer`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from vlmkit.data.packing import block_diagonal_mask
from vlmkit.data.render import IGNORE_INDEX
from vlmkit.errors import ConfigError


class LanguageModeling:
    """Next-token cross-entropy on the supervised tokens (assistant turns and their stops)."""
    name = "lm"

    def units(self, batch) -> int:
        return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())

    def __call__(self, forward: Callable, batch, features=None) -> tuple[torch.Tensor, dict]:
        pixels = batch.pixel_values if features is None else None
        attention_mask, extra = batch.attention_mask, {}
        if getattr(batch, "sequence_ids", None) is not None:  # packed rows: no attention across samples
            # (but to the row's shared prefix, when share_prefix wrote one)
            attention_mask = block_diagonal_mask(batch.sequence_ids, prefix_lengths=getattr(batch, "prefix_lengths", None))
            extra["position_ids"] = batch.position_ids
        mean, _ = forward(batch.input_ids, attention_mask=attention_mask, labels=batch.labels,
                          image_counts=batch.image_counts, pixel_values=pixels, vision_features=features,
                          record_ids=batch.record_ids, **extra)
        return mean, {}


class QFormerPretraining:
    """BLIP-2's stage 1: ITC + ITM + ITG of the Q-Former on (image, caption) pairs, without an LLM; each a mean
    over the micro-batch's pairs (vlmkit.train.blip2), so a pair is the unit. The terms are logged apart."""
    name = "blip2_qformer"
    needs_llm = False

    def units(self, batch) -> int:
        return int(batch.input_ids.shape[0])

    def __call__(self, forward: Callable, batch, features=None) -> tuple[torch.Tensor, dict]:
        pixels = batch.pixel_values if features is None else None
        loss, terms = forward(batch.input_ids, labels=batch.labels, image_counts=batch.image_counts,
                              pixel_values=pixels, vision_features=features, record_ids=batch.record_ids,
                              objective=self.name)
        return loss, {name: float(value.detach()) for name, value in terms.items()}


OBJECTIVES: dict[str, Callable[[], object]] = {"lm": LanguageModeling, "blip2_qformer": QFormerPretraining}


def needs_llm(name: str) -> bool:
    """Whether a stage with this objective runs the language model (BLIP-2's stage 1 does not load one)."""
    return getattr(get_objective(name), "needs_llm", True)


def get_objective(name: str):
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; available: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]()
