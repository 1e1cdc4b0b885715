"""Where a stage's data comes from: named sources, weighted into a mixture.

A source is a LLaVA JSON/JSONL file (with its image folder) or a built-in source registered by name
(`easy-vqa:captions`, `easy-vqa:instructions`, `easy-vqa:questions`, `easy-vqa:matches`; generated scenes later). A stage's
`mixture` lists sources with sampling weights and, optionally, each its own template and answer prompt:

    --instruct.mixture "easy-vqa:instructions=1,data/mine.json=0.5"     # inline: SOURCE[=WEIGHT],...
    --instruct.mixture mix.json     # [{"source": "mine.json", "weight": 2, "image_folder": "imgs",
                                    #   "template": "chatml", "answer_prompt": "..."}, ...]

What an epoch means: every source contributes weight x (its record count) samples — weight 1 is each record
once, 2 is each record twice, 0.5 a seeded random half (a different half every epoch). `Mixture.epoch` draws
them from (seed, epoch) alone, so a checkpoint's (epoch, batch) position is the sampler's whole state and a
resumed run reads exactly what the uninterrupted one would have. A stage without a mixture reads its slot
(`data: captions|instructions`) from `--caption-data` / `--data` as before.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlmkit.data import compare, easyvqa, grounding, scenes, tabletop
from vlmkit.data.dataset import ConversationDataset, Mixture, load_llava_json  # noqa: F401 (Mixture: public here too)
from vlmkit.data.images import ImageLimits
from vlmkit.data.templates import get_template
from vlmkit.errors import ConfigError

EASY_VQA = "easy-vqa"


@dataclass
class DataSpec:
    """The command line's data: 'easy-vqa' or LLaVA JSON files (+ image folder) for the stages' slots."""
    instructions: str = EASY_VQA
    captions: str | None = None  # default: easy-VQA captions when instructions are easy-VQA
    image_folder: str | None = None
    skip_bad: bool = False
    confine_images: bool = False  # refuse image paths that lead outside the image folder
    image_limits: ImageLimits | None = None  # None: the model's transform's (the defaults)


@dataclass
class Source:
    source: str                      # a registered name or a LLaVA JSON/JSONL path
    weight: float = 1.0
    image_folder: str | None = None  # default: the command line's --image-folder
    template: str = ""               # default: the stage's template
    answer_prompt: str | None = None  # default: the preset's (appended to questions of built-in VQA sources)


# name -> records(config, stage, answer_prompt) for built-in sources
BUILTIN: dict[str, Callable] = {}


def register_source(name: str):
    def wrap(fn):
        BUILTIN[name] = fn
        return fn
    return wrap


@register_source("easy-vqa:captions")
def _easyvqa_captions(config, stage, answer_prompt):
    return easyvqa.caption_records("train", config.caption_prompt)


@register_source("easy-vqa:instructions")
def _easyvqa_instructions(config, stage, answer_prompt):
    return easyvqa.instruction_records("train", answer_prompt, seed=config.seed, max_turns=stage.max_turns)


@register_source("easy-vqa:matches")
def _easyvqa_matches(config, stage, answer_prompt):
    return easyvqa.match_records("train", answer_prompt)


@register_source("easy-vqa:questions")
def _easyvqa_questions(config, stage, answer_prompt):
    return easyvqa.question_records("train", answer_prompt)


SCENES = "scenes"  # generated scenes: `scenes:KIND[:OPTION...]` (vlmkit.data.scenes.parse_source_name)


def _scenes_source(name: str):
    def records(config, stage, answer_prompt):
        format_boxes, format_ref = grounding.formatters(config.box_format)  # the preset's box format
        found = scenes.builtin_records(name, answer_prompt, config.caption_prompt, format_boxes, format_ref)
        if config.box_format == "minigpt_v2":
            found = [grounding.plain_phrases_in_questions(r) for r in found]
        return [grounding.with_task_token(r) for r in found] if config.task_prompts else found
    return records


for _kind in ("caption", "grounded_caption", "rec", "reg", "detection", "vqa", "all"):
    register_source(f"{SCENES}:{_kind}")(_scenes_source(f"{SCENES}:{_kind}"))


def _tabletop_source(name: str):
    def records(config, stage, answer_prompt):
        return tabletop.builtin_records(name)
    return records


for _view in tabletop.VIEWS:  # PaLM-E's tabletop: tabletop:VIEW[:train|test][:n<N>][:seed<N>]
    register_source(f"{tabletop.SOURCE_PREFIX}:{_view}")(_tabletop_source(f"{tabletop.SOURCE_PREFIX}:{_view}"))


for _k in compare.IMAGES:  # several images a record: compare:K[:KIND][:train|test][:n<N>][:seed<N>]
    register_source(f"{compare.SOURCE_PREFIX}:{_k}")(
        lambda config, stage, answer_prompt, _k=_k: compare.builtin_records(f"{compare.SOURCE_PREFIX}:{_k}"))


def parse_mixture(text: str) -> list[Source]:
    """A mixture from `SOURCE[=WEIGHT],...` or from a .json file holding a list of source objects."""
    text = text.strip()
    if not text:
        return []
    if text.endswith(".json") and "," not in text:
        path = Path(text)
        if not path.exists():
            raise ConfigError(f"mixture file {path} not found")
        try:
            items = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise ConfigError(f"{path}: a mixture file is a JSON list of objects with 'source' and 'weight'")
        known = {f for f in Source.__dataclass_fields__}
        sources = []
        for i, item in enumerate(items):
            unknown = set(item) - known
            if unknown or "source" not in item:
                raise ConfigError(f"{path}: entry {i} " + (f"has unknown field(s) {sorted(unknown)}" if unknown else
                                                           "has no 'source'") + f"; fields: {sorted(known)}")
            sources.append(Source(**item))
    else:
        sources = []
        for part in text.split(","):
            name, _, weight = part.strip().rpartition("=") if "=" in part else (part.strip(), "", "1")
            try:
                sources.append(Source(name.strip(), float(weight)))
            except ValueError:
                raise ConfigError(f"mixture entry {part.strip()!r}: the weight must be a number "
                                  "(SOURCE=WEIGHT)") from None
    for source in sources:
        if not (isinstance(source.weight, (int, float)) and source.weight >= 0 and math.isfinite(source.weight)):
            raise ConfigError(f"mixture source {source.source!r}: weight must be a number >= 0, "
                              f"got {source.weight!r}")
    if not any(source.weight > 0 for source in sources):
        raise ConfigError(f"mixture {text!r}: every weight is 0")
    return sources


def stage_sources(config, stage, data: DataSpec) -> list[Source]:
    """The sources a stage reads: its mixture, or the slot its `data` names."""
    if stage.mixture:
        return parse_mixture(stage.mixture)
    if stage.data == "captions":
        source = data.captions or (EASY_VQA if data.instructions == EASY_VQA else None)
        if source is None:
            raise ConfigError(f"stage {stage.name!r} reads captions: pass --caption-data FILE.json, or --stages to "
                              f"skip it, or give it a --{stage.name}.mixture")
        return [Source("easy-vqa:captions" if source == EASY_VQA else source)]
    if stage.data == "instructions":
        return [Source("easy-vqa:instructions" if data.instructions == EASY_VQA else data.instructions)]
    raise ConfigError(f"stage {stage.name!r}: unknown data kind {stage.data!r} (captions, instructions)")


def source_records(config, stage, source: Source) -> list[dict]:
    """The records of one source (a built-in one, or a LLaVA JSON/JSONL file)."""

    answer_prompt = config.answer_prompt if source.answer_prompt is None else source.answer_prompt
    if source.source in BUILTIN:
        return BUILTIN[source.source](config, stage, answer_prompt)
    if source.source.startswith(f"{SCENES}:"):  # with options, e.g. scenes:rec:shapes1:n20000
        return _scenes_source(source.source)(config, stage, answer_prompt)
    if source.source.startswith(f"{tabletop.SOURCE_PREFIX}:"):  # e.g. tabletop:state:test:n500
        return tabletop.builtin_records(source.source)
    if source.source.startswith(f"{compare.SOURCE_PREFIX}:"):  # e.g. compare:2:colour:n2000
        return compare.builtin_records(source.source)
    if source.source.startswith(f"{EASY_VQA}:") or source.source == EASY_VQA:
        raise ConfigError(f"unknown built-in source {source.source!r}; built-in: {', '.join(sorted(BUILTIN))}")
    return load_llava_json(source.source)


def build_dataset(model, records: list[dict], source: str, template_name: str,
                  data: DataSpec, mode: str = "train", answer_prompt: str = "", verbose: bool = True,
                  image_folder: str | None = None):
    """A validated ConversationDataset of `records` for `model` (its tokenizer, image transform, image tokens)."""
    builtin = source.startswith((EASY_VQA, f"{SCENES}:", f"{tabletop.SOURCE_PREFIX}:", f"{compare.SOURCE_PREFIX}:"))
    folder = None if builtin else (image_folder or data.image_folder)
    transform = model.image_transform
    if data.image_limits is not None and data.image_limits != transform.limits:
        transform = dataclasses.replace(transform, limits=data.image_limits)
    return ConversationDataset(records, model.tokenizer, get_template(template_name), transform,
                               num_image_tokens=model.num_image_tokens, max_length=model.config.max_length,
                               image_folder=folder, skip_bad=data.skip_bad, source=source, mode=mode,
                               answer_prompt=answer_prompt, verbose=verbose,
                               confine_images=data.confine_images and not builtin,
                               state_kinds=model.config.states.kinds, max_images=model.config.max_images)


def stage_dataset(model, config, stage, data: DataSpec,
                  verbose: bool = True):
    """The stage's sources read, validated and weighted into one dataset."""

    datasets, weights = [], []
    for source in stage_sources(config, stage, data):
        records = source_records(config, stage, source)
        datasets.append(build_dataset(model, records, source.source, source.template or stage.template
                                      or config.template, data, verbose=verbose, image_folder=source.image_folder))
        weights.append(source.weight)
    return ConversationDataset.concat(datasets, weights)
