"""DeepSpeed ZeRO-2 and ZeRO-3 under torchrun (gloo on CPU) with LLaVA's own config files, as they are
(tests/data/deepspeed/zero{2,3}.json: haotian-liu/LLaVA scripts/, "auto" values filled by vlmkit): 2
processes reproduce 1 plain process. Half the records are text-only, so some micro-batches never run the
connector (ZeRO-3 would re-apply a stale gradient to it if the forward did not keep it in the graph)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runs import argv, finish, losses, make_images, mixed_data

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
CONFIGS = Path(__file__).parent.parent / "data" / "deepspeed"


# the tiny recipe trains the tower too: a text-only micro-batch runs it on a blank image, or it would have no
# gradient there, which plain AdamW skips and ZeRO steps with a zero one (lm_head 1.9e-4 apart after 6 steps)
def _extra(tmp_path) -> tuple[str, ...]:
    make_images(tmp_path)
    return ("--instruct.max-steps", "6", "--data", str(mixed_data(tmp_path)), "--save-every", "0")


@pytest.fixture(scope="module")
def single(backbones, tmp_path_factory) -> Path:
    """The plain one-process run every ZeRO configuration is compared with (the same data, written alike)."""
    tmp_path = tmp_path_factory.mktemp("plain")
    finish(argv(backbones, tmp_path, tmp_path / "one", *_extra(tmp_path)))
    return tmp_path / "one"


@pytest.mark.slow
@pytest.mark.parametrize("stage,bf16", [("zero2", False), ("zero3", False), ("zero3", True)])
def test_llava_zero_configs_match_one_process(backbones, single, tmp_path, stage, bf16):
    """fp32: the same losses to float noise. bf16 (the engine holds the module in bf16, fp32 master weights in
    the optimizer) against the fp32 plain run: within bf16's rounding (measured 4e-4)."""
    from vlmkit.model.vlm import VisionLanguageModel

    extra = _extra(tmp_path)
    zero = tmp_path / stage
    out = finish(argv(backbones, tmp_path, zero, *extra, "--distributed", "deepspeed", "--deepspeed-config",
                      str(CONFIGS / f"{stage}.json"), *(["--bf16"] if bf16 else [])), processes=2)
    one, two = losses(single), losses(zero)
    worst = max(abs(a - b) / abs(a) for a, b in zip(one, two))
    print(f"largest relative loss difference, DeepSpeed {stage}{' bf16' if bf16 else ''} 2 processes vs 1 plain "
          f"fp32 process: {worst:.3g}")
    assert len(one) == len(two) == 6 and worst <= (5e-3 if bf16 else 1e-4), (one, two, out[-3000:])
    assert one[-1] < one[0]
    # the stage checkpoint is an ordinary model with the trained fp32 weights
    a = VisionLanguageModel.from_pretrained(single / "model")
    b = VisionLanguageModel.from_pretrained(zero / "model")
    for name in ("llm.causal_lm.lm_head.weight", "connector.linear_2.weight"):
        x, y = (a.get_parameter(name.replace("causal_lm.", "model.")), b.get_parameter(name.replace("causal_lm.",
                                                                                                   "model.")))
        assert y.dtype == torch.float32
        torch.testing.assert_close(x, y, atol=1e-2 if bf16 else 1e-5, rtol=1e-2 if bf16 else 1e-4)
    assert not (zero / ".deepspeed-scratch").exists()


def test_deepspeed_refuses_what_it_cannot_do(backbones, tmp_path, capsys):
    from vlmkit.cli import main

    make_images(tmp_path)
    run = tmp_path / "run"
    assert main(argv(backbones, tmp_path, run, "--distributed", "deepspeed", "--deepspeed-config",
                     str(CONFIGS / "zero2.json"))) == 2
    assert "launch under torchrun" in capsys.readouterr().err
