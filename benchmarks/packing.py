"""Training throughput of padded batches against packed rows (`vlmkit.data.packing`), same token budget.

    python benchmarks/packing.py [--records 512] [--batch-size 8] [--out benchmarks/results/packing.json]

A random LLaVA-1.5 is built in a temporary directory from Hugging Face backbones (a CLIP tower at 32 px with
8 px patches, so 16 image tokens; the 2-layer MLP connector; the demo's 4-layer Llama with the project's
tokenizer). The data is easy-VQA-like: one image per record and 1-8 procedurally generated question turns,
so lengths vary about fourfold. Every step is a train-mode forward + backward (vision tower frozen, as in
stage 2), no optimiser step, in fp32 on `--threads` threads. One epoch over all records per mode:

  padded          random batches of N records, `collate` pads each to its longest
  padded-grouped  the same, but `length_grouped_batches` (similar lengths together): padding's best case
  packed xK       `pack_examples` rows of K x the longest record, N/K rows per step, so every step holds at
                  most N x longest tokens, the largest padded batch

Each mode runs `--rounds` epochs, interleaved with the other modes; every step is timed, and a mode's epoch
time is the sum over its steps of the step's fastest time, so that another process's burst of work (on a
shared 2-core machine one round can take ten times as long) does not decide the result.
samples/s = records / epoch time; the ratio is against `padded`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
QUESTIONS = [  # (question, answer maker): easy-VQA's kinds, with a few longer answers for variety
    ("What color is the shape?", lambda c, s: c),
    ("What shape is in the image?", lambda c, s: s),
    ("Is there a {s} in the image?", lambda c, s: "yes"),
    ("Is the shape {c}?", lambda c, s: "yes"),
    ("Describe the image in a sentence.", lambda c, s: f"a {c} {s} on a plain white background"),
    ("Which colour and which shape do you see?", lambda c, s: f"the shape is a {s} and it is {c}"),
]
IMAGE_SIZE, PATCH_SIZE = 32, 8
LLM = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=4, tie_word_embeddings=True)  # the demo's LM (vlmkit.tiny.build.LM_CONFIG)


def records(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        colour, shape = rng.choice(COLORS), rng.choice(SHAPES)
        messages = []
        for turn in range(rng.randint(1, 8)):
            question, answer = rng.choice(QUESTIONS)
            prefix = "<image>\n" if turn == 0 else ""
            messages += [{"role": "user", "content": prefix + question.format(c=colour, s=shape)},
                         {"role": "assistant", "content": answer(colour, shape)}]
        out.append(messages)
    return out


def build_model(root: Path):
    from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from vlmkit.archs import from_name
    from vlmkit.data.images import ImageTransform
    from vlmkit.model.vlm import VisionLanguageModel
    from vlmkit.tiny.build import build_tokenizer

    build_tokenizer(root / "tokenizer", verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=128,
                                     intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
                    ).save_pretrained(root / "clip")
    ImageTransform(size=IMAGE_SIZE, crop=(IMAGE_SIZE, IMAGE_SIZE)).save(root / "clip")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, **LLM)).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    config = from_name("llava-1.5", scale="tiny", vision={"name_or_path": str(root / "clip"), "feature_layer": -2},
                       llm={"name_or_path": str(root / "llm")})
    return VisionLanguageModel.from_config(config, verbose=False)


def make_steps(examples, mode: str, batch_size: int, pad_id: int, seed: int) -> list[dict]:
    """The epoch's steps as model inputs (collated before timing: only forward + backward are timed)."""
    from vlmkit.data.dataset import collate, length_grouped_batches
    from vlmkit.data.packing import block_diagonal_mask, collate_packed, pack_examples

    rng = random.Random(seed)
    steps = []
    if mode.startswith("padded"):
        if mode == "padded-grouped":
            batches = length_grouped_batches([len(e.input_ids) for e in examples], batch_size, seed)
        else:
            order = list(range(len(examples)))
            rng.shuffle(order)
            batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for indices in batches:
            b = collate([examples[i] for i in indices], pad_id)
            steps.append(dict(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels,
                              image_counts=b.image_counts, image_indices=b.image_indices, samples=len(indices),
                              tokens=int(b.attention_mask.sum())))
        return steps
    factor = int(mode.split("x")[1])
    longest = max(len(e.input_ids) for e in examples)
    rows = pack_examples(examples, pack_to=factor * longest)
    rng.shuffle(rows)
    per_step = max(1, batch_size // factor)
    for start in range(0, len(rows), per_step):
        b = collate_packed([[examples[i] for i in row] for row in rows[start:start + per_step]], pad_id)
        steps.append(dict(input_ids=b.input_ids, attention_mask=block_diagonal_mask(b.sequence_ids, torch.float32),
                          labels=b.labels, image_counts=b.image_counts, image_indices=b.image_indices,
                          position_ids=b.position_ids, samples=sum(map(len, b.record_ids)),
                          tokens=int((b.sequence_ids >= 0).sum())))
    return steps


def run_epoch(model, steps, pixels, images_as: str = "pixel_values") -> list[float]:
    """Each step's forward + backward time; `pixels` are indexed per step and passed as `images_as`
    (`vision_features` for cached features of a frozen tower)."""
    times = []
    for step in steps:
        start = time.perf_counter()
        loss, _ = model(step["input_ids"], step["attention_mask"], step["labels"], image_counts=step["image_counts"],
                        position_ids=step.get("position_ids"), **{images_as: pixels[step["image_indices"]]})
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pack-factors", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "packing.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from vlmkit.data.dataset import Example
    from vlmkit.data.render import render_conversation
    from vlmkit.data.templates import get_template

    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp))
    model.train()
    model.vision.requires_grad_(False)
    template, pad_id = get_template(model.config.template), model.tokenizer.pad_token_id
    examples = []
    for i, messages in enumerate(records(args.records, args.seed)):
        r = render_conversation(messages, template, model.tokenizer, num_image_tokens=model.num_image_tokens)
        examples.append(Example(f"rec-{i}", r.input_ids, r.labels, [i]))
    torch.manual_seed(args.seed)
    pixels = torch.rand(len(examples), 3, IMAGE_SIZE, IMAGE_SIZE)
    lengths = [len(e.input_ids) for e in examples]

    modes = ["padded", "padded-grouped"] + [f"packed x{k}" for k in args.pack_factors]
    steps = {mode: make_steps(examples, mode, args.batch_size, pad_id, args.seed) for mode in modes}
    for mode in modes:  # warm-up: first calls allocate and pick kernels
        run_epoch(model, steps[mode][:2], pixels)
    load_before = os.getloadavg()
    times = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode in modes:
            times[mode].append(run_epoch(model, steps[mode], pixels))

    results = {}
    for mode in modes:
        s = steps[mode]
        seconds = sum(min(step_times) for step_times in zip(*times[mode]))
        shape_tokens = sum(step["input_ids"].numel() for step in s)
        real = sum(step["tokens"] for step in s)
        results[mode] = dict(steps=len(s), samples=sum(step["samples"] for step in s), epoch_s=round(seconds, 3),
                             samples_per_s=round(len(examples) / seconds, 2),
                             real_tokens_per_s=round(real / seconds, 1),
                             pad_fraction=round(1 - real / shape_tokens, 3),
                             max_step_tokens=max(step["input_ids"].numel() for step in s),
                             round_epochs_s=[round(sum(t), 3) for t in times[mode]])
    for mode in modes:
        results[mode]["ratio_vs_padded"] = round(results[mode]["samples_per_s"] / results["padded"]["samples_per_s"], 2)

    table = ["| mode | steps | max tokens/step | padding | epoch s | samples/s | real tokens/s | vs padded |",
             "|---|---|---|---|---|---|---|---|"]
    table += [f"| {m} | {r['steps']} | {r['max_step_tokens']} | {r['pad_fraction']:.1%} | {r['epoch_s']:.2f} | "
              f"{r['samples_per_s']:.1f} | {r['real_tokens_per_s']:.0f} | {r['ratio_vs_padded']:.2f}x |"
              for m, r in results.items()]
    print(f"{len(examples)} records, lengths {min(lengths)}-{max(lengths)} (mean {sum(lengths) / len(lengths):.0f}), "
          f"batch {args.batch_size}, {args.threads} threads, fastest step times of {args.rounds} epochs\n")
    print("\n".join(table))
    report = {"command": "python benchmarks/" + " ".join([Path(__file__).name, *(argv or sys.argv[1:])]),
              "settings": vars(args) | {"out": None},
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "python": platform.python_version()},
              "data": {"records": len(examples), "min_len": min(lengths), "max_len": max(lengths),
                       "mean_len": round(sum(lengths) / len(lengths), 1),
                       "image_tokens": model.num_image_tokens},
              "load_average": {"before": load_before, "after": os.getloadavg()},
              "results": results, "table": table}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
