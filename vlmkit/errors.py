"""Errors a user can act on. Each names the record (and file) at fault in one line."""
from __future__ import annotations


class VlmkitError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero, without a traceback."""


class BadRecord(VlmkitError):
    """A data record that cannot be used: missing/corrupt image, malformed turns, too long, ..."""

    def __init__(self, record_id, reason: str, kind: str = "invalid", source: str | None = None):
        self.record_id = record_id
        self.reason = reason
        self.kind = kind  # short category for skip counts: 'image', 'turns', 'length', ...
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}record {record_id!r}: {reason}")


class ConfigError(VlmkitError):
    """A configuration that cannot work (unknown part, impossible combination)."""
