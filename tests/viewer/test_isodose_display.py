"""Isodose display (seed 001, issue 12): per-line colour and width, the tinted region, tick marks
on the downhill side, labels in Gy or % of the normalisation point, each frame's hot spot, and
the one 3D isodose surface (solid, wire, off, with transparency).

The helpers are checked on constructed fields; the window (Xvfb) is checked on rendered pixels.
"""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import HAS_DISPLAY, NO_DISPLAY_REASON, build_coarse_session, require_viewer_packages

require_viewer_packages()

needs_display = pytest.mark.skipif(not HAS_DISPLAY, reason=NO_DISPLAY_REASON)
pytestmark = [pytest.mark.viewer]

WAIT_MS = 30000


# --------------------------------------------------------------------------- helpers (no window)
def test_downhill_ticks_point_to_lower_dose():
    from ids_engine.viewer._contours import _bilinear, downhill_ticks, isoline_segments

    # A peak (ticks point outwards) and a ramp rising along the columns (ticks point left).
    r, c = np.mgrid[0:40, 0:50]
    peak = 100.0 - 3.0 * np.hypot((r - 20) * 2.0, (c - 25) * 3.0)
    for field, level in ((peak, 60.0), (2.0 * c + 0.3 * r, 50.0)):
        segs = isoline_segments(field, level)
        ticks = downhill_ticks(segs, field, length_mm=4.0, spacing_mm=6.0, scale_rc=(2.0, 3.0))
        assert len(ticks) >= 5
        start = _bilinear(field, ticks[:, 0])
        end = _bilinear(field, ticks[:, 1])
        # Ticks start on the line (a segment's midpoint: the chord of a bilinear isoline).
        np.testing.assert_allclose(start, level, atol=0.2)
        assert np.all(end < level - 1.0)  # and end on its lower side
        length = np.linalg.norm((ticks[:, 1] - ticks[:, 0]) * (2.0, 3.0), axis=1)
        np.testing.assert_allclose(length, 4.0)
    # One tick per spacing: no two closer than the spacing's diagonal allows.
    mid_mm = ticks[:, 0] * (2.0, 3.0)
    cells = np.floor(mid_mm / 6.0)
    assert len(np.unique(cells, axis=0)) == len(ticks)


def test_hot_spot_and_asterisk():
    from ids_engine.viewer._contours import asterisk_segments, hot_spot_rc

    f = np.zeros((20, 30))
    f[7, 21] = 3.0
    f[3, 3] = 2.0
    assert hot_spot_rc(f) == ((7, 21), 3.0)
    assert hot_spot_rc(np.zeros((4, 4))) is None
    a = asterisk_segments((5.0, 6.0), 2.0)
    assert a.shape == (4, 2, 2)
    np.testing.assert_allclose(a.mean(axis=1), [[5.0, 6.0]] * 4, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(a[:, 1] - a[:, 0], axis=1), 4.0)


def test_display_styles_tint_and_labels():
    from ids_engine.viewer._style import (NORMAL_LINE_WIDTH_PX, IsodoseDisplay, compose_slice_rgba,
                                          isodose_levels)

    levels = isodose_levels(60.0, (50.0, 95.0))
    d = IsodoseDisplay().with_style(95.0, (0.0, 1.0, 0.0), 4.0).with_style(50.0, None, 0.0)
    assert d.style(levels[1]) == ((0.0, 1.0, 0.0), 4.0)
    assert d.style(levels[0]) == (levels[0].colour, NORMAL_LINE_WIDTH_PX)  # width 0: the normal one
    assert d.with_style(95.0, None, 2.0).style(levels[1]) == (levels[1].colour, 2.0)  # replaced, not added
    with pytest.raises(ValueError, match="line width of 95 %"):
        IsodoseDisplay(styles=((95.0, None, -1.0),))
    with pytest.raises(ValueError, match="normalisation_gy"):
        IsodoseDisplay(normalisation_gy=0.0)
    # Labels: Gy, % of the prescription, or % of the normalisation point's dose (same line).
    assert levels[1].label("Gy") == "57 Gy"
    assert levels[1].label("%") == "95%"
    assert levels[1].label("%", normalisation_gy=57.0) == "100%"
    # The tint covers the voxels at or above its level, in its colour, and nothing else.
    ct = np.zeros((3, 4), np.float32)
    dose = np.array([[10, 56.9, 57, 60]] * 3, np.float32)
    plain = compose_slice_rgba(ct, 400, 40, dose, 60.0, wash_alpha=0.0)
    tinted = compose_slice_rgba(ct, 400, 40, dose, 60.0, wash_alpha=0.0, tint=(57.0, (1.0, 0.0, 0.0), 0.5))
    np.testing.assert_array_equal(tinted[:, :2], plain[:, :2])
    t, p = tinted.astype(int), plain.astype(int)
    assert np.all(t[:, 2:, 0] > p[:, 2:, 0] + 60) and np.all(t[:, 2:, 1] < p[:, 2:, 1] - 40)


# --------------------------------------------------------------------------- the window
@pytest.fixture(scope="module")
def session():
    return build_coarse_session()


@pytest.fixture(scope="module")
def window(qapp, session):
    """One main window for the module (building a window and its worker takes seconds)."""
    from ids_engine.viewer._theme import apply_theme
    from ids_engine.viewer.app import MainWindow
    from pytestqt.qtbot import QtBot

    apply_theme(qapp)
    w = MainWindow()
    w.resize(1400, 900)
    w.show()
    bot = QtBot(None)
    bot.waitExposed(w)
    w.set_session(session)
    bot.waitUntil(lambda: w.idle, timeout=WAIT_MS)
    bot.wait(50)
    yield w
    w.close()
    w.deleteLater()


def _colour_pixels(rgba: np.ndarray, rgb01, tol: int = 30) -> np.ndarray:
    return np.all(np.abs(rgba[..., :3].astype(int) - np.asarray(rgb01) * 255) <= tol, axis=-1)


def _scene_to_rc(view, xy):
    return view.scene_to_rc(np.asarray(xy, np.float64))


@needs_display
def test_line_width_colour_tint_and_ticks_render(qtbot, window, session):
    from ids_engine.viewer._style import IsodoseDisplay

    view = window.slice_views["z"]
    magenta = (1.0, 0.0, 1.0)
    lev = next(lv for lv in window.levels if abs(lv.pct - 50.0) < 1e-6)
    window.level_box.setCurrentIndex(0)  # keep the 50 % line out of the "selected" style
    base = IsodoseDisplay(ticks=False, hot_spot=False)
    view.set_isodose_display(base.with_style(50.0, magenta, 0.0))
    thin = _colour_pixels(view.canvas.render(), magenta).sum()
    view.set_isodose_display(base.with_style(50.0, magenta, 6.0))
    wide = _colour_pixels(view.canvas.render(), magenta).sum()
    assert thin > 100, "the recoloured 50 % line is not drawn"
    assert wide > 2.5 * thin, (thin, wide)

    # Ticks: every tick starts on its line and ends on the lower-dose side.
    view.set_isodose_display(base.with_style(50.0, magenta, 0.0).__class__(ticks=True, hot_spot=False))
    d = view.dose_slice()
    pos = np.asarray(view._ticks._pos if hasattr(view._ticks, "_pos") else view._ticks.pos, np.float64)
    assert view._ticks.visible and len(pos) >= 20
    from ids_engine.viewer._contours import _bilinear

    rc = _scene_to_rc(view, pos).reshape(-1, 2, 2)
    start, end = _bilinear(d, rc[:, 0]), _bilinear(d, rc[:, 1])
    assert np.mean(end < start) > 0.95
    with_ticks = view.canvas.render()
    view.set_isodose_display(IsodoseDisplay(ticks=False, hot_spot=False))
    without = view.canvas.render()
    assert np.any(_colour_pixels(with_ticks, lev.colour, 20) & ~_colour_pixels(without, lev.colour, 20))

    # Tint: the 95 % region turns green on the rendered image, the low-dose region does not.
    tgt = np.argwhere(session.target_mask[view.slice_index])
    inside = tgt[len(tgt) // 2]
    before = view.canvas.render()
    view.set_isodose_display(IsodoseDisplay(ticks=False, hot_spot=False, tint_pct=95.0, tint_colour=(0.0, 1.0, 0.0),
                                            tint_alpha=0.6))
    after = view.canvas.render()
    px = np.round(view.rc_to_canvas(inside)).astype(int)
    ratio = view.canvas.render().shape[1] / view.canvas.size[0]
    x, y = int(px[0] * ratio), int(px[1] * ratio)
    assert after[y, x, 1] > before[y, x, 1] + 60 and after[y, x, 0] < before[y, x, 0]
    corner = (5, 5)
    assert np.array_equal(after[corner][:3], before[corner][:3])
    view.set_isodose_display(IsodoseDisplay())


@needs_display
def test_hot_spot_marked_in_each_frame_and_labels_in_percent_of_normalisation(qtbot, window, session):
    from ids_engine.viewer._style import IsodoseDisplay

    for view in window.slice_views.values():
        view.set_isodose_display(IsodoseDisplay())
        d = view.dose_slice()
        (r, c), gy = view.hot_spot
        assert gy == pytest.approx(float(d.max())) and d[r, c] == d.max()
        assert view._hot.visible and view._hot_label.visible
        assert view._hot_label.text == f"{gy:.2f} Gy"
    # The asterisk is drawn where the hot spot is (white pixels around it).
    view = window.slice_views["z"]
    img = view.canvas.render()
    ratio = img.shape[1] / view.canvas.size[0]
    x, y = (view.hot_spot_canvas() * ratio).round().astype(int)
    win = _colour_pixels(img[max(y - 12, 0):y + 12, max(x - 12, 0):x + 12], (1.0, 1.0, 1.0), 25)
    assert win.sum() >= 8
    view.set_isodose_display(IsodoseDisplay(hot_spot=False))
    assert not view._hot.visible
    # % labels: of the normalisation point's dose, when one is set (the same lines).
    rx = session.prescription_gy
    window.unit_box.setCurrentText("%")
    view.set_isodose_display(IsodoseDisplay(normalisation_gy=0.5 * rx))
    labels = list(view._labels.text)
    assert "100%" in labels  # the 50 % line is 100 % of a point at half the prescription
    assert view._hot_label.text.endswith("%")
    window.unit_box.setCurrentText("Gy")
    view.set_isodose_display(IsodoseDisplay())


@needs_display
def test_isodose_control_dialog(qtbot, window, session):
    from ids_engine.viewer.isodose_control import IsodoseControl

    rx = session.prescription_gy
    dlg = IsodoseControl(window)
    qtbot.addWidget(dlg)
    n = len(window.levels)
    dlg.value_edit.setText(f"{0.8 * rx:g}")
    dlg.value_unit.setCurrentText("Gy")
    dlg._on_add()
    assert len(window.levels) == n + 1 and any(abs(lv.gy - 0.8 * rx) < 1e-6 for lv in window.levels)
    assert abs(dlg.current_level().gy - 0.8 * rx) < 1e-6
    # Width and colour of the selected line reach every slice view.
    dlg.colour_box.setCurrentText("cyan")
    dlg.width_spin.setValue(5)
    for v in window.slice_views.values():
        assert v.display.style(dlg.current_level()) == ((0.0, 1.0, 1.0), 5.0)
    dlg.tint_colour.setCurrentText("blue")
    dlg.tint_check.setChecked(True)
    assert window.slice_views["y"].display.tint_pct == pytest.approx(80.0)
    assert window.slice_views["y"].display.tint_colour == (0.0, 0.0, 1.0)
    # Show in 3D: the window's selected level (the 3D surface's) becomes this one.
    dlg._on_show3d()
    assert window.selected_level_gy == pytest.approx(0.8 * rx)
    # A level in % of the normalisation point.
    dlg.norm_check.setChecked(True)
    dlg.norm_spin.setValue(0.5 * rx)
    assert dlg.add_level(30.0, "%")  # 30 % of half the prescription = 15 % of it
    assert any(abs(lv.pct - 15.0) < 1e-6 for lv in window.levels)
    # Delete: the level goes, and with it its style and tint.
    dlg.select_gy(0.8 * rx)
    assert dlg.delete_level()
    assert not any(abs(lv.gy - 0.8 * rx) < 1e-6 for lv in window.levels)
    assert window.slice_views["z"].display.tint_pct is None
    assert not dlg.add_level(-1.0, "Gy") and "positive" in dlg.message.text()
    dlg.close()


@needs_display
def test_one_3d_surface_solid_wire_off(qtbot, window):
    v3 = window.view3d
    qtbot.waitUntil(lambda: v3.surface_mesh is not None and not v3.surface_mesh.empty, timeout=WAIT_MS)
    colour = v3.surface_colour
    v3.set_surface_mode("Solid", 100)
    assert v3.surface_visible and not v3.wireframe
    v3.set_surface_mode("Wire")
    assert v3.surface_visible and v3.wireframe
    wire = _colour_pixels(v3.canvas.render(), colour, 60).sum()
    v3.set_surface_mode("Off")
    assert not v3.surface_visible
    off_img = v3.canvas.render().astype(int)
    v3.set_surface_mode("Solid", 100)
    solid_img = v3.canvas.render().astype(int)
    v3.set_surface_mode("Wire")
    wire_img = v3.canvas.render().astype(int)
    v3.set_surface_mode("Solid", 20)
    faint_img = v3.canvas.render().astype(int)

    def changed(img):
        return np.abs(img[..., :3] - off_img[..., :3]).max(axis=-1) > 30

    # The wire frame draws lines in the surface's own colour; the solid surface covers an area.
    assert wire > 200, wire
    assert changed(solid_img).sum() > 2000 and changed(wire_img).sum() > 200
    assert changed(wire_img).sum() < changed(solid_img).sum()
    # Transparency: at 20 % opacity the surface changes the scene much less than opaque.
    on = changed(solid_img)
    assert np.abs(faint_img - off_img)[on].mean() < 0.5 * np.abs(solid_img - off_img)[on].mean()
    assert "isodose surface" in v3.header.text()
    with pytest.raises(ValueError, match="surface mode"):
        v3.set_surface_mode("Glass")
    v3.set_surface_mode("Solid", 55)


# --------------------------------------------------------------------------- DVH popup (sampling)
def _sampling_dialog(qtbot, density):
    from ids_engine.phantoms import PHANTOMS
    from ids_engine.viewer.dvh_sampling import SampledDVHDialog

    p = PHANTOMS["horseshoe"](resolution="coarse")
    c = p.grid.voxel_centres_xyz()
    dose = (60.0 * np.exp(-np.sum((c - p.structure("PTV").centroid_xyz()) ** 2, axis=-1) / (2 * 40.0 ** 2)))
    dlg = SampledDVHDialog(dose.astype(np.float32), p, 60.0, "plan 3", density_per_mm3=density)
    qtbot.addWidget(dlg)
    return dlg


def test_dvh_popup_samples_until_the_density_and_draws_the_curves(qtbot):
    from ids_engine.evaluation import dkw_bound, dvh_max_difference

    dlg = _sampling_dialog(qtbot, 1.0)
    assert [s.name for s in dlg.chosen()] == ["PTV", "OAR"]  # the body is left out by default
    dlg.start()
    assert dlg.status.text() == "running" and not dlg.compute_button.isEnabled()
    qtbot.waitUntil(lambda: dlg.compute_button.isEnabled(), timeout=WAIT_MS)
    s = dlg.last_state
    assert s.done and min(s.density_per_mm3) >= 1.0
    assert dlg.status.text().startswith("done:")
    assert dlg.plot.current.curves == s.dvhs and dlg.plot.snapshots[0].label == "exact"
    for h, e, n in zip(s.dvhs, dlg.exact, s.points):
        assert dvh_max_difference(h, e) < dkw_bound(n, 1e-6) + 0.005
    dlg.close()


def test_dvh_popup_stops(qtbot):
    dlg = _sampling_dialog(qtbot, 1e6)  # far more points than anyone waits for
    dlg.start()
    qtbot.waitUntil(lambda: dlg.last_state is not None and dlg.last_state.round >= 1, timeout=WAIT_MS)
    dlg.stop()
    assert dlg.wait(30.0)
    qtbot.waitUntil(lambda: dlg.compute_button.isEnabled(), timeout=WAIT_MS)
    assert dlg.status.text().startswith("stopped:") and not dlg.last_state.done
    assert dlg.plot.current is not None  # the curves drawn so far stay
    dlg.close()


@needs_display
def test_point_doses_shown_on_their_slice_with_measured_values(qtbot, window, session):
    from ids_engine.evaluation import point_doses
    from ids_engine.model import PointOfInterest
    from ids_engine.viewer.slices import POINT_COLOUR, point_marks

    g = session.patient.grid
    pts = [PointOfInterest("iso", (0.0, 0.0, 0.0)), PointOfInterest("01 1 01", (0.0, -30.0, 12.0)),
           PointOfInterest("far", (9999.0, 0.0, 0.0))]
    d = point_doses(session.engine, pts)
    marks = point_marks(d.labels, d.positions_mm_xyz, g, d.total_gy, [60.5, float("nan"), 1.0])
    assert [m.label for m in marks] == ["iso", "01 1 01"]  # outside the grid: not drawn
    assert marks[0].lines == (f"{d.total_gy[0]:.2f} Gy", "60.50 Gy m")
    assert marks[1].lines == (f"{d.total_gy[1]:.2f} Gy",)
    view = window.slice_views["z"]
    k = int(round(marks[0].zyx[0]))
    view.set_slice(k)
    view.set_points(marks)
    shown = view.shown_points()
    assert marks[0] in shown and (marks[1] in shown) == (int(round(marks[1].zyx[0])) == k)
    img = view.canvas.render()
    ratio = img.shape[1] / view.canvas.size[0]
    x, y = (view.zyx_to_canvas(marks[0].zyx) * ratio).round().astype(int)
    near = _colour_pixels(img[max(y - 8, 0):y + 9, max(x - 8, 0):x + 9], POINT_COLOUR[:3], 40)
    assert near.sum() >= 6, "the point's cross is not drawn"
    view.set_slice(k + 3 if k + 3 < view.n_slices else k - 3)
    assert marks[0] not in view.shown_points() and not (view._points.visible and not view.shown_points())
    view.set_points(())
    view.set_slice(k)
    # The patient's own points, their dose read from the displayed cube: close to the engine's.
    from ids_engine.viewer.slices import patient_point_marks

    own = patient_point_marks(session.patient, session.dose(), {"I S O": 61.0})
    ref = point_doses(session.engine)
    assert [m.label for m in own] == list(ref.labels) == ["ISO"]
    assert float(own[0].lines[0].split()[0]) == pytest.approx(ref.total_gy[0], rel=0.01)
    assert own[0].lines[1] == "61.00 Gy m"
