"""Tiny backbones that vlmkit pretrains itself, offline, and saves in Hugging Face format.

`resolve("tiny:vision")` / `resolve("tiny:llama")` return a local directory that the presets then load with
`from_pretrained`, exactly as they would a hub checkpoint. The first call builds what the cache lacks
(tokenizer -> language model -> vision tower), with progress bars; later calls only look the directory up.
The data is easy-VQA's **training** split only (tiny:scenes-vision, the grounding presets' tower: generated
scenes of the training split); no test image or question is ever seen.
"""
from __future__ import annotations

from pathlib import Path

from vlmkit.io import cache_home, register_scheme

# v2: the LM corpus is rendered by the shared renderer (vlmkit.data.render); v3: LM init std 0.2, " yes" one token
# v4: tiny:qformer (blip2 stage 1) trains without dropout; v5: the LM has 8 attention heads of 16 (was 4 of 32)
VERSION = "v5"
PREFIX = "tiny:"
NAMES = ("tokenizer", "llama", "vision", "scenes-vision", "bert", "qformer",  # qformer: blip2's stage 1, trained
         "t5")  # t5: an encoder-decoder LM (blip2-t5)


def tiny_dir(name: str) -> Path:
    return cache_home() / f"tiny-{VERSION}" / name


def is_tiny(name_or_path: str) -> bool:
    return isinstance(name_or_path, str) and name_or_path.startswith(PREFIX)


def resolve(name_or_path: str, verbose: bool = True) -> str:
    """Map 'tiny:NAME' to its cache directory, building it on first need; other strings pass through."""
    if not is_tiny(name_or_path):
        return name_or_path
    name = name_or_path[len(PREFIX):]
    if name not in NAMES:
        raise ValueError(f"unknown tiny backbone {name_or_path!r}; available: {', '.join(PREFIX + n for n in NAMES)}")
    ensure(name, verbose=verbose)
    return str(tiny_dir(name))


def used_by(config) -> list[str]:
    """The tiny backbones a config names (LLM, vision tower, the Q-Former's BERT), after the tokenizer they share;
    [] if none."""
    used = [n[len(PREFIX):] for n in (config.llm.name_or_path, config.vision.name_or_path,
                                      config.connector.name_or_path) if is_tiny(n)]
    return list(dict.fromkeys(["tokenizer", *used])) if used else []


def ensure(name: str, verbose: bool = True) -> Path:
    from vlmkit.tiny import build  # start-up: `import vlmkit` registers the scheme without torch (1.4 s)

    path = tiny_dir(name)
    if (path / "config.json").exists() or (name == "tokenizer" and (path / "tokenizer.json").exists()):
        return path
    if name != "tokenizer":
        ensure("tokenizer", verbose)
    getattr(build, f"build_{name.replace('-', '_')}")(path, tokenizer_dir=tiny_dir("tokenizer"), verbose=verbose)
    return path


def resolve_config(name_or_path: str) -> str:
    """'tiny:NAME' -> a directory with what its configuration says (config.json, the preprocessor's, the tokenizer),
    without pretraining anything: the built backbone's own directory when the cache has it, else one written from
    the build's constants (`build.config_only`; the tokenizer and the BERT, which train nothing, are built)."""
    name = name_or_path[len(PREFIX):]
    if name not in NAMES:
        raise ValueError(f"unknown tiny backbone {name_or_path!r}; available: {', '.join(PREFIX + n for n in NAMES)}")
    built = tiny_dir(name)
    if name in ("tokenizer", "bert") or (built / "config.json").exists():
        return str(ensure(name, verbose=False))
    path = cache_home() / f"tiny-{VERSION}-configs" / name
    if not (path / "config.json").exists():
        from vlmkit.tiny import build  # start-up: `import vlmkit` registers the scheme without torch (1.4 s)

        build.config_only(name, path, ensure("tokenizer", verbose=False),
                          ensure("bert", verbose=False) if name == "qformer" else None)
    return str(path)


register_scheme(PREFIX, resolve, resolve_config)
