"""The desktop viewer (vispy + PyQt6), installed as ``ids_engine.viewer``.

``launch(case, session_folder)`` opens the main window and runs the Qt event loop (the
``ids view`` command calls it). Importing this package does not import Qt; ``launch`` does.
"""

from __future__ import annotations

__all__ = ["launch"]


def launch(case: dict | None = None, session_folder: str | None = None) -> int:
    """Open the viewer on a case or a saved session and run it; returns the exit status.

    Parameters
    ----------
    case : {"phantom": name, "resolution": "clinical" | "coarse"}, {"dicom": folder} or
        {"matrad": file}, optionally with "prescription_gy" (default 60); or None to start empty.
    session_folder : a folder written by ``Session.save`` to reopen instead, or None.
    """
    from .app import launch as _launch

    return _launch(case, session_folder)
