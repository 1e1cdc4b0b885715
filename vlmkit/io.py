"""Filesystem helpers: the cache location and atomic directory writes."""
from __future__ import annotations

import contextlib
import contextvars
import difflib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from vlmkit.errors import ConfigError


def cache_home() -> Path:
    """Where project-built artefacts live: $VLMKIT_HOME, else ~/.cache/vlmkit."""
    return Path(os.environ.get("VLMKIT_HOME") or Path.home() / ".cache" / "vlmkit")


def resolve_device(name: str = "auto"):
    """'auto' -> the first CUDA GPU when one is visible, else the CPU; 'cpu', 'cuda', 'cuda:N' as given, checked."""
    import torch  # start-up: vlmkit.io stays importable without torch (1.4 s, benchmarks/import_times.py)

    text = (name or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA GPU is visible to torch here (torch "
                              f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name!r}: vlmkit runs on cpu or cuda")
    return device


def check_local_path(name_or_path: str, what: str) -> None:
    """A name that can only be a local path (absolute, ./, ../, ~, more than one '/', or under an existing
    directory) must exist; otherwise it would be taken for a hub id and fail after retries. Hub ids
    (`org/name`) pass."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    looks_local = (text.startswith(("/", "./", "../", "~", ".\\")) or text.count("/") > 1
                   or (len(path.parts) > 1 and Path(path.parts[0]).is_dir()))
    if looks_local and not path.exists():
        parent = path.parent
        hint = ""
        if parent.is_dir():
            close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=1, cutoff=0.5)
            hint = f"; did you mean {str(parent / close[0])!r}?" if close else f" ({parent} exists)"
        raise ConfigError(f"{what} {text!r}: no such file or directory{hint}")


MANIFEST = "manifest.json"


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's contents to the disk (a directory: its entries, so a rename survives)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_manifest(root: Path) -> None:
    """List every file under `root` with its size and SHA-256, written last: a directory whose manifest is there
    and agrees with the files is complete, whatever a crash or a power cut did to it."""
    entries = {str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": file_digest(p)}
               for p in _files(root) if p.name != MANIFEST}
    (root / MANIFEST).write_text(json.dumps({"version": 1, "files": entries}, indent=1))


def verify_manifest(root: str | os.PathLike) -> str | None:
    """What is wrong with a directory written with a manifest (None: every file is there, whole and unchanged;
    also None for a directory written before manifests, which cannot be checked)."""
    root = Path(root)
    manifest = root / MANIFEST
    if not manifest.exists():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its {MANIFEST} is unreadable ({type(exc).__name__})"
    for name, entry in files.items():
        path = root / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{name} is {size:,} bytes, {entry['size']:,} were written"
        if file_digest(path) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return None


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory, deepest first."""
    for path in _files(root):
        fsync_path(path)
    for directory in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        fsync_path(directory)
    fsync_path(root)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, manifest: bool = True):
    """Yield a temporary directory next to `target`; on success it replaces `target` in one rename.

    Before the rename a manifest of the files (sizes, checksums) is written last and every file and directory is
    fsynced; after it, the parent directory. A crash, a kill or a power cut leaves either the old directory or
    the new one, never a half-written one, and `verify_manifest` can tell.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if manifest:
            write_manifest(tmp)
        fsync_tree(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_path(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The entries of a JSON-lines log; a line that does not parse (torn by a crash mid-write) is left out."""
    entries = []
    for line in Path(path).read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


@contextlib.contextmanager
def loading(what: str, name: str):
    """Turn a failure to read a backbone (a hub id not in the local cache without network, a missing or broken
    directory) into one line naming the flag and the name, instead of transformers' traceback."""
    try:
        yield
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        flag = " (add --llm.trust-remote-code to this command if you trust that code)" if what.startswith("--llm") \
            else " (vlmkit runs no code from a vision tower's or connector's checkpoint)"
        raise ConfigError(f"{what} {name!r}: the model is defined by Python code in its checkpoint, and this command "
                          f"did not ask to run it{flag}") from None
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = " (it is not in the local Hugging Face cache, and the Hub cannot be reached: download it first, " \
               "or point the flag at a local directory)" if "huggingface.co" in str(exc) else ""
        if "no file named model.safetensors" in str(exc):
            hint = (" (vlmkit reads weights from safetensors; a backbone with only pickled weights loads with "
                    "--allow-pickle, if you trust the files)")
        raise ConfigError(f"{what} {name!r}: could not be loaded: {first}{hint}") from None


def cpu_flags() -> str:
    """The CPU flags that decide float speed and rounding paths here ('avx2 avx512f avx512_bf16 amx_tile'), for
    reports: the same seed can end in another discrete outcome on another kind of CPU."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next(line for line in info if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.processor() or "unknown"
    kinds = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return " ".join(kinds) or "no AVX2"


def machine_summary() -> dict:
    """The machine a measurement was taken on, for benchmark and scoreboard files: CPU, cores, flags, torch."""
    import torch  # start-up: vlmkit.io stays importable without torch (1.4 s, benchmarks/import_times.py)

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "flags": cpu_flags(),
            "torch": torch.__version__}


# -- backbone names with a scheme ('tiny:llama') ------------------------------------------------------------
_SCHEMES: dict[str, tuple[Callable[[str, bool], str], Callable[[str], str] | None]] = {}
_CONFIGS_ONLY = contextvars.ContextVar("vlmkit_configs_only", default=False)


def register_scheme(prefix: str, resolver: Callable[[str, bool], str],
                    config_resolver: Callable[[str], str] | None = None) -> None:
    """Names that start with `prefix` are resolved by `resolver(name, verbose)` to a local directory (vlmkit.tiny
    registers 'tiny:', building a backbone on first need), so the parts that load backbones need not know it.
    `config_resolver(name)` answers a directory with the backbone's configuration alone, building no weights
    (used inside `configs_only()`)."""
    _SCHEMES[prefix] = (resolver, config_resolver)


@contextlib.contextmanager
def configs_only():
    """Within it, scheme names resolve to their configuration alone (`vlmkit train --dry-run` reads configs, and
    must not first pretrain a tiny backbone for minutes); other names are unaffected (a hub id or a directory is
    read for its config.json either way)."""
    token = _CONFIGS_ONLY.set(True)
    try:
        yield
    finally:
        _CONFIGS_ONLY.reset(token)


def resolve_name(name_or_path, verbose: bool = True):
    """A backbone name with a registered scheme -> its local directory; anything else as it is."""
    if isinstance(name_or_path, str):
        for prefix, (resolver, config_resolver) in _SCHEMES.items():
            if name_or_path.startswith(prefix):
                if _CONFIGS_ONLY.get() and config_resolver is not None:
                    return config_resolver(name_or_path)
                return resolver(name_or_path, verbose)
    return name_or_path
