"""Save a screenshot of the main window: ``python -m ids_engine.viewer.screenshot OUT.png``.

Opens the horseshoe phantom, runs a few requests through the worker (a voxel dose, an
isodose drag, an erase), pins the first plan's DVH for comparison, and grabs the window.
Needs a display (use ``xvfb-run -a -s "-screen 0 1920x1200x24"`` headless).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from PyQt6 import QtCore, QtWidgets

from ids_engine.dmr import MoveIsodoseLine
from ids_engine.session import Session

from ._backend import use_qt
from ._theme import apply_theme
from .app import MainWindow
from .slices import take_slice

__all__ = ["main", "take_screenshot"]


def _wait(app, window: MainWindow, timeout_s: float = 60.0) -> None:
    t0 = time.perf_counter()
    while not window.idle:
        app.processEvents(QtCore.QEventLoop.ProcessEventsFlag.AllEvents, 50)
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError("the engine worker did not answer in time")
        time.sleep(0.01)
    for _ in range(10):
        app.processEvents()


def take_screenshot(path: str, resolution: str = "clinical", size=(1600, 1000)) -> str:
    use_qt()
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    apply_theme(app)
    session = Session.from_phantom("horseshoe", resolution)
    window = MainWindow()
    window.resize(*size)
    window.show()
    window.set_session(session)
    _wait(app, window)
    window.dvh.pin_snapshot()
    rx = session.prescription_gy
    # A cooler spot inside the target, then push the 95 % line on the axial slice outwards.
    target = session.target_mask
    k = window.slice_views["z"].slice_index
    js, is_ = np.nonzero(target[k])
    window.select_voxel((k, int(js[len(js) // 3]), int(is_[len(is_) // 3])))
    window.set_voxel_dose(0.9 * rx)
    _wait(app, window)
    view = window.slice_views["z"]
    segs = view.isodose_segments(0.95 * rx)
    if len(segs):
        mid = segs.mean(axis=1)
        a = mid[np.argmax(mid[:, 1])]  # the right-most point of the line
        dose = take_slice(window.dose_gy, "z", k)
        b = (a[0], min(a[1] + 4.0, dose.shape[1] - 2))
        window.last_job_id = window.worker.engine.submit(MoveIsodoseLine("z", k, 0.95 * rx, tuple(a), b))
        _wait(app, window)
    window.select_voxel(window.selected_voxel)
    window.view3d.view.camera.azimuth = -35.0
    for _ in range(20):
        app.processEvents()
    image = window.grab()
    image.save(path)
    window.close()
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="PNG file to write")
    ap.add_argument("--resolution", default="clinical", choices=["clinical", "coarse"])
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=1000)
    args = ap.parse_args(argv)
    print(take_screenshot(args.out, args.resolution, (args.width, args.height)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
