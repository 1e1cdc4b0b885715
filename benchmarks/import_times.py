"""What importing a dependency costs at start-up, beside what every vlmkit module already imports (torch).

vlmkit imports its own modules and the standard library at module level; a third-party import stays inside the
function that needs it only for an optional dependency or when it costs start-up time that this table shows
(`tests/unit/test_layers.py` checks every such line says which). Each module is imported in a fresh interpreter
that has imported torch (and numpy, which torch loads) first; the time is `-X importtime`'s cumulative figure for
the module's top-level import, the median of `--rounds` interpreters. The natural alternative is the module-level
import: its cost is this number, paid by every command that imports the vlmkit module, including `vlmkit --help`.

    python benchmarks/import_times.py                # table + benchmarks/results/import_times.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

# the third-party modules vlmkit imports inside functions (checked against the code by tests/unit/test_layers.py)
MODULES = ("transformers", "matplotlib.pyplot", "fastapi", "starlette.responses", "uvicorn", "peft", "accelerate",
           "huggingface_hub", "huggingface_hub.file_download", "easy_vqa", "tokenizers", "safetensors.torch",
           "PIL.Image", "tqdm.auto", "torch.distributed.checkpoint", "torch.distributed.fsdp",
           "torch.distributed.nn.functional")
OPTIONAL = ("deepspeed", "tensorboard", "wandb", "bitsandbytes", "timm")  # extras: may be absent


def import_seconds(module: str) -> float | None:
    """Cumulative import time of `module` after torch, in seconds (None when it is not installed)."""
    code = f"import torch, numpy; import {module}"
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    cumulative = 0
    for line in done.stderr.splitlines():  # "import time: self [us] | cumulative | imported package"
        parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
        if len(parts) == 3 and parts[2] == module and parts[1].isdigit():
            cumulative = max(cumulative, int(parts[1]))
    return cumulative / 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "import_times.json"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vlmkit.io import machine_summary

    torch_seconds = statistics.median(
        float(subprocess.run([sys.executable, "-c", "import time; t = time.perf_counter(); import torch; "
                              "print(time.perf_counter() - t)"], capture_output=True, text=True).stdout)
        for _ in range(args.rounds))
    rows = []
    for module in MODULES + OPTIONAL:
        times = [import_seconds(module) for _ in range(args.rounds)]
        rows.append({"module": module, "seconds": None if None in times else statistics.median(times),
                     "optional": module in OPTIONAL})
    print(f"torch itself: {torch_seconds:.2f} s; after it, {args.rounds} fresh interpreters per module (median):")
    print("| module | import after torch | ratio to torch's |\n|---|---|---|")
    for row in rows:
        seconds = row["seconds"]
        shown = "not installed" if seconds is None else f"{seconds * 1000:.0f} ms"
        ratio = "" if seconds is None else f"{seconds / torch_seconds:.2f}"
        print(f"| {row['module']}{' (optional)' if row['optional'] else ''} | {shown} | {ratio} |")
    Path(args.out).write_text(json.dumps({"machine": machine_summary(), "torch_seconds": torch_seconds,
                                          "rounds": args.rounds, "modules": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
