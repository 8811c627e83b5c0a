"""``ids_engine.viewer.launch``: the entry point ``ids view`` calls.

It runs in a child process: once a Qt event loop has been quit, Qt leaves the loop-exit flag
set for the rest of the process, which would break every later test's ``qtbot.wait*``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from .conftest import HAS_DISPLAY, NO_DISPLAY_REASON, require_viewer_packages

require_viewer_packages()

pytestmark = pytest.mark.viewer

SCRIPT = textwrap.dedent("""
    import sys, time
    from PyQt6 import QtCore, QtWidgets
    from ids_engine.viewer import launch

    app = QtWidgets.QApplication(sys.argv[:1])
    t0 = time.perf_counter()
    seen = []

    def poll():
        wins = [w for w in app.topLevelWidgets() if w.objectName() == "ids-main-window" and w.isVisible()]
        if wins and wins[0].idle:
            w = wins[0]
            seen.append((w.windowTitle(), len(w.session.journal), w.beams.table.rowCount()))
        if seen or time.perf_counter() - t0 > 60:
            for w in wins:
                w.close()
            return
        QtCore.QTimer.singleShot(100, poll)

    QtCore.QTimer.singleShot(100, poll)
    status = launch({"phantom": "horseshoe", "resolution": "coarse"}, None)
    print("seen:", seen)
    sys.exit(status if seen else 3)
""")


@pytest.mark.skipif(not HAS_DISPLAY, reason=NO_DISPLAY_REASON)
def test_launch_opens_a_case_and_returns_the_exit_status():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "seen: [('ids-engine — horseshoe (IDS paper)', 0, 9)]" in proc.stdout


def test_launch_signature():
    import inspect

    from ids_engine.viewer import launch

    params = inspect.signature(launch).parameters
    assert list(params) == ["case", "session_folder"]


def test_ids_view_without_a_display_says_so_in_one_line():
    """Qt would abort with a page of plugin advice; ``ids view`` names the problem and exits 2."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    code = "import sys; from ids_engine.cli import main; sys.exit(main(['view', '--phantom', 'water']))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ids view needs a display"), proc.stderr
    assert "qt.qpa" not in proc.stderr and "Traceback" not in proc.stderr
