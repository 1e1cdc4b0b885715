"""PaLM-E's TAMP evaluation on held-out tabletop scenes: question accuracy (q1-q4, normalised exact match) and
plan success (p1 grasp, p2 stack: each answer executed against its scene by `vlmkit.data.tabletop.execute`, so
any valid plan counts, not only the reference's wording). Writes eval_tamp.json; prints one summary line."""
from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

from vlmkit.data import tabletop
from vlmkit.data.dataset import load_llava_json
from vlmkit.data.sources import DataSpec, build_dataset
from vlmkit.errors import ConfigError
from vlmkit.eval.grounding import auto_max_new_tokens
from vlmkit.eval.vqa import generate_answers, normalise_answer

DEFAULT_SCENES = 500


def trained_view(config) -> str:
    """The tabletop view (state, image, both) the run's last stage read, else 'state'."""
    for stage in reversed(config.stages):
        for part in stage.mixture.split(","):
            name = part.strip().split("=")[0]
            if name.startswith(f"{tabletop.SOURCE_PREFIX}:"):
                return tabletop.parse_source_name(name)["view"]
    return "state"


def score(predictions: list[str], records: list[dict]) -> dict:
    """Per-family accuracy or success, question accuracy (q families) and plan success (p families)."""
    families = defaultdict(lambda: [0, 0])
    rows = []
    for prediction, record in zip(predictions, records):
        family = record["family"]
        if family in tabletop.PLAN_FAMILIES:
            correct, why = tabletop.execute(record["scene"]["blocks"], prediction, record["goal"])
        else:
            reference = record["conversations"][-1]["value"]
            correct, why = normalise_answer(prediction) == normalise_answer(reference), ""
        families[family][0] += correct
        families[family][1] += 1
        rows.append({"id": record["id"], "family": family, "answer": record["conversations"][-1]["value"],
                     "prediction": prediction, "correct": bool(correct), **({"why": why} if why else {})})

    def rate(names) -> float | None:
        done = [families[f] for f in names if f in families]
        total = sum(n for _, n in done)
        return sum(c for c, _ in done) / total if total else None

    return {"question_accuracy": rate(("q1", "q2", "q3", "q4")), "plan_success": rate(tabletop.PLAN_FAMILIES),
            "per_family": {f: {"accuracy": c / n, "count": n} for f, (c, n) in sorted(families.items())},
            "rows": rows}


def run_tamp_eval(model, data: str | None, out_dir, limit: int = 0, batch_size: int = 128, max_new_tokens: int = 0,
                  skip_bad: bool = False, verbose: bool = True) -> dict:
    """Answer the held-out questions of `data` (default `tabletop:VIEW:test:n500`, VIEW the one the run trained
    on; or a JSON written like them) and score them."""
    start = time.time()
    source = data or f"{tabletop.SOURCE_PREFIX}:{trained_view(model.config)}:test:n{DEFAULT_SCENES}"
    records = tabletop.builtin_records(source) if source.startswith(f"{tabletop.SOURCE_PREFIX}:") \
        else load_llava_json(source)
    for i, record in enumerate(records):
        if not isinstance(record, dict) or record.get("family") not in tabletop.FAMILIES or "scene" not in record \
                or (record.get("family") in tabletop.PLAN_FAMILIES and "goal" not in record):
            raise ConfigError(f"{source}: record {i} is not a tabletop question (it needs 'family' "
                              f"({', '.join(tabletop.FAMILIES)}), 'scene', and 'goal' for plans)")
    if limit:
        records = records[:limit]
    dataset = build_dataset(model, records, source, model.config.template,
                            DataSpec(instructions=source, skip_bad=skip_bad), mode="prompt", verbose=verbose)
    by_id = {str(r.get("id", f"#{i}")): r for i, r in enumerate(records)}
    kept = [by_id[e.record_id] for e in dataset.examples]
    budget = max_new_tokens or auto_max_new_tokens(model, [e.answer for e in dataset.examples])
    predictions = generate_answers(model, dataset, batch_size=batch_size, max_new_tokens=budget, verbose=verbose,
                                   feature_cache_gb=model.config.feature_cache_gb)
    metrics = score(predictions, kept)
    rows = metrics.pop("rows")
    report = {"task": "tamp", **metrics, "source": source, "preset": model.config.name, "max_new_tokens": budget,
              "skipped": dict(dataset.skipped.counts), "seconds": time.time() - start, "predictions": rows}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "eval_tamp.json"
    json_path.write_text(json.dumps(report, indent=1))
    families = ", ".join(f"{f} {v['accuracy']:.1%}" for f, v in report["per_family"].items())
    question = "-" if report["question_accuracy"] is None else f"{report['question_accuracy']:.2%}"
    plans = "-" if report["plan_success"] is None else f"{report['plan_success']:.2%}"
    print(f"tamp: question accuracy {question}, plan success {plans} ({families}) on {source} in "
          f"{report['seconds']:.0f}s; report {json_path}")
    return report
