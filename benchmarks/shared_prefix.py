"""Training throughput of one-question-per-row batches against shared-prefix rows (`share_prefix`).

    python benchmarks/shared_prefix.py [--images 300] [--batch-size 32] [--out benchmarks/results/shared_prefix.json]

The demo's instruction stage trains on easy-VQA's questions one per sample (`max_turns` 1), and a sample is
mostly what every question of its image repeats: the vicuna system prompt and the image's 17 tokens. This
compares, on the first `--images` training images' questions rendered as the demo renders them (llava-1.5's
template and answer prompt), one epoch of train-mode forward + backward steps of `--batch-size` samples:

  padded   `length_grouped_batches` + `collate`: each question its own row (the stage without share_prefix)
  shared   `image_grouped_batches` + `collate_shared`: an image's questions in one row, after one copy of the
           prefix, each attending to the prefix and itself (the same loss: tests/unit/test_packing.py)

The model is the benchmark in benchmarks/packing.py builds (random CLIP tower at 32 px, 16 image tokens, the
MLP connector, the demo's Llama shape), tower frozen and its features cached (as the stage does), fp32,
no optimiser step. Modes alternate for
`--rounds` epochs and a mode's epoch time is the sum of each step's fastest time (robust to a neighbour's
burst on a shared machine); samples/s and the ratio against `padded` are reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from packing import IMAGE_SIZE, build_model, run_epoch  # noqa: E402


def make_steps(examples, mode: str, batch_size: int, pad_id: int, image_token_id: int, seed: int) -> list[dict]:
    from vlmkit.data.dataset import collate, length_grouped_batches
    from vlmkit.data.packing import block_diagonal_mask, collate_shared, image_grouped_batches

    steps = []
    if mode == "padded":
        for indices in length_grouped_batches([len(e.input_ids) for e in examples], batch_size, seed):
            b = collate([examples[i] for i in indices], pad_id)
            steps.append(dict(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels,
                              image_counts=b.image_counts, image_indices=b.image_indices, samples=len(indices)))
        return steps
    per_row = int(mode.split("x")[1]) if "x" in mode else 0
    for indices in image_grouped_batches([tuple(e.image_indices) for e in examples], batch_size, seed):
        b = collate_shared([examples[i] for i in indices], pad_id, image_token_id, per_row)
        steps.append(dict(input_ids=b.input_ids, labels=b.labels, image_counts=b.image_counts,
                          attention_mask=block_diagonal_mask(b.sequence_ids, prefix_lengths=b.prefix_lengths),
                          image_indices=b.image_indices, position_ids=b.position_ids, samples=len(indices)))
    return steps


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--per-row", type=int, nargs="*", default=[2, 4, 6],
                        help="also shared rows of at most this many questions (each row its own prefix copy)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "shared_prefix.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from vlmkit.archs.llava_1_5 import PRESET
    from vlmkit.data import easyvqa
    from vlmkit.data.dataset import Example
    from vlmkit.data.render import normalise_messages, render_conversation
    from vlmkit.data.templates import get_template

    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp))
    model.train()
    model.vision.requires_grad_(False)
    template, pad_id = get_template(model.config.template), model.tokenizer.pad_token_id
    records = easyvqa.instruction_records("train", answer_prompt=PRESET["answer_prompt"], max_turns=1)
    images = sorted({r["image"] for r in records})[:args.images]
    index = {path: i for i, path in enumerate(images)}
    examples = []
    for r in records:
        if r["image"] in index:
            rendered = render_conversation(normalise_messages(r["conversations"], r["id"]), template,
                                           model.tokenizer, num_image_tokens=model.num_image_tokens)
            examples.append(Example(r["id"], rendered.input_ids, rendered.labels, [index[r["image"]]]))
    torch.manual_seed(args.seed)
    with torch.no_grad():  # the frozen tower's features, cached per image as the training loop does
        features = model.encode_images(torch.rand(len(images), 3, IMAGE_SIZE, IMAGE_SIZE))
    modes = ["padded", "shared"] + [f"shared x{k}" for k in args.per_row]
    steps = {m: make_steps(examples, m, args.batch_size, pad_id, model.image_token_id, args.seed) for m in modes}
    for mode in modes:  # warm-up
        run_epoch(model, steps[mode][:2], features, "vision_features")
    load_before = os.getloadavg()
    times = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode in modes:
            times[mode].append(run_epoch(model, steps[mode], features, "vision_features"))
    results = {}
    for mode in modes:
        seconds = sum(min(t) for t in zip(*times[mode]))
        tokens = sum(s["input_ids"].numel() for s in steps[mode])
        results[mode] = dict(steps=len(steps[mode]), samples=sum(s["samples"] for s in steps[mode]),
                             rows_per_step=round(sum(s["input_ids"].shape[0] for s in steps[mode]) / len(steps[mode]), 1),
                             tokens_per_step=round(tokens / len(steps[mode]), 1), epoch_s=round(seconds, 3),
                             samples_per_s=round(len(examples) / seconds, 1),
                             round_epochs_s=[round(sum(t), 3) for t in times[mode]])
    for mode in modes:
        results[mode]["ratio_vs_padded"] = round(results[mode]["samples_per_s"] / results["padded"]["samples_per_s"], 2)
    lengths = [len(e.input_ids) for e in examples]
    table = ["| mode | steps | rows/step | tokens/step (incl. padding) | epoch s | samples/s | vs padded |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| {m} | {r['steps']} | {r['rows_per_step']} | {r['tokens_per_step']:.0f} | {r['epoch_s']:.2f} | "
              f"{r['samples_per_s']:.1f} | {r['ratio_vs_padded']:.2f}x |" for m, r in results.items()]
    print(f"{len(examples)} questions on {len(images)} images, {min(lengths)}-{max(lengths)} tokens "
          f"(mean {sum(lengths) / len(lengths):.0f}), batch {args.batch_size}, {args.threads} threads, "
          f"fastest step times of {args.rounds} epochs\n")
    print("\n".join(table))
    report = {"command": "python benchmarks/" + " ".join([Path(__file__).name, *(argv or sys.argv[1:])]),
              "settings": vars(args) | {"out": None},
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "python": platform.python_version()},
              "data": {"questions": len(examples), "images": len(images), "mean_len": round(sum(lengths) / len(lengths), 1),
                       "image_tokens": model.num_image_tokens},
              "load_average": {"before": load_before, "after": os.getloadavg()},
              "results": results, "table": table}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
