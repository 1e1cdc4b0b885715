"""The ladder: the demo's accuracy, one change at a time, against the known-good prototype.

    python benchmarks/ladder.py --list                                  # the start, the changes, the prototype
    python benchmarks/ladder.py --rungs start,pool,pool+noprompt --seeds 0,1,2
    python benchmarks/ladder.py --rungs proto --prototype ../shared/calibration/easyvqa_proto.py

A rung is `vlmkit demo` (tiny llava-1.5 on easy-VQA, all 9,673 test questions) with the settings the demo had
when the ladder began (`start`) plus changes joined by '+', or `default` (the demo as shipped), or the one-file
prototype of ../shared/calibration (not part of vlmkit: its path is given on the command line). Rungs run one
after another, never two at once (2 cores: a timing taken beside another training means nothing), each in a
fresh process with its own run directory under --work. Results accumulate in --out (JSON, keyed by rung and
seed; a rerun replaces its own entry) and the table is printed and written next to it as Markdown: accuracy,
accuracy per question kind (`vlmkit.data.easyvqa.KINDS`; the prototype reports its own kinds), the instruction
stage's seconds and the wall time from a warm backbone cache.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vlmkit.io import machine_summary

# The demo's settings when the ladder began (1192ef8): every rung starts from them, so a rung means the same
# whatever the defaults are now. `default` is the demo as shipped, with no arguments.
ANSWER_PROMPT = "Answer the question using a single word or phrase."
START = ["--template", "vicuna_v1_nosys", "--answer-prompt", ANSWER_PROMPT, "--vision.select", "patch",
         "--instruct.train", "connector,llm", "--instruct.batch-norm", "frozen"]
TOWER = ["--instruct.train", "connector,llm,vision", "--instruct.lr.vision"]
# one change each: a rung is `start` or changes joined by '+' (e.g. pool+noprompt+vision-bn-2e-4), applied in order
CHANGES = {
    "sys": ("Vicuna's system prompt in the template (the default until issue 32)", ["--template", "vicuna_v1"]),
    "pool": ("one more image token: the mean of the patches, the vector the tower was pretrained on",
             ["--vision.select", "patch_mean"]),
    "noprompt": ("no answer prompt after the question (LLaVA-1.5's 'Answer the question using a single word...')",
                 ["--answer-prompt", ""]),
    "vision": ("the tower trains in the instruction stage at the LM's lr 2e-3, BatchNorm frozen", TOWER + ["2e-3"]),
    "vision-2e-4": ("the tower trains at 2e-4, BatchNorm frozen", TOWER + ["2e-4"]),
    "vision-bn": ("the tower trains at 2e-3, BatchNorm in train mode (as the prototype's)",
                  TOWER + ["2e-3", "--instruct.batch-norm", "train"]),
    "vision-bn-5e-4": ("the tower trains at 5e-4, BatchNorm in train mode",
                       TOWER + ["5e-4", "--instruct.batch-norm", "train"]),
    "vision-bn-2e-4": ("the tower trains at 2e-4, BatchNorm in train mode",
                       TOWER + ["2e-4", "--instruct.batch-norm", "train"]),
    "3ep": ("3 epochs of instructions (2)", ["--instruct.epochs", "3"]),
    "b64": ("the prototype's schedule: batch 64, 3.5 epochs", ["--instruct.batch-size", "64", "--instruct.epochs", "3.5"]),
    "twins": ("a quarter of easy-vqa:matches per epoch (yes/no twins naming the image's own colour/shape)",
              ["--instruct.mixture", "easy-vqa:instructions=1,easy-vqa:matches=0.25"]),
}


def rung_argv(name: str) -> list[str]:
    """`vlmkit demo` arguments of a rung: [] for `default`, START for `start`, START + each change's otherwise."""
    if name == "default":
        return []
    if name == "start":
        return list(START)
    parts = name.split("+")
    unknown = [p for p in parts if p not in CHANGES]
    if unknown:
        raise SystemExit(f"unknown change(s) {unknown} in rung {name!r}; --list shows them")
    return START + [arg for part in parts for arg in CHANGES[part][1]]


def describe(name: str) -> str:
    if name in PROTOTYPE:
        return PROTOTYPE[name][0]
    if name == "default":
        return "vlmkit demo as shipped"
    if name == "start":
        return "the demo's settings when the ladder began"
    return "; ".join("+ " + CHANGES[part][0] for part in name.split("+"))


# the prototype's best run (../shared/calibration/r7_best.json) and the same with its tower frozen
PROTOTYPE = {
    "proto": ("the prototype's best setting (word-level tokenizer, conv tower + pooled token, tower trains)",
              ["--vis_epochs", "8", "--lm_epochs", "1", "--pool_tok", "1", "--conn_epochs", "2",
               "--inst_epochs", "3.5", "--inst_lr", "2e-3", "--train_vision_in_inst", "1"]),
    "proto-frozen": ("the prototype with its tower frozen in the instruction stage",
                     ["--vis_epochs", "8", "--lm_epochs", "1", "--pool_tok", "1", "--conn_epochs", "2",
                      "--inst_epochs", "3.5", "--inst_lr", "2e-3", "--train_vision_in_inst", "0"]),
}
# the prototype's own question kinds that are ours (its colour yes/no split by negation, not by match)
PROTO_KINDS = {"color": "what colour", "shape": "what shape", "yn-shape-pos": "shape y/n plain",
               "yn-shape-neg": "shape y/n negated"}
SHORT = {"what colour": "colour", "what shape": "shape", "colour y/n match": "c-match", "colour y/n other": "c-other",
         "shape y/n plain": "s-y/n", "shape y/n negated": "s-neg"}


def run_vlmkit(name: str, seed: int, work: Path, extra: list[str]) -> dict:
    run_dir = work / f"{name}-s{seed}"
    argv = [sys.executable, "-m", "vlmkit", "demo", "--run-dir", str(run_dir), "--seed", str(seed),
            *rung_argv(name), *extra]
    start = time.time()
    log = run_dir.with_suffix(".log")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        code = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
    if code:
        raise SystemExit(f"{name} seed {seed}: vlmkit demo exited {code}; see {log}")
    demo = json.loads((run_dir / "demo.json").read_text())
    phases = demo["phases_seconds"]
    return {"accuracy": demo["accuracy"], "per_kind": {k: v["accuracy"] for k, v in demo["per_kind"].items()},
            "wall_s": round(time.time() - start, 1), "instruct_s": round(phases.get("stage instruct", 0), 1),
            "argv": argv[2:]}


def run_prototype(name: str, seed: int, work: Path, prototype: Path) -> dict:
    out = work / f"{name}-s{seed}.json"
    argv = [sys.executable, str(prototype), *PROTOTYPE[name][1], "--seed", str(seed), "--out", str(out)]
    start = time.time()
    with open(out.with_suffix(".log"), "w") as log:
        code = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"{name} seed {seed}: the prototype exited {code}; see {out.with_suffix('.log')}")
    result = json.loads(out.read_text())
    kinds = {PROTO_KINDS[k]: v[0] for k, v in result["subtypes"].items() if k in PROTO_KINDS}
    return {"accuracy": result["acc"], "per_kind": kinds, "prototype_kinds": result["subtypes"],
            "wall_s": round(time.time() - start, 1), "instruct_s": result["timings"].get("instruction_stage", 0),
            "argv": argv[1:]}


def _order(name: str) -> tuple:
    """Prototype rungs first, then the start and the default, then rungs by how many changes they make."""
    if name in PROTOTYPE:
        return (0, list(PROTOTYPE).index(name))
    if name in ("start", "default"):
        return (1, name != "start")
    return (2, name.count("+"))


def table(results: dict) -> str:
    """Markdown: one row per rung, mean and spread over its seeds; then the changes' legend and any notes."""
    lines = ["| rung | seeds | accuracy (mean, min-max) | " + " | ".join(SHORT.values()) + " | instruct s | wall s |",
             "|" + "---|" * (len(SHORT) + 5)]
    notes = []
    for name in sorted(results, key=_order):
        by_seed = results[name]
        runs = list(by_seed.values())
        accs = [r["accuracy"] for r in runs]
        kinds = []
        for kind in SHORT:
            values = [r["per_kind"][kind] for r in runs if kind in r["per_kind"]]
            kinds.append(f"{statistics.mean(values):.3f}" if values else "—")
        spread = f" ({min(accs):.2%}-{max(accs):.2%})" if len(accs) > 1 else ""
        marks = ""
        for seed, run in by_seed.items():
            if run.get("note"):
                notes.append(f"{name} seed {seed}: {run['note']}")
                marks += "*" * len(notes)
        lines.append(f"| {name}{marks} | {','.join(by_seed)} | **{statistics.mean(accs):.2%}**{spread} | " +
                     " | ".join(kinds) + f" | {statistics.mean(r['instruct_s'] for r in runs):.0f} | "
                     f"{statistics.mean(r['wall_s'] for r in runs):.0f} |")
    used = sorted({part for name in results if name not in PROTOTYPE and name not in ("start", "default")
                   for part in name.split("+")}, key=list(CHANGES).index)
    lines += ["", "Rungs: " + "; ".join(f"`{name}`: {describe(name)}" for name in sorted(results, key=_order)
                                       if name in PROTOTYPE or name in ("start", "default"))]
    lines += ["Changes (each on top of `start`): " + "; ".join(f"`{part}`: {CHANGES[part][0]}" for part in used)]
    lines += [f"{'*' * (i + 1)} {note}" for i, note in enumerate(notes)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--rungs", default="default", help="comma-separated rung names (--list shows them)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--prototype", type=Path, help="path of easyvqa_proto.py, for the proto rungs")
    parser.add_argument("--work", type=Path, default=Path("runs/ladder"), help="run directories and logs")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ladder.json"))
    parser.add_argument("--list", action="store_true", help="list the rungs and exit")
    parser.add_argument("extra", nargs="*", help="more `vlmkit demo` arguments for every vlmkit rung (after --)")
    args = parser.parse_args()
    if args.list:
        print(f"start: {' '.join(START)}\nchanges (a rung is 'start', 'default' or changes joined by '+'):")
        for name, (what, argv) in CHANGES.items():
            print(f"  {name:15} {what}\n  {'':15} {' '.join(argv)}")
        for name, (what, argv) in PROTOTYPE.items():
            print(f"  {name:15} {what}\n  {'':15} {' '.join(argv)}")
        return
    names = [n for n in args.rungs.split(",") if n]
    for name in names:
        if name not in PROTOTYPE:
            rung_argv(name)  # names an unknown change now, not after an hour of other rungs
    if any(n in PROTOTYPE for n in names) and not (args.prototype and args.prototype.is_file()):
        raise SystemExit("the proto rungs need --prototype PATH (../shared/calibration/easyvqa_proto.py)")
    saved = json.loads(args.out.read_text()) if args.out.exists() else {}
    results = saved.get("results", {})
    for name in names:
        for seed in [int(s) for s in args.seeds.split(",")]:
            print(f"[ladder] {name} seed {seed} ...", flush=True)
            if name in PROTOTYPE:
                result = run_prototype(name, seed, args.work, args.prototype)
            else:
                result = run_vlmkit(name, seed, args.work, args.extra)
            result["when"] = time.strftime("%Y-%m-%d %H:%M")
            results.setdefault(name, {})[str(seed)] = result
            print(f"[ladder] {name} seed {seed}: {result['accuracy']:.2%} in {result['wall_s']:.0f}s " +
                  ", ".join(f"{k} {v:.3f}" for k, v in result["per_kind"].items()), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"machine": machine_summary(), "results": results}, indent=1))
            args.out.with_suffix(".md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
