"""Frozen-encoder features computed once per image, kept while they fit a memory budget.

While the vision encoder does not train, its output for an image never changes, so a stage (or an
evaluation) encodes every image once and reuses the features. LLaVA-1.5's 558k images at 576 x 1024 floats
would be terabytes, so the cache is used only while it fits `budget_gb`; past that, every batch decodes its
images (in loader workers) and runs the encoder again — slower, with memory bounded.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from vlmkit.data.loader import image_loader


def feature_bytes_per_image(model) -> int:
    """Bytes one image's encoder output takes (tokens x channels x element size), from one tiny forward."""
    crop = model.image_transform.crop
    param = next(model.vision.parameters())
    with torch.no_grad():
        probe = model.encode_images(torch.zeros(1, 3, crop[0], crop[1], device=param.device, dtype=param.dtype))
    return probe[0].numel() * probe.element_size()


@torch.no_grad()
def cache_features(model, dataset, budget_gb: float, workers: int = 0, batch_size: int = 256,
                   verbose: bool = True, log=print) -> torch.Tensor | None:
    """The encoder's features of every image of `dataset` (num_images, N, D), or None when they would not fit
    in `budget_gb` (then the caller encodes each batch's pixels)."""
    if not dataset.images:
        return None
    model.vision.eval()
    needed = feature_bytes_per_image(model) * len(dataset.images)
    if needed > budget_gb * 2**30:
        log(f"frozen-encoder features of {len(dataset.images):,} images need {needed / 2**30:.1f} GiB, more than "
            f"the cache budget (--feature-cache-gb {budget_gb:g}): each batch is encoded as it is read")
        return None
    features = None
    at = 0
    bar = tqdm(total=math.ceil(len(dataset.images) / batch_size), desc="encoding images (frozen encoder)",
               disable=not verbose, mininterval=1.0)
    for pixels in image_loader(dataset, batch_size, workers):
        encoded = model.encode_images(pixels)
        if features is None:  # one allocation: no list of pieces and a concatenated copy at twice the memory
            features = encoded.new_empty((len(dataset.images), *encoded.shape[1:]))
        features[at:at + len(encoded)] = encoded
        at += len(encoded)
        bar.update(1)
    bar.close()
    return features
