"""A POPE-style object-hallucination probe on held-out generated scenes.

POPE (Li et al., 2023, "Evaluating Object Hallucination in Large Vision-Language Models") asks "Is there a
<object> in the image?" about objects that are in the image (answer yes) and as many that are not (answer
no), choosing the absent ones three ways: random, popular (the objects most frequent in the training data)
and adversarial (the objects that co-occur most often with those present). Here an object is a colour +
shape of the scene generator (vlmkit.data.scenes: 8 colours x 6 shapes) and the question is the wording of
the training data's existence questions, `Is there a red circle?`, rendered as the run's preset renders its
VQA (task token, answer prompt). For each test scene every colour+shape present is asked once (yes), and for
each setting as many absent ones (no):

- **random**: uniformly among the absent kinds;
- **popular**: the absent kinds most frequent among the training scenes' objects;
- **adversarial**: absent kinds that share a colour or a shape with an object present (a red square beside a
  red circle and a blue square), those that co-occur most often with the present kinds in training scenes
  first: the near misses that a model binding colour to shape poorly answers yes to.

Metrics per setting, over the same positives and that setting's negatives: accuracy, precision, recall and
F1 of "yes", and the yes-ratio (POPE's sign of a model that agrees too readily: 0.5 is balanced). An answer
that is neither yes nor no is wrong either way (a miss on a present object, a false alarm on an absent one, as
POPE's scorer reads it) and counted in `other`. A question asked in two settings (a random negative that is
also the popular one) is answered once.
"""
from __future__ import annotations

import json
import random
import time
from collections import Counter
from itertools import combinations
from pathlib import Path

from vlmkit.data import scenes
from vlmkit.data.sources import DataSpec, build_dataset
from vlmkit.errors import VlmkitError
from vlmkit.eval.grounding import render_scene_json, trained_scene_options, draw_grid
from vlmkit.eval.vqa import generate_answers, normalise_answer

SETTINGS = ("random", "popular", "adversarial")
DEFAULT_SCENES = 500


def _kind(obj: dict) -> tuple[str, str]:
    return obj["color"], obj["shape"]


def training_statistics(train_scenes: list[list[dict]]) -> tuple[Counter, Counter]:
    """(how often each colour+shape occurs, how often each pair of kinds shares a scene) in training scenes, given
    as each scene's objects."""
    frequency, together = Counter(), Counter()
    for objects in train_scenes:
        kinds = sorted({_kind(o) for o in objects})
        frequency.update(_kind(o) for o in objects)
        together.update(combinations(kinds, 2))
    return frequency, together


def choose_negatives(present: set, all_kinds: list, count: int, setting: str, rng: random.Random,
                     frequency: Counter, together: Counter) -> list[tuple[str, str]]:
    """`count` absent colour+shape kinds for one scene, chosen as `setting` says (see the module's doc)."""
    absent = [k for k in all_kinds if k not in present]
    if setting == "random":
        return rng.sample(absent, min(count, len(absent)))
    if setting == "popular":  # most frequent first; ties in the kinds' fixed order
        return sorted(absent, key=lambda k: (-frequency[k], all_kinds.index(k)))[:count]
    if setting == "adversarial":
        near = [k for k in absent if any(k[0] == p[0] or k[1] == p[1] for p in present)]
        pool = near if len(near) >= count else near + [k for k in absent if k not in near]
        score = {k: sum(together[tuple(sorted((k, p)))] for p in present) for k in pool}
        ranked = sorted(pool, key=lambda k: (k not in near, -score[k], all_kinds.index(k)))
        return ranked[:count]
    raise VlmkitError(f"unknown POPE setting {setting!r}; settings: {', '.join(SETTINGS)}")


def pope_questions(test_manifest: list[dict], image_folder, frequency: Counter, together: Counter,
                   colors, shapes, seed: int = 0) -> tuple[list[dict], dict[str, list[str]]]:
    """(records, {'present' | setting: [record ids]}) for `test_manifest`'s scenes (vlmkit.data.scenes'
    `{split}_scenes.json`), images under `image_folder`. Each distinct question is one record."""
    all_kinds = [(c, s) for c in colors for s in shapes]
    records, ids = {}, {"present": [], **{s: [] for s in SETTINGS}}

    def ask(scene: dict, kind: tuple[str, str], answer: str, qtype: str) -> str:
        record_id = f"{scene['id']}-{kind[0]}-{kind[1]}"
        if record_id not in records:
            question = scenes.existence_question(*kind)
            records[record_id] = {
                "id": record_id, "image": str(Path(image_folder) / scene["image"]), "task": "vqa",
                "image_size": scene["image_size"], "question": question, "answer": answer, "question_type": qtype,
                "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                  {"from": "gpt", "value": answer}]}
        return record_id

    for scene in test_manifest:
        present = sorted({_kind(o) for o in scene["objects"]})
        ids["present"] += [ask(scene, kind, "yes", "present") for kind in present]
        for setting in SETTINGS:
            rng = random.Random(f"pope-{seed}-{setting}-{scene['id']}")
            for kind in choose_negatives(set(present), all_kinds, len(present), setting, rng, frequency, together):
                ids[setting].append(ask(scene, kind, "no", f"absent-{setting}"))
    return list(records.values()), ids


def yes_no(answer: str) -> str:
    """'yes', 'no' or 'other' from the first word of a normalised answer."""
    words = normalise_answer(answer).split()
    return words[0] if words and words[0] in ("yes", "no") else "other"


def pope_metrics(said: dict[str, str], ids: dict[str, list[str]]) -> dict:
    """Per setting: accuracy, precision, recall, F1 of 'yes', yes-ratio and the counts. `said` maps record id
    to 'yes' | 'no' | 'other'. An 'other' answer is wrong either way: a miss (fn) on a present object and a
    false alarm (fp) on an absent one, as POPE's own scorer reads any answer without 'no' or 'not' as yes; the
    yes-ratio counts the answers that are yes."""
    positives = [said[i] for i in ids["present"]]
    out = {}
    for setting in SETTINGS:
        negatives = [said[i] for i in ids[setting]]
        tp, fn = positives.count("yes"), len(positives) - positives.count("yes")
        tn = negatives.count("no")
        fp = len(negatives) - tn
        total = len(positives) + len(negatives)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / len(positives) if positives else 0.0
        out[setting] = {"accuracy": (tp + tn) / total if total else 0.0, "precision": precision, "recall": recall,
                        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
                        "yes_ratio": (tp + negatives.count("yes")) / total if total else 0.0,
                        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
                        "other": positives.count("other") + negatives.count("other"), "total": total}
    return out


def summary_line(report: dict) -> str:
    parts = [f"{s} acc {m['accuracy']:.2%} F1 {m['f1']:.3f} yes {m['yes_ratio']:.2f}"
             for s, m in report["settings"].items()]
    return "POPE " + "; ".join(parts)


def run_pope_eval(model, out_dir, n: int = DEFAULT_SCENES, seed: int = 0, limit: int = 0, batch_size: int = 128,
                  verbose: bool = True, stages_ran=None, train_scenes: int = 0, max_new_tokens: int = 0) -> dict:
    """The probe on `n` held-out scenes like those the run's VQA trained on (size, shape count, seed; 64 px and
    up to 3 shapes if it trained on none), popularity and co-occurrence counted over `train_scenes` training
    scenes (0: as many as the run's source had, default 10,000); writes eval_pope.json and eval_pope.png under
    `out_dir`. `max_new_tokens` 0: 4 (a yes or a no, and a stop)."""
    start = time.time()
    config = model.config
    options = trained_scene_options(config, "vqa", stages_ran)
    size, shapes_max, scene_seed = options["size"], options["max_shapes"], options["seed"]
    train_n = train_scenes or (options.get("n") if options.get("split") == "train" else None) \
        or scenes.SOURCE_DEFAULTS["train"]
    # counted, never rendered: a run that trained on no scenes has none cached
    frequency, together = training_statistics(scenes.scene_objects("train", train_n, scene_seed, size, shapes_max))
    test_dir = scenes.ensure_scenes("test", n, scene_seed, size, shapes_max)
    manifest = json.loads((test_dir / "test_scenes.json").read_text())
    if limit:
        manifest = manifest[:limit]
    records, ids = pope_questions(manifest, test_dir, frequency, together, scenes.COLORS, scenes.SHAPES, seed)
    records = render_scene_json(config, records)
    source = f"pope:scenes:test:n{n}:size{size}:shapes{shapes_max}:seed{scene_seed}"
    dataset = build_dataset(model, records, source, config.template, DataSpec(instructions=source), mode="prompt",
                            answer_prompt="", verbose=verbose)
    if len(dataset.examples) != len(records):
        raise VlmkitError(f"{source}: {len(records) - len(dataset.examples)} of {len(records)} probe questions did "
                          f"not render ({dict(dataset.skipped.counts)})")
    predictions = generate_answers(model, dataset, batch_size=batch_size, max_new_tokens=max_new_tokens or 4,
                                   verbose=verbose, feature_cache_gb=config.feature_cache_gb)
    by_id = {r["id"]: r for r in records}
    rows, said = [], {}
    for example, prediction in zip(dataset.examples, predictions):
        record = by_id[example.record_id]
        said[record["id"]] = yes_no(prediction)
        rows.append({"id": record["id"], "image": record["image"], "question": record["question"],
                     "question_type": record["question_type"], "answer": record["answer"],
                     "prediction": prediction, "correct": said[record["id"]] == record["answer"]})
    report = {"task": "pope", "settings": pope_metrics(said, ids), "questions": len(records),
              "positives": len(ids["present"]), "scenes": len(manifest), "source": source, "preset": config.name,
              "seconds": time.time() - start, "predictions": rows}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "eval_pope.json"
    json_path.write_text(json.dumps(report, indent=1))
    png_path = draw_grid("vqa", rows, out_dir / "eval_pope.png")
    print(f"{summary_line(report)} on {len(manifest)} scenes ({len(records)} questions) in {report['seconds']:.0f}s; "
          f"report {json_path}, images {png_path}")
    return report
