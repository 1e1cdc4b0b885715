"""Low-memory loading: a checkpoint is read tensor by tensor onto a model built on the meta device, in the
requested dtype, so a bf16 model never exists in fp32 in memory on its way (measured by peak RSS)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from vlmkit.model.weights import load_into, stream_safetensors
from vlmkit.errors import ConfigError
from vlmkit.model.vlm import VisionLanguageModel


def test_stream_reads_every_tensor_exactly(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(4).bfloat16(),
               "empty": torch.zeros(0, 3), "flag": torch.tensor([True, False])}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    read = dict(stream_safetensors(tmp_path / "w.safetensors"))
    assert read.keys() == tensors.keys()
    for name, value in tensors.items():
        assert read[name].dtype == value.dtype and torch.equal(read[name], value), name
    cast = dict(stream_safetensors(tmp_path / "w.safetensors", dtype=torch.float16))
    assert cast["a"].dtype == torch.float16 and torch.equal(cast["a"], tensors["a"].half())
    assert cast["b"].dtype == torch.int64  # only floating tensors are cast


def test_stream_names_a_truncated_file(tmp_path):
    save_file({"a": torch.randn(64, 64)}, str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(ConfigError, match="cut.safetensors: truncated"):
        list(stream_safetensors(tmp_path / "cut.safetensors"))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_from_pretrained_loads_in_dtype_with_exact_values(make_model, tmp_path, dtype):
    model = make_model()
    model.save_pretrained(tmp_path / "m")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "m", dtype=dtype)
    reference = dict(model.as_tensor_module().named_parameters())
    got = dict(loaded.as_tensor_module().named_parameters())
    assert got.keys() == reference.keys()
    for name, param in got.items():
        expected = reference[name] if dtype is None else reference[name].to(dtype)
        assert param.device.type == "cpu" and not param.is_meta, name
        assert param.dtype == expected.dtype and torch.equal(param, expected), name
    assert not any(b.is_meta for b in loaded.buffers())
    ids = model.tokenizer("what shape is this", return_tensors="pt").input_ids
    with torch.no_grad():
        _, want = model(ids)
        _, have = loaded(ids)
    tolerance = 0 if dtype is None else 0.05 * want.abs().max().item()
    assert (have.float() - want).abs().max().item() <= tolerance


def test_tied_embeddings_stay_one_parameter(backbones, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from vlmkit.archs import from_name

    tokenizer = AutoTokenizer.from_pretrained(backbones["llm"])
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=4, tie_word_embeddings=True))
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    config = from_name("llava-1.5", scale="tiny", vision={"name_or_path": backbones["clip"]},
                       llm={"name_or_path": str(tmp_path / "llm")})
    model = VisionLanguageModel.from_config(config, verbose=False)
    model.save_pretrained(tmp_path / "m")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    causal = loaded.llm.causal_lm
    assert causal.get_output_embeddings().weight is causal.get_input_embeddings().weight
    assert torch.equal(causal.get_input_embeddings().weight, model.llm.causal_lm.get_input_embeddings().weight.bfloat16())


def test_load_into_names_what_does_not_match(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=r"1.weight has shape \(3, 4\), the model expects \(2, 4\)"):
        load_into(module, [("1.weight", torch.zeros(3, 4))], source="ckpt")
    with pytest.raises(ConfigError, match=r"missing \['1.weight', '1.bias'\], unexpected \['2.weight'\]"):
        load_into(module, [("0.weight", torch.zeros(4, 3)), ("0.bias", torch.zeros(4)),
                           ("2.weight", torch.zeros(1))], source="ckpt")


_MEASURE = r"""
import json, sys, torch, transformers
from transformers import AutoConfig, AutoTokenizer
from vlmkit.model.vlm import VisionLanguageModel
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
path, mode = sys.argv[1], sys.argv[2]
saved = json.load(open(f"{path}/config.json"))
for c in (saved["llm"], saved["vision_tower"]):  # import the model classes first: their code is not the model
    small = {"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 16, "num_attention_heads": 2,
             "num_key_value_heads": 2, "vocab_size": 16, "hidden_sizes": [8] * len(c.get("hidden_sizes", [])),
             "embedding_size": 8}
    transformers.AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**c, **small})) if c is saved["llm"] \
        else transformers.AutoModel.from_config(AutoConfig.for_model(**{**c, **small}))
AutoTokenizer.from_pretrained(path)
before = status("VmRSS")
if mode == "vlmkit":
    model = VisionLanguageModel.from_pretrained(path, dtype=torch.bfloat16)
    dtype = str(next(model.llm.parameters()).dtype)
else:  # the usual way: build in fp32, read the whole file, cast
    from safetensors.torch import load_file
    from vlmkit.llm import LanguageModel
    llm = LanguageModel.from_hf_config(saved["llm"])
    state = load_file(f"{path}/model.safetensors")
    llm.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("llm.")}, strict=False)
    del state
    llm.to(torch.bfloat16)
    dtype = str(next(llm.parameters()).dtype)
print(json.dumps({"growth": status("VmHWM") - before, "dtype": dtype}))
"""


@pytest.mark.slow
def test_a_100m_model_loads_in_bf16_without_an_fp32_copy(backbones, tmp_path):
    """~100M parameters saved in fp32 (405 MB): loading in bf16 must peak below the fp32 size (it would be at
    least that if the model or the file were ever held in fp32), and below the usual build-load-cast route."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from vlmkit.archs import from_name

    tokenizer = AutoTokenizer.from_pretrained(backbones["llm"])
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=640, intermediate_size=1728,
                                       num_hidden_layers=12, num_attention_heads=10, tie_word_embeddings=False))
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    del llm
    config = from_name("llava-1.5", scale="tiny", vision={"name_or_path": backbones["clip"]},
                       llm={"name_or_path": str(tmp_path / "llm")})
    model = VisionLanguageModel.from_config(config, verbose=False)
    params = sum(p.numel() for p in model.parameters())
    assert 95e6 < params < 110e6
    model.save_pretrained(tmp_path / "m")
    del model
    fp32_bytes = (tmp_path / "m" / "model.safetensors").stat().st_size
    results = {}
    for mode in ("vlmkit", "usual"):
        out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "m"), mode], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print({mode: f"{r['growth'] / 1e6:.0f} MB" for mode, r in results.items()}, f"fp32 {fp32_bytes / 1e6:.0f} MB")
    assert results["vlmkit"]["dtype"] == "torch.bfloat16"
    assert results["vlmkit"]["growth"] < fp32_bytes, results
    assert results["vlmkit"]["growth"] < 0.6 * results["usual"]["growth"], results


def test_backbones_saved_in_fp16_train_in_fp32(backbones, tmp_path):
    """Hub LLMs are often saved in fp16 (Vicuna): transformers would load them so; training needs fp32 weights."""
    import shutil

    from transformers import AutoModelForCausalLM

    from vlmkit.archs import from_name

    AutoModelForCausalLM.from_pretrained(backbones["llm"]).half().save_pretrained(tmp_path / "llm16")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{backbones['llm']}/{name}", tmp_path / "llm16" / name)
    config = from_name("llava-1.5", scale="tiny", vision={"name_or_path": backbones["clip"]},
                       llm={"name_or_path": str(tmp_path / "llm16")})
    model = VisionLanguageModel.from_config(config, verbose=False)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    inference = VisionLanguageModel.from_config(config, verbose=False, dtype=torch.bfloat16)
    assert {p.dtype for p in inference.llm.parameters()} == {torch.bfloat16}


def test_a_hub_ids_image_processor_comes_from_the_cache(tmp_path):
    """A hub id's preprocessor config is read through the Hugging Face cache (offline here), not only from local
    directories; a hub id that is not cached is one line naming the flag."""
    from vlmkit.data.images import ImageTransform

    snapshot = tmp_path / "hub" / "models--org--tower" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "hub" / "models--org--tower" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tower" / "refs" / "main").write_text("abc123")
    ImageTransform(size=40, crop=(32, 32)).save(snapshot)
    code = ("from vlmkit.data.images import ImageTransform\n"
            "print(ImageTransform.from_pretrained('org/tower').crop)\n"
            "try:\n    ImageTransform.from_pretrained('org/missing')\n"
            "except Exception as exc:\n    print(type(exc).__name__, exc)\n")
    env = dict(__import__("os").environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == str(ImageTransform(size=40, crop=(32, 32)).crop)
    assert lines[1].startswith("ConfigError --vision.name-or-path 'org/missing': could not be loaded")
