"""Training objectives: a stage names one; the objective owns its loss, the model only gives features and logits.

The training loop calls `objective(forward, batch, features)`, which runs the (possibly DDP/FSDP-wrapped)
`forward` with `objective=self`: the model's forward then calls back `objective.loss(model, **inputs)`, so the
loss is computed inside the wrapped forward and gradient synchronisation sees every parameter it used. `loss`
returns the micro-batch's loss as a MEAN over its normalisation units and the metrics to log;
`objective.units(batch)` counts those units (supervised tokens for `lm`). The loop weights every micro-batch by
its share of the units of the whole optimiser step — all micro-batches, all ranks — so the gradient is the same
for batch 32 x accumulation 1 as for batch 16 x accumulation 2, however the supervised tokens fall (and a single
micro-batch on one process is left exactly as it is). `objective.prepare(model)` is what the loader does to each
batch while collating it (the Q-Former's own tokens), or None. BLIP-2's contrastive, matching and generation
losses are `blip2_qformer` (vlmkit.objectives.blip2).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vlmkit.data.render import IGNORE_INDEX
from vlmkit.errors import BadRecord, ConfigError
from vlmkit.objectives.blip2 import qformer_losses


class TextInputs:
    """A loader's `prepare`: the Q-Former's text inputs of a batch (`QFormerText.instructions` or `.captions`),
    put on the batch as `text_inputs` while it is collated."""

    def __init__(self, reader, kind: str):
        self.reader, self.kind = reader, kind

    def __call__(self, batch):
        if self.kind == "captions":
            batch.text_inputs = self.reader.captions(batch.input_ids, batch.labels)
        else:
            batch.text_inputs = self.reader.instructions(batch.input_ids, batch.image_counts, batch.labels)
        return batch


class LanguageModeling:
    """Next-token cross-entropy on the supervised tokens (assistant turns and their stops)."""
    name = "lm"

    def units(self, batch) -> int:
        return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())

    def prepare(self, model) -> Callable | None:
        """An instruction-aware Q-Former reads each image's question in its own tokens: made in the loader."""
        if getattr(model.connector, "reads_instruction", False) and getattr(model.connector, "tokenizer", None):
            return TextInputs(model.qformer_text(), "instructions")
        return None

    def __call__(self, forward: Callable, batch, features=None) -> tuple[torch.Tensor, dict]:
        pixels = batch.pixel_values if features is None else None
        # packed rows: the model keeps samples apart (but lets them see the row's shared prefix) and numbers them
        return forward(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                       image_counts=batch.image_counts, pixel_values=pixels, vision_features=features,
                       record_ids=batch.record_ids, text_inputs=getattr(batch, "text_inputs", None),
                       sequence_ids=getattr(batch, "sequence_ids", None),
                       prefix_lengths=getattr(batch, "prefix_lengths", None), states=getattr(batch, "states", None),
                       objective=self)

    def loss(self, model, **inputs) -> tuple[torch.Tensor, dict]:
        logits, targets = model.supervised_logits(**inputs)
        return F.cross_entropy(logits.float(), targets), {}


class QFormerPretraining:
    """BLIP-2's stage 1: ITC + ITM + ITG of the Q-Former on (image, caption) pairs, without an LLM; each a mean
    over the micro-batch's pairs (vlmkit.objectives.blip2), so a pair is the unit. The terms are logged apart."""
    name = "blip2_qformer"
    needs_llm = False

    def units(self, batch) -> int:
        return int(batch.input_ids.shape[0])

    def prepare(self, model) -> Callable:
        """Each pair's caption (the text its labels supervise) in the Q-Former's tokens, made in the loader."""
        _check_text_side(model)
        return TextInputs(model.qformer_text(), "captions")

    def __call__(self, forward: Callable, batch, features=None) -> tuple[torch.Tensor, dict]:
        pixels = batch.pixel_values if features is None else None
        loss, terms = forward(batch.input_ids, labels=batch.labels, image_counts=batch.image_counts,
                              pixel_values=pixels, vision_features=features, record_ids=batch.record_ids,
                              text_inputs=getattr(batch, "text_inputs", None), objective=self)
        return loss, {name: float(value.detach()) for name, value in terms.items()}

    def loss(self, model, *, input_ids, labels, image_counts=None, pixel_values=None, vision_features=None,
             record_ids=None, text_inputs=None, **_) -> tuple[torch.Tensor, dict]:
        _check_text_side(model)
        counts = list(image_counts or [0] * input_ids.shape[0])
        for i, count in enumerate(counts):
            if count != 1:
                name = record_ids[i] if record_ids is not None else i
                raise BadRecord(name, f"has {count} images; BLIP-2's stage-1 objectives pair one image with one "
                                      "text", kind="image_count")
        if vision_features is None:
            vision_features = model.encode_images(pixel_values)
        if text_inputs is None:  # a batch not made by a loader with `prepare`
            text_inputs = model.qformer_text().captions(input_ids, labels)
        connector = model.connector
        weight = next(connector.parameters())
        tokenizer = connector.tokenizer
        terms = qformer_losses(connector, vision_features.to(device=weight.device, dtype=weight.dtype),
                               text_inputs["input_ids"].to(weight.device),
                               text_inputs["attention_mask"].to(weight.device),
                               dec_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
        return terms["loss"], {name: value for name, value in terms.items() if name != "loss"}


def _check_text_side(model) -> None:
    if getattr(model.connector, "tokenizer", None) is None or not hasattr(model.connector, "joint_outputs"):
        raise ConfigError("objective blip2_qformer trains a Q-Former with a text side: connector.type qformer, "
                          "connector.text_input true and connector.name_or_path a BERT (its tokenizer reads "
                          "the captions)")


OBJECTIVES: dict[str, Callable[[], object]] = {"lm": LanguageModeling, "blip2_qformer": QFormerPretraining}


def needs_llm(name: str) -> bool:
    """Whether a stage with this objective runs the language model (BLIP-2's stage 1 does not load one)."""
    return getattr(get_objective(name), "needs_llm", True)


def get_objective(name: str):
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; available: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]()
