"""--report-to: TensorBoard events read back, the error messages, wandb's offline default (with a fake wandb)."""
from __future__ import annotations

import json
import sys
import types

import pytest

from vlmkit.errors import ConfigError
from vlmkit.train.report import REPORTERS, check_reporters, global_step_offset, open_reporters, parse_names

# two stages as train_log.jsonl has them: `seconds` counts from each stage's start
ENTRIES = [
    {"stage": "align", "step": 1, "epoch": 0, "loss": 5.0, "lr": {"connector": 1e-4}, "grad_norm": 2.5,
     "tokens": 100, "rows": 4, "seconds": 2.0},
    {"stage": "align", "step": 2, "epoch": 0, "loss": 4.0, "lr": {"connector": 2e-4}, "grad_norm": 1.5,
     "tokens": 200, "rows": 4, "seconds": 2.5},
    {"stage": "align", "step": 3, "epoch": 1, "loss": 3.0, "lr": {"connector": 1e-4}, "grad_norm": None,
     "tokens": 300, "rows": 4, "seconds": 3.5},
    {"stage": "instruct", "step": 1, "epoch": 0, "loss": 2.0, "lr": {"connector": 2e-5, "llm": 1e-5},
     "grad_norm": 0.75, "tokens": 80, "rows": 2, "seconds": 4.0},
    {"stage": "instruct", "step": 2, "epoch": 0, "loss": 1.0, "lr": {"connector": 1e-5, "llm": 5e-6},
     "grad_norm": 0.5, "tokens": 90, "rows": 2, "seconds": 5.0},
]
GLOBAL_STEPS = [1, 2, 3, 4, 5]  # instruct continues after align's 3 steps
CONFIG = {"name": "llava-1.5", "seed": 0, "stages": [{"name": "align"}, {"name": "instruct"}]}


def _write(reporter, entries=ENTRIES, steps=GLOBAL_STEPS):
    for entry, step in zip(entries, steps):
        reporter.log(entry, step)
    reporter.close()


def _events(log_dir):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="reading TensorBoard event files needs the tensorboard package (pip install tensorboard)")
    acc = event_accumulator.EventAccumulator(
        str(log_dir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = {tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
             for tag in acc.Tags()["tensors"]}
    return scalars, texts


@pytest.fixture
def tensorboard_installed():
    try:
        import torch.utils.tensorboard  # noqa: F401
        import tensorboard.backend.event_processing.event_accumulator  # noqa: F401
    except ImportError:
        pytest.skip("tensorboard is not installed (pip install tensorboard)")


def _approx(pairs):
    return [(step, pytest.approx(value, rel=1e-6)) for step, value in pairs]


def test_tensorboard_scalars_read_back(tmp_path, tensorboard_installed):
    _write(open_reporters(["tensorboard"], tmp_path, CONFIG))
    scalars, texts = _events(tmp_path / "runs")
    assert set(scalars) == {"train/loss", "train/learning_rate/connector", "train/learning_rate/llm",
                            "train/grad_norm", "train/tokens_per_second", "train/samples_per_second",
                            "train/epoch"}
    assert scalars["train/loss"] == _approx([(1, 5.0), (2, 4.0), (3, 3.0), (4, 2.0), (5, 1.0)])
    assert scalars["train/learning_rate/connector"] == _approx([(1, 1e-4), (2, 2e-4), (3, 1e-4), (4, 2e-5),
                                                                (5, 1e-5)])
    assert scalars["train/learning_rate/llm"] == _approx([(4, 1e-5), (5, 5e-6)])
    assert scalars["train/grad_norm"] == _approx([(1, 2.5), (2, 1.5), (4, 0.75), (5, 0.5)])  # step 3: no clip
    # per step: tokens / (seconds - previous seconds of the same stage); a stage's first entry: its own seconds
    assert scalars["train/tokens_per_second"] == _approx([(1, 100 / 2.0), (2, 200 / 0.5), (3, 300 / 1.0),
                                                          (4, 80 / 4.0), (5, 90 / 1.0)])
    assert scalars["train/samples_per_second"] == _approx([(1, 4 / 2.0), (2, 4 / 0.5), (3, 4 / 1.0),
                                                           (4, 2 / 4.0), (5, 2 / 1.0)])
    assert scalars["train/epoch"] == _approx([(1, 0), (2, 0), (3, 1), (4, 0), (5, 0)])
    assert texts["stage/text_summary"] == [(1, "align"), (4, "instruct")]  # once, where each stage starts
    [(step, config)] = texts["config/text_summary"]
    assert step == 0 and json.loads(config) == CONFIG


def test_repeated_seconds_log_no_throughput(tmp_path, tensorboard_installed):
    """`seconds` is rounded to ms: a step that seems to take none logs no throughput rather than infinity."""
    entries = [dict(ENTRIES[0]), dict(ENTRIES[1], seconds=2.0)]
    _write(open_reporters(["tensorboard"], tmp_path, {}), entries, [1, 2])
    scalars, _ = _events(tmp_path / "runs")
    assert scalars["train/tokens_per_second"] == _approx([(1, 50.0)])
    assert scalars["train/loss"] == _approx([(1, 5.0), (2, 4.0)])


def test_resume_purges_the_interrupted_runs_later_steps(tmp_path, tensorboard_installed):
    _write(open_reporters(["tensorboard"], tmp_path, {}))  # the killed run got to global step 5
    # resumed from a checkpoint at global step 3 (align done): the new run logs from step 4 on
    resumed = [dict(ENTRIES[3], loss=9.0, seconds=1.0)]
    _write(open_reporters(["tensorboard"], tmp_path, {}, purge_step=4), resumed, [4])
    scalars, _ = _events(tmp_path / "runs")
    assert scalars["train/loss"] == _approx([(1, 5.0), (2, 4.0), (3, 3.0), (4, 9.0)])


def test_none_writes_nothing(tmp_path):
    for names in (["none"], [], "none"):
        reporter = open_reporters(names, tmp_path, CONFIG)
        assert not reporter and reporter.names == []
        _write(reporter)
    assert list(tmp_path.iterdir()) == []


def test_names(tmp_path):
    assert REPORTERS == ("none", "tensorboard", "wandb")
    assert parse_names(["tensorboard,wandb", "TensorBoard"]) == ["tensorboard", "wandb"]
    assert check_reporters(["none"]) == [] and check_reporters("none") == []
    with pytest.raises(ConfigError, match=r"--report-to 'mlflow' is not known; choose from none, tensorboard, wandb"):
        open_reporters(["mlflow"], tmp_path, {})
    with pytest.raises(ConfigError, match="none cannot be combined with tensorboard"):
        open_reporters(["none", "tensorboard"], tmp_path, {})
    assert list(tmp_path.iterdir()) == []


def test_missing_tensorboard_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError) as caught:
        open_reporters(["tensorboard"], tmp_path, {})
    assert str(caught.value) == "--report-to tensorboard needs the tensorboard package: pip install tensorboard"
    assert "\n" not in str(caught.value)


def test_missing_wandb_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError) as caught:
        open_reporters(["wandb"], tmp_path, {})
    assert str(caught.value) == "--report-to wandb needs the wandb package: pip install wandb"
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError) as caught:
        open_reporters(["tensorboard", "wandb"], tmp_path, {})
    assert str(caught.value) == ("--report-to tensorboard,wandb needs the tensorboard and wandb packages: "
                                 "pip install tensorboard wandb")
    assert list(tmp_path.iterdir()) == []


def test_every_name_is_checked_before_any_backend_opens(tmp_path, monkeypatch, tensorboard_installed):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match="pip install wandb"):
        open_reporters(["tensorboard", "wandb"], tmp_path, {})
    assert not (tmp_path / "runs").exists()  # no stray TensorBoard event file


class _FakeWandb(types.ModuleType):
    """Records wandb.init's kwargs and each run's log/finish calls; never touches the network."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logs, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            def log(self, data, step=None):
                fake.logs.append((step, data))

            def finish(self):
                fake.finished += 1
        return Run()


@pytest.fixture
def fake_wandb(monkeypatch, tmp_path):
    wandb = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_BASE_URL"):
        monkeypatch.setenv(name, "x")  # recorded, so the delenv below is undone too (the code sets WANDB_MODE)
        monkeypatch.delenv(name)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return wandb


def test_wandb_defaults_offline_without_credentials(tmp_path, fake_wandb):
    import os

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _write(open_reporters(["wandb"], run_dir, CONFIG))
    [kwargs] = fake_wandb.inits
    assert kwargs == {"project": "vlmkit", "dir": str(run_dir), "name": "run", "config": CONFIG, "mode": "offline"}
    assert os.environ["WANDB_MODE"] == "offline"
    assert [step for step, _ in fake_wandb.logs] == GLOBAL_STEPS
    step, data = fake_wandb.logs[1]
    assert data["train/loss"] == 4.0 and data["train/learning_rate/connector"] == 2e-4
    assert data["train/tokens_per_second"] == pytest.approx(400.0) and data["train/global_step"] == 2
    assert "train/grad_norm" not in fake_wandb.logs[2][1]
    assert fake_wandb.finished == 1


@pytest.mark.parametrize("setting", ["mode", "api_key", "netrc"])
def test_wandb_keeps_the_users_choice(tmp_path, fake_wandb, monkeypatch, setting):
    import os

    if setting == "mode":
        monkeypatch.setenv("WANDB_MODE", "online")
    elif setting == "api_key":
        monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    else:
        (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
        monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    open_reporters(["wandb"], tmp_path, {}).close()
    [kwargs] = fake_wandb.inits
    assert "mode" not in kwargs and kwargs["project"] == "mine"
    assert os.environ.get("WANDB_MODE") == ("online" if setting == "mode" else None)


def test_tensorboard_and_wandb_together(tmp_path, fake_wandb, tensorboard_installed):
    reporter = open_reporters(["tensorboard,wandb"], tmp_path, CONFIG)
    assert reporter.names == ["tensorboard", "wandb"]
    _write(reporter)
    scalars, _ = _events(tmp_path / "runs")
    assert [step for step, _ in scalars["train/loss"]] == [step for step, _ in fake_wandb.logs] == GLOBAL_STEPS


def test_global_step_offset(tmp_path):
    log = tmp_path / "train_log.jsonl"
    assert global_step_offset(log, "align") == 0  # no log yet
    log.write_text("".join(json.dumps(e) + "\n" for e in ENTRIES))
    assert global_step_offset(log, "align") == 0
    assert global_step_offset(log, "instruct") == 3
    assert global_step_offset(log, "next") == global_step_offset(log) == 5
    assert [global_step_offset(log, e["stage"]) + e["step"] for e in ENTRIES] == GLOBAL_STEPS


def test_train_reports_what_it_logs(backbones, tmp_path, image_files, tensorboard_installed):
    """`vlmkit train --report-to tensorboard`: the event file has the JSONL log's losses at the same steps."""
    from test_cli import train_argv, write_data

    from vlmkit.cli import main

    data = write_data(tmp_path, image_files)
    assert main(train_argv(backbones, tmp_path, data, "--report-to", "tensorboard")) == 0
    run = tmp_path / "run"
    logged = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    scalars, texts = _events(run / "runs")
    assert [step for step, _ in scalars["train/loss"]] == [e["step"] for e in logged] == [1, 2, 3]
    assert [value for _, value in scalars["train/loss"]] == pytest.approx([e["loss"] for e in logged], rel=1e-6)
    assert [value for _, value in scalars["train/learning_rate/llm"]] == \
        pytest.approx([e["lr"]["llm"] for e in logged], rel=1e-6)
    assert texts["stage/text_summary"] == [(1, "instruct")]
