"""Short-answer VQA evaluation: greedy answers, normalised exact match, JSON report, confusion matrix PNG.

Works on any records whose last turn is a short reference answer: easy-VQA's test split or a user's LLaVA
JSON. Frozen-encoder features are computed once per image, prompts are batched with left padding.
"""
from __future__ import annotations

import json
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vlmkit.data import compare, easyvqa
from vlmkit.data.dataset import collate_states, load_llava_json
from vlmkit.data.sources import EASY_VQA, DataSpec, build_dataset
from vlmkit.infer.generate import GenerationConfig, decode_answer, generate
from vlmkit.model.features import cache_features

_ARTICLES = {"a", "an", "the"}
_NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation or articles, number words as digits (as VQA evaluation does)."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def _prefix_end(input_ids: list[int], image_token_id: int) -> int:
    """Where a one-image prompt's shared start ends: just after its image's last placeholder token."""
    ids = list(input_ids)
    return len(ids) - ids[::-1].index(image_token_id) if image_token_id in ids else 0


def _shared_prefix_batches(dataset, image_token_id: int, batch_size: int) -> tuple[list, list[int]]:
    """Batches of the one-image examples, whole images at a time: (prefix ids, [(image index, [example indices])])
    per batch, where every example of the batch starts with those ids; and the examples left for plain batches."""
    groups: dict[tuple, list[int]] = {}
    rest = []
    for i in range(len(dataset)):
        example = dataset[i]
        cut = _prefix_end(example.input_ids, image_token_id) if len(example.image_indices) == 1 else 0
        if not 0 < cut < len(example.input_ids):
            rest.append(i)
            continue
        groups.setdefault((tuple(int(t) for t in example.input_ids[:cut]), int(example.image_indices[0])),
                          []).append(i)
    batches, current, rows = [], None, 0
    for (prefix, image), members in sorted(groups.items(), key=lambda item: (len(item[0][0]), item[0])):
        if current is None or current[0] != prefix or rows + len(members) > batch_size and rows:
            current, rows = (prefix, []), 0
            batches.append(current)
        current[1].append((image, members))
        rows += len(members)
    return batches, rest


@torch.no_grad()
def generate_answers(model, dataset, batch_size: int = 128, max_new_tokens: int = 8, verbose: bool = True,
                     feature_cache_gb: float = 4.0, workers: int = 0, share_prefix: bool = True) -> list[str]:
    """Greedy answers to every example of a prompt-mode ConversationDataset (stopped by the template's stop),
    in dataset order. Frozen-encoder features are computed once per image. With `share_prefix` (and cached
    features), the questions about one image are batched together and the prompt up to the image's last token
    (system text, image) runs once per image (`Decoder.add_with_prefix`); other prompts are sorted by length
    and batched with left padding."""
    model.eval()
    features = cache_features(model, dataset, feature_cache_gb, workers, verbose=verbose)
    predictions = [None] * len(dataset)
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    # a connector that reads the question makes each question's image tokens its own: no prefix to share
    # (and an encoder-decoder LLM's encoder reads each prompt whole)
    share_prefix = share_prefix and not getattr(model.connector, "reads_instruction", False) \
        and not model.require_llm("evaluation").is_encoder_decoder \
        and not any(e.states for e in dataset.examples)  # a state placeholder after the image: not in the prefix
    shared, rest = (_shared_prefix_batches(dataset, model.image_token_id, batch_size)
                    if share_prefix and features is not None else ([], list(range(len(dataset)))))
    order = sorted(rest, key=lambda i: len(dataset[i].input_ids))
    plain = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    bar = tqdm(total=len(shared) + len(plain), desc="evaluating", disable=not verbose, mininterval=1.0)
    for prefix, images in shared:
        owners, indices = [], []
        for owner, (_, members) in enumerate(images):
            owners += [owner] * len(members)
            indices += members
        cut = len(prefix)
        outputs = generate(model, [list(dataset[i].input_ids[cut:]) for i in indices], config=config,
                           vision_features=features[torch.tensor([image for image, _ in images])],
                           prefix=(torch.tensor([prefix] * len(images), dtype=torch.long), owners))
        for i, tokens in zip(indices, outputs):
            predictions[i] = decode_answer(model, tokens)
        bar.update(1)
    for indices in plain:
        examples = [dataset[i] for i in indices]
        image_indices = torch.tensor([j for e in examples for j in e.image_indices], dtype=torch.long)
        images = dict(vision_features=features[image_indices]) if features is not None else \
            dict(pixel_values=dataset.pixels(image_indices))
        outputs = generate(model, [e.input_ids for e in examples], [len(e.image_indices) for e in examples],
                           config=config, record_ids=[e.record_id for e in examples],
                           states=collate_states(examples), **(images if len(image_indices) else {}))
        for i, tokens in zip(indices, outputs):
            predictions[i] = decode_answer(model, tokens)
        bar.update(1)
    bar.close()
    return predictions


@torch.no_grad()
def evaluate(model, dataset, batch_size: int = 128, max_new_tokens: int = 8, verbose: bool = True,
             feature_cache_gb: float = 4.0, workers: int = 0) -> dict:
    """Answer every example of a prompt-mode ConversationDataset; returns the report dict."""
    start = time.time()
    predictions = generate_answers(model, dataset, batch_size, max_new_tokens, verbose, feature_cache_gb, workers)
    rows = []
    per_answer = defaultdict(lambda: [0, 0])
    confusion = Counter()
    for example, prediction in zip(dataset.examples, predictions):
        truth, guess = normalise_answer(example.answer), normalise_answer(prediction)
        correct = truth == guess
        per_answer[truth][0] += correct
        per_answer[truth][1] += 1
        confusion[(truth, guess)] += 1
        rows.append({"id": example.record_id, "answer": example.answer, "prediction": prediction, "correct": correct})
    correct = sum(r["correct"] for r in rows)
    return {
        "accuracy": correct / len(rows), "correct": correct, "total": len(rows),
        "skipped": dict(dataset.skipped.counts), "source": dataset.source,
        "per_answer": {a: {"accuracy": c / n, "count": n} for a, (c, n) in sorted(per_answer.items())},
        "confusion": [[t, g, n] for (t, g), n in confusion.most_common()],
        "seconds": time.time() - start,
        "predictions": rows,
    }


def write_report(report: dict, out_dir: str | Path, name: str) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"eval_{name}.json"
    json_path.write_text(json.dumps(report, indent=1))
    png_path = out_dir / f"confusion_{name}.png"
    plot_confusion(report, png_path)
    return json_path, png_path


def plot_confusion(report: dict, out_file: Path, max_labels: int = 20) -> None:
    import matplotlib  # start-up: matplotlib, 0.55 s

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up: matplotlib, 0.55 s

    truths = Counter()
    for truth, _, n in report["confusion"]:
        truths[truth] += n
    labels = [a for a, _ in truths.most_common(max_labels)]
    index = {a: i for i, a in enumerate(labels)}
    other = len(labels)
    matrix = np.zeros((len(labels), len(labels) + 1))
    for truth, guess, n in report["confusion"]:
        if truth in index:
            matrix[index[truth], index.get(guess, other)] += n
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(labels), 1 + 0.45 * len(labels)), dpi=110)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels) + 1), labels + ["(other)"], rotation=60, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for r in range(len(labels)):
        for c in range(len(labels) + 1):
            if matrix[r, c]:
                ax.text(c, r, int(matrix[r, c]), ha="center", va="center", fontsize=6,
                        color="white" if rates[r, c] > 0.5 else "black")
    ax.set_xlabel("prediction")
    ax.set_ylabel("reference answer")
    ax.set_title(f"accuracy {report['accuracy']:.2%} on {report['total']} questions")
    fig.tight_layout()
    fig.savefig(out_file)
    plt.close(fig)


def run_eval(model, data: str, split: str, image_folder, skip_bad: bool, out_dir, limit: int = 0,
             batch_size: int = 128, verbose: bool = True, max_new_tokens: int = 8, confine_images: bool = False
             ) -> dict:
    """Evaluate on 'easy-vqa' (a split) or a LLaVA JSON file, print one summary line, write the report."""
    if data == EASY_VQA:
        records, source, name = easyvqa.question_records(split), f"easy-vqa {split}", f"easy-vqa-{split}"
    elif data.startswith(f"{compare.SOURCE_PREFIX}:"):  # several images a question, generated (held-out: :test)
        records, source, name = compare.builtin_records(data), data, data.replace(":", "-")
    else:
        records, source, name = load_llava_json(data), data, Path(data).stem
    if limit:
        records = records[:limit]
    # the preset's answer prompt is appended to the questions of built-in sources, in training as here; a
    # user's JSON is asked as written, as it was trained (appending it made a model trained on plain questions
    # answer noise: 7% on a digits set it fits)
    answer_prompt = model.config.answer_prompt if data == EASY_VQA else ""
    dataset = build_dataset(model, records, source, model.config.template,
                            DataSpec(instructions=data, image_folder=image_folder, skip_bad=skip_bad,
                                     confine_images=confine_images),
                            mode="prompt", answer_prompt=answer_prompt, verbose=verbose)
    report = evaluate(model, dataset, batch_size=batch_size, max_new_tokens=max_new_tokens, verbose=verbose)
    report["skipped"] = dict(dataset.skipped.counts)
    if data == EASY_VQA:
        report["per_kind"] = easyvqa.kind_accuracy(report["predictions"], split)
    json_path, png_path = write_report(report, out_dir, name)
    skipped = f"; {dataset.skipped.summary()}" if dataset.skipped.total else ""
    print(f"accuracy {report['accuracy']:.2%} ({report['correct']}/{report['total']}) on {source}{skipped} "
          f"in {report['seconds']:.0f}s; report {json_path}, confusion matrix {png_path}")
    if report.get("per_kind"):
        print("  by kind: " + "; ".join(f"{kind} {v['accuracy']:.1%} ({v['total']})"
                                        for kind, v in report["per_kind"].items()))
    return report
