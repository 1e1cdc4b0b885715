"""bf16 autocast (`--bf16`) against fp32 on this CPU: matmul GFLOP/s, and vlmkit's own stage-2 training step.

    python benchmarks/bf16_cpu.py [--configs tiny small] [--rounds 3] [--out benchmarks/results/bf16_cpu.json]

`--bf16` in training is `torch.autocast(model.device.type, dtype=torch.bfloat16)` around the forward
(`vlmkit.train.loop.train_stage`), with fp32 master weights and fp32 AdamW. On a CPU with native bf16
(AVX512-BF16, AMX) bf16 matmuls can be faster than fp32 ones; whether a training step is depends on how much
of it is matmul of a size that profits, and on what the casts cost. What runs:

  machine  the CPU flags that decide bf16 speed (avx2, avx512f, avx512_bf16, amx_bf16, amx_tile), torch's CPU
           capability, whether oneDNN reports bf16 support, the thread count.
  matmul   square matmuls (`--sizes`), fp32 and bf16 operands, in interleaved bursts, before and after the
           training runs; the fastest burst counts.
  train    the models of `vs_transformers.py` (its `build`, `CONFIGS`, data and stage): a random LLaVA-1.5 from
           Hugging Face backbones, 'tiny' (the demo's Llama 4 layers x 128) and 'small' (Llama 8 layers x 512,
           vocabulary 32000); stage 2 ('instruct': vision tower frozen, connector + LLM train). Each run is
           vlmkit's own `train_stage(..., bf16=False/True)` on a fresh copy loaded from the same checkpoint,
           seed 0, so both modes see the same batches in the same order. Every step is timed (from the end
           of one optimiser step to the end of the next, via the loop's `reporter` hook: data, forward,
           backward, clipping, AdamW); the first step of a run (it also holds the stage's setup) is not timed.
  quality  per-step losses of fp32 and bf16 (same data, same seed): the loss after the last step, train_stage's
           final loss (mean of the last tenth), the largest difference of per-step losses; and the loss of the
           trained model on held-out records, computed in fp32 without autocast.

Runs are interleaved: each round trains every mode once (the order alternates), and a mode's time is the sum
over its steps of the step's fastest time over the rounds, so another process's burst of work (on a shared
2-core machine one round can take many times as long) does not decide the result (the method of
`packing.py`). samples/s = timed samples / that time; ratio = bf16 / fp32. Each run also records how much of
the CPU other processes used meanwhile (`vs_transformers.Stopwatch`), so a disturbed measurement shows; before
each run it waits up to `--quiet-wait-s` for a quiet second. Per size at least `--min-rounds` (2) rounds run,
`--rounds` (3) where time allows, and up to `--max-rounds` (4) while some mode has had no quiet run (others
<= 10% CPU); no round starts that would overrun the size's share of `--budget-s` (330 s for the whole run,
about 2.5 minutes on a quiet machine).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import vs_transformers as vt  # noqa: E402  (the models, data and stage of the framework comparison)

MODES = ("fp32", "bf16")
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
# steps per run (plus one untimed first step) and held-out records per size: 'small' steps take ~20x longer
STEPS = {"tiny": 32, "small": 6}
HELD_OUT = {"tiny": 64, "small": 32}
WEIGHT = {"tiny": 1, "small": 3}  # shares of the time budget (a quiet 'small' round takes ~4x a 'tiny' one)
MATMUL_S = 15  # kept back from the budget for the final matmul pass


def machine(threads: int) -> dict:
    flags, model = set(), platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    flags.update(value.split())
                elif key.strip() == "model name":
                    model = value.strip()
    except OSError:
        pass
    mkldnn_bf16 = None
    try:
        mkldnn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "threads": threads,
            "flags": {flag: flag in flags for flag in FLAGS}, "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "mkldnn_bf16_supported": mkldnn_bf16,
            "python": platform.python_version()}


# -- matmul ------------------------------------------------------------------------------------------------------
def matmul(sizes: list[int], rounds: int, burst_s: float) -> dict:
    """GFLOP/s of n x n @ n x n, fp32 and bf16, bursts interleaved over sizes and dtypes; the fastest counts."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    operands = {(n, m): (torch.randn(n, n, dtype=d), torch.randn(n, n, dtype=d))
                for n in sizes for m, d in dtypes.items()}
    for a, b in operands.values():  # warm-up: oneDNN creates its kernels on the first call
        a @ b
    rates = {key: [] for key in operands}
    for round_ in range(rounds):
        for key in (operands if round_ % 2 == 0 else reversed(list(operands))):
            a, b = operands[key]
            calls, start = 0, time.perf_counter()
            while calls == 0 or time.perf_counter() - start < burst_s:
                a @ b
                calls += 1
            rates[key].append(2 * key[0] ** 3 * calls / (time.perf_counter() - start) / 1e9)
    out = {}
    for n in sizes:
        fp32, bf16 = max(rates[(n, "fp32")]), max(rates[(n, "bf16")])
        out[str(n)] = {"fp32_gflops": round(fp32, 1), "bf16_gflops": round(bf16, 1), "ratio": round(bf16 / fp32, 2)}
    return out


# -- training ----------------------------------------------------------------------------------------------------
class StepClock:
    """train_stage's `reporter`: called once per optimiser step, after it; keeps the time, loss and rows."""

    def __init__(self):
        self.times, self.losses, self.rows = [], [], []

    def log(self, entry: dict, step: int) -> None:
        self.times.append(time.perf_counter())
        self.losses.append(entry["loss"])
        self.rows.append(entry["rows"])


def train_once(path: str, dataset, settings, bf16: bool):
    """One stage-2 run of vlmkit's train_stage on a fresh copy of the checkpoint; (model, clock, summary)."""
    from vlmkit.model.vlm import VisionLanguageModel
    from vlmkit.train.loop import train_stage

    model = VisionLanguageModel.from_pretrained(path)
    clock = StepClock()
    stage = vt.instruct_stage(settings, settings.train_steps)
    summary = train_stage(model, stage, dataset, seed=0, bf16=bf16, verbose=False, log=lambda *a: None,
                          reporter=clock)
    return model, clock, summary


def held_out_loss(model, dataset, batch_size: int) -> float:
    """Mean supervised-token loss of `model` over `dataset`, in fp32 (no autocast)."""
    from vlmkit.data.loader import batch_loader
    from vlmkit.objectives import get_objective

    objective = get_objective("lm")
    batches = [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
    total, units = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in batch_loader(dataset, batches, model.tokenizer.pad_token_id, pixels=True):
            loss, _ = objective(model, batch)
            count = objective.units(batch)
            total += float(loss) * count
            units += count
    return total / max(units, 1)


def measure(name: str, root: str, args, deadline: float) -> dict:
    """Both modes on `name`'s model: at least `--min-rounds` rounds; then more, up to `--max-rounds`, while
    fewer than `--rounds` ran or some mode has had no quiet run (other processes <= 10% CPU), and the fastest
    round so far still fits before `deadline` (perf_counter seconds)."""
    from vlmkit.data import easyvqa

    steps = args.steps or STEPS[name]
    # one untimed first step; the dataset is exactly the run's records (one epoch)
    settings = vt.Settings(batch_size=args.batch_size, train_steps=steps + 1, threads=args.threads)
    t0 = time.perf_counter()
    built = vt.build(root, name, settings)
    path = built["vlmkit"]
    dataset = vt.training_dataset(path, settings)
    records = easyvqa.instruction_records("train", vt.ANSWER_PROMPT, seed=0, max_turns=settings.max_turns)
    held_out = vt.load_dataset(path, records[settings.train_records:settings.train_records + HELD_OUT[name]],
                               "train")
    print(f"[{name}] built in {time.perf_counter() - t0:.1f}s: {built['params']['total'] / 1e6:.1f}M parameters, "
          f"{len(dataset)} training records, {steps} timed steps of batch {args.batch_size}", flush=True)

    warm = dataclasses.replace(settings, train_steps=2)
    for mode in MODES:  # warm-up: kernels (oneDNN's bf16 ones included) are made on the first calls
        train_once(path, vt.training_dataset(path, warm), warm, mode == "bf16")

    runs = {mode: [] for mode in MODES}
    quality = {}
    round_s = []
    for round_ in range(args.max_rounds):
        quiet = all(min(run["foreign_cpu"] for run in runs[mode]) <= vt.BUSY for mode in MODES) if round_ else False
        if round_ >= args.min_rounds and (round_ >= args.rounds and quiet
                                          or time.perf_counter() + min(round_s) > deadline):
            break
        started = time.perf_counter()
        for mode in (MODES if round_ % 2 == 0 else MODES[::-1]):
            if args.quiet_wait_s and time.perf_counter() < deadline:
                vt.wait_for_quiet(args.quiet_wait_s, log=lambda *a: None)
            with vt.Stopwatch() as watch:
                model, clock, summary = train_once(path, dataset, settings, mode == "bf16")
            wall = watch.seconds
            runs[mode].append({"step_s": [b - a for a, b in zip(clock.times, clock.times[1:])],
                               "losses": clock.losses, "rows": clock.rows[1:], "stage_s": wall,
                               "final_loss": summary["final_loss"], "foreign_cpu": watch.foreign})
            if round_ == 0:
                quality[mode] = held_out_loss(model, held_out, args.batch_size)
            print(f"[{name}] round {round_ + 1} {mode}: {wall:5.1f}s, loss {clock.losses[0]:.4f} -> "
                  f"{clock.losses[-1]:.4f}  (other processes: {watch.foreign:.0%} CPU)", flush=True)
            del model
        round_s.append(time.perf_counter() - started)

    result = {"model": vt.CONFIGS[name], "params": built["params"], "timed_steps": steps,
              "rounds": len(runs["fp32"]),
              "batch_size": args.batch_size, "records": len(dataset), "held_out_records": len(held_out)}
    for mode in MODES:
        fastest = [min(times) for times in zip(*(run["step_s"] for run in runs[mode]))]
        samples = sum(runs[mode][0]["rows"])
        seconds = sum(fastest)
        result[mode] = {"samples_per_s": round(samples / seconds, 2), "step_ms": round(1e3 * seconds / len(fastest), 1),
                        "timed_samples": samples, "timed_s": round(seconds, 3),
                        "round_timed_s": [round(sum(run["step_s"]), 3) for run in runs[mode]],
                        "round_stage_s": [round(run["stage_s"], 2) for run in runs[mode]],
                        "round_foreign_cpu": [round(run["foreign_cpu"], 3) for run in runs[mode]],
                        "quietest_run_foreign_cpu": round(min(run["foreign_cpu"] for run in runs[mode]), 3),
                        "losses": runs[mode][0]["losses"], "last_loss": runs[mode][0]["losses"][-1],
                        "final_loss": runs[mode][0]["final_loss"], "held_out_loss_fp32": quality[mode]}
    fp32, bf16 = result["fp32"], result["bf16"]
    diffs = [abs(a - b) for a, b in zip(fp32["losses"], bf16["losses"])]
    repeat = [max(abs(a - b) for a, b in zip(run["losses"], runs[mode][0]["losses"]))
              for mode in MODES for run in runs[mode][1:]]
    result["ratio_bf16_vs_fp32"] = round(bf16["samples_per_s"] / fp32["samples_per_s"], 2)
    result["loss"] = {"max_abs_diff_per_step": max(diffs), "first_step_abs_diff": diffs[0],
                      "max_rel_diff_per_step": max(d / abs(a) for d, a in zip(diffs, fp32["losses"])),
                      "last_step_abs_diff": diffs[-1],
                      "held_out_abs_diff": abs(fp32["held_out_loss_fp32"] - bf16["held_out_loss_fp32"]),
                      "same_mode_repeat_max_abs_diff": max(repeat) if repeat else None}
    return result


def matmul_table(results: dict) -> list[str]:
    table = ["| matmul n x n | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |", "|---|---|---|---|"]
    return table + [f"| {n} | {r['fp32_gflops']:.0f} | {r['bf16_gflops']:.0f} | {r['ratio']:.2f}x |"
                    for n, r in results.items()]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=sorted(vt.CONFIGS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--matmul-rounds", type=int, default=10)
    parser.add_argument("--burst-s", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=3, help="rounds wanted per size (time allowing)")
    parser.add_argument("--min-rounds", type=int, default=2)
    parser.add_argument("--max-rounds", type=int, default=4, help="while some mode has had no quiet run")
    parser.add_argument("--budget-s", type=float, default=330,
                        help="wall time for the whole benchmark; no round starts that would not fit")
    parser.add_argument("--quiet-wait-s", type=float, default=5,
                        help="before each run and matmul pass, wait up to this long for other processes to pause")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per run (default: per size, STEPS)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bf16_cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    began, load_before = time.perf_counter(), os.getloadavg()
    facts = machine(args.threads)
    print(f"{facts['cpu']}, {facts['cores']} cores, {args.threads} threads; torch {facts['torch']} "
          f"(CPU capability {facts['cpu_capability']}, oneDNN bf16: {facts['mkldnn_bf16_supported']})")
    print("flags: " + ", ".join(f"{flag} {'yes' if on else 'no'}" for flag, on in facts["flags"].items()), flush=True)

    passes = []  # the matmuls run before and after the training runs; the faster pass of each counts
    vt.wait_for_quiet(args.quiet_wait_s, log=lambda *a: None)
    with vt.Stopwatch() as watch:
        passes.append(matmul(args.sizes, args.matmul_rounds, args.burst_s))
    matmul_foreign = [watch.foreign]
    print("\n" + "\n".join(matmul_table(passes[0])) + f"\n(other processes: {watch.foreign:.0%} CPU)\n", flush=True)

    configs = {}
    with tempfile.TemporaryDirectory() as root:
        for i, name in enumerate(args.configs):  # the time left, shared out by WEIGHT
            left = began + args.budget_s - MATMUL_S - time.perf_counter()
            share = WEIGHT[name] / sum(WEIGHT[n] for n in args.configs[i:])
            configs[name] = measure(name, root, args, time.perf_counter() + share * left)

    vt.wait_for_quiet(args.quiet_wait_s, log=lambda *a: None)
    with vt.Stopwatch() as watch:
        passes.append(matmul(args.sizes, args.matmul_rounds, args.burst_s))
    matmul_foreign.append(watch.foreign)
    matmuls = {}
    for n in passes[0]:
        fp32, bf16 = (max(p[n][key] for p in passes) for key in ("fp32_gflops", "bf16_gflops"))
        matmuls[n] = {"fp32_gflops": fp32, "bf16_gflops": bf16, "ratio": round(bf16 / fp32, 2),
                      "passes": [p[n] for p in passes]}
    table = matmul_table(matmuls)

    train_table = [("| size | params | timed steps | rounds (others' CPU, quietest run fp32 / bf16) | fp32 samples/s "
                    "| bf16 samples/s | bf16 / fp32 | loss after last step fp32 / bf16 | max abs diff of per-step "
                    "losses | held-out loss fp32 / bf16 |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in configs.items():
        f, b = r["fp32"], r["bf16"]
        train_table.append(
            f"| {name} | {r['params']['total'] / 1e6:.1f}M | {r['timed_steps']} (+1) | {r['rounds']} "
            f"({f['quietest_run_foreign_cpu']:.0%} / {b['quietest_run_foreign_cpu']:.0%}) | {f['samples_per_s']:.2f} | "
            f"{b['samples_per_s']:.2f} | {r['ratio_bf16_vs_fp32']:.2f}x | "
            f"{f['last_loss']:.4f} / {b['last_loss']:.4f} | {r['loss']['max_abs_diff_per_step']:.4f} | "
            f"{f['held_out_loss_fp32']:.4f} / {b['held_out_loss_fp32']:.4f} |")
    print("\n" + "\n".join(table))
    print(f"\nstage-2 training step (train_stage, batch {args.batch_size}, "
          "each step's fastest time over the rounds):\n")
    print("\n".join(train_table))
    seconds = time.perf_counter() - began
    foreign = [x for r in configs.values() for m in MODES for x in r[m]["round_foreign_cpu"]]
    print(f"\nother processes used {min(foreign):.0%}-{max(foreign):.0%} of the CPU during the training runs, "
          f"{' and '.join(f'{x:.0%}' for x in matmul_foreign)} during the two matmul passes")
    print(f"{seconds:.0f}s; load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    report = {"command": "python benchmarks/" + " ".join([Path(__file__).name, *(argv or sys.argv[1:])]),
              "settings": vars(args) | {"out": None, "steps": {n: args.steps or STEPS[n] for n in args.configs}},
              "machine": facts, "matmul": matmuls, "matmul_foreign_cpu": [round(x, 3) for x in matmul_foreign],
              "train": configs,
              "load_average": {"before": load_before, "after": os.getloadavg()}, "seconds": round(seconds, 1),
              "tables": {"matmul": table, "train": train_table}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
