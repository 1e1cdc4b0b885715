"""The same command and seed give the same losses whether the tiny backbone cache was empty or warm.

Building the tiny backbones consumes the RNG; the connector used to be initialised after that, so a first run
and its repeat trained differently. Two real `vlmkit train` processes: one on an empty $VLMKIT_HOME (it builds
the backbones), one on the cache it left."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from runs import losses


@pytest.mark.slow
def test_cold_and_warm_cache_give_the_same_losses(tmp_path):
    env = dict(os.environ, VLMKIT_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    runs = []
    for name in ("cold", "warm"):
        run = tmp_path / name
        done = subprocess.run([sys.executable, "-m", "vlmkit", "train", "--run-dir", str(run), "--stages", "align",
                               "--align.max-steps", "5", "--align.batch-size", "8"], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        runs.append(losses(run))
    assert "[tiny]" not in done.stdout + done.stderr  # the second run found the backbones built
    assert runs[0] == runs[1]
