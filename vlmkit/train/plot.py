"""The loss curve of a run, from its JSONL log, as a PNG."""
from __future__ import annotations

from pathlib import Path

from vlmkit.io import read_jsonl


def plot_loss(log_file: Path, out_file: Path) -> Path | None:
    import matplotlib  # start-up: matplotlib, 0.55 s

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up: matplotlib, 0.55 s

    rows = [entry for entry in read_jsonl(log_file) if "loss" in entry and "step" in entry]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    offset = 0
    stages: dict[str, list[dict]] = {}
    for row in rows:
        stages.setdefault(row["stage"], []).append(row)
    for name, stage_rows in stages.items():
        xs = [offset + r["step"] for r in stage_rows]
        ys = [r["loss"] for r in stage_rows]
        ax.plot(xs, ys, linewidth=0.8, alpha=0.35)
        window = max(1, len(ys) // 30)
        smooth = [sum(ys[max(0, i - window + 1):i + 1]) / len(ys[max(0, i - window + 1):i + 1]) for i in range(len(ys))]
        ax.plot(xs, smooth, linewidth=2, label=f"{name} ({len(ys)} steps)", color=ax.lines[-1].get_color())
        terms = sorted({term for r in stage_rows for term in (r.get("terms") or {})})
        for term, style in zip(terms, (":", "--", "-.", (0, (1, 3)))):  # an objective's parts (BLIP-2's itc/itm/itg)
            points = [(offset + r["step"], r["terms"][term]) for r in stage_rows if term in (r.get("terms") or {})]
            ax.plot([x for x, _ in points], _smooth([y for _, y in points]), linewidth=1.2, linestyle=style,
                    color=ax.lines[-1].get_color(), label=f"{name}: {term}")
        offset = xs[-1]
    ax.set_yscale("log")
    ax.set_xlabel("optimiser step (all stages)")
    ax.set_ylabel("training loss (assistant tokens; pairs for BLIP-2 stage 1)")
    ax.set_title(f"training loss: {Path(log_file).parent.name}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_file)
    plt.close(fig)
    return out_file


def _smooth(ys: list[float]) -> list[float]:
    window = max(1, len(ys) // 30)
    return [sum(ys[max(0, i - window + 1):i + 1]) / len(ys[max(0, i - window + 1):i + 1]) for i in range(len(ys))]
