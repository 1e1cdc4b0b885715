"""Presets: one small data file per architecture, registered by name.

Each module in this package defines `PRESET`: a nested dict with the fields of `vlmkit.config.ArchConfig`
plus `scales`, a mapping from scale name ('tiny', 'paper') to the fields that differ at that scale, and
`design`: the paper's design it belongs to (LLaVA-1.5 has two presets), and
`skills`: what the paper's model does that `vlmkit reproduce` measures after the tiny recipe, each with the
target its issue set (a fraction, or None), optionally measured after a named stage instead of the last.
Adding an architecture means adding a file here; nothing dispatches on substrings of model names.
"""
from __future__ import annotations

import importlib
import pkgutil

from vlmkit.config import ArchConfig, apply_dotted, deep_merge, without_remote_code

_REGISTRY: dict[str, dict] = {}


def _load() -> dict[str, dict]:
    if not _REGISTRY:
        for info in pkgutil.iter_modules(__path__):
            module = importlib.import_module(f"{__name__}.{info.name}")
            preset = getattr(module, "PRESET", None)
            if preset is not None:
                _REGISTRY[preset["name"]] = preset
    return _REGISTRY


def names() -> list[str]:
    return sorted(_load())


def preset_data(name: str, scale: str = "tiny") -> dict:
    presets = _load()
    if name not in presets:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(sorted(presets))}")
    preset = dict(presets[name])
    preset.pop("skills", None)
    preset.pop("design", None)
    scales = preset.pop("scales", {})
    if scale not in scales:
        raise KeyError(f"preset {name!r} has no scale {scale!r}; scales: {', '.join(sorted(scales))}")
    data = deep_merge(preset, scales[scale])
    data["scale"] = scale
    return data


def design(name: str) -> str:
    """The paper's design a preset belongs to (`blip2` and `blip2-t5` are both BLIP-2); a preset file that names
    none is its own."""
    presets = _load()
    if name not in presets:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(sorted(presets))}")
    return presets[name].get("design", name)


def skills(name: str) -> dict[str, dict]:
    """{skill: {"target": fraction or None, "stage": name (optional)}} of preset `name` (see the module's doc)."""
    presets = _load()
    if name not in presets:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(sorted(presets))}")
    return {skill: dict(spec) for skill, spec in presets[name].get("skills", {}).items()}


def from_name(name: str, scale: str = "tiny", **overrides) -> ArchConfig:
    """Build a preset's typed config. Overrides are nested dicts or dotted keys with '__' for dots:

    >>> from_name("llava-1.5", vision={"feature_layer": -1}, stages__instruct__epochs=2)
    """
    data = without_remote_code(preset_data(name, scale))  # only the caller's overrides can turn it on
    nested = {k: v for k, v in overrides.items() if "__" not in k}
    dotted = {k.replace("__", "."): v for k, v in overrides.items() if "__" in k}
    data = deep_merge(data, nested)
    data = apply_dotted(data, dotted)
    return ArchConfig.from_dict(data)
