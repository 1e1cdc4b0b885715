"""Image-text retrieval with a Q-Former's stage-1 heads, as BLIP-2 evaluates it (LAVIS `compute_sim_matrix`).

ITC ranks every candidate: similarity = the maximum over the query embeddings of their cosine to the text's
[CLS] embedding. ITM re-ranks the ITC's top k of each query: the score is the matching head's "match" logit
(averaged over the queries, bidirectional mask) plus the ITC similarity. Recall@1/@5 in both directions.

The default data are held-out generated scenes (their test split: no layout seen in training) with distinct
captions, so that each text has exactly one right image among the candidates.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from vlmkit.connectors.qformer import attention_mask
from vlmkit.data import scenes
from vlmkit.data.dataset import load_llava_json
from vlmkit.errors import ConfigError

DEFAULT_CANDIDATES = 100
DEFAULT_TOP_K = 16


def distinct_caption_records(records: list[dict], limit: int) -> list[dict]:
    """The first `limit` records whose captions (last turn) differ from every earlier one's."""
    seen, kept = set(), []
    for record in records:
        caption = record["conversations"][-1]["value"].strip()
        if caption.lower() in seen:
            continue
        seen.add(caption.lower())
        kept.append(record)
        if len(kept) == limit:
            break
    return kept


def recall_at(scores: torch.Tensor, truth: torch.Tensor, k: int) -> float:
    """Share of rows whose true column is among the k highest scores (a -inf score, a candidate the re-ranking
    never scored, is never a hit, however topk orders the ties)."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    scored = torch.isfinite(scores.gather(1, truth[:, None])).squeeze(1)
    return float(((top == truth[:, None]).any(1) & scored).float().mean())


@torch.no_grad()
def embed(model, images: list, texts: list[str], batch_size: int = 64, verbose: bool = True):
    """(vision features (N, V, D), image embeddings (N, Q, P), text ids, text masks, text embeddings (N, P))."""
    connector = model.connector
    tokenizer = connector.tokenizer
    weight = next(connector.parameters())
    features, image_embeds = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="retrieval: images", disable=not verbose):
        pixels = torch.stack([model.image_transform(image) for image in images[start:start + batch_size]])
        tower = next(model.vision.parameters())
        feats = model.encode_images(pixels.to(tower.device, tower.dtype)).to(weight.device, weight.dtype)
        features.append(feats)
        queries = connector.query_outputs(feats)
        image_embeds.append(F.normalize(connector.vision_projection(queries), dim=-1))
    encoded = tokenizer(texts, padding="longest", truncation=True, max_length=model.config.connector.max_text_tokens,
                        return_tensors="pt")
    ids, mask = encoded["input_ids"].to(weight.device), encoded["attention_mask"].to(weight.device)
    text_embeds = []
    for start in range(0, len(texts), batch_size):
        out = connector.text_outputs(ids[start:start + batch_size], mask[start:start + batch_size])
        text_embeds.append(F.normalize(connector.text_projection(out[:, 0]), dim=-1))
    return torch.cat(features), torch.cat(image_embeds), ids, mask, torch.cat(text_embeds)


@torch.no_grad()
def itm_scores(model, features, ids, mask, pairs: list[tuple[int, int]], batch_size: int = 128) -> torch.Tensor:
    """The matching head's 'match' logit for each (image index, text index) pair."""
    connector = model.connector
    queries = connector.config.num_queries
    scores = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        image_index = torch.tensor([i for i, _ in chunk], device=features.device)
        text_index = torch.tensor([t for _, t in chunk], device=ids.device)
        out = connector.joint_outputs(ids[text_index], attention_mask("itm", queries, mask[text_index]),
                                      features[image_index])
        scores.append(connector.itm_head(out[:, :queries]).mean(1)[:, 1].float())
    return torch.cat(scores) if scores else torch.zeros(0)


def retrieval_metrics(model, images: list, texts: list[str], top_k: int = DEFAULT_TOP_K, verbose: bool = True) -> dict:
    """R@1/R@5 text->image and image->text, by ITC and after ITM re-ranking; image i's caption is texts[i]."""
    if not hasattr(model.connector, "joint_outputs") or getattr(model.connector, "tokenizer", None) is None:
        raise ConfigError("retrieval evaluation needs a Q-Former with its text side and tokenizer (a blip2 run "
                          "whose stage 1 trained it); this model's connector is "
                          f"{model.config.connector.type!r}")
    if len(images) != len(texts) or len(images) < 2:
        raise ConfigError(f"retrieval needs at least 2 image-caption pairs (got {len(images)} images, {len(texts)} texts)")
    model.eval()
    features, image_embeds, ids, mask, text_embeds = embed(model, images, texts, verbose=verbose)
    temp = model.connector.temp.float()
    sim_i2t = torch.einsum("iqp,tp->itq", image_embeds.float(), text_embeds.float()).amax(-1) / temp
    sim_t2i = sim_i2t.t()
    truth = torch.arange(len(images), device=sim_i2t.device)
    k = min(top_k, len(images))
    rerank_i2t = torch.full_like(sim_i2t, float("-inf"))
    rerank_t2i = torch.full_like(sim_t2i, float("-inf"))
    top_i2t = sim_i2t.topk(k, dim=1)
    top_t2i = sim_t2i.topk(k, dim=1)
    pairs = [(i, int(t)) for i in range(len(images)) for t in top_i2t.indices[i]]
    pairs += [(int(i), t) for t in range(len(texts)) for i in top_t2i.indices[t]]
    scores = itm_scores(model, features, ids, mask, pairs).to(sim_i2t.device)
    half = len(images) * k
    rerank_i2t.scatter_(1, top_i2t.indices, scores[:half].view(-1, k) + top_i2t.values)
    rerank_t2i.scatter_(1, top_t2i.indices, scores[half:].view(-1, k) + top_t2i.values)
    report = {"candidates": len(images), "itm_top_k": k}
    for method, (i2t, t2i) in (("itc", (sim_i2t, sim_t2i)), ("itm", (rerank_i2t, rerank_t2i))):
        report[method] = {"text_to_image_r1": recall_at(t2i, truth, 1), "text_to_image_r5": recall_at(t2i, truth, 5),
                          "image_to_text_r1": recall_at(i2t, truth, 1), "image_to_text_r5": recall_at(i2t, truth, 5)}
    misses = (rerank_t2i.argmax(1) != truth).nonzero().squeeze(1).tolist()
    report["text_to_image_misses"] = [{"text": texts[t], "retrieved": texts[int(rerank_t2i[t].argmax())]}
                                      for t in misses[:20]]
    return report


def summary_table(report: dict) -> str:
    lines = [f"image-text retrieval among {report['candidates']} candidates (ITM re-ranks the ITC top "
             f"{report['itm_top_k']})",
             f"{'':6} {'t->i R@1':>9} {'t->i R@5':>9} {'i->t R@1':>9} {'i->t R@5':>9}"]
    for method in ("itc", "itm"):
        r = report[method]
        lines.append(f"{method.upper():6} {r['text_to_image_r1']:9.1%} {r['text_to_image_r5']:9.1%} "
                     f"{r['image_to_text_r1']:9.1%} {r['image_to_text_r5']:9.1%}")
    return "\n".join(lines)


def retrieval_records(config, data: str | None, split: str, limit: int, image_folder: str | None = None) -> list[dict]:
    """Caption records with distinct captions: held-out scenes by default, or a scene source / LLaVA JSON."""
    source = data or f"scenes:caption:{split}:n{max(1000, 4 * limit)}"
    if source.startswith("scenes:"):
        records = scenes.builtin_records(source)
    else:
        records = load_llava_json(source)
        folder = Path(image_folder) if image_folder else Path(source).parent
        for record in records:
            if "image" not in record:
                raise ConfigError(f"{source}: record {record.get('id', '?')!r} has no image")
            record["image"] = str(folder / record["image"])
    kept = distinct_caption_records(records, limit)
    if len(kept) < limit:
        raise ConfigError(f"{source}: only {len(kept)} records with distinct captions, {limit} asked (--limit)")
    return kept


def run_retrieval_eval(model, data: str | None, out_dir, split: str = "test", limit: int = 0,
                       image_folder: str | None = None, top_k: int = DEFAULT_TOP_K, verbose: bool = True) -> dict:
    limit = limit or DEFAULT_CANDIDATES
    records = retrieval_records(model.config, data, split, limit, image_folder)
    images = []
    for record in records:
        try:
            with Image.open(record["image"]) as image:
                images.append(image.convert("RGB"))
        except OSError as exc:
            raise ConfigError(f"record {record.get('id', '?')!r}: cannot read image {record['image']} ({exc})") from None
    texts = [record["conversations"][-1]["value"].strip() for record in records]
    report = retrieval_metrics(model, images, texts, top_k=top_k, verbose=verbose)
    report["data"] = data or f"scenes:caption:{split} (distinct captions)"
    out = Path(out_dir) / "eval_retrieval.json"
    out.write_text(json.dumps(report, indent=2))
    print(summary_table(report))
    print(f"wrote {out}")
    return report
