"""Files that try to run code or take memory: a checkpoint naming a directory of Python with trust_remote_code,
pickled backbones, safetensors headers that lie. Each is refused in one line naming what is wrong and the flag
that would allow it, and nothing of it runs or is allocated."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from hostile import HEADERS, safetensors_file

from vlmkit.errors import ConfigError


@pytest.fixture
def remote_code_dir(tmp_path, backbones):
    """An LLM directory whose config needs its own Python; importing that Python writes a marker file."""
    directory = tmp_path / "evil-llm"
    directory.mkdir()
    marker = tmp_path / "code-ran"
    config = json.loads((__import__("pathlib").Path(backbones["llm"]) / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                               "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (directory / "config.json").write_text(json.dumps(config))
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import LlamaConfig\n" \
           "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
    (directory / "configuration_evil.py").write_text(code)
    (directory / "modeling_evil.py").write_text(code)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        source = __import__("pathlib").Path(backbones["llm"]) / name
        if source.exists():
            (directory / name).write_text(source.read_text())
    return directory, marker


def test_no_preset_turns_remote_code_on():
    from vlmkit.archs import names
    from vlmkit.archs import from_name

    for name in names():
        for scale in ("tiny", "paper"):
            assert from_name(name, scale=scale).llm.trust_remote_code is False, (name, scale)
    assert from_name("visualglm", scale="paper", llm={"trust_remote_code": True}).llm.trust_remote_code is True


def test_a_saved_config_cannot_run_the_code_of_the_directory_it_names(make_model, tmp_path, remote_code_dir):
    """A BLIP-2-style checkpoint without its LLM, whose saved config names a directory of Python with
    trust_remote_code: loading it (as --init and --resume do) and attaching the LLM runs none of it."""
    from vlmkit.model.vlm import VisionLanguageModel
    from vlmkit.train.init import init_config, with_overrides

    directory, marker = remote_code_dir
    model = make_model()
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    saved["arch"]["llm"] = {"name_or_path": str(directory), "trust_remote_code": True}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(saved))

    assert init_config(str(tmp_path / "ckpt")).llm.trust_remote_code is False
    assert with_overrides(init_config(str(tmp_path / "ckpt")),
                          {"llm__trust_remote_code": True}).llm.trust_remote_code is True  # the command line may
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.llm.trust_remote_code is False
    loaded.llm = None  # as a BLIP-2 stage-1 checkpoint: the next stage loads the LLM its config names
    with pytest.raises(ConfigError, match=r"--llm.name-or-path .*Python code in its checkpoint.*"
                                          r"--llm.trust-remote-code") as info:
        loaded.attach_llm(verbose=False)
    assert "\n" not in str(info.value)
    assert not marker.exists(), "the directory's Python ran"


def test_the_cli_refuses_a_model_that_needs_its_own_code(tmp_path, remote_code_dir, backbones, capsys):
    from vlmkit.cli import main

    directory, marker = remote_code_dir
    code = main(["train", "--preset", "llava-1.5", "--run-dir", str(tmp_path / "run"), "--llm", str(directory),
                 "--vision-tower", backbones["clip"], "--stages", "align", "--align.max-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "--llm.trust-remote-code" in err[-1] and "Traceback" not in "\n".join(err)
    assert not marker.exists()


def test_backbones_with_only_pickled_weights_need_allow_pickle(backbones, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from vlmkit.archs import from_name
    from vlmkit.model.vlm import VisionLanguageModel

    pickled = tmp_path / "llm-bin"
    shutil.copytree(backbones["llm"], pickled)
    state = load_file(str(pickled / "model.safetensors"))
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    config = from_name("llava-1.5", scale="tiny", vision={"name_or_path": backbones["clip"]},
                       llm={"name_or_path": str(pickled)})
    with pytest.raises(ConfigError, match=r"--llm.name-or-path .*no file named model.safetensors.*--allow-pickle"):
        VisionLanguageModel.from_config(config, verbose=False)
    model = VisionLanguageModel.from_config(config, verbose=False, allow_pickle=True)
    torch.testing.assert_close(model.llm.causal_lm.lm_head.weight, state["lm_head.weight"])


@pytest.mark.parametrize("name", list(HEADERS))
def test_a_lying_safetensors_header_is_refused_before_allocating(tmp_path, name):
    import tracemalloc

    from vlmkit.model.weights import stream_safetensors

    header, data, length, words = HEADERS[name]
    path = safetensors_file(tmp_path / "x.safetensors", header, data, length)
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as info:
            list(stream_safetensors(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert words in str(info.value) and str(path) in str(info.value), str(info.value)
    assert peak < 10 * 2**20


def test_a_checkpoint_with_a_lying_header_is_refused_by_from_pretrained(make_model, tmp_path):
    from vlmkit.model.vlm import VisionLanguageModel

    make_model().save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [2**38]  # claims a terabyte
    header[name]["data_offsets"][1] = header[name]["data_offsets"][0] + 2**40
    safetensors_file(weights, header, bytes(raw[8 + length:]))
    with pytest.raises(ConfigError, match="truncated or damaged"):
        VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
