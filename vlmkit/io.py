"""Filesystem helpers: the cache location and atomic directory writes."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def cache_home() -> Path:
    """Where project-built artefacts live: $VLMKIT_HOME, else ~/.cache/vlmkit."""
    return Path(os.environ.get("VLMKIT_HOME") or Path.home() / ".cache" / "vlmkit")


def resolve_device(name: str = "auto"):
    """'auto' -> the first CUDA GPU when one is visible, else the CPU; 'cpu', 'cuda', 'cuda:N' as given, checked."""
    import torch

    from vlmkit.errors import ConfigError

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
    from vlmkit.errors import ConfigError

    text = str(name_or_path)
    path = Path(text).expanduser()
    looks_local = (text.startswith(("/", "./", "../", "~", ".\\")) or text.count("/") > 1
                   or (len(path.parts) > 1 and Path(path.parts[0]).is_dir()))
    if looks_local and not path.exists():
        parent = path.parent
        hint = ""
        if parent.is_dir():
            import difflib

            close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=1, cutoff=0.5)
            hint = f"; did you mean {str(parent / close[0])!r}?" if close else f" ({parent} exists)"
        raise ConfigError(f"{what} {text!r}: no such file or directory{hint}")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike):
    """Yield a temporary directory next to `target`; on success it replaces `target` in one rename.

    A crash leaves either the old directory or the new one, never a half-written one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def loading(what: str, name: str):
    """Turn a failure to read a backbone (a hub id not in the local cache without network, a missing or broken
    directory) into one line naming the flag and the name, instead of transformers' traceback."""
    from vlmkit.errors import ConfigError

    try:
        yield
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = " (it is not in the local Hugging Face cache, and the Hub cannot be reached: download it first, " \
               "or point the flag at a local directory)" if "huggingface.co" in str(exc) else ""
        raise ConfigError(f"{what} {name!r}: could not be loaded: {first}{hint}") from None
