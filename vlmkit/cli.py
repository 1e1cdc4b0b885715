"""The `vlmkit` command. Options of `train` and `demo` are generated from the preset's typed config, so
`vlmkit train --preset llava-1.5 --help` lists that preset's own defaults, and there is no second copy.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import textwrap
import time
from pathlib import Path

from vlmkit.archs import from_name
from vlmkit.config import (
    ArchConfig,
    ConnectorConfig,
    connector_fields,
    LLMConfig,
    LoRAConfig,
    StageConfig,
    StateConfig,
    VisionConfig,
)
from vlmkit.errors import VlmkitError

_PART_CLASSES = {"vision": VisionConfig, "connector": ConnectorConfig, "llm": LLMConfig, "states": StateConfig}
_SKIP_TOP = {"name", "scale", "vision", "connector", "llm", "states", "stages"}


# -- config -> argparse ---------------------------------------------------------------------------
def _parse_list(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _parse_int_or_list(text: str) -> int | list[int]:
    """'-2' -> -2; '-2,-5' -> [-2, -5] (a list of vision layers)."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or a comma-separated list of integers, not {text!r}")
    return values[0] if len(values) == 1 and "," not in text else values


def _parse_widths(text: str) -> dict[str, int]:
    """'obj=7,pose=3' -> {'obj': 7, 'pose': 3} (state kinds and their vector widths; '' = none)."""
    out = {}
    for part in (t.strip() for t in text.split(",") if t.strip()):
        name, _, width = part.partition("=")
        if not name.strip().isidentifier() or not width.strip().isdigit() or int(width) < 1:
            raise argparse.ArgumentTypeError(f"expected KIND=WIDTH,... (e.g. obj=7), not {text!r}")
        out[name.strip()] = int(width)
    return out


# short spellings users know from LLaVA's scripts, next to the dotted field names
_ALIASES = {"--vision.name-or-path": ["--vision-tower"], "--llm.name-or-path": ["--llm"]}


def _add_field(group, flag: str, dest: str, ftype: str, default, help_text: str) -> None:
    flags = [flag, *_ALIASES.get(flag, [])]
    shown = json.dumps(default) if not isinstance(default, str) else repr(default)
    help_text = f"{help_text} (default: {shown})"
    if ftype == "bool":
        group.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    elif ftype == "int | list[int]":
        group.add_argument(*flags, dest=dest, type=_parse_int_or_list, default=None, metavar="N[,N…]", help=help_text)
    elif ftype == "dict[str, int]":
        group.add_argument(*flags, dest=dest, type=_parse_widths, default=None, metavar="KIND=N,…", help=help_text)
    elif ftype.startswith("list"):
        group.add_argument(*flags, dest=dest, type=_parse_list, default=None, metavar="A,B", help=help_text)
    else:
        kind = {"int": int, "float": float}.get(ftype, str)
        group.add_argument(*flags, dest=dest, type=kind, default=None, metavar=ftype.upper(), help=help_text)


def add_config_arguments(parser: argparse.ArgumentParser, config: ArchConfig) -> None:
    """One flag per config field, with the preset's value as the shown default; dest is the dotted path."""
    top = parser.add_argument_group(f"model and run (preset {config.name}, scale {config.scale})")
    for f in dataclasses.fields(ArchConfig):
        if f.name not in _SKIP_TOP:
            _add_field(top, f"--{f.name.replace('_', '-')}", f"cfg:{f.name}", f.type, getattr(config, f.name),
                       f.metadata.get("help", ""))
    for part, cls in _PART_CLASSES.items():
        group = parser.add_argument_group(f"{part}" + (f" ({config.connector.type}: the fields it reads)"
                                                       if part == "connector" else ""))
        for f in dataclasses.fields(cls):
            if part == "connector" and f.name not in connector_fields(config.connector.type):
                continue  # another connector's field (--connector.type TYPE shows that type's)
            _add_field(group, f"--{part}.{f.name.replace('_', '-')}", f"cfg:{part}.{f.name}", f.type,
                       getattr(getattr(config, part), f.name), f.metadata.get("help", ""))
    for stage in config.stages:
        group = parser.add_argument_group(f"stage {stage.name!r}")
        for f in dataclasses.fields(StageConfig):
            if f.name in ("name", "lr", "lora"):
                continue
            _add_field(group, f"--{stage.name}.{f.name.replace('_', '-')}", f"cfg:stages.{stage.name}.{f.name}",
                       f.type, getattr(stage, f.name), f.metadata.get("help", ""))
        for f in dataclasses.fields(LoRAConfig):
            _add_field(group, f"--{stage.name}.lora.{f.name.replace('_', '-')}",
                       f"cfg:stages.{stage.name}.lora.{f.name}", f.type, getattr(stage.lora, f.name),
                       f.metadata.get("help", ""))
        for module in ("vision", "connector", "llm", "states"):
            _add_field(group, f"--{stage.name}.lr.{module}", f"cfg:stages.{stage.name}.lr.{module}", "float",
                       stage.lr.get(module), f"Peak learning rate of {module} when it trains in this stage.")


def config_overrides(args: argparse.Namespace) -> dict:
    return {key[4:].replace(".", "__"): value for key, value in vars(args).items()
            if key.startswith("cfg:") and value is not None}


def _preset_from_argv(argv: list[str], default: str) -> tuple[str, str, str | None]:
    """--preset, --scale and --connector.type, read first: the flags of `train` are those of that config."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=default)
    pre.add_argument("--scale", default="tiny")
    pre.add_argument("--connector.type", dest="connector_type", default=None)
    known, _ = pre.parse_known_args(argv)
    return known.preset, known.scale, known.connector_type


# -- commands -------------------------------------------------------------------------------------
def cmd_presets(args) -> int:
    from vlmkit.archs import design, names

    for name in names():
        config = from_name(name, scale=args.scale)
        print(f"{name}  [{config.scale}]  {design(name)}")
        print(f"  vision    {config.vision.name_or_path}  layer {config.vision.feature_layer}, {config.vision.select}"
              f"{', pad to square' if config.vision.pad_to_square else ''}")
        print(f"  connector {config.connector.type}")
        print(f"  llm       {config.llm.name_or_path}" + (", a visual expert in every layer" if
                                                           config.llm.visual_expert else ""))
        if config.states.kinds:
            print("  states    " + ", ".join(f"<{kind}>: {width} numbers" for kind, width in
                                             config.states.kinds.items()) + ", each through its own MLP")
        print(f"  template  {config.template}" + (f"; answer prompt {config.answer_prompt!r}" if config.answer_prompt
                                                 else ""))
        for i, stage in enumerate(config.stages, 1):
            lrs = ", ".join(f"{m} {lr:g}" for m, lr in stage.lr.items())
            lora = (f"; LLM via LoRA r={stage.lora.r} alpha={stage.lora.alpha:g}"
                    + (" (QLoRA 4-bit)" if stage.lora.quantize else "")) if stage.lora.r else ""
            print(f"  stage {i} {stage.name:<9} trains {'+'.join(stage.train):<16} on {stage.mixture or stage.data:<12} "
                  f"lr {lrs}; {stage.epochs:g} epoch(s), batch {stage.batch_size}x{stage.grad_accum}{lora}")
    designs = list(dict.fromkeys(design(name) for name in names()))
    print(f"{len(names())} presets of {len(designs)} designs: {', '.join(designs)}")
    return 0


def _image_limits(args):
    from vlmkit.data.images import ImageLimits

    return ImageLimits(args.max_image_pixels, args.max_image_side, args.max_image_aspect)


def _data_spec(args):
    from vlmkit.data.sources import DataSpec

    return DataSpec(instructions=args.data, captions=getattr(args, "caption_data", None),
                    image_folder=args.image_folder, skip_bad=args.skip_bad, confine_images=args.confine_images,
                    image_limits=_image_limits(args))


def cmd_train(args) -> int:
    from vlmkit.train.run import train_run

    stages = args.stages.split(",") if args.stages else None
    if args.init:  # the model's own config (parts, template, preset), with this command's run and stage settings
        from vlmkit.train.init import init_config, with_overrides

        config = with_overrides(init_config(args.init), config_overrides(args))
        if stages is None:  # what LLaVA's finetune_task scripts run: the instruction tuning, not the alignment
            stages = [config.stages[-1].name]
        print(f"--init {args.init}: preset {config.name}, template {config.template}; stage(s) {', '.join(stages)}")
    else:
        config = from_name(args.preset, scale=args.scale, **config_overrides(args))
    if args.dry_run:
        from vlmkit.train.plan import memory_plan_main

        return memory_plan_main(config, args.gpus, args.gpu_memory_gb)
    result = train_run(config, args.run_dir, _data_spec(args), stages=stages, resume=args.resume,
                       overwrite=args.overwrite, report_to=args.report_to, init=args.init,
                       allow_pickle=args.allow_pickle)
    print(f"done in {result['seconds']:.0f}s; model in {Path(args.run_dir) / 'model'}; "
          f"loss curve {Path(args.run_dir) / 'loss.png'}")
    return 0


def load_run(run: str, allow_pickle: bool = False, device: str = "auto", dtype: str | None = None):
    from vlmkit.io import resolve_device
    from vlmkit.model.vlm import VisionLanguageModel

    path = Path(run)
    if (path / "model" / "config.json").exists():
        path = path / "model"
    if not (path / "config.json").exists():
        raise VlmkitError(f"{run}: not a run directory or a vlmkit checkpoint (no config.json)")
    target = resolve_device(device)  # checked before the weights are read
    import torch

    return VisionLanguageModel.from_pretrained(path, allow_pickle=allow_pickle, device=target,
                                               dtype=getattr(torch, dtype) if dtype else None), path


def _stages_ran(run: str) -> set[str] | None:
    """The names of the stages a run finished (its `N-stage` checkpoint directories), or None."""
    from vlmkit.train.checkpoint import finished_stages

    return set(finished_stages(Path(run))) or None


def cmd_eval(args) -> int:
    from vlmkit.eval.vqa import run_eval

    if args.task is None and args.data is not None and args.data.startswith("scenes:"):
        raise VlmkitError(f"--data {args.data} is generated scenes: add --task rec|reg|caption|vqa")
    if args.task == "pope" and (args.data is not None or args.split not in (None, "test")):
        raise VlmkitError("--task pope asks about generated test scenes like those the run trained on; it takes no "
                          "--data or --split (--limit N: the first N scenes)")
    model, path = load_run(args.run, args.allow_pickle, args.device, args.dtype)
    model.image_transform = dataclasses.replace(model.image_transform, limits=_image_limits(args))
    out_dir = Path(args.run) if (Path(args.run) / "model").exists() else path
    if args.task == "pope":
        from vlmkit.eval.pope import DEFAULT_SCENES, run_pope_eval

        run_pope_eval(model, out_dir, n=DEFAULT_SCENES, limit=args.limit, batch_size=args.batch_size,
                      stages_ran=_stages_ran(args.run), max_new_tokens=args.max_new_tokens)
        return 0
    if args.task == "retrieval":
        from vlmkit.eval.retrieval import run_retrieval_eval

        run_retrieval_eval(model, args.data, out_dir, split=args.split or "test", limit=args.limit,
                           image_folder=args.image_folder)
        return 0
    if args.task == "tamp":
        from vlmkit.eval.tamp import run_tamp_eval

        run_tamp_eval(model, args.data, out_dir, limit=args.limit, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, skip_bad=args.skip_bad)
        return 0
    if args.task:
        from vlmkit.eval.grounding import run_grounding_eval

        run_grounding_eval(model, args.task, args.data, out_dir, split=args.split or "test",
                           image_folder=args.image_folder, skip_bad=args.skip_bad, limit=args.limit,
                           batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                           stages_ran=_stages_ran(args.run))
        return 0
    run_eval(model, args.data or "easy-vqa", args.split or "test", args.image_folder, args.skip_bad, out_dir,
             args.limit, args.batch_size, max_new_tokens=args.max_new_tokens or 8, confine_images=args.confine_images)
    return 0


def cmd_chat(args) -> int:
    from vlmkit.infer.chat import answer, first_user_turn, interactive, read_states
    from vlmkit.infer.generate import GenerationConfig

    if args.draw and not (args.image and len(args.image) == 1 and args.question):
        raise VlmkitError("--draw needs one --image and a question (it draws the boxes of that one answer)")
    model, _ = load_run(args.run, args.allow_pickle, args.device, args.dtype)
    model.image_transform = dataclasses.replace(model.image_transform, limits=_image_limits(args))
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)
    if args.question:
        question = " ".join(args.question)
        if model.config.answer_prompt and args.short:
            question = f"{question}\n{model.config.answer_prompt}"
        images = args.image or []
        messages = [{"role": "user", "content": first_user_turn(question, len(images))}]
        reply = answer(model, messages, images, config,
                       states=read_states(args.states) if args.states else None)
        print(reply)
        if args.draw:
            from vlmkit.eval.grounding import draw_answer_boxes

            drawn, error = draw_answer_boxes(args.image[0], reply, model.config.box_format, args.draw)
            fmt = model.config.box_format
            if drawn:
                note = f" (also: {error})" if error else ""
                print(f"drew {drawn} box{'es' if drawn != 1 else ''} ({fmt} format) on {args.draw}{note}",
                      file=sys.stderr)
            else:
                print(f"no box drawn on {args.draw}: {error} ({fmt} format)", file=sys.stderr)
    else:
        if args.states:
            raise VlmkitError("--states goes with a one-off question (the interactive loop takes images only)")
        interactive(model, args.image, config)
    return 0


def cmd_serve(args) -> int:
    import os

    from vlmkit.serve import ServeSettings
    from vlmkit.serve.app import serve

    model, path = load_run(args.run, args.allow_pickle, args.device, args.dtype)
    name = args.model_name or (Path(args.run).resolve().name if path.name == "model" else path.resolve().name)
    settings = ServeSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeSettings)})
    api_key = args.api_key or os.environ.get("VLMKIT_API_KEY") or None
    print(f"vlmkit: serving {name!r} ({model.config.name}) on http://{args.host}:{args.port}/ "
          f"— chat page at /, OpenAI API at /v1" + (", API key required" if api_key else ""), flush=True)
    serve(model, name, args.host, args.port, settings, api_key, args.log_level)
    return 0


_DTYPES = ("bfloat16", "float16", "float32")


def cmd_convert(args) -> int:
    import torch

    from vlmkit import convert

    dtype = getattr(torch, args.dtype) if getattr(args, "dtype", None) else None
    if args.direction == "to-hf":
        model, _ = load_run(args.src, args.allow_pickle, device=args.device, dtype=args.dtype)  # read in that dtype
        out = convert.to_hf(model, args.out)
        kind = "Blip2" if model.config.connector.type == "qformer" else "Llava"
        print(f"wrote {out}: loads with {kind}ForConditionalGeneration.from_pretrained and "
              "AutoProcessor.from_pretrained")
        return 0
    from vlmkit.io import resolve_device

    device = resolve_device(args.device)
    if args.direction == "from-hf":
        model = convert.from_hf(args.src, dtype=dtype, device_map=device if device.type != "cpu" else None)
    elif args.direction == "from-minigpt4":
        model = convert.from_minigpt4(args.src, args.blip2, args.llm, allow_pickle=args.allow_pickle,
                                      dtype=dtype).to(device)
    else:
        model = convert.from_llava_original(args.src, vision_tower=args.vision_tower, allow_pickle=args.allow_pickle,
                                            dtype=dtype).to(device)  # read on the CPU (its weights are assembled)
    model.save_pretrained(args.out)
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in model.parts().items()}
    print(f"wrote {args.out} (preset {model.config.name}; " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in
                                                                       counts.items()) + " parameters)")
    return 0


def cmd_build_tiny(args) -> int:
    from vlmkit.tiny import NAMES, ensure, tiny_dir

    for name in NAMES:
        start = time.time()
        ensure(name)
        print(f"{name}: {tiny_dir(name)} ({time.time() - start:.0f}s)")
    return 0


def cmd_demo(args) -> int:
    from vlmkit.data import easyvqa
    from vlmkit.eval.vqa import run_eval
    from vlmkit.infer.chat import answer, first_user_turn
    from vlmkit.tiny import ensure, used_by
    from vlmkit.data.sources import DataSpec
    from vlmkit.train.run import train_run

    run_dir = Path(args.run_dir)
    phases = {}
    start = time.time()
    config = from_name(args.preset, scale="tiny", **config_overrides(args))
    for name in used_by(config):  # only this preset's: the grounding presets' scenes tower is minutes more
        phase = time.time()
        ensure(name)
        phases[f"backbone {name}"] = time.time() - phase
    result = train_run(config, run_dir, DataSpec(), resume=args.resume, overwrite=True)  # a re-run starts over
    phases["model build"] = result["build_seconds"]
    for stage in result["stages"]:
        phases[f"stage {stage['stage']}"] = stage["seconds"]
    phase = time.time()
    report = run_eval(result["model"], "easy-vqa", "test", None, False, run_dir, limit=args.eval_limit)
    phases["evaluation"] = time.time() - phase
    questions, paths = easyvqa.load_split("test")
    question = questions[0]
    text = f"{question.text}\n{config.answer_prompt}" if config.answer_prompt else question.text
    reply = answer(result["model"], [{"role": "user", "content": first_user_turn(text, True)}], [paths[question.image_id]])
    total = time.time() - start
    print(f"\nchat: [{paths[question.image_id]}] {question.text!r} -> {reply!r} (reference {question.answer!r})")
    print("\nphase                     seconds")
    for name, seconds in phases.items():
        print(f"  {name:<24}{seconds:8.1f}")
    print(f"  {'total':<24}{total:8.1f}")
    print(f"\neasy-VQA test accuracy {report['accuracy']:.2%} over {report['total']} questions; "
          f"wall time {total / 60:.1f} min; everything is in {run_dir}/")
    (run_dir / "demo.json").write_text(json.dumps({"accuracy": report["accuracy"], "total": report["total"],
                                                   "per_kind": report.get("per_kind", {}),
                                                   "phases_seconds": phases, "wall_seconds": total,
                                                   "chat": {"question": question.text, "answer": reply,
                                                            "reference": question.answer}}, indent=2))
    return 0


def cmd_reproduce(args) -> int:
    from vlmkit.archs import names
    from vlmkit.tiny.reproduce import reproduce

    presets = names() if args.presets == ["all"] else args.presets
    reproduce(presets, args.seeds, args.out, eval_limit=args.eval_limit, fresh=args.fresh)
    return 0


def cmd_data_glyphs(args) -> int:
    from vlmkit.data.glyphs import write_glyphs

    start = time.time()
    path = write_glyphs(args.out, args.n, split=args.split, seed=args.seed, chars=args.chars, kinds=tuple(args.kinds))
    print(f"wrote {args.n} {args.split} glyph records (seed {args.seed}) in {time.time() - start:.1f}s: {path}, "
          f"images in {Path(args.out) / args.split}/")
    print(f"train on them with e.g. vlmkit train --preset llava-1.5 --data {path} --image-folder {args.out} "
          "--stages instruct")
    return 0


def _generator_args(parser, n: int, what: str, splits: list[str]) -> None:
    """--out, --n, --split, --seed of a `vlmkit data` generator."""
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--n", type=int, default=n, help=f"number of {what} (default {n})")
    parser.add_argument("--split", choices=splits, default="train")
    parser.add_argument("--seed", type=int, default=0)


def cmd_data_tabletop(args) -> int:
    from vlmkit.data import tabletop

    start = time.time()
    path = tabletop.write_tabletop(args.out, args.n, split=args.split, seed=args.seed)
    questions = json.loads(path.read_text())
    written = []
    for view in args.views:
        out = Path(args.out) / f"{args.split}_{view}.json"
        out.write_text(json.dumps(tabletop.records(questions, view)))
        written.append(out)
    print(f"wrote {args.n} {args.split} tabletop scenes ({len(questions)} questions, seed {args.seed}) in "
          f"{time.time() - start:.1f}s: images in {Path(args.out) / args.split}/")
    for view, out in zip(args.views, written):
        print(f"  {view:<6}{out}")
    print(f"train on them with e.g. vlmkit train --preset palm-e --encoders.mixture {written[0]} "
          f"--cotrain.mixture {written[0]} --image-folder {args.out}")
    return 0


def cmd_data_compare(args) -> int:
    from vlmkit.data import compare

    start = time.time()
    path = compare.write_compare(args.out, args.n, args.images, split=args.split, seed=args.seed)
    print(f"wrote {args.n} {args.split} records of {args.images} images (seed {args.seed}) in "
          f"{time.time() - start:.1f}s: {path}, images in {Path(args.out) / args.split}/")
    return 0


def cmd_data_scenes(args) -> int:
    from vlmkit.data.scenes import write_scenes

    start = time.time()
    paths = write_scenes(args.out, args.n, split=args.split, seed=args.seed, kinds=args.kinds, size=args.size,
                         max_shapes=args.max_shapes)
    print(f"wrote {args.n} {args.split} scenes ({args.size}x{args.size} px, 1-{args.max_shapes} shapes, seed "
          f"{args.seed}) in {time.time() - start:.1f}s: images in {paths.pop('images')}/, objects in "
          f"{paths.pop('scenes')}")
    for kind, path in paths.items():
        print(f"  {kind:<17}{path}")
    print(f"train on them with e.g. --data {next(iter(paths.values()))} --image-folder {args.out}")
    return 0


# -- parser ---------------------------------------------------------------------------------------
def _add_device(parser) -> None:
    parser.add_argument("--device", default="auto",
                        help="auto (a CUDA GPU when one is visible, else the CPU), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=_DTYPES, default=None,
                        help="load the weights in this dtype, straight onto --device one tensor at a time (bfloat16 "
                             "halves the memory; default: as saved, float32)")


def _add_image_limits(parser, pixels: int = 40_000_000, side: int = 16_384, aspect: float = 50.0,
                      confine: bool = True) -> None:
    group = parser.add_argument_group("image limits (checked on each image's header, before decoding)")
    group.add_argument("--max-image-pixels", type=int, default=pixels,
                       help="largest image (width x height), and largest image made of it by padding to a square "
                            "or resizing")
    group.add_argument("--max-image-side", type=int, default=side, help="longest side of an image")
    group.add_argument("--max-image-aspect", type=float, default=aspect, help="largest long side / short side")
    if confine:
        group.add_argument("--confine-images", action="store_true",
                           help="refuse records whose image paths lead outside --image-folder (absolute paths, '..', "
                                "links out of it); without it such paths are read as written")


def add_options(parser, cls, skip: tuple = ()) -> None:
    """One flag per field of a command's settings dataclass (`ChatOptions`, `EvalOptions`, `ServerOptions`): its
    default and help are the field's, so they are written once; dest is the field name."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        extra = {key: meta[key] for key in ("choices", "metavar") if key in meta}
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction if f.default else "store_true",
                                default=f.default, help=meta["help"])
        else:
            kind = meta.get("kind") or type(f.default)
            parser.add_argument(flag, dest=f.name, type=kind, default=f.default, help=meta["help"], **extra)


def _add_serve_settings(parser) -> None:
    """`vlmkit serve`'s limits and defaults, one flag per ServeSettings field (its default and help are there)."""
    from vlmkit.serve.protocol import ServeSettings

    fields = {f.name: f for f in dataclasses.fields(ServeSettings)}
    for f in fields.values():
        if f.metadata.get("image_limit"):  # in the image-limits group below, as every command has it
            continue
        flag, text = f.metadata.get("flag") or "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.metadata.get("repeat"):
            parser.add_argument(flag, dest=f.name, action="append", default=[], help=text,
                                metavar=flag.rsplit("-", 1)[-1].upper())
        elif isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action="store_true", help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=type(f.default), default=f.default, help=text)
    _add_image_limits(parser, pixels=fields["max_image_pixels"].default, side=fields["max_image_side"].default,
                      aspect=fields["max_image_aspect"].default, confine=False)


def _add_allow_pickle(parser) -> None:
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read pickled .bin/.pt weights (with torch.load(weights_only=True)); only for files you "
                             "trust")


def _add_convert_paths(parser, src_help: str, out_help: str, dtype_help: str) -> None:
    parser.add_argument("src", help=src_help)
    parser.add_argument("out", help=out_help)
    parser.add_argument("--dtype", choices=_DTYPES, help=dtype_help)
    parser.add_argument("--device", default="cpu",
                        help="where the weights are loaded on their way (default cpu: converting only reads and writes "
                             "files, tensor by tensor; auto, cuda or cuda:N to load onto a GPU)")


_TRAIN_EXAMPLES = """examples:
  vlmkit train --preset llava-1.5 --data mine.json --image-folder imgs/ --caption-data caps.json
  vlmkit train --llm ./my-qwen2 --template chatml          # the LLM's own tokenizer; answers stop on <|im_end|>
  # a stage reading weighted sources (weight 1 = each record once per epoch, 0.5 = a random half):
  vlmkit train --instruct.mixture "easy-vqa:instructions=1,mine.json=0.5" --image-folder imgs/
  # a long list in a file: [{"source": "mine.json", "weight": 2, "image_folder": "imgs", "template": "chatml"}]
  vlmkit train --instruct.mixture mix.json --instruct.pack-to 1024   # samples packed into 1024-token rows
  vlmkit train ... --workers 4 --feature-cache-gb 16     # image-decoding processes; frozen-feature cache budget
  vlmkit train --scale paper --dry-run --gpus 8 --gpu-memory-gb 80   # memory per GPU, before anything downloads
  vlmkit train --init llava-hf/llava-1.5-7b-hf --data task.json --image-folder imgs/ --instruct.lora.r 128
  vlmkit train ... --report-to tensorboard                # then: tensorboard --logdir RUN_DIR/runs
"""


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmkit", description="Vision-language models from shared parts (vision encoder -> connector -> LLM), "
                                   "trained with each paper's staged recipe.",
        epilog="Start with `vlmkit demo`; `vlmkit presets` lists architectures; `vlmkit COMMAND --help` for more.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from vlmkit.eval import EvalOptions
    from vlmkit.infer.chat import ChatOptions
    from vlmkit.serve.protocol import ServerOptions

    p = sub.add_parser("presets", help="list every preset with its parts and stages")
    p.add_argument("--scale", default="tiny", choices=["tiny", "paper"])
    p.set_defaults(func=cmd_presets)

    command = next((a for a in argv if not a.startswith("-")), None)
    preset, scale, connector_type = _preset_from_argv(argv, "llava-1.5")
    config = None
    if command in ("train", "demo"):
        try:
            config = from_name(preset, scale="tiny" if command == "demo" else scale,
                               **({"connector": {"type": connector_type}} if connector_type else {}))
        except KeyError as exc:
            raise VlmkitError(str(exc).strip('"')) from None

    p = sub.add_parser("train", help="train a preset through its stages",
                       description="Train a preset through its stages. Each flag below is a field of the preset's "
                                   "config; the defaults shown are this preset's.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_TRAIN_EXAMPLES)
    p.add_argument("--preset", default="llava-1.5", help="architecture preset (see `vlmkit presets`)")
    p.add_argument("--scale", default="tiny", choices=["tiny", "paper"], help="backbone scale")
    p.add_argument("--run-dir", default="runs/train", help="where checkpoints, logs and the loss curve go")
    p.add_argument("--data", default="easy-vqa", help="'easy-vqa' or a LLaVA JSON file for instruction stages")
    p.add_argument("--caption-data", default=None, help="LLaVA JSON with image-caption pairs for caption stages")
    p.add_argument("--image-folder", default=None, help="folder that the records' image paths are relative to")
    p.add_argument("--stages", default=None, help="comma-separated stage names to run (default: all)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad records and count them instead of stopping")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in --run-dir: a step checkpoint (--save-every) "
                        "continues mid-stage exactly; a stage checkpoint continues with the next stage. It is "
                        "refused if the checkpoint's data, batch size, seed or process count differ from this run's")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a --run-dir that holds another run's checkpoints (they are deleted); without "
                        "it such a directory is refused")
    p.add_argument("--init", default=None, metavar="SOURCE",
                   help="fine-tune an existing model instead of assembling backbones: a vlmkit run directory or "
                        "checkpoint, or a Hugging Face LLaVA directory or hub id (llava-hf/llava-1.5-7b-hf). It keeps "
                        "its parts, weights, tokenizer, template and preset; the flags here change run and stage "
                        "settings only; --stages defaults to the preset's last stage (instruction tuning), full or "
                        "LoRA (--instruct.lora.r 128), as LLaVA's finetune_task.sh / finetune_task_lora.sh")
    p.add_argument("--dry-run", action="store_true",
                   help="build the model on the meta device (configs only, no weights are read) and print, per stage "
                        "and per GPU, parameter, gradient, optimizer-state and activation memory under DDP, ZeRO-2, "
                        "FSDP, LoRA and QLoRA, and what fits; exit status 1 when the configured run does not fit")
    p.add_argument("--gpus", type=int, default=None, help="GPU count for --dry-run (default: the visible GPUs, or 1)")
    p.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="memory per GPU in GiB for --dry-run (default: the first GPU's, or 80)")
    p.add_argument("--report-to", default=["none"], type=_parse_list, metavar="NAME[,NAME]",
                   help="also log the per-step loss, learning rates, grad norm and throughput to: none, tensorboard "
                        "(RUN_DIR/runs: tensorboard --logdir RUN_DIR/runs), wandb (offline unless WANDB_MODE is set "
                        "or you are logged in). train_log.jsonl and loss.png are always written")
    if config is not None and command == "train":
        add_config_arguments(p, config)
    _add_image_limits(p)
    _add_allow_pickle(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="the main job: tiny llava-1.5 on easy-VQA, both stages, full test evaluation",
                       description="Build the tiny backbones if the cache lacks them ($VLMKIT_HOME, default "
                                   "~/.cache/vlmkit), train tiny llava-1.5 on easy-VQA through both stages, evaluate "
                                   "on all 9,673 test questions, answer one chat question.")
    p.add_argument("--preset", default="llava-1.5", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default="runs/demo", help="where everything is written")
    p.add_argument("--eval-limit", type=int, default=0, help="evaluate only the first N test questions (0 = all)")
    p.add_argument("--resume", action="store_true", help="reuse completed stages in --run-dir")
    if config is not None and command == "demo":
        add_config_arguments(p, config)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("reproduce", help="the scoreboard: train each preset's tiny recipe over seeds and measure its "
                                         "paper's skills on held-out data (table + PNG)",
                       description=textwrap.fill(
                           "For each preset and seed: build the tiny backbones it names (once), train its tiny "
                           "recipe through all stages into OUT/runs/PRESET-sSEED, then measure each skill the preset "
                           "lists: easy-VQA accuracy (full test split), retrieval R@1 (BLIP-2's stage 1), REC "
                           "Acc@0.5 / REG / scene VQA on held-out scenes, a POPE-style hallucination probe, and "
                           "TAMP questions and executed plans (PaLM-E). "
                           "Results go to OUT/scoreboard.json as each run finishes (a rerun resumes: what is there "
                           "is kept), then OUT/scoreboard.md (preset x metric: mean, min-max over seeds, target, "
                           "training time) and OUT/scoreboard.png. A run takes 5-25 minutes per preset and seed on 2 "
                           "CPU cores.", 100),
                       epilog="examples:\n  vlmkit reproduce llava-1.5 --seeds 3\n  vlmkit reproduce all --out "
                              "scoreboard/\n  vlmkit reproduce minigpt4 blip2 --eval-limit 500   # a quicker look",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("presets", nargs="+", metavar="PRESET", help="preset names (vlmkit presets), or all")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 for each preset (default 1)")
    p.add_argument("--out", default="scoreboard", help="where the runs, scoreboard.json/.md/.png go")
    p.add_argument("--eval-limit", type=int, default=0,
                   help="measure each skill on its first N questions / scenes / candidates only (0 = all)")
    p.add_argument("--fresh", action="store_true", help="measure every preset and seed again, discarding OUT's results")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("eval", help="exact-match accuracy on easy-VQA or a LLaVA JSON of short answers; "
                                    "--task rec|reg|caption|vqa: grounding metrics on held-out scenes; "
                                    "--task retrieval: a Q-Former's image-text retrieval; --task pope: "
                                    "object hallucination (yes/no about present and absent objects)",
                       description="Without --task: normalised exact-match accuracy on easy-VQA or a LLaVA JSON of "
                                   "short answers (eval_<name>.json, confusion_<name>.png). With --task: the test "
                                   "split of the generated scenes (never a training layout), written as the run's "
                                   "preset writes them (box format, task tokens); rec: accuracy at IoU >= 0.5 and "
                                   "mean IoU, unparseable answers counted by reason; reg: exact / valid-phrase / "
                                   "colour+shape match and token F1; caption: colour+shape precision and recall; "
                                   "vqa: accuracy per question type; pope: 'Is there a red circle?' about every "
                                   "colour+shape in 500 test scenes and as many absent ones (random, popular, "
                                   "adversarial), accuracy, F1 and yes-ratio per setting. Writes eval_<task>.json "
                                   "and eval_<task>.png "
                                   "(16 test images, true boxes green, predicted red) in the run directory.")
    p.add_argument("run", help="run directory or checkpoint")
    add_options(p, EvalOptions)
    _add_allow_pickle(p)
    _add_device(p)
    _add_image_limits(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("chat", help="ask about an image (one answer) or chat interactively (no question)")
    p.add_argument("run", help="run directory or checkpoint")
    p.add_argument("question", nargs="*", help="the question; omit it for an interactive chat")
    p.add_argument("--image", action="append", default=None,
                   help="image file; repeat for several (up to the model's max_images): they go before the question as "
                        "'Image 1: <image>' lines, or where the question writes <image>, one per image")
    add_options(p, ChatOptions)
    _add_allow_pickle(p)
    _add_device(p)
    _add_image_limits(p, confine=False)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="serve a run over an OpenAI-compatible API, with a web chat page at /",
                       description="Serve a run (any preset) over HTTP: POST /v1/chat/completions in the OpenAI "
                                   "format (text and image_url parts with data: URIs, streaming), GET /v1/models, "
                                   "GET /health, and a chat page at /. Every limit refuses with a 4xx naming it.",
                       epilog="example: vlmkit serve runs/demo --port 8000, then open http://127.0.0.1:8000/ or "
                              "point an OpenAI client at http://127.0.0.1:8000/v1",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="run directory or checkpoint")
    add_options(p, ServerOptions)
    _add_serve_settings(p)
    _add_allow_pickle(p)
    _add_device(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("convert", help="import a Hugging Face or original-LLaVA checkpoint, or export to Hugging Face",
                       description="Move checkpoints between vlmkit and the formats LLaVA users have. Every config "
                                   "field that changes the computation is carried over or refused with a reason.")
    directions = p.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    c = directions.add_parser("from-hf", help="transformers LlavaForConditionalGeneration (dir or hub id) -> vlmkit",
                              description="Import a Hugging Face LLaVA directory (config.json with vision_config/"
                                          "text_config, safetensors, tokenizer, processor) as a vlmkit llava-1.5 "
                                          "checkpoint. Example: vlmkit convert from-hf llava-hf/llava-1.5-7b-hf out/")
    _add_convert_paths(c, "directory or hub id", "vlmkit checkpoint directory to write",
                       "load and save in this dtype (default: the checkpoint's)")
    c = directions.add_parser("from-llava", help="original LLaVA repository checkpoint (mm_vision_tower…) -> vlmkit",
                              description="Import a haotian-liu/LLaVA checkpoint (LlavaLlamaForCausalLM: mm_* config "
                                          "keys, model.mm_projector.* weights). The vision tower is loaded from the "
                                          "config's mm_vision_tower unless --vision-tower names a local copy.")
    _add_convert_paths(c, "checkpoint directory", "vlmkit checkpoint directory to write",
                       "convert the weights to this dtype")
    c.add_argument("--vision-tower", default=None, help="local directory (or hub id) of the CLIP tower to use")
    _add_allow_pickle(c)
    c = directions.add_parser("from-minigpt4", help="MiniGPT-4 projection file + BLIP-2 checkpoint + LLM -> vlmkit",
                              description="MiniGPT-4's released checkpoints hold only its projection (llama_proj). "
                                          "This builds the minigpt4 preset from a Hugging Face BLIP-2 checkpoint (its "
                                          "ViT and Q-Former) and --llm, and loads the projection into it. Example: "
                                          "vlmkit convert from-minigpt4 pretrained_minigpt4.pth out/ --blip2 "
                                          "Salesforce/blip2-flan-t5-xxl --llm ./vicuna-13b-v0 --allow-pickle")
    _add_convert_paths(c, "the MiniGPT-4 checkpoint file (.pth, or .safetensors)", "vlmkit checkpoint directory to "
                       "write", "load and save in this dtype")
    c.add_argument("--blip2", required=True, help="Hugging Face BLIP-2 directory or hub id (ViT + Q-Former)")
    c.add_argument("--llm", required=True, help="the LLM it was trained with (Vicuna-v0), directory or hub id")
    _add_allow_pickle(c)
    c = directions.add_parser("to-hf", help="vlmkit run or checkpoint -> transformers Llava / Blip2 "
                                            "ForConditionalGeneration",
                              description="Export for LlavaForConditionalGeneration.from_pretrained and "
                                          "AutoProcessor.from_pretrained (with a chat template matching the preset's). "
                                          "Needs a ViT tower (CLIP/SigLIP) and the mlp2x_gelu connector. A Q-Former "
                                          "model is written as Blip2ForConditionalGeneration + Blip2Processor (a "
                                          "Blip2VisionModel tower, a Q-Former reading the image alone).")
    _add_convert_paths(c, "run directory or vlmkit checkpoint", "directory to write", "save in this dtype")
    _add_allow_pickle(c)
    p.set_defaults(func=cmd_convert)

    from vlmkit.data import scenes  # the defaults below are write_scenes' own

    defaults = {name: param.default for name, param in inspect.signature(scenes.write_scenes).parameters.items()}
    p = sub.add_parser("data", help="generate data sets (scenes of shapes with exact boxes; glyphs)")
    datasets = p.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    d = datasets.add_parser("scenes", help="seeded scenes of coloured shapes: captions, grounding, REC/REG, "
                                           "detection and VQA records",
                            description="Write N seeded scenes (PNGs in OUT/SPLIT/) and one LLaVA JSON per record "
                                        "kind (OUT/SPLIT_KIND.json); the same arguments give the same bytes, and "
                                        "train and test scenes never share a layout. Boxes in the text are "
                                        "placeholders (<box:i>, <ref>...</ref>) that a preset renders; every "
                                        "record also holds its pixel boxes, image size and objects.")
    _generator_args(d, 10_000, "scenes", list(scenes.SPLIT_BUCKETS))
    d.add_argument("--kinds", type=_parse_list, default=list(defaults["kinds"]),
                   help=f"comma-separated record kinds (default all: {','.join(scenes.KINDS)})")
    d.add_argument("--size", type=int, default=defaults["size"], help="image side in pixels (e.g. 64, 224, 448)")
    d.add_argument("--max-shapes", type=int, default=defaults["max_shapes"],
                   help="at most this many shapes a scene (the curriculum knob: 1 first, more later)")
    d.set_defaults(func=cmd_data_scenes)
    from vlmkit.data import glyphs

    g = datasets.add_parser("glyphs", help="seeded images of one coloured digit (or letter) on a textured "
                                           "background, one question each: a small VQA set of a new domain",
                            description="Write N seeded 64-px images of one character (PNGs in OUT/SPLIT/) and "
                                        "OUT/SPLIT.json in LLaVA format, one question per record: which digit, "
                                        "its colour, top or bottom, left or right, the background pattern: a "
                                        "domain the tiny backbones were not pretrained on. Splits use separate "
                                        "random streams; the same arguments give the same bytes.")
    _generator_args(g, 1500, "images and records", list(glyphs.SPLIT_SALT))
    g.add_argument("--chars", default=glyphs.DIGITS, help="characters to draw (default the digits 0-9)")
    g.add_argument("--kinds", type=_parse_list, default=list(glyphs.QUESTIONS),
                   help=f"comma-separated question kinds (default all: {','.join(glyphs.QUESTIONS)})")
    g.set_defaults(func=cmd_data_glyphs)
    from vlmkit.data import compare, tabletop

    t = datasets.add_parser("tabletop", help="PaLM-E's tabletop world: blocks as state vectors, as images, or both, "
                                             "with TAMP questions and plans",
                            description="Write N seeded tabletop scenes (side-view PNGs in OUT/SPLIT/), every "
                                        "question with its scene and state vectors (OUT/SPLIT_questions.json) and "
                                        "one LLaVA JSON per view (OUT/SPLIT_VIEW.json; states in each record's "
                                        "'states'). Plans are scored by executing them (vlmkit eval --task tamp).")
    _generator_args(t, tabletop.SOURCE_DEFAULTS["train"], "scenes", list(tabletop.SOURCE_DEFAULTS))
    t.add_argument("--views", type=_parse_list, default=list(tabletop.VIEWS),
                   help=f"comma-separated views (default all: {','.join(tabletop.VIEWS)})")
    t.set_defaults(func=cmd_data_tabletop)
    c = datasets.add_parser("compare", help="questions about 2 or 3 images at once (which has more shapes; same "
                                            "colour or not)",
                            description="Write N seeded records of K scene images each (PNGs in OUT/SPLIT/) and "
                                        "OUT/SPLIT_compareK.json, the images as 'Image 1: <image>' lines before "
                                        "the question.")
    _generator_args(c, compare.SOURCE_DEFAULTS["train"], "records", list(compare.SOURCE_DEFAULTS))
    c.add_argument("--images", type=int, choices=list(compare.IMAGES), default=2, help="images a record")
    c.set_defaults(func=cmd_data_compare)

    p = sub.add_parser("build-tiny", help="pretrain the tiny backbones into the cache (normally done on first need)")
    p.set_defaults(func=cmd_build_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vlmkit.train.loop import TrainingInterrupted

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # loading reports (e.g. CLIP's unused text weights) are not for users
        hf_logging.disable_progress_bar()
        parser = build_parser(argv)
        args, extra = parser.parse_known_args(argv)
        if args.command == "chat" and extra and not any(a.startswith("-") for a in extra):
            args.question = list(args.question) + extra  # `chat RUN --image F "question"`: words after options
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args.func(args)
    except TrainingInterrupted as exc:
        print(f"vlmkit: {exc}", file=sys.stderr)
        return 130
    except VlmkitError as exc:
        print(f"vlmkit: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, KeyError) as exc:
        print(f"vlmkit: error: {str(exc).strip(chr(34))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlmkit: interrupted", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun: leave the process group before the interpreter exits (left to exit, gloo's threads can
    abort a rank — 'terminate called without an active exception' — after its run has finished)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
