"""vlmkit against transformers' own `LlavaForConditionalGeneration`: same config, same weights, same data.

    python benchmarks/vs_transformers.py [--quick] [--configs tiny small] [--out FILE.json]

For each model size in `CONFIGS` a random LLaVA-1.5 is built from Hugging Face backbone directories (a CLIP
vision tower at 64 px, the 2-layer MLP connector, a Llama LM with the project's tokenizer), saved as a vlmkit
checkpoint and exported with `vlmkit.convert.to_hf`, so transformers loads the identical weights. Then:

  train   stage-2 'instruct' (tower frozen; connector + LLM train; AdamW over the trainable parameters,
          the same warm-up/cosine schedule, clipping at 1.0) on the same easy-VQA conversations in the same
          batches: vlmkit runs its own `train_stage`, transformers the loop a user writes around
          `LlavaForConditionalGeneration(..., labels=...)`. The first losses of both must agree.
  ttft    time to the first token at batch 1: image encoding + prefill + one greedy token.
  decode  greedy tokens/s at batch 1 and 8 (no early stop), wall time of the whole generate call; the tokens
          of both frameworks must agree. Generation is timed with both models in one process, called in
          turns, because twin processes differ by up to 20% (memory placement); memory is measured apart.
  memory  peak resident memory of the timed phase above the resident memory just before it (libraries, model
          and data loaded, warm-up done, freed memory handed back to the kernel), and the absolute peak RSS.
          The warm-up matters: transformers maps the safetensors weights lazily, so they become resident only
          when first used.
  mfu     training model FLOPs/s over this machine's measured matmul peak (see `FLOPS_FORMULA`).

Every measurement runs in a fresh process forked from a server that has only imported the libraries, so
nothing of one measurement (allocator caches, memory high-water mark, warm kernels) leaks into another.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import itertools
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FRAMEWORKS = ("vlmkit", "transformers")
PRELOAD = ["torch", "transformers", "transformers.models.llava.modeling_llava", "vlmkit.model.vlm",
           "vlmkit.train.loop", "vlmkit.infer.generate", "vlmkit.convert", "vlmkit.data.easyvqa"]
ANSWER_PROMPT = "Answer the question using a single word or phrase."
MIB = 1024 * 1024

# Model sizes. The vision tower is CLIP at 64 px with 8 px patches (64 patch tokens + CLS); `llm` holds
# LlamaConfig fields, vocab_size None meaning the project tokenizer's own size.
CONFIGS = {
    "tiny": {  # the LM of the project's demo (vlmkit.tiny.build.LM_CONFIG)
        "vision": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4),
        "llm": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=4, tie_word_embeddings=True, vocab_size=None),
    },
    "small": {  # big enough for efficient matmuls; Llama's 32000-token vocabulary makes the LM head count
        "vision": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
        "llm": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=8, tie_word_embeddings=False, vocab_size=32000),
    },
}
IMAGE_SIZE, PATCH_SIZE = 64, 8

FLOPS_FORMULA = (
    "train FLOPs/step = 6*N_llm*T_real + 6*N_head*T_sup + 6*N_conn*T_img + 2*N_vis*T_vis, where N_llm = trainable "
    "LLM parameters without the input embedding and the LM head, T_real = non-padding tokens, N_head = LM head "
    "parameters (vocab x hidden, counted even when tied), T_sup = supervised tokens (the only positions whose "
    "logits the loss needs), N_conn = connector parameters, T_img = image tokens, N_vis = frozen vision tower "
    "parameters without position embeddings (forward only), T_vis = tower tokens (patches + CLS) of every image "
    "of the step. Attention score FLOPs are left out. The same count is used for both frameworks, so the MFU "
    "ratio equals the throughput ratio; MFU = FLOPs/s over the measured fp32 matmul peak (training runs in fp32)."
)

# (metric, better, target ratio vlmkit/transformers); MFU's target is absolute
TARGETS = {
    "train_samples_per_s": ("higher", 1.5),
    "decode_tokens_per_s_b1": ("higher", 1.2),
    "decode_tokens_per_s_b8": ("higher", 1.2),
    "ttft_ms": ("lower", 0.8),
    "train_peak_mib": ("lower", 1.0),
    "decode_peak_mib_b8": ("lower", 1.0),
}
MFU_TARGET = 0.5
BUSY = 0.1  # foreign CPU share above which a timing is flagged (see Stopwatch)


@dataclasses.dataclass(frozen=True)
class Settings:
    batch_size: int = 8          # the stage-2 batch of the tiny presets
    train_steps: int = 10
    warmup_steps: int = 2
    epochs: float = 1.0          # passes the timed steps make over the training records
    max_turns: int = 4           # easy-VQA questions per record (varied lengths: 1..max_turns turns)
    lr: float = 1e-4
    new_tokens: int = 32
    decode_batch: int = 8
    repeats: int = 4             # timed generate calls per framework after a warm-up call; the fastest counts
    rounds: int = 2              # processes per generation timing (fastest counts) and memory (median counts)
    train_rounds: int = 1        # processes per framework timing training; the fastest counts
    threads: int = 2
    retries: int = 2             # measure again (in a new process) when other processes disturbed a measurement

    @property
    def train_records(self) -> int:
        return max(self.batch_size, round(self.batch_size * self.train_steps / self.epochs))


QUICK = Settings(batch_size=4, train_steps=3, warmup_steps=1, new_tokens=8, repeats=2, rounds=1)


# -- isolation and memory ---------------------------------------------------------------------------------
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(PRELOAD)


def isolated(fn, *args):
    """Run fn(*args) in a fresh process forked from the preloaded server; return its result."""
    with ProcessPoolExecutor(1, mp_context=_CONTEXT, max_tasks_per_child=1) as pool:
        return pool.submit(fn, *args).result()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak resident memory of this process above its memory at `reset()`.

    `reset()` first hands memory that Python and malloc hold but no longer use back to the kernel, then resets
    the kernel's high-water mark (writing 5 to /proc/self/clear_refs), so VmHWM is the peak since the reset,
    whatever loading and warming up cost before it. Where that is not allowed, the peak is ru_maxrss, which also
    remembers loading."""

    def reset(self) -> None:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            self.method = "VmHWM after clear_refs, minus RSS at the reset"
        except OSError:
            self.method = "ru_maxrss (which remembers loading) minus RSS at the reset"
        self.baseline = _rss_bytes()

    def peak_rss_mib(self) -> float:
        if self.method.startswith("VmHWM"):
            with open("/proc/self/status") as status:
                line = next(line for line in status if line.startswith("VmHWM:"))
            return int(line.split()[1]) * 1024 / MIB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB

    def report(self) -> dict:
        peak = self.peak_rss_mib()
        return {"peak_mib": peak - self.baseline / MIB, "peak_rss_mib": peak, "baseline_mib": self.baseline / MIB,
                "memory_method": self.method}


def _busy_cpu_seconds() -> float:
    """CPU time all processes of the machine have used (busy and stolen), from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Stopwatch:
    """Wall time of a block, and `foreign`: the CPU that other processes used meanwhile, as a fraction of all
    cores. With a few threads on a few cores, a busy neighbour slows a run many times over (the threads of a
    parallel region wait for the one that was descheduled), so a number measured while `foreign` is high is
    flagged rather than trusted."""

    def __enter__(self) -> "Stopwatch":
        self._start = (time.perf_counter(), _busy_cpu_seconds(), sum(os.times()[:2]))
        return self

    def __exit__(self, *exc) -> None:
        wall, busy, own = (now - then for now, then in zip(
            (time.perf_counter(), _busy_cpu_seconds(), sum(os.times()[:2])), self._start))
        self.seconds = wall
        self.foreign = max(0.0, (busy - own) / (wall * os.cpu_count()))


def foreign_share(seconds: float = 1.0) -> float:
    """The CPU share in use over `seconds` while this process sleeps: the machine's other load."""
    start = _busy_cpu_seconds()
    time.sleep(seconds)
    return (_busy_cpu_seconds() - start) / (seconds * os.cpu_count())


def wait_for_quiet(limit_s: float = 120.0, log=print) -> None:
    """Wait up to `limit_s` until other processes leave the CPU (almost) idle for a second."""
    deadline = time.perf_counter() + limit_s
    share = foreign_share()
    if share > BUSY:
        log(f"  waiting for a quiet machine (other processes use {share:.0%} of the CPU) ...")
    while share > BUSY and time.perf_counter() < deadline:
        share = foreign_share(2.0)


def measure_quietly(fn, args: tuple, settings: Settings, label: str, log=print, timed: bool = True) -> dict:
    """fn(*args) in its own process, after waiting for a quiet machine; measured again, up to `settings.retries`
    times, while other processes used more than `BUSY` of the CPU during it. The least disturbed result counts.
    A measurement whose time is not used (`timed=False`: memory) neither waits nor is repeated."""
    best = None
    for attempt in range(1 + (settings.retries if timed else 0)):
        if timed:
            wait_for_quiet(log=log)
        start = time.perf_counter()
        result = isolated(fn, *args)
        result["attempts"] = attempt + 1
        log(f"{label:<34} {time.perf_counter() - start:6.1f}s  (other processes: {result['foreign_cpu']:.0%} CPU)")
        if best is None or result["foreign_cpu"] < best["foreign_cpu"]:
            best = result
        if result["foreign_cpu"] <= BUSY:
            break
    return best


def _start_worker(settings: Settings) -> None:
    import torch
    import transformers

    torch.set_num_threads(settings.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


# -- building the shared model --------------------------------------------------------------------------
def build(root: str, name: str, settings: Settings) -> dict:
    """Backbones -> vlmkit model -> vlmkit checkpoint and HF LLaVA export; returns paths and parameter counts."""
    _start_worker(settings)
    import torch
    from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from vlmkit.archs import from_name
    from vlmkit.convert import to_hf
    from vlmkit.data.images import ImageTransform
    from vlmkit.model.vlm import VisionLanguageModel
    from vlmkit.tiny.build import build_tokenizer

    root = Path(root)
    if not (root / "tokenizer").exists():
        build_tokenizer(root / "tokenizer", verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    spec = CONFIGS[name]
    base = root / name
    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **spec["vision"]))
    tower.save_pretrained(base / "clip")
    ImageTransform(size=IMAGE_SIZE, crop=(IMAGE_SIZE, IMAGE_SIZE)).save(base / "clip")
    llm_fields = dict(spec["llm"], vocab_size=spec["llm"]["vocab_size"] or len(tokenizer))
    llm = LlamaForCausalLM(LlamaConfig(max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                       **llm_fields))
    llm.save_pretrained(base / "llm")
    tokenizer.save_pretrained(base / "llm")

    config = from_name("llava-1.5", scale="tiny", vision={"name_or_path": str(base / "clip"), "feature_layer": -2},
                       llm={"name_or_path": str(base / "llm")})
    model = VisionLanguageModel.from_config(config, verbose=False)
    model.save_pretrained(base / "vlmkit")
    to_hf(model, base / "hf")
    return {"vlmkit": str(base / "vlmkit"), "transformers": str(base / "hf"), "params": parameter_counts(model)}


def parameter_counts(model) -> dict:
    """The parameter groups of `FLOPS_FORMULA`, and the token counts per image."""
    causal = model.llm.model
    embed, head = causal.get_input_embeddings().weight, causal.get_output_embeddings().weight
    tower = model.vision.tower
    return {
        "vision": sum(p.numel() for n, p in tower.named_parameters() if "position_embedding" not in n),
        "connector": sum(p.numel() for p in model.connector.parameters()),
        "llm_body": sum(p.numel() for p in causal.parameters() if p is not embed and p is not head),
        "lm_head": head.numel(),
        "embedding": embed.numel(),
        "tied": head is embed,
        "vocab": head.shape[0],
        "total": sum(p.numel() for p in model.parameters()),
        "image_tokens": model.num_image_tokens,
        "tower_tokens": (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1,
    }


# -- data ------------------------------------------------------------------------------------------------
def load_dataset(checkpoint: str, records: list[dict], mode: str):
    """Records rendered exactly as `vlmkit train` renders them (vlmkit.train.run.build_dataset), read from the
    checkpoint's tokenizer and image transform, so the transformers side need not load the vlmkit model."""
    from transformers import AutoTokenizer

    from vlmkit.config import ArchConfig
    from vlmkit.data.dataset import ConversationDataset
    from vlmkit.data.images import ImageTransform
    from vlmkit.data.templates import get_template

    saved = json.loads((Path(checkpoint) / "config.json").read_text())
    arch = ArchConfig.from_dict(saved["arch"])
    transform = ImageTransform.from_pretrained(checkpoint, pad_to_square=arch.vision.pad_to_square)
    return ConversationDataset(records, AutoTokenizer.from_pretrained(checkpoint), get_template(arch.template),
                               transform, num_image_tokens=saved["num_image_tokens"], max_length=arch.max_length,
                               source="easy-vqa", mode=mode, answer_prompt=ANSWER_PROMPT, verbose=False)


def training_dataset(checkpoint: str, settings: Settings):
    from vlmkit.data import easyvqa

    records = easyvqa.instruction_records("train", ANSWER_PROMPT, seed=0, max_turns=settings.max_turns)
    return load_dataset(checkpoint, records[:settings.train_records], "train")


def training_batches(dataset, batch_size: int, seed: int, pad_id: int):
    """The micro-batches vlmkit's `train_stage` draws, in its order and with its padding, endlessly."""
    from vlmkit.data.dataset import collate, length_grouped_batches

    for epoch in itertools.count():
        for indices in length_grouped_batches(dataset.lengths(), batch_size, seed + epoch):
            yield collate([dataset[i] for i in indices], pad_id)


def batch_statistics(dataset, settings: Settings, pad_id: int) -> dict:
    """Token and image counts of the timed steps (the inputs of `FLOPS_FORMULA`)."""
    stats = {"samples": 0, "real_tokens": 0, "padded_tokens": 0, "supervised_tokens": 0, "images": 0}
    for batch in itertools.islice(training_batches(dataset, settings.batch_size, 0, pad_id), settings.train_steps):
        stats["samples"] += batch.input_ids.shape[0]
        stats["real_tokens"] += int(batch.attention_mask.sum())
        stats["padded_tokens"] += batch.input_ids.numel()
        stats["supervised_tokens"] += int((batch.labels != -100).sum())
        stats["images"] += len(batch.image_indices)
    stats["records"], stats["unique_images"] = len(dataset), len(dataset.images)
    stats["epochs"] = stats["samples"] / len(dataset)
    return stats


def decode_inputs(checkpoint: str, batch_size: int):
    """The first `batch_size` easy-VQA test questions as generation prompts (ending with the assistant cue)."""
    from vlmkit.data import easyvqa

    dataset = load_dataset(checkpoint, easyvqa.question_records("test", ANSWER_PROMPT)[:batch_size], "prompt")
    image_indices = [i for example in dataset for i in example.image_indices]
    return [example.input_ids for example in dataset], dataset.pixel_values[image_indices]


def dataset_pad_id(checkpoint: str) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint).pad_token_id


def load_model(framework: str, path: str):
    if framework == "vlmkit":
        from vlmkit.model.vlm import VisionLanguageModel
        return VisionLanguageModel.from_pretrained(path)
    from transformers import LlavaForConditionalGeneration
    return LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa").eval()


# -- training ---------------------------------------------------------------------------------------------
def instruct_stage(settings: Settings, steps: int):
    from vlmkit.config import StageConfig

    return StageConfig(name="instruct", train=["connector", "llm"], lr={"connector": settings.lr, "llm": settings.lr},
                       max_steps=steps, batch_size=settings.batch_size)


def train_vlmkit(model, dataset, stage) -> list[float]:
    """vlmkit's own stage loop; returns [first loss, mean of the last tenth] as its summary gives them."""
    from vlmkit.train.loop import train_stage

    summary = train_stage(model, stage, dataset, seed=0, verbose=False, log=lambda *args: None)
    return [summary["first_loss"], summary["final_loss"]]


def train_transformers(hf, dataset, stage, pad_id: int) -> list[float]:
    """The loop a transformers user writes: forward with labels, backward, clip, AdamW, schedule."""
    import torch

    from vlmkit.train.loop import warmup_cosine

    torch.manual_seed(0)
    hf.train()
    hf.model.vision_tower.requires_grad_(False).eval()
    trainable = [p for p in hf.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=single_lr(stage), betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=stage.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(stage.max_steps, stage.warmup_ratio))
    losses = []
    for batch in itertools.islice(training_batches(dataset, stage.batch_size, 0, pad_id), stage.max_steps):
        out = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 pixel_values=dataset.pixel_values[batch.image_indices], labels=batch.labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, stage.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    tail = losses[-max(1, len(losses) // 10):]
    return [losses[0], sum(tail) / len(tail)]


def single_lr(stage) -> float:
    rates = set(stage.lr.values())
    if len(rates) != 1:
        raise ValueError(f"the transformers loop uses one learning rate; the stage sets {stage.lr}")
    return rates.pop()


def task_train(framework: str, paths: dict, settings: Settings) -> dict:
    """Warm-up steps, then the timed steps (a fresh optimiser and schedule each, as a new stage would)."""
    _start_worker(settings)
    dataset = training_dataset(paths["vlmkit"], settings)
    model = load_model(framework, paths[framework])
    pad_id = dataset_pad_id(paths["vlmkit"])
    stats = batch_statistics(dataset, settings, pad_id)

    def run(steps: int) -> list[float]:
        stage = instruct_stage(settings, steps)
        if framework == "vlmkit":
            return train_vlmkit(model, dataset, stage)
        return train_transformers(model, dataset, stage, pad_id)

    warmup_losses = run(settings.warmup_steps)
    memory = PeakMemory()
    memory.reset()
    with Stopwatch() as watch:
        losses = run(settings.train_steps)
    seconds = watch.seconds
    return {"seconds": seconds, "foreign_cpu": watch.foreign, "samples_per_s": stats["samples"] / seconds,
            "real_tokens_per_s": stats["real_tokens"] / seconds, "fresh_first_loss": warmup_losses[0],
            "timed_first_loss": losses[0], "timed_final_loss": losses[1], "batches": stats, **memory.report()}


# -- generation -----------------------------------------------------------------------------------------------
def generate_tokens(framework: str, model, prompts, pixel_values, new_tokens: int, pad_id: int) -> list[list[int]]:
    """Greedy continuations of `prompts` without early stop; the new tokens of each."""
    from vlmkit.infer.generate import GenerationConfig, generate, left_pad

    if framework == "vlmkit":
        return generate(model, prompts, [1] * len(prompts), pixel_values=pixel_values,
                        config=GenerationConfig(max_new_tokens=new_tokens), stop_ids=set())
    input_ids, attention_mask = left_pad(prompts, pad_id)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=pad_id)
    return out[:, input_ids.shape[1]:].tolist()


def task_generate_memory(framework: str, paths: dict, settings: Settings, batch_size: int,
                         new_tokens: int) -> dict:
    """Peak memory of one generate call (after a warm-up call) with the process to itself; and its tokens."""
    _start_worker(settings)
    pad_id = dataset_pad_id(paths["vlmkit"])
    prompts, pixel_values = decode_inputs(paths["vlmkit"], batch_size)
    model = load_model(framework, paths[framework])
    generate_tokens(framework, model, prompts, pixel_values, new_tokens, pad_id)
    memory = PeakMemory()
    memory.reset()
    with Stopwatch() as watch:
        tokens = generate_tokens(framework, model, prompts, pixel_values, new_tokens, pad_id)
    return {"seconds": watch.seconds, "foreign_cpu": watch.foreign, "prompt_tokens": [len(p) for p in prompts],
            "tokens": tokens, **memory.report()}


def task_generate_timing(paths: dict, settings: Settings, batch_size: int, new_tokens: int) -> dict:
    """Both frameworks in one process, called in turns: a warm-up call each, then `settings.repeats` timed
    calls each; the fastest counts. Sharing the process gives both the same conditions (twin processes differ
    by up to 20%)."""
    _start_worker(settings)
    pad_id = dataset_pad_id(paths["vlmkit"])
    prompts, pixel_values = decode_inputs(paths["vlmkit"], batch_size)
    models = {framework: load_model(framework, paths[framework]) for framework in FRAMEWORKS}
    for framework, model in models.items():
        generate_tokens(framework, model, prompts, pixel_values, new_tokens, pad_id)
    times = {framework: [] for framework in FRAMEWORKS}
    with Stopwatch() as watch:
        for repeat in range(settings.repeats):
            for framework in FRAMEWORKS[::1 if repeat % 2 == 0 else -1]:
                start = time.perf_counter()
                generate_tokens(framework, models[framework], prompts, pixel_values, new_tokens, pad_id)
                times[framework].append(time.perf_counter() - start)
    return {"seconds": min(map(min, times.values())), "foreign_cpu": watch.foreign, "all_seconds": times}


# -- the machine's matmul peak ------------------------------------------------------------------------------
def task_matmul_peak(settings: Settings, sizes=(256, 512, 1024, 2048, 3072), seconds: float = 0.5,
                     bursts: int = 5) -> dict:
    """GFLOP/s of square matmuls, fp32 and bf16, on `settings.threads` threads: the best burst of the best size.
    Sizes grow while one product is predicted to take under a burst (bf16 without native CPU support is slow)."""
    _start_worker(settings)
    import torch

    result = {}
    with Stopwatch() as watch:
        for dtype in (torch.float32, torch.bfloat16):
            by_size = {}
            for n in sizes:
                if by_size and 2 * n ** 3 / (max(by_size.values()) * 1e9) > seconds / bursts:
                    break
                a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
                a @ b
                rates = []
                for _ in range(bursts):
                    calls, start = 0, time.perf_counter()
                    while calls == 0 or time.perf_counter() - start < seconds / bursts:
                        a @ b
                        calls += 1
                    rates.append(2 * n ** 3 * calls / (time.perf_counter() - start) / 1e9)
                by_size[n] = max(rates)
            result[str(dtype).removeprefix("torch.")] = {"gflops": max(by_size.values()), "by_size": by_size}
    result["foreign_cpu"] = watch.foreign
    return result


# -- comparison ------------------------------------------------------------------------------------------------
def train_flops_per_step(params: dict, batches: dict, steps: int) -> float:
    """`FLOPS_FORMULA`, averaged over the timed steps."""
    return (6 * params["llm_body"] * batches["real_tokens"] + 6 * params["lm_head"] * batches["supervised_tokens"]
            + 6 * params["connector"] * batches["images"] * params["image_tokens"]
            + 2 * params["vision"] * batches["images"] * params["tower_tokens"]) / steps


def measure(name: str, root: str, settings: Settings, log=print) -> dict:
    """Build `name`'s model, measure both frameworks on it; the raw results, the checks and the FLOP count."""
    log(f"\n[{name}] building the model and its transformers export")
    built = isolated(build, root, name, settings)
    results = {framework: {} for framework in FRAMEWORKS}
    runs = {framework: [] for framework in FRAMEWORKS}
    for round_ in range(settings.train_rounds):
        for framework in FRAMEWORKS[::1 if round_ % 2 == 0 else -1]:  # alternating which goes first
            runs[framework].append(measure_quietly(task_train, (framework, built, settings), settings,
                                                   f"[{name}] train {framework}", log))
    for framework in FRAMEWORKS:
        results[framework]["train"] = fastest(runs[framework])

    generation = {"ttft": (1, 1), "decode_b1": (1, settings.new_tokens),
                  f"decode_b{settings.decode_batch}": (settings.decode_batch, settings.new_tokens)}
    for job, (batch_size, new_tokens) in generation.items():
        timings = [measure_quietly(task_generate_timing, (built, settings, batch_size, new_tokens), settings,
                                   f"[{name}] {job} timing (both)", log) for _ in range(settings.rounds)]
        for framework in FRAMEWORKS:
            memory = median_memory([measure_quietly(
                task_generate_memory, (framework, built, settings, batch_size, new_tokens), settings,
                f"[{name}] {job} memory {framework}", log, timed=False) for _ in range(settings.rounds)])
            best = min(timings, key=lambda timing: min(timing["all_seconds"][framework]))
            seconds = min(best["all_seconds"][framework])
            results[framework][job] = {
                **memory, "seconds": seconds, "tokens_per_s": batch_size * new_tokens / seconds,
                "foreign_cpu": best["foreign_cpu"], "memory_process_seconds": memory["seconds"],
                "all_seconds": [timing["all_seconds"][framework] for timing in timings]}

    batches = results["vlmkit"]["train"]["batches"]
    return {"model": CONFIGS[name], "params": built["params"], "batches": batches,
            "train_flops_per_step": train_flops_per_step(built["params"], batches, settings.train_steps),
            "checks": checks(results, settings), "raw": results}


def summarise(result: dict, settings: Settings, peak_gflops: float) -> None:
    """Add the metrics of both frameworks, their ratios and the targets to a `measure` result."""
    results, flops = result["raw"], result["train_flops_per_step"]
    b8 = f"decode_b{settings.decode_batch}"
    metrics = {}
    for framework, r in results.items():
        step_seconds = r["train"]["seconds"] / settings.train_steps
        metrics[framework] = {
            "train_samples_per_s": r["train"]["samples_per_s"],
            "train_real_tokens_per_s": r["train"]["real_tokens_per_s"],
            "train_mfu": flops / step_seconds / (peak_gflops * 1e9),
            "train_peak_mib": r["train"]["peak_mib"],
            "train_peak_rss_mib": r["train"]["peak_rss_mib"],
            "ttft_ms": r["ttft"]["seconds"] * 1e3,
            "decode_tokens_per_s_b1": r["decode_b1"]["tokens_per_s"],
            f"decode_tokens_per_s_b{settings.decode_batch}": r[b8]["tokens_per_s"],
            f"decode_peak_mib_b{settings.decode_batch}": r[b8]["peak_mib"],
            f"decode_peak_rss_mib_b{settings.decode_batch}": r[b8]["peak_rss_mib"],
        }
    ratios = {key: metrics["vlmkit"][key] / metrics["transformers"][key] for key in metrics["vlmkit"]}
    targets = {}
    for key, (better, target) in TARGETS.items():
        key = key.replace("_b8", f"_b{settings.decode_batch}")
        met = ratios[key] >= target if better == "higher" else ratios[key] <= target
        targets[key] = {"target": f"{'>=' if better == 'higher' else '<='} {target}x", "met": met}
    targets["train_mfu"] = {"target": f">= {MFU_TARGET:.0%} of peak",
                            "met": metrics["vlmkit"]["train_mfu"] >= MFU_TARGET}
    foreign = {f"{job}/{framework}": r[job]["foreign_cpu"] for framework, r in results.items() for job in r}
    result.update(metrics=metrics, ratios=ratios, targets=targets, foreign_cpu=foreign)


def median_memory(runs: list[dict]) -> dict:
    """The first run, with the median memory of all (it varies by 15-30 MiB from process to process: malloc
    arenas of the worker threads)."""
    memory = {key: statistics.median(run[key] for run in runs) for key in ("peak_mib", "peak_rss_mib", "baseline_mib")}
    return {**runs[0], **memory, "rounds_peak_mib": [run["peak_mib"] for run in runs]}


def fastest(runs: list[dict]) -> dict:
    """One measurement from several processes: the fastest; the others' times are kept alongside."""
    return dict(min(runs, key=lambda run: run["seconds"]), rounds_seconds=[run["seconds"] for run in runs])


def checks(results: dict, settings: Settings) -> dict:
    """Do the two frameworks compute the same thing? Loss on the fresh weights, and the greedy tokens."""
    ours, theirs = results["vlmkit"], results["transformers"]
    out = {"fresh_first_loss": {"vlmkit": ours["train"]["fresh_first_loss"],
                                "transformers": theirs["train"]["fresh_first_loss"],
                                "abs_diff": abs(ours["train"]["fresh_first_loss"]
                                                - theirs["train"]["fresh_first_loss"])},
           "timed_final_loss": {"vlmkit": ours["train"]["timed_final_loss"],
                                "transformers": theirs["train"]["timed_final_loss"]}}
    for job in ("ttft", "decode_b1", f"decode_b{settings.decode_batch}"):
        a, b = ours[job]["tokens"], theirs[job]["tokens"]
        same = sum(x == y for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))
        out[f"tokens_{job}"] = {"identical": a == b, "matching": same, "total": sum(map(len, b))}
    return out


# -- report ------------------------------------------------------------------------------------------------------
ROWS = [  # (key, label, format)
    ("train_samples_per_s", "train samples/s", "{:.2f}"),
    ("train_real_tokens_per_s", "train real tokens/s", "{:.0f}"),
    ("train_mfu", "train MFU (fp32 peak)", "{:.1%}"),
    ("train_peak_mib", "train peak memory MiB", "{:.0f}"),
    ("train_peak_rss_mib", "  absolute peak RSS MiB", "{:.0f}"),
    ("ttft_ms", "TTFT ms (batch 1)", "{:.1f}"),
    ("decode_tokens_per_s_b1", "decode tokens/s batch 1", "{:.1f}"),
    ("decode_tokens_per_s_b8", "decode tokens/s batch 8", "{:.1f}"),
    ("decode_peak_mib_b8", "decode peak memory MiB b8", "{:.0f}"),
    ("decode_peak_rss_mib_b8", "  absolute peak RSS MiB", "{:.0f}"),
]


def format_table(name: str, result: dict, settings: Settings) -> str:
    p, b = result["params"], result["batches"]
    lines = [f"\n== {name}: vision CLIP {CONFIGS[name]['vision']['num_hidden_layers']}x"
             f"{CONFIGS[name]['vision']['hidden_size']} ({p['vision'] / 1e6:.2f}M, frozen), connector "
             f"{p['connector'] / 1e6:.2f}M, LLM {CONFIGS[name]['llm']['num_hidden_layers']}x"
             f"{CONFIGS[name]['llm']['hidden_size']} ({p['llm_body'] / 1e6:.2f}M body + {p['lm_head'] / 1e6:.2f}M "
             f"head, vocab {p['vocab']}{', tied' if p['tied'] else ''})",
             f"   train: batch {settings.batch_size}, {settings.train_steps} timed steps = {b['epochs']:.2f} epochs "
             f"of {b['records']} records ({b['unique_images']} images); {b['real_tokens'] / b['samples']:.0f} real "
             f"tokens/sample, padding {1 - b['real_tokens'] / b['padded_tokens']:.1%}, supervised "
             f"{b['supervised_tokens'] / b['real_tokens']:.1%}; {result['train_flops_per_step'] / 1e9:.1f} GFLOP/step",
             f"{'metric':<28}{'vlmkit':>12}{'transformers':>14}{'ratio':>8}  {'target':<16}{'met':<4}"]
    suffix = f"_b{settings.decode_batch}"
    for key, label, fmt in ROWS:
        key = key.replace("_b8", suffix)
        label = label.replace("batch 8", f"batch {settings.decode_batch}").replace("b8", f"b{settings.decode_batch}")
        target = result["targets"].get(key)
        lines.append(f"{label:<28}{fmt.format(result['metrics']['vlmkit'][key]):>12}"
                     f"{fmt.format(result['metrics']['transformers'][key]):>14}{result['ratios'][key]:>7.2f}x  "
                     f"{target['target'] if target else '':<16}{('yes' if target['met'] else 'NO') if target else ''}")
    c = result["checks"]
    lines.append(f"checks: loss on fresh weights, first batch: vlmkit {c['fresh_first_loss']['vlmkit']:.6f}, "
                 f"transformers {c['fresh_first_loss']['transformers']:.6f} "
                 f"(|diff| {c['fresh_first_loss']['abs_diff']:.1e}); after the timed steps "
                 f"{c['timed_final_loss']['vlmkit']:.4f} vs {c['timed_final_loss']['transformers']:.4f}")
    lines.append("        greedy tokens: " + ", ".join(
        f"{job.removeprefix('tokens_')} {'identical' if v['identical'] else 'DIFFER'} ({v['matching']}/{v['total']})"
        for job, v in c.items() if job.startswith("tokens_")))
    busiest = max(result["foreign_cpu"], key=result["foreign_cpu"].get)
    share = result["foreign_cpu"][busiest]
    lines.append(f"machine: other processes used at most {share:.0%} of the CPU during a timed phase ({busiest})"
                 + (f"; numbers measured above {BUSY:.0%} are not trustworthy, rerun on a quiet machine"
                    if share > BUSY else ""))
    return "\n".join(lines)


def machine_info(settings: Settings) -> dict:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": settings.threads, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke test: few steps, small batches, 8 new tokens")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--out", default="benchmarks/results/vs_transformers.json", help="where the JSON goes")
    for field in dataclasses.fields(Settings):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=None,
                            help=f"default {field.default} ({getattr(QUICK, field.name)} with --quick)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    settings = dataclasses.replace(QUICK if args.quick else Settings(), **{
        f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if getattr(args, f.name) is not None})
    start = time.perf_counter()
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "settings": dataclasses.asdict(settings),
              "machine": machine_info(settings), "load_average_before": os.getloadavg(),
              "flops_formula": FLOPS_FORMULA, "memory_method": None, "configs": {}}
    # the peak is the best of several measurements spread over the run: one process can be 30% slow
    peaks = [measure_quietly(task_matmul_peak, (settings,), settings, "matmul peak")]
    with tempfile.TemporaryDirectory(prefix="vlmkit-bench-") as root:
        for name in args.configs:
            report["configs"][name] = measure(name, root, settings)
            peaks.append(measure_quietly(task_matmul_peak, (settings,), settings, "matmul peak"))
    best = {dtype: max(run[dtype]["gflops"] for run in peaks) for dtype in ("float32", "bfloat16")}
    report["matmul_peak"] = {"gflops": best, "runs": peaks}
    peak = best["float32"]
    print(f"\nmatmul peak on {settings.threads} threads, best of {len(peaks)} processes: "
          + ", ".join(f"{dtype} {gflops:.1f} GFLOP/s" for dtype, gflops in best.items())
          + " (fp32 runs: " + ", ".join(f"{run['float32']['gflops']:.0f}" for run in peaks) + ")")
    for name, result in report["configs"].items():
        summarise(result, settings, peak)
        report["memory_method"] = result["raw"]["vlmkit"]["train"]["memory_method"]
        print(format_table(name, result, settings))
    report["load_average_after"] = os.getloadavg()
    report["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nmatmul peak fp32 {peak:.1f} GFLOP/s; memory: {report['memory_method']}; load average before "
          f"{report['load_average_before'][0]:.2f}, after {report['load_average_after'][0]:.2f}; "
          f"{report['seconds']:.0f}s -> {out}")
    return report


if __name__ == "__main__":
    main()
