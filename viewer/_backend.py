"""Select vispy's PyQt6 backend before any canvas is made."""

from __future__ import annotations

import vispy

__all__ = ["use_qt"]


def use_qt() -> None:
    """Make vispy draw through PyQt6 (idempotent)."""
    vispy.use(app="pyqt6")
