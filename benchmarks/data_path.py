"""The lazy image data path: time to the first step, throughput and peak memory against the data set's size.

    python benchmarks/data_path.py [--sizes 1000,6000,20000] [--steps 20] [--workers 0,2]
                                   [--in-memory-size 1000] [--retries 1] [--quiet-wait 30]
                                   [--out benchmarks/results/data_path.json]

A tiny random LLaVA-1.5 is built in a temporary directory from Hugging Face backbone directories: a
`CLIPVisionModel` whose preprocessor expects 336 px images (56 px patches, so 36 image tokens; 2 layers x
64) and a 2-layer x 64 Llama with the project's tokenizer. For each size N, N distinct 336 x 336 PNGs
(coloured shapes on a plain background with a patch of noise) are generated once and kept in
`--image-cache`/N for later runs, with a LLaVA JSON of one record per image (1-3 short question/answer turns).

Each (N, workers) pair then runs, in a fresh process, the `instruct` stage of the `llava-1.5` preset through
`vlmkit.train.run.train_run` with the vision tower trained too (`train: vision, connector, llm`), so no
frozen-encoder feature cache applies and every batch decodes its 16 images (in the main process with
workers=0, in DataLoader worker processes otherwise). Measured per run:

  to first step   seconds from launching the process to the end of optimiser step 1: interpreter start and
                  imports, building the model, building the dataset (tokenising every record and reading every
                  image header), then step 1 (worker start-up, the first batch decoded, forward + backward)
  samples/s       batch size x (steps - 1) / the time from the end of step 1 to the end of the last step
  peak RSS        `getrusage(RUSAGE_SELF).ru_maxrss` of the run's process at its end (main), and
                  `RUSAGE_CHILDREN` (children): the largest single child, not a sum. Children are forked, and
                  a forked child's RSS starts at its parent's, so this counts pages shared with the main
                  process; with workers=0 it is the `ldconfig -p` that `ctypes.util.find_library` forks
                  during the imports (the main process's RSS at that moment), not a worker.
  workers' private  the peak, sampled every 0.2 s, of the DataLoader workers' private memory summed over
                  workers (Private_* of /proc/PID/smaps_rollup): what they add beyond the shared pages
  index MiB       resident memory added while the dataset was built (VmRSS just before and after): what the
                  lazy path holds per record instead of pixels (token ids and labels as Python lists, image
                  paths), plus what the allocator kept of the parsed JSON and the tokenizer's temporaries

For comparison, the former in-memory path (`torch.stack([transform(load_image(p)) for p in paths])`, every
image decoded up front, as the dataset did before the lazy path) runs once at `--in-memory-size` images in
its own process; its peak RSS above the process's resident memory before decoding, per image, extrapolates
what it would need at each N.

Before each run the script waits (up to `--quiet-wait` seconds) for other processes to leave the CPU idle,
and measures again (`--retries`) when they used more than 10% of it during the run; the least disturbed
attempt counts, and its share of foreign CPU is reported ("other CPU"; flagged (!) above 10%).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vs_transformers import _busy_cpu_seconds  # the same quiet-machine accounting as the other benchmarks

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

IMAGE_SIZE, PATCH_SIZE = 336, 56
BATCH_SIZE = 16
VISION = dict(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4)
LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=4, max_position_embeddings=512)
LR = {"vision": 1e-4, "connector": 1e-3, "llm": 1e-3}
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 180), "orange": (240, 140, 30), "black": (20, 20, 20), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
MIB = 1024 * 1024
BUSY = 0.1  # the other processes' CPU share above which a run is measured again, then flagged


# -- data -------------------------------------------------------------------------------------------------
def scene(index: int) -> list[tuple[str, str, tuple[int, int, int]]]:
    """Image `index`'s shapes: (colour, shape, (x, y, size)), the same in every run."""
    rng = random.Random(index)
    return [(rng.choice(list(COLOURS)), rng.choice(SHAPES),
             (rng.randrange(0, IMAGE_SIZE - 90), rng.randrange(0, IMAGE_SIZE - 90), rng.randrange(30, 90)))
            for _ in range(rng.randint(1, 3))]


def draw(index: int):
    """A 336 x 336 image of `scene(index)` on a random background, with a 48 px patch of seeded noise so that
    every image differs (and a PNG stays ~11 KB: mostly flat colour)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = random.Random(f"background:{index}")
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(rng.randrange(256) for _ in range(3)))
    pen = ImageDraw.Draw(image)
    for colour, shape, (x, y, size) in scene(index):
        fill = COLOURS[colour]
        if shape == "circle":
            pen.ellipse((x, y, x + size, y + size), fill=fill)
        elif shape == "square":
            pen.rectangle((x, y, x + size, y + size), fill=fill)
        else:
            pen.polygon([(x + size // 2, y), (x, y + size), (x + size, y + size)], fill=fill)
    noise = np.random.default_rng(index).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    image.paste(Image.fromarray(noise), (rng.randrange(IMAGE_SIZE - 48), rng.randrange(IMAGE_SIZE - 48)))
    return image


def image_name(index: int) -> str:
    return f"{index:06d}.png"


def ensure_images(cache: Path, n: int) -> tuple[Path, float]:
    """`cache`/N holding N PNGs (generated unless a previous run completed them); returns (folder, seconds)."""
    folder = cache / str(n)
    done = folder / ".complete"
    if done.exists() and done.read_text().strip() == str(n):
        return folder, 0.0
    start = time.time()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / image_name(i)
        if path.exists():  # written by an interrupted run: files are renamed into place only when complete
            continue
        partial = folder / f".{image_name(i)}.tmp"
        draw(i).save(partial, format="PNG", compress_level=1)
        os.replace(partial, path)
    done.write_text(str(n))
    return folder, time.time() - start


def conversation(index: int) -> list[dict]:
    """1-3 question/answer turns about image `index`'s shapes."""
    shapes = scene(index)
    colour, shape, _ = shapes[0]
    rng = random.Random(f"questions:{index}")
    qa = [("How many shapes are in the image?", str(len(shapes))),
          ("What shape is in the image?", shape),
          (f"What colour is the {shape}?", colour),
          (f"Is there a {colour} {shape}?", "yes"),
          ("Describe the image briefly.", ", ".join(f"a {c} {s}" for c, s, _ in shapes))]
    turns = []
    for k, (question, answer) in enumerate(rng.sample(qa, rng.randint(1, 3))):
        turns += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + question},
                  {"from": "gpt", "value": answer}]
    return turns


def write_records(path: Path, n: int) -> None:
    records = [{"id": f"img-{i}", "image": image_name(i), "conversations": conversation(i)} for i in range(n)]
    path.write_text(json.dumps(records))


def build_backbones(root: Path) -> dict[str, str]:
    """A random 336 px CLIP vision tower and a random tiny Llama with the project's tokenizer, as HF dirs."""
    import torch
    from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as transformers_logging

    from vlmkit.data.images import ImageTransform
    from vlmkit.tiny.build import build_tokenizer

    transformers_logging.disable_progress_bar()
    build_tokenizer(root / "tokenizer", verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                       **LLM))
    llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(root / "vision")
    ImageTransform(size=IMAGE_SIZE, crop=(IMAGE_SIZE, IMAGE_SIZE)).save(root / "vision")
    return {"vision": str(root / "vision"), "llm": str(root / "llm")}


# -- measurements, each in its own process ----------------------------------------------------------------
class CpuShare:
    """`foreign`: the CPU other processes used during a block, as a fraction of all cores. With 2 torch threads
    on 2 cores a busy neighbour slows a step many times over (the threads of a parallel region wait for the one
    that was descheduled), so a run measured while it is high is repeated, or flagged."""

    def __enter__(self) -> "CpuShare":
        self._start = (time.perf_counter(), _busy_cpu_seconds(), sum(os.times()[:4]))
        return self

    def __exit__(self, *exc) -> None:
        # own CPU counts reaped children too: the workers have been joined when the stage ends
        wall, busy, own = (now - then for now, then in zip(
            (time.perf_counter(), _busy_cpu_seconds(), sum(os.times()[:4])), self._start))
        self.foreign = max(0.0, (busy - own) / (wall * os.cpu_count()))


def wait_for_quiet(limit_s: float) -> float:
    """Wait up to `limit_s` for other processes to leave the CPU (almost) idle; returns their last share."""
    deadline = time.perf_counter() + limit_s
    while True:
        start = _busy_cpu_seconds()
        time.sleep(1.0)
        share = (_busy_cpu_seconds() - start) / os.cpu_count()
        if share <= BUSY or time.perf_counter() > deadline:
            return share


def rss_mib() -> float:
    """The current resident memory (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> dict:
    """Peak RSS of this process and of its largest reaped child (Linux reports ru_maxrss in KiB)."""
    return {"main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


class WorkerMemory:
    """Samples, every `interval` seconds in a thread, the private memory (USS: Private_Clean + Private_Dirty of
    /proc/PID/smaps_rollup) summed over this process's live children, i.e. what the DataLoader workers hold
    beyond the pages they still share with the process they were forked from; keeps the peak."""

    def __init__(self, interval: float = 0.2):
        import threading

        self.interval, self.peak_mib, self.peak_workers = interval, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            pids = set()
            for children in Path("/proc/self/task").glob("*/children"):
                try:
                    pids.update(children.read_text().split())
                except OSError:
                    continue
            total = 0.0
            for pid in pids:
                try:
                    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                except OSError:  # it ended meanwhile
                    continue
                total += sum(int(line.split()[1]) for line in rollup if line.startswith("Private_")) / 1024
            self.peak_mib = max(self.peak_mib, total)
            self.peak_workers = max(self.peak_workers, len(pids))


def child_train(spec: dict) -> dict:
    """One instruct stage with the tower trained; timings relative to `spec['launched']` (the parent's clock
    just before it started this process)."""
    imported_at = time.time()
    with CpuShare() as cpu:
        from transformers.utils import logging as transformers_logging

        from vlmkit.archs import from_name
        from vlmkit.data.sources import DataSpec
        from vlmkit.train.run import train_run

        imports_done = time.time()
        transformers_logging.disable_progress_bar()
        events: list[tuple[float, float, str]] = []  # (time, VmRSS MiB, message) of each line train_run logs

        def log(message: str) -> None:
            events.append((time.time(), rss_mib(), message))

        steps, workers = spec["steps"], spec["workers"]
        config = from_name("llava-1.5", scale="tiny", vision={"name_or_path": spec["vision"]},
                           llm={"name_or_path": spec["llm"]}, stages__instruct__train=["vision", "connector", "llm"],
                           stages__instruct__lr=LR, stages__instruct__max_steps=steps,
                           stages__instruct__batch_size=BATCH_SIZE, workers=workers)
        data = DataSpec(instructions=spec["records"], image_folder=spec["images"])
        with tempfile.TemporaryDirectory() as run_dir, WorkerMemory() as workers_memory:
            summary = train_run(config, run_dir, data, stages=["instruct"], verbose=False, log=log)
            log_lines = [json.loads(line) for line in (Path(run_dir) / "train_log.jsonl").read_text().splitlines()]
        peak = peak_rss_mib()
    model_at, model_rss, _ = next(e for e in events if e[2].startswith("model:"))
    data_at, data_rss, _ = next(e for e in events if re.match(r"stage \d+/\d+ 'instruct'", e[2]))
    seconds = [entry["seconds"] for entry in log_lines]  # from train_stage's start, just after data_at
    launched = spec["launched"]
    return {
        "n": spec["n"], "workers": workers, "steps": len(seconds), "batch_size": BATCH_SIZE,
        "image_tokens": summary["model"].num_image_tokens, "torch_threads": _torch_threads(),
        "startup_s": round(imported_at - launched, 3),
        "imports_s": round(imports_done - imported_at, 3),
        "model_build_s": round(model_at - imports_done, 3),
        "dataset_s": round(data_at - model_at, 3),
        "step1_s": seconds[0],
        "to_first_step_s": round(data_at + seconds[0] - launched, 3),
        "samples_per_s": round(BATCH_SIZE * (len(seconds) - 1) / (seconds[-1] - seconds[0]), 2)
        if len(seconds) > 1 else None,
        "step_seconds": seconds,
        "rss_before_dataset_mib": round(model_rss, 1), "rss_after_dataset_mib": round(data_rss, 1),
        "index_mib": round(data_rss - model_rss, 1),
        "index_kib_per_record": round((data_rss - model_rss) * 1024 / spec["n"], 2),
        "peak_rss_main_mib": round(peak["main"], 1), "peak_rss_children_mib": round(peak["children"], 1),
        "peak_workers_private_mib": round(workers_memory.peak_mib, 1),
        "final_loss": summary["stages"][0]["final_loss"], "foreign_cpu": round(cpu.foreign, 3),
    }


def child_in_memory(spec: dict) -> dict:
    """The former path: every image decoded and transformed into one tensor before training."""
    import torch

    from vlmkit.data.images import ImageTransform, load_image

    transform = ImageTransform.from_pretrained(spec["vision"], pad_to_square=True)  # llava-1.5's, as training
    paths = [str(Path(spec["images"]) / image_name(i)) for i in range(spec["n"])]
    before = rss_mib()
    start = time.time()
    with CpuShare() as cpu:
        pixels = torch.stack([transform(load_image(p)) for p in paths])
    seconds = time.time() - start
    peak = peak_rss_mib()["main"]
    return {"n": spec["n"], "decode_s": round(seconds, 3), "images_per_s": round(spec["n"] / seconds, 1),
            "tensor_mib": round(pixels.numel() * pixels.element_size() / MIB, 1),
            "rss_before_mib": round(before, 1), "peak_rss_main_mib": round(peak, 1),
            "per_image_mib": round((peak - before) / spec["n"], 3), "torch_threads": _torch_threads(),
            "foreign_cpu": round(cpu.foreign, 3)}


def _torch_threads() -> int:
    import torch
    return torch.get_num_threads()


CHILDREN = {"train": child_train, "in-memory": child_in_memory}
RESULT = "DATA_PATH_RESULT "


def run_child(kind: str, spec: dict, retries: int = 1, quiet_wait: float = 30.0) -> dict:
    """Run one measurement in a fresh interpreter, after waiting for a quiet machine, and return what it
    reports; measured again (up to `retries` times) while other processes used more than `BUSY` of the CPU.
    The least disturbed attempt counts."""
    best = None
    for attempt in range(1 + retries):
        wait_for_quiet(quiet_wait)
        launch = {**spec, "launched": time.time()}
        done = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(launch)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
        if done.returncode or not lines:
            sys.stdout.write(done.stdout)
            raise SystemExit(f"{kind} run {spec} failed (exit {done.returncode})")
        result = json.loads(lines[-1][len(RESULT):]) | {"attempts": attempt + 1}
        if best is None or result["foreign_cpu"] < best["foreign_cpu"]:
            best = result
        if best["foreign_cpu"] <= BUSY:
            break
        print(f"  (other processes used {result['foreign_cpu']:.0%} of the CPU during the run"
              + ("; measuring again)" if attempt < retries else ")"), flush=True)
    return best


# -- report -----------------------------------------------------------------------------------------------
def machine() -> dict:
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}
    try:
        lscpu = subprocess.run(["lscpu"], stdout=subprocess.PIPE, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return info
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    info["cpu"] = fields.get("Model name", info["cpu"]).strip()
    info["flags"] = {flag: flag in flags for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")}
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return info


def table(runs: list[dict], old: dict | None) -> list[str]:
    rows = ["| N | path | workers | peak RSS MiB (main / children) | workers' private MiB | dataset index MiB "
            "| to first step s (of which dataset) | samples/s | other CPU |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        speed = f"{r['samples_per_s']:.1f}" if r["samples_per_s"] else "-"
        rows.append(f"| {r['n']:,} | lazy | {r['workers']} | {r['peak_rss_main_mib']:.0f} / "
                    f"{r['peak_rss_children_mib']:.0f} | {r['peak_workers_private_mib']:.0f} | {r['index_mib']:.1f} | "
                    f"{r['to_first_step_s']:.2f} ({r['dataset_s']:.2f}) | {speed} | {_share(r)} |")
    if old:
        rows.append(f"| {old['n']:,} | in-memory, decode only | 0 | {old['peak_rss_main_mib']:.0f} / - | - | "
                    f"{old['peak_rss_main_mib'] - old['rss_before_mib']:.0f} (pixels) | {old['decode_s']:.2f} "
                    f"(decode alone) | - | {_share(old)} |")
    return rows


def _share(result: dict) -> str:
    """The other processes' CPU share during a run, flagged when above `BUSY` (its timings are unreliable)."""
    return f"{result['foreign_cpu']:.0%}" + (" (!)" if result["foreign_cpu"] > BUSY else "")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,6000,20000", help="data set sizes N, comma-separated")
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps per run")
    parser.add_argument("--workers", default="0,2", help="DataLoader worker counts, comma-separated")
    parser.add_argument("--in-memory-size", type=int, default=1000,
                        help="images the former in-memory path decodes (0 = skip it)")
    parser.add_argument("--retries", type=int, default=1,
                        help="runs measured again while other processes used > 10%% of the CPU")
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="seconds to wait, before each run, for other processes to leave the CPU idle")
    parser.add_argument("--image-cache", default=str(Path(tempfile.gettempdir()) / "vlmkit-bench-images"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_path.json"))
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, spec = args.child
        print(RESULT + json.dumps(CHILDREN[kind](json.loads(spec))), flush=True)
        return {}

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so that the temporary directory goes
    began = time.time()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    cache = Path(args.image_cache)
    generated = {}
    runs, old = [], None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        backbones = build_backbones(tmp / "backbones")
        for n in sizes:
            folder, seconds = ensure_images(cache, n)
            generated[n] = round(seconds, 1)
            records = tmp / f"records-{n}.json"
            write_records(records, n)
            print(f"N={n:,}: images in {folder}" + (f" (generated in {seconds:.1f}s)" if seconds else " (cached)"),
                  flush=True)
            for workers in worker_counts:
                run = run_child("train", {"n": n, "workers": workers, "steps": args.steps, "records": str(records),
                                          "images": str(folder), **backbones}, args.retries, args.quiet_wait)
                runs.append(run)
                print(f"  workers={workers}: first step at {run['to_first_step_s']:.2f}s, "
                      f"{run['samples_per_s']} samples/s, peak RSS {run['peak_rss_main_mib']:.0f} / "
                      f"{run['peak_rss_children_mib']:.0f} MiB", flush=True)
        if args.in_memory_size:
            folder, seconds = ensure_images(cache, args.in_memory_size)
            generated.setdefault(args.in_memory_size, round(seconds, 1))
            old = run_child("in-memory", {"n": args.in_memory_size, "images": str(folder), **backbones},
                            args.retries, args.quiet_wait)
            old["extrapolated_peak_mib"] = {n: round(old["rss_before_mib"] + old["per_image_mib"] * n)
                                            for n in sorted({*sizes, old["n"]})}

    rows = table(runs, old)
    report_machine = machine()
    print(f"\n{BATCH_SIZE} records per step, {args.steps} steps, vision tower trained (pixels decoded every batch)\n")
    print("\n".join(rows))
    if any(r["foreign_cpu"] > BUSY for r in runs + ([old] if old else [])):
        print(f"\n(!) other processes used more than {BUSY:.0%} of the CPU during that run: its timings are not "
              "reliable")
    if old:
        memory_gib = report_machine.get("memory_gib", float("inf"))
        extrapolated = [f"N={n:,}: {mib / 1024:.1f} GiB" + (" (more than this machine has)" if mib / 1024 > memory_gib
                                                            else "") for n, mib in old["extrapolated_peak_mib"].items()]
        print(f"\nin-memory path: {old['per_image_mib']:.2f} MiB of peak RSS per image (the {old['tensor_mib']:.0f} "
              f"MiB tensor of {old['n']:,} images, plus the list of per-image tensors it is stacked from); "
              f"extrapolated peak: {', '.join(extrapolated)}")
    report = {"command": "python benchmarks/" + " ".join([Path(__file__).name, *(argv or sys.argv[1:])]),
              "settings": {k: v for k, v in vars(args).items() if k not in ("child", "out")}
              | {"batch_size": BATCH_SIZE, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "vision": VISION,
                 "llm": LLM, "lr": LR, "preset": "llava-1.5", "stage": "instruct"},
              "machine": report_machine, "image_generation_s": generated, "runs": runs, "in_memory": old,
              "table": rows, "total_s": round(time.time() - began, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\ntotal {report['total_s']:.0f}s; wrote {out}")
    return report


if __name__ == "__main__":
    main()
