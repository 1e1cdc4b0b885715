"""Memory planning (vlmkit.train.plan): the meta-device build counts what the real model holds, allocates
nothing, and the byte rules give the known numbers for LLaVA-1.5-7B."""
import json

import pytest
import torch

from vlmkit.archs import from_name

from vlmkit.config import LoRAConfig
from vlmkit.errors import ConfigError
from vlmkit.train.plan import (
    GiB,
    activation_bytes,
    build_meta,
    format_plan,
    lora_params,
    memory_plan_main,
    plan_memory,
)

# the real checkpoints' config fields, written by hand (no network)
LLAMA = {"vicuna-7b": (4096, 32, 32, 11008), "vicuna-13b": (5120, 40, 40, 13824)}
CLIP_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu"}


def llama_config(hidden, layers, heads, intermediate, vocab=32000) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
            "intermediate_size": intermediate, "vocab_size": vocab, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Config-only directories for the paper's backbones, and tiny ones with real weights."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        LlamaConfig,
        LlamaForCausalLM,
        ResNetConfig,
        ResNetModel,
    )

    from vlmkit.data.images import ImageTransform

    root = tmp_path_factory.mktemp("hub")
    for name, shape in LLAMA.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(llama_config(*shape)))
    (root / "clip-336").mkdir()
    (root / "clip-336" / "config.json").write_text(json.dumps({
        "model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": 768, "vision_config": CLIP_L_336,
        "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                        "num_attention_heads": 12}}))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**llama_config(64, 2, 4, 172, vocab=300))).save_pretrained(root / "tiny-llm")
    CLIPModel(CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                      "num_attention_heads": 2, "vocab_size": 100},
                         vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 48, "intermediate_size": 64,
                                        "num_hidden_layers": 3, "num_attention_heads": 4},
                         projection_dim=16)).save_pretrained(root / "tiny-clip")
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                             downsample_in_first_stage=False)).save_pretrained(root / "tiny-resnet")
    for name in ("tiny-clip", "tiny-resnet"):
        ImageTransform(size=32, crop=(32, 32)).save(root / name)
    return root


def paper(hub, llm="vicuna-7b", preset="llava-1.5", **overrides):
    return from_name(preset, scale="paper", vision__name_or_path=str(hub / "clip-336"),
                     llm__name_or_path=str(hub / llm), **overrides)


@pytest.fixture(scope="module")
def meta7b(hub):
    return build_meta(paper(hub))


def row(rows, stage, strategy):
    return next(r for r in rows if r["stage"] == stage and r["strategy"] == strategy)


@pytest.mark.parametrize("vision", ["tiny-clip", "tiny-resnet"])
def test_meta_counts_equal_the_real_parts(hub, vision):
    from vlmkit.connectors import build_connector
    from vlmkit.encoders import VisionEncoder, load_vision_tower
    from vlmkit.llm import LanguageModel

    config = from_name("llava-1.5", scale="tiny", vision__name_or_path=str(hub / vision),
                       llm__name_or_path=str(hub / "tiny-llm"))
    meta = build_meta(config)
    encoder = VisionEncoder(load_vision_tower(str(hub / vision)), config.vision, 32)
    llm = LanguageModel.from_pretrained(str(hub / "tiny-llm"))
    connector = build_connector(config.connector, encoder.hidden_size, llm.hidden_size, encoder.num_tokens)
    real = {"vision": encoder, "connector": connector, "llm": llm}
    assert meta.params == {name: sum(p.numel() for p in part.parameters()) for name, part in real.items()}
    assert meta.num_image_tokens == encoder.num_tokens and meta.vision_hidden == encoder.hidden_size
    assert all(p.is_meta for part in meta.parts().values() for p in part.parameters())


def test_paper_7b_and_13b_counts_on_meta_without_memory(hub, meta7b):
    assert meta7b.params == {"vision": 303_507_456, "connector": 1024 * 4096 + 4096 + 4096 * 4096 + 4096,
                             "llm": 6_738_415_616}
    assert meta7b.num_image_tokens == 576 and meta7b.layers == 32 and meta7b.vocab == 32000
    tensors = [t for part in meta7b.parts().values() for t in [*part.parameters(), *part.buffers()]]
    assert tensors and all(t.is_meta for t in tensors)  # nothing allocated for 7B parameters
    meta13 = build_meta(paper(hub, "vicuna-13b"))
    assert meta13.params["llm"] == 13_015_864_320 and meta13.params["connector"] == 1024 * 5120 + 5120 * 5121 + 5120


def test_full_finetune_is_16_bytes_per_trainable_parameter_and_fsdp_divides_it(hub, meta7b):
    config = paper(hub)
    p = meta7b.params

    def states(r):
        return (r["weights_gb"] + r["grads_gb"] + r["optimizer_gb"]) * GiB
    one = row(plan_memory(config, gpus=1, meta=meta7b), "instruct", "ddp")
    expected = 16 * (p["llm"] + p["connector"]) + 2 * p["vision"]
    assert states(one) == pytest.approx(expected) and 108.7e9 < expected < 108.8e9  # ~16 B x 6.76B + frozen CLIP
    assert one["trainable_params"] == p["llm"] + p["connector"] and one["micro_batch"] == 128
    assert not one["fits"]
    eight = plan_memory(config, gpus=8, meta=meta7b)
    fsdp = row(eight, "instruct", "fsdp")
    root = meta7b.total - 32 * meta7b.layer_params  # tower, connector, embeddings, head: gathered whole
    gathered = 2 * (root + 2 * meta7b.layer_params) + 2 * (root - p["vision"] + meta7b.layer_params)
    assert states(fsdp) == pytest.approx(expected / 8 + gathered)
    assert fsdp["micro_batch"] == 16 and fsdp["seq_len"] == config.max_length == 2048
    zero2 = row(eight, "instruct", "zero2")
    assert zero2["weights_gb"] == one["weights_gb"] and zero2["optimizer_gb"] == pytest.approx(one["optimizer_gb"] / 8)
    align = row(eight, "align", "ddp")  # connector only: the frozen 7B costs its bf16 weights
    assert align["trainable_params"] == p["connector"] and align["micro_batch"] == 32
    assert align["weights_gb"] * GiB == pytest.approx(2 * meta7b.total)
    assert {r["strategy"] for r in eight if r["stage"] == "align"} == {"ddp", "zero2", "fsdp"}  # no LoRA: LLM frozen


@pytest.mark.parametrize("targets", [["all-linear"], ["q_proj", "v_proj"]])
def test_lora_count_equals_peft(hub, targets):
    from vlmkit.llm import LanguageModel
    from vlmkit.llm.lora import attach_lora

    lora = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=targets)
    meta = build_meta(from_name("llava-1.5", scale="tiny", vision__name_or_path=str(hub / "tiny-clip"),
                                llm__name_or_path=str(hub / "tiny-llm")))
    assert lora_params(meta.causal_lm, lora) == attach_lora(LanguageModel.from_pretrained(str(hub / "tiny-llm")), lora)


def test_lora_rows_use_the_stage_adapters(hub, meta7b):
    rows = plan_memory(paper(hub, preset="llava-1.5-lora"), gpus=8, meta=meta7b)
    lora = row(rows, "instruct", "lora")
    per_layer = 128 * (4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096))  # q k v o, gate up, down
    assert lora["trainable_params"] == 32 * per_layer + meta7b.params["connector"]
    assert lora["configured"] and lora["lora_r"] == 128
    assert not row(rows, "instruct", "fsdp")["configured"]
    qlora = row(rows, "instruct", "qlora")
    assert qlora["weights_gb"] < lora["weights_gb"] / 2 and qlora["checkpointing"]  # 4-bit base; peft checkpoints


def test_fits_flips_at_the_planned_total(hub, meta7b):
    config = paper(hub, gradient_checkpointing=True, distributed="fsdp")
    need = row(plan_memory(config, gpus=8, meta=meta7b), "instruct", "fsdp")["total_gb"]
    above = row(plan_memory(config, gpus=8, gpu_memory_gb=need + 0.05, meta=meta7b), "instruct", "fsdp")
    below = row(plan_memory(config, gpus=8, gpu_memory_gb=need - 0.05, meta=meta7b), "instruct", "fsdp")
    assert above["fits"] and not below["fits"] and above["configured"]


def test_checkpointing_rule_and_sequence_length(hub, meta7b):
    config = paper(hub, gradient_checkpointing=True)
    rows = plan_memory(config, gpus=8, meta=meta7b)
    assert row(rows, "align", "ddp")["checkpointing"]  # every stage, the frozen LLM's too
    assert row(rows, "instruct", "ddp")["checkpointing"]
    plain = row(plan_memory(config, gpus=8, checkpointing=False, meta=meta7b), "align", "ddp")
    assert not plain["checkpointing"] and row(rows, "align", "ddp")["activations_gb"] < plain["activations_gb"] / 4
    llava = row(plan_memory(config, gpus=8, text_len=2048, meta=meta7b), "instruct", "fsdp")
    assert llava["seq_len"] == 576 + 2048
    assert row(plan_memory(config, gpus=8, micro_batch=4, seq_len=1000, meta=meta7b), "instruct", "ddp")[
        "micro_batch"] == 4
    with pytest.raises(ConfigError):
        plan_memory(config, strategy="zero9", meta=meta7b)


def saved_bytes(run, params) -> int:
    """Bytes of the tensors autograd keeps for the backward pass (parameters excluded)."""
    seen, skip = {}, {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        storage = t.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


@pytest.mark.parametrize("mode", ["trains", "frozen", "lora", "checkpointed"])
def test_activation_estimate_matches_what_autograd_saves(hub, mode):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = from_name("llava-1.5", scale="tiny", vision__name_or_path=str(hub / "tiny-clip"),
                       llm__name_or_path=str(hub / "tiny-llm"))
    meta = build_meta(config)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**llama_config(64, 2, 4, 172, vocab=300))).to(torch.bfloat16).train()
    lora = LoRAConfig(r=4, alpha=8, dropout=0.05) if mode == "lora" else None
    if lora is not None:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear"))
    elif mode == "frozen":
        model.requires_grad_(False)
    if mode == "checkpointed":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows, seq = 2, 96
    embeds = torch.randn(rows, seq, 64, dtype=torch.bfloat16, requires_grad=True)
    decoder = model.get_decoder() if lora is None else model.base_model.model.get_decoder()
    measured = saved_bytes(lambda: decoder(inputs_embeds=embeds, use_cache=False), model.parameters())
    train = ["connector", "llm"] if mode in ("trains", "checkpointed") else ["connector"]
    estimate = activation_bytes(meta, train if lora is None else ["connector", "llm"], rows, seq,
                                checkpointing=mode == "checkpointed", lora=lora)["llm"]
    if mode == "checkpointed":  # the estimate's peak adds one layer recomputed in the backward pass
        final_norm = 6.5 * 64 * rows * seq
        estimate -= (activation_bytes(meta, train, rows, seq)["llm"] - final_norm) / meta.layers
    assert estimate == pytest.approx(measured, rel=0.1)


def test_printed_plan(hub, meta7b):
    config = paper(hub, gradient_checkpointing=True, distributed="fsdp")
    rows = plan_memory(config, gpus=8, meta=meta7b)
    table = format_plan(rows)
    assert "instruct  fsdp*" in table and "instruct: as configured (fsdp) it fits" in table
    assert "align: as configured (fsdp) it fits" in table  # the frozen LLM checkpointed too (43.9 GiB)
    assert "too big: ddp (135.7)" in table  # full fine-tuning without sharding the optimizer state
    printed = []
    assert memory_plan_main(config, 8, 80.0, print_fn=printed.append) == 0
    assert memory_plan_main(config, 8, 40.0, print_fn=printed.append) == 1  # align needs 43.9 GiB
    assert "303.5M" in printed[0] and "6.74B" in printed[0] and "576 image tokens" in printed[0]


@pytest.mark.parametrize("preset", ["minigpt4", "blip2-t5"])  # every tiny backbone kind: LM, T5, tower, Q-Former
def test_tiny_dry_run_reads_configs_without_pretraining(tmp_path, preset):
    """`vlmkit train --dry-run` on an empty cache writes the tiny backbones' configurations, never their weights
    (it used to pretrain them first, for minutes, without a word); only the tokenizer and the random BERT, which
    size the vocabularies and train nothing, are built. The counts are those of the built backbones."""
    import os
    import subprocess
    import sys

    from vlmkit.tiny import ensure

    env = dict(os.environ, VLMKIT_HOME=str(tmp_path), TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, "-m", "vlmkit", "train", "--preset", preset, "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "configs only" in done.stdout
    weights = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.safetensors"))
    assert weights == ["tiny-v5/bert/model.safetensors"]  # the random BERT alone: nothing was pretrained
    assert sorted(p.name for p in (tmp_path / "tiny-v5").iterdir()) == ["bert", "tokenizer"]
    if preset != "minigpt4":
        return
    # the same parameter counts as the model built from the real backbones (the shared cache's LM and tower, which
    # the end-to-end tests build anyway; the Q-Former's is its config either way)
    config = from_name(preset, scale="tiny")
    for name in ("llama", "vision"):
        ensure(name, verbose=False)
    from vlmkit.train.plan import _n, build_meta

    p = build_meta(config).params
    assert f"vision {_n(p['vision'])} + connector {_n(p['connector'])} + llm {_n(p['llm'])} =" in done.stdout
