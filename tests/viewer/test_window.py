"""The main window driven through its real widgets (pytest-qt, Xvfb + Mesa in CI).

Mouse and key events go to the vispy canvases' native Qt widgets at pixel positions computed
from the views' transforms; the rendered pixels (``canvas.render()``) are checked, not just
produced.
"""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import (HAS_DISPLAY, NO_DISPLAY_REASON, build_coarse_session, conflicting_requests,
                       require_viewer_packages, rewind)

require_viewer_packages()

pytestmark = [pytest.mark.viewer, pytest.mark.skipif(not HAS_DISPLAY, reason=NO_DISPLAY_REASON)]

WAIT_MS = 30000


@pytest.fixture(scope="module")
def session():
    return build_coarse_session()


@pytest.fixture
def window(qtbot, session):
    from ids_engine.viewer._theme import apply_theme
    from ids_engine.viewer.app import MainWindow
    from PyQt6 import QtWidgets

    apply_theme(QtWidgets.QApplication.instance())
    w = MainWindow()
    w.resize(1400, 900)
    qtbot.addWidget(w)
    w.show()
    qtbot.waitExposed(w)
    w.activateWindow()  # window shortcuts (Ctrl+Z) need the active window
    qtbot.waitActive(w)
    w.set_session(session)
    qtbot.waitUntil(lambda: w.idle, timeout=WAIT_MS)
    qtbot.wait(50)  # let the canvases take their laid-out sizes
    yield w
    w.close()
    rewind(session)


# ---------------------------------------------------------------- helpers
def _qpoint(p):
    from PyQt6 import QtCore

    return QtCore.QPoint(int(round(float(p[0]))), int(round(float(p[1]))))


def _interior_voxel(session) -> tuple[int, int, int]:
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(session.target_mask)
    return tuple(int(v) for v in np.unravel_index(np.argmax(depth), depth.shape))


def _colour_mask(rgba: np.ndarray, rgb01, tol=(40, 40, 60)) -> np.ndarray:
    """Pixels of a rendered image (rows, cols, 4) within ``tol`` of a colour (0..1)."""
    target = np.asarray(rgb01) * 255.0
    diff = np.abs(rgba[..., :3].astype(np.float64) - target)
    return np.all(diff <= np.asarray(tol), axis=-1)


def _near(mask: np.ndarray, xy, radius_px: float) -> int:
    """How many mask pixels lie within ``radius_px`` of canvas point ``xy`` (x right, y down)."""
    rows, cols = np.nonzero(mask)
    return int(np.sum(np.hypot(cols - xy[0], rows - xy[1]) <= radius_px))


def _rightmost(mask: np.ndarray, y: float, rows: int = 2) -> float:
    """Largest x of the mask's pixels within ``rows`` of canvas row ``y``."""
    r = int(round(y))
    cols = np.nonzero(mask[max(r - rows, 0) : r + rows + 1].any(axis=0))[0]
    return float(cols.max()) if cols.size else -1.0


def _wheel(widget, pos, steps: int, modifiers=None) -> None:
    from PyQt6 import QtCore, QtGui, QtWidgets

    mods = modifiers or QtCore.Qt.KeyboardModifier.NoModifier
    ev = QtGui.QWheelEvent(QtCore.QPointF(pos), QtCore.QPointF(widget.mapToGlobal(pos)), QtCore.QPoint(0, 0),
                           QtCore.QPoint(0, 120 * steps), QtCore.Qt.MouseButton.NoButton, mods,
                           QtCore.Qt.ScrollPhase.NoScrollPhase, False)
    QtWidgets.QApplication.sendEvent(widget, ev)


# ---------------------------------------------------------------- tests
def test_set_dose_by_clicking_a_voxel_and_typing_then_undo(qtbot, window, session):
    from PyQt6 import QtCore

    view = window.slice_views["z"]
    idx = _interior_voxel(session)
    before = session.dose_at(idx)
    view.set_slice(idx[0], emit=True)
    window.tool_actions["set_dose"].trigger()
    qtbot.mouseClick(view.canvas.native, QtCore.Qt.MouseButton.LeftButton, pos=_qpoint(view.zyx_to_canvas(idx)))
    assert window.selected_voxel == idx
    assert window.dose_box.value() == pytest.approx(before, abs=0.01)

    qtbot.keyClicks(window.dose_box, "45")
    qtbot.keyClick(window.dose_box, QtCore.Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: len(session.journal) == 1 and window.idle, timeout=WAIT_MS)
    assert session.journal[-1].request.index_zyx == idx
    assert session.journal[-1].request.dose_gy == pytest.approx(45.0)
    assert abs(session.dose_at(idx) - 45.0) < 2.0
    assert window.history.count() == 2  # the starting plan and the request
    assert "engine" in window.perf.text() and "frame" in window.perf.text()

    qtbot.keyClick(view.canvas.native, QtCore.Qt.Key.Key_Z, QtCore.Qt.KeyboardModifier.ControlModifier)
    qtbot.waitUntil(lambda: len(session.journal) == 0 and window.idle, timeout=WAIT_MS)
    assert session.dose_at(idx) == pytest.approx(before, abs=1e-3)
    assert window.act_redo.isEnabled()

    qtbot.keyClick(view.canvas.native, QtCore.Qt.Key.Key_Z,
                   QtCore.Qt.KeyboardModifier.ControlModifier | QtCore.Qt.KeyboardModifier.ShiftModifier)
    qtbot.waitUntil(lambda: len(session.journal) == 1 and window.idle, timeout=WAIT_MS)
    assert abs(session.dose_at(idx) - 45.0) < 2.0


def test_drag_isodose_line_with_the_mouse_moves_the_rendered_line(qtbot, window, session):
    from PyQt6 import QtCore
    from PyQt6.QtTest import QTest

    from ids_engine.dmr import MoveIsodoseLine

    view = window.slice_views["z"]
    native = view.canvas.native
    window.act_wash.trigger()  # wash off: only the lines carry the isodose colours
    assert not window.act_wash.isChecked()
    level = window.selected_level_gy
    assert level == pytest.approx(0.95 * session.prescription_gy)
    lev = window._selected_level()
    segs = view.isodose_segments(level)
    assert len(segs)
    mid = segs.mean(axis=1)
    a_rc = mid[np.argmax(mid[:, 1])]  # the right-most point of the 95 % line
    b_rc = (a_rc[0], a_rc[1] + 4.0)  # four voxels further out
    pa, pb = view.rc_to_canvas(a_rc), view.rc_to_canvas(b_rc)

    before = _colour_mask(view.canvas.render(), lev.colour)
    assert _near(before, pa, 4) > 0, "the selected isodose colour is not drawn where the line is"
    assert _near(before, pb, 3) == 0

    window.tool_actions["drag_isodose"].trigger()
    left = QtCore.Qt.MouseButton.LeftButton
    QTest.mousePress(native, left, QtCore.Qt.KeyboardModifier.NoModifier, _qpoint(pa))
    assert view.dragging
    for t in np.linspace(0.0, 1.0, 7)[1:]:
        QTest.mouseMove(native, _qpoint(pa + t * (pb - pa)))
        qtbot.wait(40)
    # While dragging, the line follows the mouse before the engine answers.
    during = _colour_mask(view.canvas.render(), lev.colour)
    assert _near(during, pb, 3) > 0
    QTest.mouseRelease(native, left, QtCore.Qt.KeyboardModifier.NoModifier, _qpoint(pb))
    qtbot.waitUntil(lambda: window.idle and bool(session.journal), timeout=WAIT_MS)
    assert len(session.journal) == 1, "a drag must leave one journal entry"
    req = session.journal[-1].request
    assert isinstance(req, MoveIsodoseLine)
    assert req.axis == "z" and req.slice_index == view.slice_index
    assert req.level_gy == pytest.approx(level)
    assert np.allclose(req.end_rc, b_rc, atol=0.6)

    after = _colour_mask(view.canvas.render(), lev.colour)
    # On the dragged row the line now reaches well out towards the release point (recovery
    # settles it within its tolerance of the level, so not necessarily all the way).
    x_before, x_after = _rightmost(before, pa[1]), _rightmost(after, pa[1])
    assert x_before == pytest.approx(pa[0], abs=4)
    assert x_after >= pa[0] + 0.4 * (pb[0] - pa[0]), "the rendered isodose did not move where it was dragged"
    assert _near(after, pa, 2) == 0
    overlap = np.logical_and(before, after).sum() / max(np.logical_or(before, after).sum(), 1)
    assert overlap < 0.95

    qtbot.keyClick(native, QtCore.Qt.Key.Key_Z, QtCore.Qt.KeyboardModifier.ControlModifier)
    qtbot.waitUntil(lambda: len(session.journal) == 0 and window.idle, timeout=WAIT_MS)
    restored = _colour_mask(view.canvas.render(), lev.colour)
    assert _near(restored, pb, 3) == 0
    assert np.logical_and(before, restored).sum() / max(np.logical_or(before, restored).sum(), 1) > 0.9


def test_a_drag_preview_updates_the_displayed_slice_from_its_readout(qtbot, window, session):
    from PyQt6 import QtCore
    from PyQt6.QtTest import QTest

    view = window.slice_views["z"]
    native = view.canvas.native
    level = window.selected_level_gy
    final_dose = window.dose_gy
    segs = view.isodose_segments(level)
    mid = segs.mean(axis=1)
    a_rc = mid[np.argmax(mid[:, 1])]
    b_rc = (a_rc[0], a_rc[1] + 4.0)
    pa, pb = view.rc_to_canvas(a_rc), view.rc_to_canvas(b_rc)
    reach_before = view.isodose_segments(level)[..., 1].max()

    window.tool_actions["drag_isodose"].trigger()
    left = QtCore.Qt.MouseButton.LeftButton
    QTest.mousePress(native, left, QtCore.Qt.KeyboardModifier.NoModifier, _qpoint(pa))
    for t in np.linspace(0.0, 1.0, 4)[1:]:
        QTest.mouseMove(native, _qpoint(pa + t * (pb - pa)))
        qtbot.wait(20)
    qtbot.waitUntil(lambda: window.snapshot.readout is not None, timeout=WAIT_MS)  # button still down
    snap = window.snapshot
    r = snap.readout
    assert snap.dose_gy is None and not snap.final
    assert r.index_zyx == window.display_index_zyx()
    # Each slice view shows the readout's slice of its axis; the 3D view keeps the final dose.
    for axis, sl in (("z", r.axial_gy), ("y", r.coronal_gy), ("x", r.sagittal_gy)):
        assert window.slice_views[axis].dose_slice() is sl
    assert window.dose_gy is final_dose and window.view3d.dose_gy is final_dose
    assert not np.array_equal(view.displayed_slice(), final_dose[view.slice_index])
    assert view.isodose_segments(level)[..., 1].max() > reach_before + 0.5, "the previewed line did not move"
    # The read-out under the cursor reads the preview's slice.
    j, i = int(round(a_rc[0])), int(round(a_rc[1])) + 2
    assert window.dose_at((view.slice_index, j, i)) == pytest.approx(float(r.axial_gy[j, i]))
    QTest.mouseRelease(native, left, QtCore.Qt.KeyboardModifier.NoModifier, _qpoint(pb))
    qtbot.waitUntil(lambda: window.idle and bool(session.journal), timeout=WAIT_MS)
    assert window.snapshot.final and view.preview is None
    np.testing.assert_array_equal(view.dose_slice(), window.dose_gy[view.slice_index])


def test_slice_navigation_crosshair_and_hover_readout(qtbot, window, session):
    from PyQt6 import QtCore
    from PyQt6.QtTest import QTest

    axial, coronal = window.slice_views["z"], window.slice_views["y"]
    native = axial.canvas.native
    k0 = axial.slice_index
    centre = _qpoint(np.array([native.width(), native.height()]) / 2)
    _wheel(native, centre, +1)
    assert axial.slice_index == k0 + 1
    assert coronal.crosshair_zyx[0] == pytest.approx(k0 + 1)
    QTest.keyClick(native, QtCore.Qt.Key.Key_PageDown)
    QTest.keyClick(native, QtCore.Qt.Key.Key_Down)
    assert axial.slice_index == k0 - 1
    QTest.keyClick(native, QtCore.Qt.Key.Key_Up)
    assert axial.slice_index == k0
    # 0-based, named by axis as scripts do (index_zyx), like the history's "axial slice z=21".
    assert f"slice z={k0} (0–{axial.n_slices - 1})" in axial.header.text()

    # Navigate tool: a click moves the crosshair and the other planes follow.
    window.tool_actions["navigate"].trigger()
    idx = _interior_voxel(session)
    qtbot.mouseClick(native, QtCore.Qt.MouseButton.LeftButton, pos=_qpoint(axial.zyx_to_canvas((k0, idx[1], idx[2]))))
    assert coronal.slice_index == idx[1]
    assert window.slice_views["x"].slice_index == idx[2]

    # Right-drag sets the CT window; Ctrl+wheel zooms; labels switch to % of the prescription.
    w0 = window.window_box.value()
    right, none = QtCore.Qt.MouseButton.RightButton, QtCore.Qt.KeyboardModifier.NoModifier
    QTest.mousePress(native, right, none, centre)
    QTest.mouseMove(native, centre + QtCore.QPoint(30, 0))
    QTest.mouseRelease(native, right, none, centre + QtCore.QPoint(30, 0))
    assert window.window_box.value() > w0 and window.preset_box.currentText() == "Custom"
    width0 = axial.view.camera.rect.width
    _wheel(native, centre, +1, QtCore.Qt.KeyboardModifier.ControlModifier)
    assert axial.view.camera.rect.width < width0 and axial.slice_index == k0
    assert all(t.endswith("Gy") for t in axial._labels.text)
    window.unit_box.setCurrentText("%")
    assert all(t.endswith("%") for t in axial._labels.text) and window.act_percent.isChecked()

    # Hover read-out (last: after a button-less QTest move, Qt drops the next drag's moves).
    QTest.mouseMove(native, _qpoint(axial.zyx_to_canvas((k0, idx[1], idx[2]))))
    text = window.readout.text()
    assert "HU" in text and "Gy" in text and "PTV" in text


def test_pin_erase_and_history_click(qtbot, window, session):
    from PyQt6 import QtCore

    from ids_engine.dmr import EraseSpot, Pin

    view = window.slice_views["z"]
    native = view.canvas.native
    rx = session.prescription_gy
    k = view.slice_index
    # Pin a region in the OAR, then erase a cold spot in the target (restricted to the PTV).
    oar = session.patient.structure("OAR").mask[k]
    j, i = (int(v) for v in np.argwhere(oar).mean(axis=0).round())
    window.tool_actions["pin"].trigger()
    qtbot.mouseClick(native, QtCore.Qt.MouseButton.LeftButton, pos=_qpoint(view.zyx_to_canvas((k, j, i))))
    qtbot.waitUntil(lambda: len(session.journal) == 1 and window.idle, timeout=WAIT_MS)
    assert isinstance(session.journal[-1].request, Pin)
    assert view._pins.visible and window.act_unpin.isEnabled()

    # The coldest target voxel, on its own axial slice, below the erase bounds set in the toolbar.
    dose3 = np.where(session.target_mask, window.snapshot.dose_gy, np.inf)
    k, j, i = (int(v) for v in np.unravel_index(np.argmin(dose3), dose3.shape))
    window.erase_low.setValue(98.0)
    window.erase_high.setValue(105.0)
    assert dose3[k, j, i] < 0.98 * rx
    view.set_slice(k, emit=True)
    dose = window.snapshot.dose_gy[k]
    window.erase_structure.setCurrentIndex(window.erase_structure.findData("PTV"))
    window.tool_actions["erase"].trigger()
    qtbot.mouseClick(native, QtCore.Qt.MouseButton.LeftButton, pos=_qpoint(view.zyx_to_canvas((k, j, i))))
    qtbot.waitUntil(lambda: len(session.journal) == 2 and window.idle, timeout=WAIT_MS)
    req = session.journal[-1].request
    assert isinstance(req, EraseSpot) and req.structure == "PTV"
    assert (req.low_gy, req.high_gy) == pytest.approx((0.98 * rx, 1.05 * rx))
    assert window.snapshot.dose_gy[k, j, i] > dose[j, i]

    # Clicking the first row ("Starting plan") undoes both; clicking the last redoes both.
    hist = window.history
    assert hist.count() == 3
    hist.scrollToItem(hist.item(0))
    rect = hist.visualItemRect(hist.item(0))
    qtbot.mouseClick(hist.viewport(), QtCore.Qt.MouseButton.LeftButton, pos=rect.center())
    qtbot.waitUntil(lambda: len(session.journal) == 0 and window.idle, timeout=WAIT_MS)
    assert hist.count() == 3 and not session.pins
    rect = hist.visualItemRect(hist.item(2))
    qtbot.mouseClick(hist.viewport(), QtCore.Qt.MouseButton.LeftButton, pos=rect.center())
    qtbot.waitUntil(lambda: len(session.journal) == 2 and window.idle, timeout=WAIT_MS)
    assert "pin 1" in session.pins


def test_a_conflict_shows_in_the_status_bar_and_the_history(qtbot, window, session):
    """Pin a ball around the OAR rim, then set a voxel just outside it far down with the set-dose
    tool: recovery cannot keep both, and the window says so (status bar and history entry)."""
    from PyQt6 import QtCore

    pin, near = conflicting_requests(session)
    view = window.slice_views["z"]
    native = view.canvas.native
    view.set_slice(pin.centre_zyx[0], emit=True)
    window.radius_box.setValue(pin.radius_mm)
    window.tool_actions["pin"].trigger()
    qtbot.mouseClick(native, QtCore.Qt.MouseButton.LeftButton, pos=_qpoint(view.zyx_to_canvas(pin.centre_zyx)))
    qtbot.waitUntil(lambda: len(session.journal) == 1 and window.idle, timeout=WAIT_MS)
    assert np.allclose(session.journal[-1].request.centre_zyx, pin.centre_zyx, atol=0.5)
    assert session.journal[-1].request.radius_mm == pytest.approx(pin.radius_mm)
    assert "⚠" not in window.history.item(1).text() and not window.history.item(1).toolTip()

    window.tool_actions["set_dose"].trigger()
    qtbot.mouseClick(native, QtCore.Qt.MouseButton.LeftButton, pos=_qpoint(view.zyx_to_canvas(near.index_zyx)))
    assert window.selected_voxel == near.index_zyx
    qtbot.keyClicks(window.dose_box, f"{near.dose_gy:g}")
    qtbot.keyClick(window.dose_box, QtCore.Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: len(session.journal) == 2 and window.idle, timeout=WAIT_MS)
    res = session.journal[-1]
    assert res.request.index_zyx == near.index_zyx and res.request.dose_gy == pytest.approx(near.dose_gy)
    assert res.conflicts, "the request beside the pin reported no conflict"
    messages = [c.message for c in res.conflicts if c.kind != "rise"]
    side = [c.message for c in res.conflicts if c.kind == "rise"]
    assert messages, "the request beside the pin reported only side effects"

    status = window.statusBar().currentMessage()
    assert status.startswith(f"⚠ Conflict: {messages[0]}")
    total = len(messages) + len(side)
    assert (f"+{total - 1} more" in status) == (total > 1)

    item = window.history.item(2)  # the starting plan, the pin, the request
    n = len(messages)
    tags = f"⚠ {n} conflict{'s' if n != 1 else ''}"
    if side:
        tags += f"  ↑ {len(side)} side effect{'s' if len(side) != 1 else ''}"
    assert item.text().endswith(tags)
    assert not item.icon().isNull()
    assert all(m in item.toolTip() for m in messages + side)
    assert item.foreground().color().name() == window.history.CONFLICT_COLOUR


def test_drag_isodose_surface_in_3d(qtbot, window, session):
    from PyQt6 import QtCore
    from PyQt6.QtTest import QTest

    from ids_engine.dmr import MoveIsodoseSurface

    v3 = window.view3d
    native = v3.canvas.native
    assert v3.surface_mesh is not None and not v3.surface_mesh.empty
    image = v3.canvas.render()
    colour = np.asarray(window._selected_level().colour) * 255
    assert np.any(np.all(np.abs(image[..., :3] - colour) < 90, axis=-1)), "no isodose surface on screen"
    # Aim at the projection of the target's centre: the ray enters the surface on the near side.
    centre_zyx = np.argwhere(session.target_mask).mean(axis=0)
    pa = np.round(v3.scene_to_canvas(v3.zyx_to_mm(centre_zyx)))
    start = v3.pick_surface(pa)
    assert start is not None
    pb = pa + np.array([0.0, -25.0])  # drag up the screen
    window.tool_actions["drag_isodose"].trigger()
    left = QtCore.Qt.MouseButton.LeftButton
    QTest.mousePress(native, left, QtCore.Qt.KeyboardModifier.NoModifier, _qpoint(pa))
    assert v3.dragging and not v3.view.camera.interactive
    for t in np.linspace(0.0, 1.0, 5)[1:]:
        QTest.mouseMove(native, _qpoint(pa + t * (pb - pa)))
        qtbot.wait(40)
    QTest.mouseRelease(native, left, QtCore.Qt.KeyboardModifier.NoModifier, _qpoint(pb))
    assert v3.view.camera.interactive
    qtbot.waitUntil(lambda: window.idle and window._pending_commit == 0, timeout=WAIT_MS)
    assert len(session.journal) == 1
    req = session.journal[-1].request
    assert isinstance(req, MoveIsodoseSurface)
    assert np.allclose(req.start_zyx, start, atol=1e-6)
    assert req.level_gy == pytest.approx(window.selected_level_gy)


def test_save_and_reopen_a_session(qtbot, window, session, tmp_path):
    from ids_engine.dmr import SetVoxelDose

    idx = _interior_voxel(session)
    window.last_job_id = window.worker.engine.submit(SetVoxelDose(idx, 50.0))
    qtbot.waitUntil(lambda: window.idle and len(session.journal) == 1, timeout=WAIT_MS)
    dose = window.snapshot.dose_gy.copy()
    window.save_session(str(tmp_path))
    qtbot.waitUntil(lambda: window.idle and (tmp_path / "session.json").exists(), timeout=WAIT_MS)
    window.open_session(str(tmp_path))
    qtbot.waitUntil(lambda: window.session is not session and window.idle, timeout=60000)
    assert len(window.session.journal) == 1
    np.testing.assert_allclose(window.snapshot.dose_gy, dose, atol=1e-4)
    assert window.history.count() == 2


def test_window_screenshot_shows_the_plan(qtbot, window, session, tmp_path):
    from PyQt6 import QtGui

    path = tmp_path / "window.png"
    assert window.grab().save(str(path))
    img = QtGui.QImage(str(path)).convertToFormat(QtGui.QImage.Format.Format_RGBA8888)
    arr = np.frombuffer(img.constBits().asstring(img.sizeInBytes()), np.uint8).reshape(img.height(), img.width(), 4)
    assert arr.shape[:2] == (window.height(), window.width())
    # The views are drawn (GL content is in the grab): the selected isodose colour and the PTV
    # contour colour both appear, and the picture is far from uniform.
    assert _colour_mask(arr, window._selected_level().colour).sum() > 50
    assert _colour_mask(arr, session.patient.structure("PTV").colour, tol=(30, 30, 30)).sum() > 50
    assert arr[..., :3].std() > 20


def test_edit_beams_and_rebuild_the_plan(qtbot, window, session):
    from PyQt6 import QtCore, QtWidgets

    panel = window.beams
    assert panel.table.rowCount() == len(session.engine.geometry) == 9
    assert panel.table.item(1, 1).text() == "40"
    assert not panel.rebuild_button.isEnabled()

    def accept_dialog(gantry):
        d = QtWidgets.QApplication.activeModalWidget()
        d.angles["gantry_deg"].setValue(gantry)
        d.accept()

    panel.table.selectRow(0)
    QtCore.QTimer.singleShot(100, lambda: accept_dialog(10.0))
    qtbot.mouseClick(panel.edit_button, QtCore.Qt.MouseButton.LeftButton)
    assert panel.beams[0].gantry_deg == 10.0 and panel.beams[0].fluence_grid is None
    panel.table.selectRow(8)
    qtbot.mouseClick(panel.delete_button, QtCore.Qt.MouseButton.LeftButton)
    assert panel.table.rowCount() == 8
    assert panel.rebuild_button.isEnabled()

    qtbot.mouseClick(panel.rebuild_button, QtCore.Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: window.session is not session and window.idle, timeout=60000)
    beams = [g.beam for g in window.session.engine.geometry]
    assert [b.gantry_deg for b in beams] == [10.0, 40.0, 80.0, 120.0, 160.0, 200.0, 240.0, 280.0]
    assert window.session.patient is session.patient
    # The new plan starts from open fields normalised to the prescription.
    target = session.patient.targets[0].mask
    assert float(np.median(window.snapshot.dose_gy[target])) == pytest.approx(session.prescription_gy, rel=1e-3)
    assert not panel.rebuild_button.isEnabled() and panel.table.rowCount() == 8


def test_dvh_panel_overlays_a_pinned_snapshot_and_switches_units(qtbot, window, session):
    from PyQt6 import QtCore, QtGui

    from ids_engine.dmr import SetVoxelDose

    panel = window.dvh
    assert {c.name for c in panel.plot.current.curves} == {"PTV", "OAR", "BODY"}
    qtbot.mouseClick(panel.pin_button, QtCore.Qt.MouseButton.LeftButton)
    first = f"plan {session.plan_id}"
    assert panel.snapshot_list.count() == 1 and panel.snapshot_list.item(0).text() == first
    pinned = panel.plot.snapshots[0].curves

    window.last_job_id = window.worker.engine.submit(SetVoxelDose(_interior_voxel(session), 40.0))
    qtbot.waitUntil(lambda: window.idle and len(session.journal) == 1, timeout=WAIT_MS)
    assert panel.plot.current.label == f"plan {session.plan_id}" != first
    ptv_now = next(c for c in panel.plot.current.curves if c.name == "PTV")
    ptv_then = next(c for c in pinned if c.name == "PTV")
    grid = np.linspace(0.0, 70.0, 701)
    change = np.abs(np.interp(grid, ptv_now.dose_gy, ptv_now.volume_fraction)
                    - np.interp(grid, ptv_then.dose_gy, ptv_then.volume_fraction))
    assert change.max() > 1e-5  # the live curve moved; the pinned one kept the old plan

    def grab():
        img = panel.plot.grab().toImage().convertToFormat(QtGui.QImage.Format.Format_RGBA8888)
        return np.frombuffer(img.constBits().asstring(img.sizeInBytes()), np.uint8).reshape(
            img.height(), img.width(), 4)

    ptv_colour = session.patient.structure("PTV").colour
    assert _colour_mask(grab(), ptv_colour, tol=(40, 40, 40)).sum() > 30
    panel.unit_box.setCurrentIndex(1)
    assert panel.plot.volume_unit == "cc" and window.act_cc.isChecked()
    assert _colour_mask(grab(), ptv_colour, tol=(40, 40, 40)).sum() > 30
    qtbot.mouseClick(panel.clear_button, QtCore.Qt.MouseButton.LeftButton)
    assert panel.snapshot_list.count() == 0 and not panel.plot.snapshots
