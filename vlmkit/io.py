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
