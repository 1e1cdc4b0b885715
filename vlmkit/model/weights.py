"""Reading checkpoint weights: safetensors (one file or a sharded index), and pickle only when asked.

A `.bin`/`.pt` file is a pickle, which can run code when loaded; vlmkit refuses it unless the caller
passes `allow_pickle=True`, and even then loads with `torch.load(weights_only=True)` (tensors only).
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file

from vlmkit.errors import ConfigError


def weight_files(directory: str | Path) -> tuple[list[Path], bool]:
    """The weight files of a checkpoint directory and whether they are pickles."""
    directory = Path(directory)
    for index_name, pickled in (("model.safetensors.index.json", False), ("pytorch_model.bin.index.json", True)):
        index = directory / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [directory / shard for shard in shards], pickled
    if (directory / "model.safetensors").exists():
        return [directory / "model.safetensors"], False
    pickles = sorted(directory.glob("*.bin")) + sorted(directory.glob("*.pt"))
    if pickles:
        return pickles, True
    raise ConfigError(f"{directory}: no model.safetensors, sharded safetensors index or .bin weights")


def read_state_dict(directory: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    files, pickled = weight_files(directory)
    if pickled and not allow_pickle:
        raise ConfigError(f"{files[0]} is a pickle file, which can run code when loaded; vlmkit loads safetensors "
                          "only. If you trust it, pass --allow-pickle (tensors only, torch.load(weights_only=True)), "
                          "or convert it to safetensors first")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if pickled:
            state.update(_load_pickle(path))
        else:
            state.update(load_file(path))
    return state


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    error = None
    for mmap in (True, False):  # mmap needs the zip format of torch >= 1.6; older files load without it
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as exc:  # weights_only refuses anything that is not plain tensors
            error = exc
    raise ConfigError(f"{path}: cannot be read as plain tensors ({str(error).splitlines()[0]})")


# -- low-memory loading ---------------------------------------------------------------------------
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own cap on a header


def read_safetensors_header(path: str | Path) -> tuple[dict, int]:
    """A safetensors file's tensor entries and where their data starts, every entry checked against the file
    before anything is allocated: a known dtype, a shape of non-negative integers, offsets that are in order,
    do not overlap, hold exactly shape x itemsize bytes and end within the file. Any fault is a ConfigError
    naming the file and the tensor (a hostile header would otherwise allocate what it claims)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise ConfigError(f"{path}: not a safetensors file (shorter than its header)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise ConfigError(f"{path}: not a safetensors file (its header claims {length:,} bytes; the file has "
                              f"{size:,})")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ConfigError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    base, data_size = 8 + length, size - 8 - length
    entries = []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ConfigError(f"{where}: its entry needs dtype, shape and data_offsets")
        if info["dtype"] not in _ST_DTYPES:
            raise ConfigError(f"{where} has dtype {info['dtype']!r}, which vlmkit does not read")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ConfigError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ConfigError(f"{where}: data_offsets {offsets!r} are not [start, end] with 0 <= start <= end")
        expected = math.prod(shape) * _ST_DTYPES[info["dtype"]].itemsize
        if offsets[1] - offsets[0] != expected:
            raise ConfigError(f"{where}: {offsets[1] - offsets[0]:,} bytes of data for shape {shape} "
                              f"{info['dtype']} ({expected:,} bytes)")
        if offsets[1] > data_size:
            raise ConfigError(f"{path}: truncated or damaged (tensor {name!r} ends at byte {offsets[1]:,} of the "
                              f"data, past the end of the file's {data_size:,})")
        entries.append((offsets[0], offsets[1], name))
    entries.sort()
    for (_, end, first), (start, _, second) in zip(entries, entries[1:]):
        if start < end:
            raise ConfigError(f"{path}: tensors {first!r} and {second!r} overlap in the file")
    return header, base


def stream_safetensors(path: str | Path, dtype: torch.dtype | None = None, device=None):
    """Yield (name, tensor) from a safetensors file one tensor at a time, each read with plain file reads,
    cast to `dtype` (floating tensors only) and moved to `device` before the next is read.

    The whole file is never in memory at once (neither as a copy nor as mapped pages, which count towards the
    process's resident memory): loading an fp32 checkpoint in bf16 peaks at the bf16 model plus the largest
    single tensor. That is how a 7B LLM goes onto a GPU without materialising in fp32 in CPU memory. The
    header is validated first (`read_safetensors_header`)."""
    path = Path(path)
    header, base = read_safetensors_header(path)
    with open(path, "rb") as handle:
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            start, end = info["data_offsets"]
            raw = torch.empty(end - start, dtype=torch.uint8)
            handle.seek(base + start)
            if handle.readinto(raw.numpy()) != end - start:
                raise ConfigError(f"{path}: truncated (tensor {name!r} ends past the end of the file)")
            tensor = raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"]) if end > start else \
                torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            if device is not None:
                tensor = tensor.to(device)
            del raw
            yield name, tensor


def load_into(module: torch.nn.Module, tensors, source: str = "the checkpoint", shape_of=None) -> None:
    """Put (name, tensor) pairs into `module` in place of its parameters and buffers, as they come.

    The module may have been built on the meta device (nothing allocated): each parameter becomes the loaded
    tensor itself, with its requires_grad kept. A parameter shared by several modules (tied embeddings, which
    safetensors files store once) is replaced everywhere it appears. Shape mismatches, unknown names and
    parameters left unloaded are errors naming them. `shape_of(param)`: a parameter's full shape where it is
    not its own (DeepSpeed ZeRO-3 leaves empty placeholders that know it)."""
    params = dict(module.named_parameters(remove_duplicate=False))
    buffers = dict(module.named_buffers(remove_duplicate=False))
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for attr, param in sub._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((sub, attr))
    loaded, unexpected = set(), []
    for name, value in tensors:
        if name in params:
            old = params[name]
            expected = tuple(shape_of(old) if shape_of else old.shape)
            if expected != tuple(value.shape):
                raise ConfigError(f"{source}: {name} has shape {tuple(value.shape)}, the model expects {expected}")
            new = torch.nn.Parameter(value, requires_grad=old.requires_grad)
            for owner, attr in owners[id(old)]:
                owner._parameters[attr] = new
            loaded.add(id(old))
        elif name in buffers:
            path, _, attr = name.rpartition(".")
            owner = module.get_submodule(path) if path else module
            owner._buffers[attr] = value
        else:
            unexpected.append(name)
    missing = [name for name, param in params.items() if id(param) not in loaded]
    if missing or unexpected:
        raise ConfigError(f"{source} does not match the model its config describes (missing {missing[:5]}"
                          f"{'…' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                          f"{'…' if len(unexpected) > 5 else ''})")


def hf_from_pretrained(model_class, src: str, **kwargs):
    """`model_class.from_pretrained(src, **kwargs)`, with a checkpoint whose tensors disagree with its own
    config.json refused in one line naming the tensor and both shapes (transformers logs a table and raises
    "look at the above report"; with ignore_mismatched_sizes it would silently re-initialise them)."""
    model, info = model_class.from_pretrained(src, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs)
    mismatched = sorted(info.get("mismatched_keys") or [], key=str)
    if mismatched:
        first = mismatched[0]
        name, saved, expected = (first[0], first[1], first[2]) if isinstance(first, (tuple, list)) and len(first) == 3 \
            else (first, "?", "?")
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise ConfigError(f"{src}: its weights disagree with its config.json: {name} is {tuple(saved)} in the file, "
                          f"{tuple(expected)} by the config{more}")
    return model
