"""The window tells the truth (issue 9): what it shows matches the plan and the patient.

The read-out follows every snapshot, numbering is 0-based (z, y, x) as in scripts, status
lines say what is true, orientation letters match the scene transform, the legend draws the
wash's colours, isodose levels can be typed, phantoms without a target open for dose display,
saving creates folders and asks before replacing, and a DICOM case's RT Dose is a reference
the slices can show the difference to.
"""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import HAS_DISPLAY, NO_DISPLAY_REASON, build_coarse_session, require_viewer_packages, rewind

require_viewer_packages()

pytestmark = [pytest.mark.viewer, pytest.mark.skipif(not HAS_DISPLAY, reason=NO_DISPLAY_REASON)]

WAIT_MS = 30000


@pytest.fixture(scope="module")
def session():
    return build_coarse_session()


@pytest.fixture(scope="module")
def display(session):
    from ids_engine.viewer._loading import case_display

    return case_display(session)


@pytest.fixture(scope="module")
def shared_window(qapp, session):
    """One window for the module (making one costs seconds of software OpenGL); each test
    puts the session it needs back with :func:`_show`."""
    from ids_engine.viewer._theme import apply_theme
    from ids_engine.viewer.app import MainWindow

    apply_theme(qapp)
    w = MainWindow()
    w.resize(1400, 900)
    w.show()
    yield w
    w.close()


def _show(qtbot, w, session, display) -> None:
    if w.session is not session:
        w.set_session(session, display)
    qtbot.waitExposed(w)
    w.activateWindow()
    qtbot.waitActive(w)
    qtbot.waitUntil(lambda: w.idle, timeout=WAIT_MS)
    qtbot.wait(50)


@pytest.fixture
def window(qtbot, shared_window, session, display):
    _show(qtbot, shared_window, session, display)
    shared_window.tool_actions["navigate"].trigger()
    yield shared_window
    rewind(session)


def _qpoint(p):
    from PyQt6 import QtCore

    return QtCore.QPoint(int(round(float(p[0]))), int(round(float(p[1]))))


def _interior_voxel(session) -> tuple[int, int, int]:
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(session.target_mask)
    return tuple(int(v) for v in np.unravel_index(np.argmax(depth), depth.shape))


def _near_colour(rgba: np.ndarray, rgb01, xy, radius_px: float, tol: float = 40.0) -> int:
    """Pixels within ``radius_px`` of canvas point ``xy`` within ``tol`` of a colour (0..1)."""
    mask = np.all(np.abs(rgba[..., :3].astype(float) - np.asarray(rgb01) * 255.0) <= tol, axis=-1)
    rows, cols = np.nonzero(mask)
    return int(np.sum(np.hypot(cols - xy[0], rows - xy[1]) <= radius_px))


def _grab(widget) -> np.ndarray:
    from PyQt6 import QtGui

    img = widget.grab().toImage().convertToFormat(QtGui.QImage.Format.Format_RGBA8888)
    return np.frombuffer(img.constBits().asstring(img.sizeInBytes()), np.uint8).reshape(img.height(), img.width(), 4)


# ---------------------------------------------------------------- tests
def test_status_hint_and_readout_say_what_is_true(qtbot, shared_window, session, display):
    """No "Ready" before the first dose, no "Open a case" once one is open; the dose under the
    cursor is the newest snapshot's after a request and after undo, without moving the mouse."""
    from PyQt6 import QtCore
    from PyQt6.QtTest import QTest

    from ids_engine.dmr import SetVoxelDose

    w = shared_window
    try:
        if w.session is None:
            assert w.readout.text() == w.HINT  # what a new window shows
        w._show_hint()
        # Every status message, with whether the dose had arrived when it was shown: "Ready"
        # lasts 3 s, and a loaded machine's first frame (software OpenGL) can take longer, so
        # the message is checked as it is shown rather than after the frame.
        shown: list[tuple[str, bool]] = []
        record = lambda m: shown.append((m, w.dose_gy is not None))  # noqa: E731
        w.statusBar().messageChanged.connect(record)
        w.set_session(session, display)
        # The dose arrives as a queued signal: until then the window says it is computing.
        assert "Ready" not in w.statusBar().currentMessage()
        assert "Computing the dose" in w.statusBar().currentMessage()
        assert w.readout.text() != w.HINT
        qtbot.waitUntil(lambda: w.idle, timeout=WAIT_MS)
        w.statusBar().messageChanged.disconnect(record)
        ready = [had_dose for m, had_dose in shown if m.startswith("Ready")]
        assert ready and all(ready), shown  # shown, and only once the dose was in
        _show(qtbot, w, session, display)

        axial = w.slice_views["z"]
        idx = _interior_voxel(session)
        axial.set_slice(idx[0], emit=True)
        QTest.mouseMove(axial.canvas.native, _qpoint(axial.zyx_to_canvas(idx)))
        qtbot.waitUntil(lambda: w.readout_index() == idx, timeout=5000)
        before = float(w.snapshot.dose_gy[idx])
        assert f"voxel (z={idx[0]}, y={idx[1]}, x={idx[2]})" in w.readout.text()
        assert f"{before:.2f} Gy" in w.readout.text()

        # (a raise: lowering a voxel deep in the target leaves its neighbours below coverage, and the
        # status bar then shows that conflict instead)
        w.last_job_id = w.worker.engine.submit(SetVoxelDose(idx, 64.0))
        qtbot.waitUntil(lambda: w.idle and len(session.journal) == 1, timeout=WAIT_MS)
        after = float(w.snapshot.dose_gy[idx])
        assert abs(after - before) > 2.0
        assert f"{after:.2f} Gy" in w.readout.text() and f"{before:.2f} Gy" not in w.readout.text()
        # The status line and the history number the request #1.
        assert w.statusBar().currentMessage().startswith("#1: requested 64.00 Gy")
        assert w.history.item(1).text().startswith(f"#1  Set dose at voxel (z={idx[0]}, y={idx[1]}, x={idx[2]})")

        QTest.keyClick(axial.canvas.native, QtCore.Qt.Key.Key_Z, QtCore.Qt.KeyboardModifier.ControlModifier)
        qtbot.waitUntil(lambda: w.idle and not session.journal, timeout=WAIT_MS)
        assert f"{before:.2f} Gy" in w.readout.text()
    finally:
        rewind(session)


def test_one_brush_ring_and_orientation_letters(qtbot, window, session):
    from PyQt6.QtTest import QTest

    views = window.slice_views
    window.tool_actions["erase"].trigger()
    centre = lambda v: _qpoint(np.array([v.canvas.native.width(), v.canvas.native.height()]) / 2)  # noqa: E731
    QTest.mouseMove(views["z"].canvas.native, centre(views["z"]))
    assert views["z"].brush_visible
    QTest.mouseMove(views["y"].canvas.native, centre(views["y"]))
    assert views["y"].brush_visible and not views["z"].brush_visible

    # DICOM patient axes: +x the patient's left, +y posterior, +z the head.
    assert views["z"].orientation == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert views["y"].orientation == {"left": "R", "right": "L", "top": "H", "bottom": "F"}
    assert views["x"].orientation == {"left": "A", "right": "P", "top": "H", "bottom": "F"}
    shape = session.patient.grid.shape_zyx
    ax = views["z"]
    k = ax.slice_index
    # The letters agree with where the voxels are drawn: higher x (left) to the right, higher y
    # (posterior) further down, and the "L" is drawn at the right edge.
    assert ax.zyx_to_canvas((k, 0, shape[2] - 1))[0] > ax.zyx_to_canvas((k, 0, 0))[0]
    assert ax.zyx_to_canvas((k, shape[1] - 1, 0))[1] > ax.zyx_to_canvas((k, 0, 0))[1]
    image = ax.canvas.render()
    pos = dict(zip(ax._orient.text, ax._orient.pos))
    assert pos["L"][0] > image.shape[1] * 0.9 and pos["R"][0] < image.shape[1] * 0.1
    scale = image.shape[1] / ax.canvas.size[0]
    assert _near_colour(image, (1.0, 0.92, 0.3), pos["L"] * scale, 12 * scale) > 5, "no L drawn at the right edge"

    # 3D: a corner cue with red/green/blue axes labelled L, P, H that turns with the scene.
    v3 = window.view3d
    assert list(v3._axis_labels.text) == ["L", "P", "H"]
    img3 = v3.canvas.render()
    s3 = img3.shape[1] / v3.canvas.size[0]
    for k, colour in enumerate(v3.AXIS_COLOURS):
        mid = v3.cue_to_canvas(0.5 * np.eye(3)[k]) * s3
        assert _near_colour(img3, colour, mid, 4 * s3, tol=60) > 0, f"axis {'xyz'[k]} of the cue is not drawn"
    before = v3.cue_to_canvas((1.0, 0.0, 0.0))
    v3.view.camera.azimuth = v3.view.camera.azimuth + 90.0
    assert v3.cue.camera.azimuth == pytest.approx(v3.view.camera.azimuth)
    assert np.linalg.norm(v3.cue_to_canvas((1.0, 0.0, 0.0)) - before) > 10


def test_legend_and_typed_isodose_levels(qtbot, window, session):
    from PyQt6 import QtCore

    from ids_engine.viewer._style import isodose_colour

    rx = session.prescription_gy
    legend = window.legend
    labels = {pct: gy for _, pct, gy in legend.ticks}
    assert labels["100%"] == f"{rx:g} Gy" and labels["50%"] == f"{0.5 * rx:g} Gy"
    img = _grab(legend)
    bar = legend.bar_rect()
    t = next(t for t, pct, _ in legend.ticks if pct == "100%")
    x = int(round(legend.x_of(t))) + 2
    y = int(round(bar.center().y()))
    assert np.allclose(img[y, x, :3], np.asarray(isodose_colour(legend.fraction_at((x + 0.5 - bar.left()) /
                                                                                    bar.width()))) * 255, atol=12)

    edit = window.levels_edit
    edit.clear()
    qtbot.keyClicks(edit, f"{0.2 * rx:g} Gy, 50 95 100 110 %")
    qtbot.keyClick(edit, QtCore.Qt.Key.Key_Return)
    assert window.level_pcts == pytest.approx((20.0, 50.0, 95.0, 100.0, 110.0))
    assert window.level_box.count() == 5 and window.selected_level_gy == pytest.approx(0.95 * rx)
    axial = window.slice_views["z"]
    assert [lev.pct for lev in axial.levels] == pytest.approx([20.0, 50.0, 95.0, 100.0, 110.0])
    assert len(axial.isodose_segments(0.2 * rx)) > 0  # the new 20 % line is drawn
    assert f"{0.2 * rx:.3g} Gy" in list(axial._labels.text)

    edit.setText("95, lots")
    qtbot.keyClick(edit, QtCore.Qt.Key.Key_Return)
    assert window.level_pcts == pytest.approx((20.0, 50.0, 95.0, 100.0, 110.0))
    assert "not changed" in window.statusBar().currentMessage() and "'lots'" in window.statusBar().currentMessage()


def test_phantom_lists_agree_and_water_opens_for_dose_display(qtbot, window, session):
    from PyQt6 import QtCore, QtWidgets

    from ids_engine.cli import build_parser
    from ids_engine.phantoms import PHANTOMS

    view = next(a for a in build_parser()._subparsers._group_actions[0].choices["view"]._actions
                if "--phantom" in a.option_strings)
    assert list(view.choices) == list(PHANTOMS)
    seen = []

    def inspect_dialog():
        d = QtWidgets.QApplication.activeModalWidget()
        seen.append([d.findChildren(QtWidgets.QComboBox)[0].itemText(i)
                     for i in range(d.findChildren(QtWidgets.QComboBox)[0].count())])
        d.reject()

    QtCore.QTimer.singleShot(100, inspect_dialog)
    window.open_phantom_dialog()
    assert seen == [list(PHANTOMS)]

    window.open_case({"phantom": "water", "resolution": "coarse"})
    qtbot.waitUntil(lambda: window.session is not session and window.idle and window.field.curves is not None,
                    timeout=60000)
    assert window.display_only and not window.session.patient.targets
    assert window.field_dock.isVisible()
    assert not window.tool_actions["set_dose"].isEnabled() and window.tool_actions["navigate"].isEnabled()
    assert "no target" in window.statusBar().currentMessage()
    c = window.field.curves
    assert c.max_gy == pytest.approx(window.session.prescription_gy, rel=1e-3)
    assert window.field.depth_plot.y_pct.max() == pytest.approx(100.0, abs=0.01)
    assert "dose display" in window.case_label.text()


def test_save_session_creates_the_folder_and_asks_before_replacing(qtbot, window, session, tmp_path, monkeypatch):
    target = tmp_path / "plans" / "case 1"
    window.save_session(str(target))
    qtbot.waitUntil(lambda: window.idle and (target / "session.json").exists(), timeout=WAIT_MS)

    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    asked = []
    monkeypatch.setattr(window, "confirm", lambda title, text: asked.append(text) or False)
    window.save_session(str(other))
    qtbot.waitUntil(lambda: window.idle and bool(asked), timeout=WAIT_MS)
    assert "not empty" in asked[0] and [p.name for p in other.iterdir()] == ["keep.txt"]
    monkeypatch.setattr(window, "confirm", lambda title, text: asked.append(text) or True)
    window.save_session(str(other))
    qtbot.waitUntil(lambda: window.idle and (other / "session.json").exists(), timeout=WAIT_MS)
    assert not (other / "keep.txt").exists() and len(asked) == 2
    session.close()  # the worker is idle: stop journaling to the test's folders


@pytest.fixture(scope="module")
def dicom_case(session, tmp_path_factory):
    """The coarse horseshoe written as CT + RTSTRUCT + an RT Dose that is the open-field plan
    with +10 % of the prescription added in the PTV's upper half (a known difference)."""
    from ids_engine.io import write_dicom_ct, write_rtdose, write_rtstruct

    folder = tmp_path_factory.mktemp("dicom-case")
    p = session.patient
    files = write_dicom_ct(p, folder)
    write_rtstruct(p, folder / "RS.dcm", files)
    from ids_engine.io import read_dicom

    frame = read_dicom(folder).frame_of_reference_uid
    plan = session.dose() if not session.journal else None
    assert plan is not None
    ref = plan.copy()
    ptv = p.structure("PTV").mask
    upper = ptv & (np.arange(ptv.shape[0])[:, None, None] >= ptv.shape[0] // 2)
    ref[upper] += 0.1 * session.prescription_gy
    write_rtdose(ref, p.grid, folder / "RD.dcm", frame, ct_files=files)
    return folder, ref, upper


def test_rt_dose_in_a_dicom_folder_is_a_reference_to_compare_with(qtbot, shared_window, dicom_case):
    from ids_engine.viewer._loading import build_session, case_display

    folder, ref, upper = dicom_case
    s = build_session({"dicom": str(folder)}, 60.0)
    display = case_display(s)
    assert display.reference_gy is not None and display.reference_name == "RD.dcm"
    np.testing.assert_allclose(display.reference_gy, ref, atol=1e-3)
    w = shared_window
    w.set_session(s, display)
    qtbot.waitUntil(lambda: w.idle, timeout=WAIT_MS)
    assert "Reference dose RD.dcm loaded" in w.statusBar().currentMessage()
    assert w.dose_mode_box.isEnabled()
    w.dose_mode_box.setCurrentIndex(w.dose_mode_box.findData("difference"))
    axial = w.slice_views["z"]
    k, j, i = (int(v) for v in np.argwhere(upper)[len(np.argwhere(upper)) // 2])
    axial.set_slice(k, emit=True)
    diff = axial.displayed_slice()
    np.testing.assert_allclose(diff, w.snapshot.dose_gy[k] - ref[k], atol=1e-3)
    assert diff[j, i] == pytest.approx(-0.1 * s.prescription_gy, abs=0.05)
    assert w.legend.mode == "difference" and any(pct == "-10%" for _, pct, _ in w.legend.ticks)
    # The wash is blue (plan below the reference) over the raised half of the PTV.
    image = axial.canvas.render()
    scale = image.shape[1] / axial.canvas.size[0]
    x, y = np.round(axial.zyx_to_canvas((k, j, i)) * scale).astype(int)
    patch = image[y - 3 : y + 4, x - 3 : x + 4, :3].astype(float).reshape(-1, 3)
    assert np.mean(patch[:, 2] > patch[:, 0] + 40) > 0.5, f"no blue wash where the plan is below the reference: {patch}"
    w._hover_zyx = (k, j, i)
    w._update_readout()
    assert "reference" in w.readout.text() and "plan − reference -6.00 Gy" in w.readout.text()
