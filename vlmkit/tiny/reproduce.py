"""`vlmkit reproduce PRESET|all`: train each preset's tiny recipe and measure its paper's skills: the scoreboard.

For every preset and seed: the preset's tiny scale with that seed (the tiny backbones it names are built first
when the cache lacks them, timed apart from the recipe), trained through all its stages into
OUT/runs/PRESET-sSEED, then each skill the preset lists (`skills` in vlmkit.archs) measured on held-out data:

  easy-vqa   exact-match accuracy on easy-VQA's full test split (9,673 questions)
  retrieval  text->image R@1 by ITC (and after ITM re-ranking) among 100 held-out scenes with distinct captions,
             measured after the stage the preset names (BLIP-2's representation stage)
  rec        Acc@0.5 (and mean IoU) on the referring expressions of 1,000 held-out scenes
  reg        the share of answers that name the boxed object and no other (and exact phrases)
  scene-vqa  accuracy on those scenes' questions (count, colour, shape, exists, position; and counting alone)
  pope       the hallucination probe (vlmkit.eval.pope): F1 of yes with adversarial negatives, accuracy per
             setting, yes-ratio

A skill's first metric is its headline, the one its target is for; a target is judged only on the full
evaluation, never on an `eval_limit` subset (retrieval always ranks its 100 candidates). Each preset/seed is
added to OUT/scoreboard.json when it finishes, with the machine it ran on and the evaluation limit, and a rerun
skips those already there with the same limit and every skill (`fresh` starts over), so an interrupted
scoreboard resumes. Then OUT/scoreboard.md (one row per preset and metric: mean, min-max over seeds,
target, wall time of the recipe) and OUT/scoreboard.png (headline metrics as bars at the mean, each seed a dot,
each target a tick).
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from vlmkit import archs
from vlmkit.archs import from_name
from vlmkit.data.sources import DataSpec
from vlmkit.errors import ConfigError, VlmkitError
from vlmkit.eval.grounding import run_grounding_eval
from vlmkit.eval.pope import run_pope_eval
from vlmkit.eval.retrieval import run_retrieval_eval
from vlmkit.eval.tamp import run_tamp_eval
from vlmkit.eval.vqa import run_eval
from vlmkit.io import machine_summary
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit.tiny import ensure, used_by
from vlmkit.train import checkpoint
from vlmkit.train.run import train_run

SKILLS = ("easy-vqa", "retrieval", "rec", "reg", "scene-vqa", "pope", "tamp")
SKILL_NAMES = {"easy-vqa": "easy-VQA", "retrieval": "retrieval", "rec": "REC", "reg": "REG",
               "scene-vqa": "scene VQA", "pope": "POPE", "tamp": "TAMP"}


def _evaluate(skill: str, model, run_dir: Path, limit: int) -> dict:
    """The report of `skill` on `model`, written into `run_dir` as `vlmkit eval` writes it."""
    if skill == "easy-vqa":
        return run_eval(model, "easy-vqa", "test", None, False, run_dir, limit=limit, verbose=False)
    if skill == "retrieval":  # always the 100 candidates its target is for (a limit would change the task)
        return run_retrieval_eval(model, None, run_dir, verbose=False)
    if skill in ("rec", "reg", "scene-vqa"):
        task = "vqa" if skill == "scene-vqa" else skill
        return run_grounding_eval(model, task, None, run_dir, limit=limit, verbose=False)
    if skill == "pope":
        return run_pope_eval(model, run_dir, limit=limit, verbose=False)
    if skill == "tamp":
        return run_tamp_eval(model, None, run_dir, limit=limit, verbose=False)
    raise ConfigError(f"unknown skill {skill!r}; skills: {', '.join(SKILLS)}")


def skill_metrics(skill: str, report: dict) -> dict[str, float]:
    """The numbers the scoreboard shows for one skill's report, headline first."""
    if skill == "easy-vqa":
        return {"accuracy": report["accuracy"]}
    if skill == "retrieval":
        return {"t->i R@1 (ITC)": report["itc"]["text_to_image_r1"],
                "t->i R@1 (ITM re-ranked)": report["itm"]["text_to_image_r1"]}
    if skill == "rec":
        return {"Acc@0.5": report["accuracy"], "mean IoU": report["mean_iou"]}
    if skill == "reg":
        return {"valid phrase": report["valid"], "exact phrase": report["exact"]}
    if skill == "scene-vqa":
        out = {"accuracy": report["accuracy"]}
        if "count" in report["per_type"]:
            out["counting"] = report["per_type"]["count"]["accuracy"]
        return out
    if skill == "pope":
        settings = report["settings"]
        return {"F1 (adversarial)": settings["adversarial"]["f1"],
                **{f"accuracy ({s})": settings[s]["accuracy"] for s in settings},
                "yes-ratio (adversarial)": settings["adversarial"]["yes_ratio"]}
    if skill == "tamp":
        return {"question accuracy": report["question_accuracy"], "plan success": report["plan_success"],
                **{f"{family}": value["accuracy"] for family, value in report["per_family"].items()}}
    raise ConfigError(f"unknown skill {skill!r}; skills: {', '.join(SKILLS)}")


def _stage_model(run_dir: Path, stage: str) -> VisionLanguageModel:
    found = checkpoint.finished_stages(run_dir).get(stage)
    if found is None:
        raise ConfigError(f"{run_dir}: no checkpoint of stage {stage!r} to measure a skill after")
    return VisionLanguageModel.from_pretrained(found)


def reproduce_one(preset: str, seed: int, out: Path, eval_limit: int = 0, overrides: dict | None = None,
                  log=print) -> dict:
    """Train `preset`'s tiny recipe with `seed` into out/runs/PRESET-sSEED and measure its skills."""
    config = from_name(preset, scale="tiny", seed=seed, **(overrides or {}))
    start = time.time()
    for name in used_by(config):
        ensure(name)
    backbones = time.time() - start
    run_dir = out / "runs" / f"{preset}-s{seed}"
    log(f"== {preset}, seed {seed}: training its tiny recipe ({', '.join(s.name for s in config.stages)}) "
        f"into {run_dir}")
    start = time.time()
    result = train_run(config, run_dir, DataSpec(), overwrite=True)
    train_seconds = time.time() - start
    entry = {"preset": preset, "seed": seed, "eval_limit": eval_limit, "machine": machine_summary(),
             "backbone_seconds": backbones, "train_seconds": train_seconds, "skills": {}, "errors": {},
             "eval_seconds": 0.0}
    for skill, spec in archs.skills(preset).items():
        start = time.time()
        try:  # one skill that cannot be measured does not lose the run's others
            model = _stage_model(run_dir, spec["stage"]) if spec.get("stage") else result["model"]
            entry["skills"][skill] = skill_metrics(skill, _evaluate(skill, model, run_dir, eval_limit))
        except VlmkitError as exc:
            entry["errors"][skill] = str(exc)
            log(f"   {preset} seed {seed}: {SKILL_NAMES.get(skill, skill)} not measured: {exc}")
        entry["eval_seconds"] += time.time() - start
    log(f"   {preset} seed {seed}: trained in {train_seconds / 60:.1f} min; " + "; ".join(
        f"{SKILL_NAMES[s]} {next(iter(m))} {_value(next(iter(m)), next(iter(m.values())))}"
        for s, m in entry["skills"].items()))
    return entry


_ENTRY_KEYS = {"preset", "seed", "eval_limit", "machine", "train_seconds", "skills"}


def _load(path: Path) -> dict:
    if path.exists():
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict) and isinstance(data.get("results"), list) and all(
                    isinstance(e, dict) and _ENTRY_KEYS <= set(e) for e in data["results"]):
                return data
        except json.JSONDecodeError:
            pass
        raise ConfigError(f"{path} is not a scoreboard written by vlmkit reproduce; pass --fresh to start over or "
                          "pick another --out")
    return {"results": []}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def rows(data: dict) -> list[dict]:
    """One row per preset and metric: mean, min, max over the seeds measured, target (judged only on the full
    evaluation: never on an --eval-limit subset), mean training time."""
    by_preset: dict[str, list[dict]] = {}
    for entry in data["results"]:
        by_preset.setdefault(entry["preset"], []).append(entry)
    order = archs.names()
    out = []
    for preset in sorted(by_preset, key=lambda p: (order.index(p) if p in order else len(order), p)):
        entries = by_preset[preset]
        skills = archs.skills(preset) if preset in order else {}
        wall = statistics.mean(e["train_seconds"] for e in entries)
        metrics = list(dict.fromkeys((skill, metric) for e in entries for skill, values in e["skills"].items()
                                     for metric in values))
        for skill, metric in metrics:
            measured = [e for e in entries if metric in e["skills"].get(skill, {})]
            values = [e["skills"][skill][metric] for e in measured]
            headline = metric == next(iter(measured[0]["skills"][skill]))
            subset = any(e.get("eval_limit") for e in measured)
            target = skills.get(skill, {}).get("target") if headline else None
            out.append({"preset": preset, "skill": skill, "metric": metric, "headline": headline,
                        "mean": statistics.mean(values), "min": min(values), "max": max(values), "values": values,
                        "seeds": [e["seed"] for e in measured], "target": target, "subset": subset,
                        "met": None if target is None or subset else min(values) >= target,
                        "train_minutes": wall / 60})
    return out


def _value(metric: str, value: float) -> str:
    return f"{value:.3f}" if ("IoU" in metric or "F1" in metric) else f"{value:.2%}"


def markdown(data: dict) -> str:
    machines = sorted({f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('flags', '?')}, torch "
                       f"{m.get('torch', '?')}" for m in (e.get("machine", {}) for e in data["results"])})
    limits = sorted({e.get("eval_limit", 0) for e in data["results"]} - {0})
    lines = ["Scoreboard: each preset's tiny recipe, trained from its tiny backbones and measured on held-out data "
             f"(`vlmkit reproduce`). Measured on {'; '.join(machines) or '?'}. Spread = min-max over the seeds; a "
             "target is met when every seed meets it. Training: the recipe's wall time (backbones and evaluation "
             "apart)." + (f" Evaluated on subsets (--eval-limit {', '.join(map(str, limits))}): targets not "
                          "judged." if limits else ""), "",
             "| preset | skill | metric | mean | spread (seeds) | target | training |",
             "|---|---|---|---|---|---|---|"]
    for row in rows(data):
        spread = f"{_value(row['metric'], row['min'])}–{_value(row['metric'], row['max'])}" \
            if len(row["values"]) > 1 else "—"
        if row["target"] is None:
            target = "—"
        else:
            verdict = "subset" if row["subset"] else ("met" if row["met"] else "not met")
            target = f"≥ {row['target']:.1%} {verdict}"
        lines.append(f"| {row['preset'] if row['headline'] else ''} | {SKILL_NAMES.get(row['skill'], row['skill'])} | "
                     f"{row['metric']} | {_value(row['metric'], row['mean'])} | {spread} ({len(row['values'])}) | "
                     f"{target} | {row['train_minutes']:.1f} min |")
    errors = [f"- {e['preset']} seed {e['seed']}: {SKILL_NAMES.get(k, k)} not measured: {v}"
              for e in data["results"] for k, v in e.get("errors", {}).items()]
    return "\n".join(lines + ([""] + errors if errors else [])) + "\n"


def plot(data: dict, out_file: Path) -> Path:
    import matplotlib  # start-up: matplotlib, 0.55 s

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up: matplotlib, 0.55 s

    headline = [r for r in rows(data) if r["headline"]]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(headline) + 1.4), dpi=110)
    labels = [f"{r['preset']}: {SKILL_NAMES.get(r['skill'], r['skill'])} {r['metric']}" for r in headline]
    ys = list(range(len(headline)))[::-1]
    colours = ["#2a9d8f" if r["met"] else ("#e76f51" if r["met"] is False else "#8d99ae") for r in headline]
    ax.barh(ys, [r["mean"] for r in headline], color=colours, height=0.6)
    for y, r in zip(ys, headline):
        ax.scatter(r["values"], [y] * len(r["values"]), color="black", s=10, zorder=3)
        if r["target"] is not None:
            ax.plot([r["target"]] * 2, [y - 0.4, y + 0.4], color="black", linewidth=2)
        ax.text(min(r["mean"], 1.0) + 0.01, y, _value(r["metric"], r["mean"]), va="center", fontsize=8)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("headline metric on held-out data, 0-1 (bar: mean over seeds; dots: seeds; tick: target)")
    ax.set_title("vlmkit reproduce: tiny recipes (green: target met by every seed; red: not; grey: no target)",
                 fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_file)
    plt.close(fig)
    return out_file


def reproduce(presets: list[str], seeds: int, out, eval_limit: int = 0, fresh: bool = False,
              overrides: dict | None = None, log=print) -> dict:
    """Train and measure every preset x seed not yet in out/scoreboard.json, then write the table and plot."""
    known = archs.names()
    unknown = [p for p in presets if p not in known]
    if unknown:
        raise ConfigError(f"unknown preset(s) {', '.join(unknown)}; presets: {', '.join(known)}, or all")
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    if eval_limit < 0:
        raise ConfigError(f"--eval-limit must be 0 (everything) or more, got {eval_limit}")
    presets = list(dict.fromkeys(presets))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scoreboard.json"
    data = {"results": []} if fresh else _load(path)
    for preset in presets:
        for seed in range(seeds):
            held = [e for e in data["results"] if (e["preset"], e["seed"]) == (preset, seed)]
            if any(e["eval_limit"] == eval_limit and set(e["skills"]) | set(e.get("errors", {})) >=
                   set(archs.skills(preset)) for e in held):
                log(f"== {preset}, seed {seed}: in {path} already (--fresh measures it again)")
                continue
            data["results"] = [e for e in data["results"] if e not in held]  # measured otherwise: replaced
            data["results"].append(reproduce_one(preset, seed, out, eval_limit, overrides, log))
            _write_json(path, data)
    _write_json(path, data)
    (out / "scoreboard.md").write_text(markdown(data))
    plot(data, out / "scoreboard.png")
    log(f"\n{markdown(data)}\nwrote {out / 'scoreboard.md'}, {out / 'scoreboard.png'}, {path}")
    return data
