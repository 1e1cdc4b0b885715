"""BLIP-2's stage-1 objectives: image-text contrast (ITC), matching (ITM) and image-grounded generation (ITG).

All three run the Q-Former (vlmkit.connectors.qformer) on [queries; text] and differ only in who may see whom
(`attention_mask`), as LAVIS's `Blip2Qformer.forward` computes them:

- ITC, unimodal mask: queries see queries, text sees text. Image-text similarity = the maximum over the query
  outputs of their cosine to the text's [CLS] output (both projected to `proj_dim`), over a learned temperature;
  cross-entropy in both directions with label smoothing 0.1, against every rank's features. Texts that are equal
  count as positives of each other (LAVIS's retrieval fine-tuning does this with image ids): a batch of
  easy-VQA captions repeats texts, and calling a copy of the right caption a negative teaches nothing true.
- ITM, bidirectional mask: every position sees every other. For each pair one hard negative text and one hard
  negative image are drawn from softmax(similarity) with the positives' weight zeroed; 3B pairs labelled
  [1]*B + [0]*2B; `itm_head` on each query output, the logits averaged over the queries.
- ITG, multimodal causal mask: queries see queries only; each text token sees all queries and the text before it.
  The first text token is [DEC] instead of [CLS]; next-token loss with label smoothing 0.1, padding ignored.

A single forward with the unimodal mask gives exactly the query-only and text-only outputs (text positions are
numbered from 0 either way, and only the query slice reads the image), so ITC uses one pass as the others do.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather
import torch.nn.functional as F

from vlmkit.connectors.qformer import attention_mask
from vlmkit.errors import ConfigError

LABEL_SMOOTHING = 0.1  # LAVIS: ITC's cross-entropies and the ITG decoder's
IGNORE = -100


def _gather(tensor: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0 (this rank's own keeps its gradient); itself on one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    if with_grad:
        return torch.cat(all_gather(tensor), dim=0)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    parts[dist.get_rank()] = tensor
    return torch.cat(parts, dim=0)


def _rank_offset(batch: int) -> int:
    return dist.get_rank() * batch if dist.is_available() and dist.is_initialized() else 0


def similarities(image_feats: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor):
    """(image->text, text->image) logits: max over queries of the cosine, / temperature. image_feats (B, Q, P) and
    text_feat (B, P) are normalised; each is compared with every rank's other side."""
    text_all = _gather(text_feat, with_grad=False)
    image_all = _gather(image_feats, with_grad=False)
    sim_i2t = torch.einsum("bqp,np->bnq", image_feats, text_all).amax(-1) / temp
    sim_t2i = torch.einsum("bp,nqp->bnq", text_feat, image_all).amax(-1) / temp
    return sim_i2t, sim_t2i


def qformer_losses(connector, image_features: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor,
                   dec_token_id: int, pad_token_id: int, generator: torch.Generator | None = None) -> dict:
    """The three losses and their sum for a batch of (image features, Q-Former text tokens): a dict of tensors
    `loss`, `itc`, `itm`, `itg`."""
    batch = input_ids.shape[0]
    queries = connector.config.num_queries
    if batch < 2 and _gather(torch.zeros(1, device=input_ids.device), False).shape[0] < 2:
        raise ConfigError("BLIP-2's stage-1 objectives need at least 2 pairs per step (ITC contrasts them, ITM draws "
                          "its negatives from them): raise the stage's batch_size")
    with torch.no_grad():
        connector.temp.clamp_(0.001, 0.5)  # BLIP's guard: a temperature at or below zero inverts the ranking

    # ITC: one pass, queries and text apart
    out = connector.joint_outputs(input_ids, attention_mask("itc", queries, text_mask), image_features)
    image_feats = F.normalize(connector.vision_projection(out[:, :queries]), dim=-1)
    text_feat = F.normalize(connector.text_projection(out[:, queries]), dim=-1)  # the [CLS] output
    sim_i2t, sim_t2i = similarities(image_feats, text_feat, connector.temp)
    ids_all = _gather(input_ids, with_grad=False)
    mask_all = _gather(text_mask, with_grad=False)
    offset = _rank_offset(batch)
    same_text = _same_text(input_ids, text_mask, ids_all, mask_all)  # (B, N): pair j's text equals pair i's
    same_text[torch.arange(batch), offset + torch.arange(batch)] = True
    targets = same_text.float() / same_text.sum(1, keepdim=True)
    itc = (F.cross_entropy(sim_i2t, targets, label_smoothing=LABEL_SMOOTHING)
           + F.cross_entropy(sim_t2i, targets, label_smoothing=LABEL_SMOOTHING)) / 2

    # ITM: a hard negative text per image and a hard negative image per text, from the ITC similarities
    images_all = _gather(image_features, with_grad=True)
    with torch.no_grad():
        weights_t2i = F.softmax(sim_t2i.float(), dim=1) + 1e-4
        weights_t2i[same_text] = 0
        weights_i2t = F.softmax(sim_i2t.float(), dim=1) + 1e-4
        weights_i2t[same_text] = 0
        usable = (weights_t2i.sum(1) > 0) & (weights_i2t.sum(1) > 0)  # a batch of one caption has no negative
        weights_t2i[~usable] = 1
        weights_i2t[~usable] = 1
        negative_image = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
        negative_text = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
    keep = usable.nonzero().squeeze(1)
    ids_itm = torch.cat([input_ids, input_ids[keep], ids_all[negative_text[keep]]])
    mask_itm = torch.cat([text_mask, text_mask[keep], mask_all[negative_text[keep]]])
    images_itm = torch.cat([image_features, images_all[negative_image[keep]], image_features[keep]])
    out = connector.joint_outputs(ids_itm, attention_mask("itm", queries, mask_itm), images_itm)
    itm_logits = connector.itm_head(out[:, :queries]).mean(dim=1)
    itm_labels = torch.cat([torch.ones(batch, dtype=torch.long), torch.zeros(2 * len(keep), dtype=torch.long)])
    itm = F.cross_entropy(itm_logits, itm_labels.to(itm_logits.device))

    # ITG: [DEC] first, text causal after all queries
    decoder_ids = input_ids.clone()
    decoder_ids[:, 0] = dec_token_id
    out = connector.joint_outputs(decoder_ids, attention_mask("itg", queries, text_mask), image_features)
    logits = connector.itg_head(out[:, queries:-1])
    labels = decoder_ids[:, 1:].masked_fill(text_mask[:, 1:] == 0, IGNORE)
    labels = labels.masked_fill(labels == pad_token_id, IGNORE)
    itg = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE,
                          label_smoothing=LABEL_SMOOTHING)
    return {"loss": itc + itm + itg, "itc": itc, "itm": itm, "itg": itg}


def _same_text(ids: torch.Tensor, mask: torch.Tensor, ids_all: torch.Tensor, mask_all: torch.Tensor) -> torch.Tensor:
    """(B, N) booleans: text i of this rank equals text j of the gathered batch (same tokens where not padded)."""
    length = max(ids.shape[1], ids_all.shape[1])
    a = F.pad(ids.masked_fill(mask == 0, -1), (0, length - ids.shape[1]), value=-1)
    b = F.pad(ids_all.masked_fill(mask_all == 0, -1), (0, length - ids_all.shape[1]), value=-1)
    return (a[:, None, :] == b[None, :, :]).all(-1)
