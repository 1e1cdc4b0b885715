"""Pretraining of the tiny backbones: a byte-level BPE tokenizer, a LLaMA-style LM and a CLIP model.

Only easy-VQA's training split is read. Each backbone is saved as a Hugging Face directory (written
atomically) with a `vlmkit_build.json` recording how it was made and how long it took.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm

from vlmkit.archs import from_name
from vlmkit.connectors import connector_class
from vlmkit.data import easyvqa, scenes
from vlmkit.data.boxes import BoxError, iou
from vlmkit.data.dataset import Example, collate
from vlmkit.data.images import ImageTransform, load_image
from vlmkit.data.render import conversation_pieces, normalise_messages, render_conversation
from vlmkit.data.templates import TEMPLATES
from vlmkit.io import atomic_dir
from vlmkit.model.vlm import split_for_encoder_decoder
from vlmkit.train.run import train_run

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
TOKENIZER_VOCAB = 1024
ANSWER_PROMPT = "Answer the question using a single word or phrase."
CAPTION_PROMPTS = ["Describe the image briefly."]
TINY_TEMPLATES = ("vicuna_v1", "plain")  # the templates the tiny presets use: the tokenizer encodes them compactly

# initializer_range 0.2, not transformers' 0.02 (a default sized for wide models): at width 128 the small init
# leaves attention near-uniform and the LM never learns to compare two words of its context. Measured with
# scripts/probe-yes-no (a fresh LM of this shape, "caption + easy-VQA yes/no question", answer = match XOR
# negated, 800 steps of 32, answer-only loss): std 0.02 stays at the prior (plain 0.43-0.83 / negated 0.16-0.58),
# 0.1 reaches 0.81 / 0.76, 0.2 reaches 0.93 / 0.90; the same with the colour written as an unrelated word.
# 8 heads of 16, not 4 of 32 (tiny v5): the same probe with --answer-only reaches 0.976 / 0.945 at step 400 and
# 1.000 / 0.987 at 800 (seed 1: 0.980 / 0.964 at 600), against 0.73 / 0.76 and 0.85 / 0.86 with 4 heads; 16 heads
# 0.973 / 0.984 at 600; 2 layers or width 256 do not learn it in 800 steps. In the demo's recipe (llava tiny: single
# questions, 2 epochs at 2e-3) 8 heads give 93.70% on easy-VQA test against 87.95% with 4 (shape yes/no 0.998 / 0.971
# against 0.761 / 0.652; colour yes/no stays at the prior with both: issue 15's note).
LM_CONFIG = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=8, max_position_embeddings=1024, tie_word_embeddings=True,
                 initializer_range=0.2)
LM_STEPS, LM_BATCH, LM_LR = 80, 16, 3e-3

# The image tower is a small ResNet (transformers `ResNetModel`): it reaches 100% colour and shape accuracy
# on held-out training images in ~45 s here. A CLIP ViT with 8-px patches took 224 s for 12 epochs (and
# CALIBRATION.md measured a 16-px-patch ViT at 89.8% shape accuracy after 30 epochs); see the issue note.
IMAGE_SIZE = 64
VISION_TOWER = dict(num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1],
                    layer_type="basic", downsample_in_first_stage=False)
CLIP_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                 max_position_embeddings=16, projection_dim=128)
CLIP_EPOCHS, CLIP_BATCH, CLIP_LR, CLIP_HELD_OUT = 8, 128, 2e-3, 300


def _write_info(directory: Path, info: dict) -> None:
    (directory / "vlmkit_build.json").write_text(json.dumps(info, indent=2))


def text_corpus() -> list[str]:
    """Text the project has: training questions, answers and captions, and the templates' fixed text."""
    questions, _ = easyvqa.load_split("train")
    # answers also with the space they have after "ASSISTANT:": without it " yes" was two tokens ("Ġ", "yes"), so
    # a model could stop after the bare space and answer "" (" no" was one: "no" occurs inside questions)
    corpus = [q.text for q in questions] + [q.answer for q in questions] + [" " + q.answer for q in questions]
    corpus += [easyvqa.caption_of(a) or "" for a in easyvqa.image_attributes(questions).values()]
    corpus += [ANSWER_PROMPT, *CAPTION_PROMPTS]
    for name in TINY_TEMPLATES:
        corpus += TEMPLATES[name].corpus_text()
    return [t for t in corpus if t]


def build_tokenizer(path: Path, verbose: bool = True, **_) -> None:
    from transformers import PreTrainedTokenizerFast  # start-up: transformers, 0.76 s

    start = time.time()
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=verbose)
    tokenizer.train_from_iterator(text_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=["<image>"])
    fast.padding_side = "right"
    with atomic_dir(path) as tmp:
        fast.save_pretrained(tmp)
        _write_info(tmp, {"kind": "byte-level BPE", "vocab_size": len(fast), "seconds": time.time() - start})
    if verbose:
        print(f"[tiny] tokenizer: {len(fast)} tokens -> {path} ({time.time() - start:.1f}s)")


def _lm_documents(tokenizer, seed: int = 0) -> list[str]:
    """Training conversations as text-only chats (the <image> placeholder removed), rendered by the shared
    renderer with the LLaVA template, plus captions."""
    template = TEMPLATES["vicuna_v1"]
    documents = []
    for prompt in ("", ANSWER_PROMPT):
        for record in easyvqa.instruction_records("train", answer_prompt=prompt, seed=seed):
            messages = [{**m, "content": m["content"].replace("<image>\n", "")}
                        for m in normalise_messages(record["conversations"], record["id"])]
            pieces, _ = conversation_pieces(messages, template, tokenizer, record["id"])
            documents.append("".join(text for text, _ in pieces))
    for record in easyvqa.caption_records("train"):
        documents.append(record["conversations"][1]["value"] + "\n")
    return documents


def _step(model, optimizer, schedule, loss, losses: list, bar) -> None:
    """One optimiser step of a tiny LM's pretraining (clipped at 1.0), its loss logged and shown."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    losses.append(loss.item())
    bar.set_postfix(loss=f"{loss.item():.3f}")


def _save_lm(path: Path, model, tokenizer, kind: str, steps: int, losses: list, start: float) -> None:
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_info(tmp, {"kind": kind, "parameters": sum(p.numel() for p in model.parameters()), "steps": steps,
                          "final_loss": sum(losses[-20:]) / 20, "seconds": time.time() - start})


# -- the backbones' configurations, which `config_only` writes without building anything ----------------------------
def llama_config(tokenizer):
    from transformers import LlamaConfig  # start-up: transformers, 0.76 s

    return LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       attn_implementation="sdpa", **LM_CONFIG)


def t5_config(tokenizer):
    from transformers import T5Config  # start-up: transformers, 0.76 s

    return T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    decoder_start_token_id=tokenizer.pad_token_id, **T5_CONFIG)


def vision_config(size: int):
    from transformers import ResNetConfig  # start-up: transformers, 0.76 s

    return ResNetConfig(image_size=size, **VISION_TOWER)


def scenes_transform() -> ImageTransform:
    return ImageTransform(size=SCENES_IMAGE_SIZE, crop=(SCENES_IMAGE_SIZE,) * 2, mean=(0.5,) * 3, std=(0.5,) * 3)


def config_only(name: str, path: Path, tokenizer_dir: Path, bert_dir: Path) -> None:
    """Write what a tiny backbone's directory says about its shape — config.json, the preprocessor's config, the
    tokenizer — without pretraining it: what `vlmkit train --dry-run` reads (vlmkit.io.configs_only). The
    tokenizer and the Q-Former's BERT are built for real first (seconds, no training: they size the vocabularies)."""
    from transformers import AutoTokenizer  # start-up: transformers, 0.76 s

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with atomic_dir(path) as tmp:
        if name == "llama":
            llama_config(tokenizer).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        elif name == "t5":
            t5_config(tokenizer).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        elif name in ("vision", "scenes-vision"):
            size = IMAGE_SIZE if name == "vision" else SCENES_IMAGE_SIZE
            vision_config(size).save_pretrained(tmp)
            (ImageTransform(size=size, crop=(size, size)) if name == "vision" else scenes_transform()).save(tmp)
        elif name == "qformer":  # a blip2 stage-1 checkpoint's config (its sizes the BERT's), and that tokenizer
            arch = from_name("blip2", scale="tiny")
            arch = dataclasses.replace(arch, connector=connector_class(arch.connector).resolve_pretrained(
                arch.connector)[0])
            (Path(tmp) / "config.json").write_text(json.dumps({"format": "vlmkit", "format_version": 1,
                                                               "arch": arch.to_dict()}, indent=2, default=str))
            shutil.copytree(bert_dir, Path(tmp) / "connector_tokenizer",
                            ignore=shutil.ignore_patterns("*.safetensors", "config.json", "manifest.json"))
        else:
            raise ValueError(f"no configuration-only form of tiny:{name}")


def build_llama(path: Path, tokenizer_dir: Path, verbose: bool = True, seed: int = 0) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM  # start-up: transformers, 0.76 s

    start = time.time()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = LlamaForCausalLM(llama_config(tokenizer))
    documents = _lm_documents(tokenizer, seed)
    encoded = [[tokenizer.bos_token_id] + tokenizer.encode(d, add_special_tokens=False) for d in documents]
    encoded = [Example(str(i), ids, ids, []) for i, ids in enumerate(encoded)]  # every token is a target
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LM_LR, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, LM_STEPS) / LM_STEPS)))
    model.train()
    losses = []
    bar = tqdm(range(LM_STEPS), desc="[tiny] pretraining LM", disable=not verbose)
    for _ in bar:
        batch = collate(rng.sample(encoded, LM_BATCH), tokenizer.pad_token_id)
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        _step(model, optimizer, schedule, loss, losses, bar)
    _save_lm(path, model, tokenizer, "LlamaForCausalLM", LM_STEPS, losses, start)
    if verbose:
        print(f"[tiny] LM: loss {losses[0]:.2f} -> {sum(losses[-20:]) / 20:.3f} in {time.time() - start:.0f}s -> {path}")


# -- an encoder-decoder LM (BLIP-2's Flan-T5 variant) -------------------------------------------------------------
# Flan-T5's shape (gated GELU, untied LM head, relative position buckets) at the tiny LM's width, on its tokenizer
T5_CONFIG = dict(d_model=128, d_ff=256, num_layers=4, num_decoder_layers=4, num_heads=4, d_kv=32,
                 relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
T5_STEPS, T5_BATCH, T5_LR = 300, 32, 2e-3


def _t5_pairs(tokenizer, seed: int = 0) -> list:
    """Training questions and captions as the `blip2-t5` preset renders them without the image, split as the
    model reads them: `Question: q Answer:</s>` to the encoder, `a</s>` from the decoder; a caption from an
    empty prompt (`</s>`)."""
    pairs = []
    for template, records in (("blip2_t5", easyvqa.instruction_records("train", seed=seed, max_turns=1)),
                              ("blip2_t5_caption", easyvqa.caption_records("train"))):
        for record in records:
            messages = [{"role": "user" if turn["from"] == "human" else "assistant",
                         "content": turn["value"].replace("<image>\n", "").replace("<image>", "")}
                        for turn in record["conversations"]]
            pairs.append(render_conversation(messages, TEMPLATES[template], tokenizer, num_image_tokens=0,
                                             record_id=record["id"]))
    return pairs


def build_t5(path: Path, tokenizer_dir: Path, verbose: bool = True, seed: int = 0) -> None:
    """A T5 encoder-decoder (Flan-T5's architecture at the tiny width) pretrained on the training split's
    question-answer pairs and captions as prompt -> answer: what `blip2-t5` keeps frozen at the tiny scale."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration  # start-up: transformers, 0.76 s

    start = time.time()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = T5ForConditionalGeneration(t5_config(tokenizer))
    pairs = [Example(str(i), r.input_ids, r.labels, []) for i, r in enumerate(_t5_pairs(tokenizer, seed))]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=T5_LR, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, T5_STEPS) / T5_STEPS)))
    model.train()
    losses = []
    bar = tqdm(range(T5_STEPS), desc="[tiny] pretraining T5", disable=not verbose)
    for _ in bar:
        batch = collate(rng.sample(pairs, T5_BATCH), tokenizer.pad_token_id)
        encoder_ids, encoder_mask, decoder_ids, decoder_mask, labels = split_for_encoder_decoder(
            batch.input_ids, batch.labels, batch.attention_mask, model.config.decoder_start_token_id,
            tokenizer.pad_token_id, image_id)
        loss = model(input_ids=encoder_ids, attention_mask=encoder_mask, decoder_input_ids=decoder_ids,
                     decoder_attention_mask=decoder_mask, labels=labels).loss
        _step(model, optimizer, schedule, loss, losses, bar)
    _save_lm(path, model, tokenizer, "T5ForConditionalGeneration", T5_STEPS, losses, start)
    if verbose:
        print(f"[tiny] T5: loss {losses[0]:.2f} -> {sum(losses[-20:]) / 20:.3f} in {time.time() - start:.0f}s -> {path}")


def _tensor(output) -> torch.Tensor:
    """CLIP's get_*_features return a tensor in transformers 4 and an output object in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _caption_images() -> tuple[torch.Tensor, list[str]]:
    """Training images whose questions reveal both colour and shape, with their captions."""
    questions, paths = easyvqa.load_split("train")
    transform = ImageTransform(size=IMAGE_SIZE, crop=(IMAGE_SIZE, IMAGE_SIZE))
    images, captions = [], []
    for image_id, attrs in sorted(easyvqa.image_attributes(questions).items()):
        if "color" in attrs and "shape" in attrs:
            images.append(transform(load_image(paths[image_id], record_id=image_id)))
            captions.append(easyvqa.caption_of(attrs))
    return torch.stack(images), captions


class ContrastivePair(torch.nn.Module):
    """CLIP-style training scaffold: an image tower + projection against a tiny CLIP text tower."""

    def __init__(self, image_tower, text_tower, image_dim: int, projection_dim: int):
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_projection = torch.nn.Linear(image_dim, projection_dim, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def image_embeds(self, pixel_values):
        pooled = self.image_tower(pixel_values=pixel_values).pooler_output.flatten(1)
        return F.normalize(self.image_projection(pooled), dim=-1)

    def text_embeds(self, input_ids, attention_mask):
        # pool at the last real token ourselves: CLIP's own pooling takes argmax(input_ids) when eos id == 2
        hidden = self.text_tower.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(1) - 1
        pooled = hidden[torch.arange(hidden.shape[0]), last]
        return F.normalize(self.text_tower.text_projection(pooled), dim=-1)


def build_vision(path: Path, tokenizer_dir: Path, verbose: bool = True, seed: int = 0) -> None:
    """Contrastive image-caption pretraining; identical captions in a batch are positives of each other.

    Only the image tower is kept, saved as a Hugging Face `ResNetModel` directory with a
    `preprocessor_config.json`; the text tower is training scaffolding.
    """
    from transformers import (  # start-up: transformers, 0.76 s
        AutoTokenizer,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        ResNetModel,
    )

    start = time.time()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tower = ResNetModel(vision_config(IMAGE_SIZE))
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id, **CLIP_TEXT))
    model = ContrastivePair(tower, text, VISION_TOWER["hidden_sizes"][-1], CLIP_TEXT["projection_dim"])
    images, captions = _caption_images()
    held_out = CLIP_HELD_OUT
    train_images, train_captions = images[:-held_out], captions[:-held_out]
    unique = sorted(set(captions))
    caption_ids = {c: [tokenizer.bos_token_id] + tokenizer.encode(c, add_special_tokens=False)
                   + [tokenizer.eos_token_id] for c in unique}

    def encode_texts(texts: list[str]) -> torch.Tensor:
        batch = collate([Example(t, caption_ids[t], caption_ids[t], []) for t in texts], tokenizer.pad_token_id)
        return model.text_embeds(batch.input_ids, batch.attention_mask)

    steps_per_epoch = math.ceil(len(train_images) / CLIP_BATCH)
    total = CLIP_EPOCHS * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=CLIP_LR, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=total, desc="[tiny] pretraining vision tower (contrastive)", disable=not verbose)
    model.train()
    for _ in range(CLIP_EPOCHS):
        order = torch.randperm(len(train_images), generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * CLIP_BATCH:(step + 1) * CLIP_BATCH]
            batch_captions = [train_captions[i] for i in index.tolist()]
            texts = sorted(set(batch_captions))
            target = torch.tensor([texts.index(c) for c in batch_captions])
            logits = model.logit_scale.exp() * model.image_embeds(train_images[index]) @ encode_texts(texts).T
            positives = F.one_hot(target, len(texts)).float().T  # texts x images
            loss_text = -(positives / positives.sum(1, keepdim=True) * logits.T.log_softmax(-1)).sum(1).mean()
            loss = (F.cross_entropy(logits, target) + loss_text) / 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    with torch.no_grad():
        similarity = model.image_embeds(images[-held_out:]) @ encode_texts(unique).T
        predicted = [unique[i] for i in similarity.argmax(-1).tolist()]
    truth = captions[-held_out:]
    accuracy = {
        "caption": sum(p == t for p, t in zip(predicted, truth)) / held_out,
        "color": sum(p.split()[1] == t.split()[1] for p, t in zip(predicted, truth)) / held_out,
        "shape": sum(p.split()[2] == t.split()[2] for p, t in zip(predicted, truth)) / held_out,
    }
    transform = ImageTransform(size=IMAGE_SIZE, crop=(IMAGE_SIZE, IMAGE_SIZE))
    with atomic_dir(path) as tmp:
        tower.save_pretrained(tmp)
        transform.save(tmp)
        _write_info(tmp, {"kind": "ResNetModel, CLIP-style contrastive", "epochs": CLIP_EPOCHS,
                          "train_images": len(train_images), "held_out_train_images": held_out,
                          "held_out_accuracy": accuracy, "seconds": time.time() - start})
    if verbose:
        print(f"[tiny] vision tower: held-out training images: caption {accuracy['caption']:.1%}, colour "
              f"{accuracy['color']:.1%}, shape {accuracy['shape']:.1%} in {time.time() - start:.0f}s -> {path}")


# The grounding presets' tower (tiny:scenes-vision): the same ResNet at 128 px (an 8 x 8 grid of 128-d features,
# twice llava's tiny side), pretrained on generated scenes with a per-cell detection head, YOLO-style: each
# object is assigned to the cell holding its box centre, which predicts it is there, its colour, shape, size
# class and its box. A contrastive caption loss (the tiny:vision recipe) teaches what objects are but not where
# they are; grounding needs where. The head is training scaffolding; only the tower is kept.
SCENES_IMAGE_SIZE = 128
SCENES_TRAIN, SCENES_HELD_OUT, SCENES_MAX_SHAPES = 8000, 500, 3
SCENES_STEPS, SCENES_BATCH, SCENES_LR = 1200, 64, 2e-3
SCENES_BOX_WEIGHT = 10.0


def _scene_tensors(split: str, n: int, size: int, seed: int):
    """uint8 images (n, 3, size, size) and per-cell targets of `n` generated scenes."""
    grid = size // 16
    colors, shapes = list(scenes.COLORS), list(scenes.SHAPES)
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    objectness = torch.zeros(n, grid, grid)
    classes = torch.full((n, 3, grid, grid), -100, dtype=torch.long)  # colour, shape, size class
    boxes = torch.zeros(n, grid, grid, 4)
    for k in range(n):
        scene = scenes.generate_scene(k, split, seed, size, SCENES_MAX_SHAPES)
        images[k] = torch.from_numpy(np.asarray(scenes.render(scene))).permute(2, 0, 1)
        for obj in scene.objects:  # drawing order: a later object on the same cell wins, as it is on top
            cx, cy = obj.center
            gx, gy = min(grid - 1, int(cx / size * grid)), min(grid - 1, int(cy / size * grid))
            objectness[k, gy, gx] = 1
            classes[k, :, gy, gx] = torch.tensor([colors.index(obj.color), shapes.index(obj.shape),
                                                  list(scenes.SIZE_CLASSES).index(obj.size)])
            boxes[k, gy, gx] = torch.tensor(obj.box, dtype=torch.float) / size
    return images, (objectness, classes, boxes)


def _safe_iou(predicted, true) -> float:
    """IoU of a regressed box (0 when it is inverted: x2 <= x1 or y2 <= y1) with a true one."""
    try:
        return iou(predicted, true)
    except BoxError:
        return 0.0


def build_scenes_vision(path: Path, verbose: bool = True, seed: int = 0, **_) -> None:
    """Per-cell detection pretraining on generated scenes (training split only); held-out test scenes measure
    how well a linear head reads objects and boxes off the features."""
    from transformers import ResNetModel  # start-up: transformers, 0.76 s

    start = time.time()
    torch.manual_seed(seed)
    size = SCENES_IMAGE_SIZE
    images, targets = _scene_tensors("train", SCENES_TRAIN, size, seed)
    held_images, held_targets = _scene_tensors("test", SCENES_HELD_OUT, size, seed)
    transform = scenes_transform()
    tower = ResNetModel(vision_config(size))
    n_classes = [len(scenes.COLORS), len(scenes.SHAPES), len(scenes.SIZE_CLASSES)]
    head = torch.nn.Conv2d(VISION_TOWER["hidden_sizes"][-1], 1 + sum(n_classes) + 4, 1)

    def predict(uint8_images):
        pixels = (uint8_images.float() / 255 - 0.5) / 0.5  # the saved transform's scaling, on exact pixels
        return head(tower(pixel_values=pixels).last_hidden_state)  # (n, 1 + classes + 4, grid, grid)

    def split_outputs(out):
        pieces = torch.split(out, [1, *n_classes, 4], dim=1)
        return pieces[0][:, 0], pieces[1:-1], pieces[-1].permute(0, 2, 3, 1)

    parameters = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=SCENES_LR, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (
        1 + math.cos(math.pi * min(s, SCENES_STEPS) / SCENES_STEPS)))
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(range(SCENES_STEPS), desc="[tiny] pretraining scenes vision tower (per-cell detection)",
               disable=not verbose)
    tower.train()
    for _ in bar:
        index = torch.randint(0, SCENES_TRAIN, (SCENES_BATCH,), generator=generator)
        objectness, classes, boxes = (t[index] for t in targets)
        logit, class_logits, box_out = split_outputs(predict(images[index]))
        loss = F.binary_cross_entropy_with_logits(logit, objectness)
        for i, logits in enumerate(class_logits):
            loss = loss + F.cross_entropy(logits, classes[:, i], ignore_index=-100)
        mask = objectness.bool()
        loss = loss + SCENES_BOX_WEIGHT * F.l1_loss(box_out[mask], boxes[mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    tower.eval()
    with torch.no_grad():
        out = torch.cat([predict(held_images[i:i + 100]) for i in range(0, SCENES_HELD_OUT, 100)])
    logit, class_logits, box_out = split_outputs(out)
    objectness, classes, boxes = held_targets
    mask = objectness.bool()
    predicted = (box_out[mask] * size).tolist()
    true = (boxes[mask] * size).tolist()
    held_out = {
        "objects": int(mask.sum()),
        "cell_objectness": ((logit > 0) == mask).float().mean().item(),
        **{name: (class_logits[i].argmax(1)[mask] == classes[:, i][mask]).float().mean().item()
           for i, name in enumerate(("color", "shape", "size"))},
        "box_mae_pixels": (box_out[mask] - boxes[mask]).abs().mean().item() * size,
        "box_iou_at_0.5": sum(_safe_iou(p, t) >= 0.5 for p, t in zip(predicted, true)) / max(1, len(true)),
    }
    with atomic_dir(path) as tmp:
        tower.save_pretrained(tmp)
        transform.save(tmp)
        _write_info(tmp, {"kind": "ResNetModel, per-cell detection on generated scenes", "image_size": size,
                          "steps": SCENES_STEPS, "train_scenes": SCENES_TRAIN, "held_out_test_scenes": SCENES_HELD_OUT,
                          "held_out": held_out, "seconds": time.time() - start})
    if verbose:
        print(f"[tiny] scenes vision tower: held-out scenes: colour {held_out['color']:.1%}, shape "
              f"{held_out['shape']:.1%}, box from one cell IoU>=0.5 {held_out['box_iou_at_0.5']:.1%} (mean error "
              f"{held_out['box_mae_pixels']:.1f} px) in {time.time() - start:.0f}s -> {path}")



# -- the Q-Former's BERT (BLIP-2 family) -------------------------------------------------------------------------
BERT_CONFIG = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                   max_position_embeddings=64)
BERT_VOCAB = 512


def _bert_corpus() -> list[str]:
    """Captions and questions the project has (easy-VQA's training split, generated training scenes)."""
    corpus = text_corpus()
    corpus += [scenes.caption(scenes.generate_scene(i, "train", max_shapes=4)) for i in range(400)]
    return corpus


def build_bert(path: Path, verbose: bool = True, seed: int = 0, **_) -> None:
    """A lower-cased WordPiece tokenizer over the project's text and a BERT of BERT_CONFIG's sizes, randomly
    initialised (not pretrained): what a Q-Former starts from at the tiny scale, loaded as bert-base-uncased is."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast  # start-up: transformers, 0.76 s

    start = time.time()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(_bert_corpus(), trainer=trainers.WordPieceTrainer(
        vocab_size=BERT_VOCAB, special_tokens=specials, show_progress=verbose))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                             special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = BertTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]", do_lower_case=True)
    torch.manual_seed(seed)
    model = BertForMaskedLM(BertConfig(vocab_size=len(fast), pad_token_id=fast.pad_token_id, **BERT_CONFIG))
    with atomic_dir(path) as tmp:
        fast.save_pretrained(tmp)
        model.save_pretrained(tmp)
        _write_info(tmp, {"kind": "WordPiece tokenizer + random BERT (not pretrained)", "vocab_size": len(fast),
                          "config": BERT_CONFIG, "seconds": time.time() - start})
    if verbose:
        print(f"[tiny] bert: {len(fast)} WordPiece tokens, random {BERT_CONFIG['num_hidden_layers']}-layer BERT -> "
              f"{path} ({time.time() - start:.1f}s)")


# -- a trained Q-Former (MiniGPT-4, VisualGLM) ---------------------------------------------------------------------
def build_qformer(path: Path, verbose: bool = True, seed: int = 0, **_) -> None:
    """BLIP-2's stage 1 at the tiny scale — the `blip2` preset's representation stage on generated scene captions,
    with its own defaults — saved as a vlmkit checkpoint: the trained Q-Former that MiniGPT-4 and VisualGLM start
    from, as they start from BLIP-2's."""
    start = time.time()
    config = from_name("blip2", scale="tiny", seed=seed)
    with tempfile.TemporaryDirectory(prefix="vlmkit-qformer-") as run:
        train_run(config, run, stages=["representation"], verbose=verbose,
                  log=print if verbose else (lambda *args, **kwargs: None))
        with atomic_dir(path) as tmp:
            shutil.copytree(Path(run) / "model", tmp, dirs_exist_ok=True)
            shutil.copy(Path(run) / "train_log.jsonl", Path(tmp) / "train_log.jsonl")
    if verbose:
        print(f"[tiny] qformer: blip2 stage 1 ({config.stages[0].name}) in {time.time() - start:.0f}s -> {path}")
