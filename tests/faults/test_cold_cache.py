"""The same command and seed give the same losses whether the tiny backbone cache was empty or warm.

Building the tiny backbones consumes the RNG; the connector used to be initialised after that, so a first run
and its repeat trained differently. Two real `vlmkit train` processes (BLIP-2's first stage): one whose $VLMKIT_HOME
lacks the Q-Former's BERT (it builds it: a second, and the RNG drawn from for its random weights), one on the
cache it left. The tokenizer, LM and tower come from the shared cache (built there if missing, as the end-to-end
test needs them anyway)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from runs import losses


@pytest.mark.slow
def test_cold_and_warm_cache_give_the_same_losses(tmp_path):
    from vlmkit.io import cache_home
    from vlmkit.tiny import ensure, tiny_dir

    home = tmp_path / "home"
    for name in ("tokenizer", "llama", "vision"):
        shared = ensure(name, verbose=False)
        link = home / tiny_dir(name).relative_to(cache_home())
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(shared, target_is_directory=True)
    env = dict(os.environ, VLMKIT_HOME=str(home), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    runs, outputs = [], []
    for name in ("cold", "warm"):
        run = tmp_path / name
        done = subprocess.run([sys.executable, "-m", "vlmkit", "train", "--preset", "blip2", "--run-dir", str(run),
                               "--vision-tower", "tiny:vision", "--stages", "representation",
                               "--representation.mixture", "easy-vqa:captions", "--representation.max-steps", "5",
                               "--representation.batch-size", "8"], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        runs.append(losses(run))
        outputs.append(done.stdout + done.stderr)
    assert "[tiny] bert" in outputs[0], outputs[0][-2000:]  # the first run built it
    assert "[tiny]" not in outputs[1]  # the second run found the backbones built
    assert runs[0] == runs[1]
