"""The ladder: the demo's accuracy, one change at a time, against the known-good prototype.

    python benchmarks/ladder.py --list                                  # the rungs and what each changes
    python benchmarks/ladder.py --rungs default,pool --seeds 0,1,2      # vlmkit demo with each rung's overrides
    python benchmarks/ladder.py --rungs proto --prototype ../shared/calibration/easyvqa_proto.py

Each rung is `vlmkit demo` (tiny llava-1.5 on easy-VQA, all 9,673 test questions) with a few overrides, or the
one-file prototype of ../shared/calibration (not part of vlmkit: its path is given on the command line). Rungs
run one after another, never two at once (2 cores: a timing taken beside another training means nothing), each
in a fresh process with its own run directory under --work. Results accumulate in --out (JSON, keyed by rung and
seed, a rerun replaces its own entry) and the table is printed and written next to it as Markdown: accuracy,
accuracy per question kind (`vlmkit.data.easyvqa.KINDS`; the prototype reports its own kinds), wall time from
a warm backbone cache, and the instruction stage's seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# name -> (what it changes, `vlmkit demo` arguments); each rung is the default plus its own arguments only
RUNGS = {
    "default": ("vlmkit demo as shipped", []),
    "pool": ("+ one mean-pooled image token (the vector the tower was pretrained on)",
             ["--vision.select", "patch_mean"]),
    "vision": ("+ the tower trains in the instruction stage at the LM's lr (the prototype's lever)",
               ["--instruct.train", "connector,llm,vision", "--instruct.lr.vision", "2e-3"]),
    "pool+vision": ("+ both",
                    ["--vision.select", "patch_mean", "--instruct.train", "connector,llm,vision",
                     "--instruct.lr.vision", "2e-3"]),
    "pool+vision-bn": ("pool + the tower trains at 2e-3 with its BatchNorm in train mode (as the prototype's)",
                       ["--vision.select", "patch_mean", "--instruct.train", "connector,llm,vision",
                        "--instruct.lr.vision", "2e-3", "--instruct.batch-norm", "train"]),
    "pool+vision-bn-5e-4": ("pool + the tower trains at 5e-4 with its BatchNorm in train mode",
                            ["--vision.select", "patch_mean", "--instruct.train", "connector,llm,vision",
                             "--instruct.lr.vision", "5e-4", "--instruct.batch-norm", "train"]),
    "pool+vision-bn-2e-4": ("pool + the tower trains at 2e-4 with its BatchNorm in train mode",
                            ["--vision.select", "patch_mean", "--instruct.train", "connector,llm,vision",
                             "--instruct.lr.vision", "2e-4", "--instruct.batch-norm", "train"]),
    "pool+vision-2e-4": ("pool + the tower trains at 2e-4, BatchNorm frozen",
                         ["--vision.select", "patch_mean", "--instruct.train", "connector,llm,vision",
                          "--instruct.lr.vision", "2e-4"]),
    "pool+noprompt": ("pool + no answer prompt after the question (LLaVA-1.5's 'Answer the question...')",
                      ["--vision.select", "patch_mean", "--answer-prompt", ""]),
    "pool+noprompt+vision": ("pool + no answer prompt + the tower trains at 2e-4 with its BatchNorm in train mode",
                             ["--vision.select", "patch_mean", "--answer-prompt", "", "--instruct.train",
                              "connector,llm,vision", "--instruct.lr.vision", "2e-4", "--instruct.batch-norm",
                              "train"]),
    "noprompt": ("+ no answer prompt after the question", ["--answer-prompt", ""]),
    "batch64": ("+ the prototype's instruction schedule: batch 64, 3.5 epochs",
                ["--instruct.batch-size", "64", "--instruct.epochs", "3.5"]),
    "sys": ("- the template with Vicuna's system prompt (the default until issue 32)", ["--template", "vicuna_v1"]),
}
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


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            flags = next(line for line in info if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.processor() or "unknown"
    kinds = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return " ".join(kinds) or "no AVX2"


def run_vlmkit(name: str, seed: int, work: Path, extra: list[str]) -> dict:
    run_dir = work / f"{name}-s{seed}"
    argv = [sys.executable, "-m", "vlmkit", "demo", "--run-dir", str(run_dir), "--seed", str(seed),
            *RUNGS[name][1], *extra]
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


def table(results: dict) -> str:
    """Markdown: one row per rung, mean and spread over its seeds."""
    lines = ["| rung | what changes | seeds | accuracy (mean, min-max) | " + " | ".join(SHORT.values()) +
             " | instruct s | wall s |", "|" + "---|" * (len(SHORT) + 6)]
    described = {**RUNGS, **PROTOTYPE}
    for name, by_seed in results.items():
        runs = list(by_seed.values())
        accs = [r["accuracy"] for r in runs]
        kinds = []
        for kind in SHORT:
            values = [r["per_kind"][kind] for r in runs if kind in r["per_kind"]]
            kinds.append(f"{statistics.mean(values):.3f}" if values else "—")
        spread = f" ({min(accs):.2%}-{max(accs):.2%})" if len(accs) > 1 else ""
        lines.append(f"| {name} | {described.get(name, ('',))[0]} | {','.join(by_seed)} | "
                     f"**{statistics.mean(accs):.2%}**{spread} | " + " | ".join(kinds) +
                     f" | {statistics.mean(r['instruct_s'] for r in runs):.0f} | "
                     f"{statistics.mean(r['wall_s'] for r in runs):.0f} |")
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
        for name, (what, argv) in {**PROTOTYPE, **RUNGS}.items():
            print(f"{name:14} {what}\n{'':14} {' '.join(argv)}")
        return
    names = [n for n in args.rungs.split(",") if n]
    unknown = [n for n in names if n not in RUNGS and n not in PROTOTYPE]
    if unknown:
        raise SystemExit(f"unknown rung(s) {unknown}; --list shows them")
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
            import torch

            args.out.write_text(json.dumps({"machine": {"cpu": platform.processor() or platform.machine(),
                                                        "flags": cpu_flags(), "cores": os.cpu_count(),
                                                        "torch": torch.__version__},
                                            "results": results}, indent=1))
            args.out.with_suffix(".md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
