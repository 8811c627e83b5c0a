"""Errors for bad input: each names the file and the field at fault."""

from __future__ import annotations

import tomllib
from pathlib import Path

__all__ = ["InputError", "read_toml"]


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


def read_toml(path: "str | Path") -> dict:
    """The top-level table of a TOML file; :class:`InputError` naming the file when it cannot be
    read or is not valid TOML (protocols, tolerance profiles)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path) from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"not valid TOML: {exc}", path) from None
