"""Training metrics where users look: TensorBoard and Weights & Biases, beside train_log.jsonl and loss.png.

`--report-to tensorboard,wandb` (or `none`, the default) opens one `Reporter` per run; the loop hands it each
optimiser step's JSONL entry ({"stage", "step", "epoch", "loss", "lr": {part: lr}, "grad_norm", "tokens", "rows",
"seconds"}) with a global step that runs on across stages (the x axis of loss.png; `global_step_offset`). The tags
follow Hugging Face Trainer's layout, so its users find the curves where they expect them:

  train/loss                       the step's loss
  train/learning_rate/PART         one per trained part (connector, llm, vision)
  train/grad_norm                  before clipping (absent when the stage does not clip)
  train/tokens_per_second          the step's loss tokens (summed over ranks) / the step's seconds
  train/samples_per_second         the step's rows (the reporting rank's) / the step's seconds
  train/epoch                      the stage's epoch
  stage (text)                     the stage's name, written at the global step where it starts
  config (text)                    the run's configuration as JSON, when the reporter opens

A step's seconds are the difference of `seconds` (since the stage started) between consecutive entries of the same
stage; a stage's first entry uses its own `seconds`, so it includes the stage's setup.

TensorBoard writes event files to RUN_DIR/runs (point `tensorboard --logdir RUN_DIR/runs` at it). Weights & Biases
is used only if `import wandb` works; unless the user set WANDB_MODE or has credentials (WANDB_API_KEY, or a
`wandb login` entry in ~/.netrc), it runs offline (WANDB_MODE=offline: no prompt, no network; `wandb sync` uploads
later), with its files under RUN_DIR/wandb and the project from WANDB_PROJECT (default "vlmkit").

Only rank 0 reports: the caller opens reporters on the main process alone (as it writes train_log.jsonl there).
"""
from __future__ import annotations

import importlib
import json
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from vlmkit.errors import ConfigError
from vlmkit.io import read_jsonl

REPORTERS = ("none", "tensorboard", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


class Reporter:
    """Every backend `--report-to` named, as one: `log(entry, global_step)` per optimiser step, then `close()`."""

    def __init__(self, backends: list | None = None):
        self.backends = list(backends or [])
        self.names = [b.name for b in self.backends]
        self._previous: tuple[str, float] | None = None  # (stage, seconds) of the last entry
        self._closed = False

    def log(self, entry: dict, global_step: int) -> None:
        metrics = self.metrics(entry)
        stage = entry.get("stage")
        for backend in self.backends:
            backend.log(metrics, int(global_step), stage)

    def metrics(self, entry: dict) -> dict[str, float]:
        """The scalars for one JSONL entry, by tag; updates the step-time state (call once per entry)."""
        metrics = {"train/loss": float(entry["loss"])}
        for part, lr in (entry.get("lr") or {}).items():
            metrics[f"train/learning_rate/{part}"] = float(lr)
        if entry.get("grad_norm") is not None:
            metrics["train/grad_norm"] = float(entry["grad_norm"])
        for name, value in (entry.get("terms") or {}).items():  # an objective's parts (BLIP-2's itc, itm, itg)
            metrics[f"train/loss/{name}"] = float(value)
        stage, seconds = entry.get("stage"), entry.get("seconds")
        if seconds is not None:
            seconds = float(seconds)
            same = self._previous is not None and self._previous[0] == stage and seconds >= self._previous[1]
            elapsed = seconds - self._previous[1] if same else seconds
            if elapsed > 0:  # `seconds` is rounded to ms: two entries can share one value
                if entry.get("tokens") is not None:
                    metrics["train/tokens_per_second"] = float(entry["tokens"]) / elapsed
                if entry.get("rows") is not None:
                    metrics["train/samples_per_second"] = float(entry["rows"]) / elapsed
            self._previous = (stage, seconds)
        if entry.get("epoch") is not None:
            metrics["train/epoch"] = float(entry["epoch"])
        return metrics

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        errors = []
        for backend in self.backends:
            try:
                backend.close()
            except Exception as exc:  # close every backend even if one fails
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __bool__(self) -> bool:
        return bool(self.backends)


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, config_dict: dict, purge_step: int | None):
        module = importlib.import_module("torch.utils.tensorboard")
        # purge_step: a resumed run hides the events the interrupted run wrote after its checkpoint
        self.writer = module.SummaryWriter(log_dir=str(run_dir / "runs"), flush_secs=30, purge_step=purge_step)
        self.writer.add_text("config", json.dumps(config_dict, indent=2, sort_keys=True, default=str),
                             purge_step or 0)
        self.stage: str | None = None

    def log(self, metrics: dict, global_step: int, stage: str | None) -> None:
        if stage is not None and stage != self.stage:
            self.writer.add_text("stage", str(stage), global_step)
            self.stage = stage
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, global_step)

    def close(self) -> None:
        self.writer.close()


def _wandb_credentials() -> bool:
    """WANDB_API_KEY, or a `wandb login` entry in the netrc file, for the host wandb talks to."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str | None:
    """The mode wandb.init gets: None (wandb's own choice) when the user set WANDB_MODE or has credentials,
    else "offline", also set as WANDB_MODE so that nothing in this process prompts or reaches the network."""
    if os.environ.get("WANDB_MODE") or _wandb_credentials():
        return None
    os.environ["WANDB_MODE"] = "offline"
    return "offline"


class _WandB:
    name = "wandb"

    def __init__(self, run_dir: Path, config_dict: dict):
        wandb = importlib.import_module("wandb")
        kwargs = {"project": os.environ.get("WANDB_PROJECT") or "vlmkit", "dir": str(run_dir),
                  "name": run_dir.resolve().name, "config": config_dict}
        mode = wandb_mode()
        if mode is not None:
            kwargs["mode"] = mode
        self.run = wandb.init(**kwargs)

    def log(self, metrics: dict, global_step: int, stage: str | None) -> None:
        self.run.log({**metrics, "train/global_step": global_step}, step=global_step)

    def close(self) -> None:
        self.run.finish()


def _check_installed(names: list[str]) -> None:
    """One ConfigError line naming the pip package(s) to install, for every name whose import fails."""
    missing = []
    for name in names:
        try:
            importlib.import_module("torch.utils.tensorboard" if name == "tensorboard" else name)
        except ImportError:
            missing.append(name)
    if len(missing) == 1:
        raise ConfigError(f"--report-to {missing[0]} needs the {_PACKAGES[missing[0]]} package: "
                          f"pip install {_PACKAGES[missing[0]]}")
    if missing:
        packages = [_PACKAGES[name] for name in missing]
        raise ConfigError(f"--report-to {','.join(missing)} needs the {' and '.join(packages)} packages: "
                          f"pip install {' '.join(packages)}")


def parse_names(names) -> list[str]:
    """`names` as a list ("tensorboard,wandb" is split too), checked: unknown names and "none" mixed with
    others raise ConfigError. ["none"] or [] -> []."""
    if isinstance(names, str):
        names = [names]
    wanted: list[str] = []
    for item in names or []:
        for name in str(item).split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name not in REPORTERS:
                raise ConfigError(f"--report-to {name!r} is not known; choose from {', '.join(REPORTERS)} "
                                  "(several: tensorboard,wandb)")
            if name not in wanted:
                wanted.append(name)
    if "none" in wanted and len(wanted) > 1:
        raise ConfigError(f"--report-to none cannot be combined with {', '.join(n for n in wanted if n != 'none')}")
    return [name for name in wanted if name != "none"]


def check_reporters(names) -> list[str]:
    """What open_reporters checks, without opening anything: call it early (every rank) to fail before the
    model is built. Returns the names to open ([] for none)."""
    wanted = parse_names(names)
    _check_installed(wanted)
    return wanted


def open_reporters(names: list[str], run_dir: Path, config_dict: dict, *, purge_step: int | None = None) -> Reporter:
    """One Reporter for every name (["none"]: one that does nothing). Call it on rank 0 only.

    Every name is checked (known, its package installed) before any backend opens. `purge_step`, on --resume:
    the first global step the resumed run will log; TensorBoard then hides the interrupted run's events from
    there on (the JSONL log is truncated the same way)."""
    wanted = check_reporters(names)
    run_dir = Path(run_dir)
    backends = []
    try:
        for name in wanted:
            if name == "tensorboard":
                backends.append(_TensorBoard(run_dir, config_dict, purge_step))
            else:
                backends.append(_WandB(run_dir, config_dict))
    except BaseException:
        for backend in backends:
            backend.close()
        raise
    return Reporter(backends)


def global_step_offset(log_file: Path, stage: str | None = None) -> int:
    """The global steps before `stage` in a run's JSONL log: the sum of every earlier stage's last step, as
    loss.png's x axis counts them. A stage's entries log at `offset + entry["step"]`. `stage=None`: every
    stage's, the global step the log has reached (on --resume, after truncating: purge_step - 1)."""
    offset, current, last = 0, None, 0
    path = Path(log_file)
    if not path.exists():
        return 0
    for entry in read_jsonl(path):
        if "stage" not in entry or "step" not in entry:
            continue
        if entry["stage"] == stage:
            break
        if entry["stage"] != current:
            offset, current = offset + last, entry["stage"]
        last = entry["step"]
    return offset + last
