"""Where easy-VQA evaluation spends its time, and what sharing the per-image prompt prefix saves.

    python benchmarks/eval_speed.py RUN_DIR                  # a trained run (e.g. runs/demo), all 9,673 questions
    python benchmarks/eval_speed.py RUN_DIR --limit 2000 --rounds 3 --out benchmarks/results/eval_speed.json

Phases, each timed on its own in one process (2 torch threads unless --threads): building the prompt-mode
data set (rendering and tokenising every question, checking every image header), encoding the test images
once with the frozen tower, then generating every answer two ways in alternating rounds: `share_prefix=False`
(every whole prompt prefilled: system text + image tokens + question) and `share_prefix=True` (the questions of
an image batched together; the prompt up to the image's last token runs once per image, each question
continues from its KV cache). Both give the same answers (checked here, and in tests/unit/test_generate.py).
Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--limit", type=int, default=0, help="first N test questions (0 = all 9,673)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results/eval_speed.json")
    args = parser.parse_args()

    import torch

    from vlmkit import VisionLanguageModel
    from vlmkit.data import easyvqa
    from vlmkit.data.sources import DataSpec, build_dataset
    from vlmkit.eval.vqa import generate_answers
    from vlmkit.model.features import cache_features

    torch.set_num_threads(args.threads)
    model = VisionLanguageModel.from_pretrained(Path(args.run_dir) / "model").eval()
    records = easyvqa.question_records("test")
    records = records[:args.limit] if args.limit else records
    start = time.perf_counter()
    dataset = build_dataset(model, records, "easy-vqa test", model.config.template, DataSpec(instructions="easy-vqa"),
                            mode="prompt", answer_prompt=model.config.answer_prompt, verbose=False)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    cache_features(model, dataset, 4.0, verbose=False)
    encode_s = time.perf_counter() - start
    times = {False: [], True: []}
    answers = {}
    for _ in range(args.rounds):
        for share in (False, True):
            start = time.perf_counter()
            answers[share] = generate_answers(model, dataset, args.batch_size, verbose=False, share_prefix=share)
            times[share].append(time.perf_counter() - start - encode_s)  # generate_answers encodes too
    same = sum(a == b for a, b in zip(answers[False], answers[True]))
    whole, shared = statistics.median(times[False]), statistics.median(times[True])
    prompt = statistics.mean(len(e.input_ids) for e in dataset.examples)
    rows = [("build data set (render, tokenise, image headers)", build_s),
            ("encode test images (frozen tower)", encode_s),
            ("generate, whole prompts", whole), ("generate, shared per-image prefix", shared)]
    print(f"{len(dataset)} questions, {len(dataset.images)} images, mean prompt {prompt:.1f} tokens, "
          f"{args.threads} threads, median of {args.rounds} rounds")
    print(f"{'phase':<52}{'seconds':>9}")
    for name, seconds in rows:
        print(f"{name:<52}{seconds:9.2f}")
    print(f"shared prefix / whole prompts: {shared / whole:.2f}x the time; identical answers {same}/{len(dataset)}")
    print(f"whole evaluation (build + encode + generate): {build_s + encode_s + whole:.1f} s -> "
          f"{build_s + encode_s + shared:.1f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"questions": len(dataset), "images": len(dataset.images), "threads": args.threads,
                               "mean_prompt_tokens": prompt, "build_seconds": build_s, "encode_seconds": encode_s,
                               "generate_whole_seconds": times[False], "generate_shared_seconds": times[True],
                               "ratio_shared_over_whole": shared / whole, "identical_answers": same,
                               "machine": platform.processor() or platform.machine(),
                               "torch": torch.__version__}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
