"""Errors for bad input: each names the file and the field at fault."""

from __future__ import annotations

from pathlib import Path

__all__ = ["InputError"]


class InputError(ValueError):
    """Input that cannot be used, with the file and field that are wrong.

    ``str(err)`` reads ``"<file>: <field>: <message>"`` (parts that are unknown are left out).
    """

    def __init__(self, message: str, path: "str | Path | None" = None, field: str | None = None) -> None:
        self.path = str(path) if path is not None else None
        self.field = field
        self.message = message
        parts = [p for p in (self.path, self.field) if p]
        super().__init__(": ".join(parts + [message]))
