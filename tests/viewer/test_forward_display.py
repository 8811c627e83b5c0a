"""A forward plan's dose in the main window (seed 001: plans are displayed in frames, each frame
showing the plan ID so a screen print can be matched to the physics summary), points removed
and edited in the forward dialog, and the DVH popup over several plans.

The worker is checked without a window; the window and dialogs under Xvfb on the coarse
horseshoe."""

from __future__ import annotations

import functools
import threading

import numpy as np
import pytest

from .conftest import HAS_DISPLAY, NO_DISPLAY_REASON, open_forward_dialog, require_viewer_packages, wait_until

require_viewer_packages()

pytestmark = [pytest.mark.viewer]
needs_display = pytest.mark.skipif(not HAS_DISPLAY, reason=NO_DISPLAY_REASON)


# --------------------------------------------------------------------------- the worker
def test_worker_shows_another_plans_dose_and_refuses_to_shape_it():
    from ids_engine.dmr import SetVoxelDose
    from ids_engine.session import Session
    from ids_engine.viewer.worker import EngineWorker, ShownPlan

    s = Session.from_phantom("horseshoe", "coarse", n_beams=3)
    snaps, messages = [], []
    got = threading.Event()
    w = EngineWorker(s, lambda snap: (snaps.append(snap), got.set()), lambda t, e: messages.append((t, e)))

    def wait_for(job_id):
        for _ in range(600):
            if snaps and snaps[-1].job_id >= job_id:
                return snaps[-1]
            got.wait(0.1)
            got.clear()
        raise AssertionError("no snapshot")

    w.start()
    try:
        first = wait_for(1)
        session_dose = first.dose_gy.copy()
        other = (0.5 * session_dose).astype(np.float32)
        shown = ShownPlan("Box", 7, 2.0, lambda: other)
        snap = wait_for(w.show_plan(shown))
        assert snap.shown is shown and snap.plan_id == 7
        np.testing.assert_array_equal(snap.dose_gy, other)
        assert snap.metrics.prescription_gy == 2.0  # % of the shown plan's normalisation point
        ptv = next(h for h in snap.dvhs if h.name == "PTV")
        mask = s.patient.structure("PTV").mask
        assert ptv.dose_gy[np.flatnonzero(ptv.volume_fraction > 0)[-1]] <= other[mask].max() + 1e-6
        # Shaping the session while another plan is shown is refused, and says why.
        snap = wait_for(w.submit(SetVoxelDose(tuple(int(v) for v in np.argwhere(mask)[0]), 1.0)))
        assert not s.journal and snap.shown is shown
        assert messages and "forward plan 'Box', plan ID 7 is displayed" in messages[-1][0] and messages[-1][1]
        # A dose of the wrong grid is reported, and the display stays as it was.
        snap = wait_for(w.show_plan(ShownPlan("Bad", 1, 1.0, lambda: np.zeros((2, 2, 2), np.float32))))
        assert snap.shown is shown and "not the case's grid" in messages[-1][0]
        # Back to the session: its dose, its plan ID, shaping allowed again.
        snap = wait_for(w.show_plan(None))
        assert snap.shown is None and snap.plan_id == s.plan_id
        np.testing.assert_array_equal(snap.dose_gy, session_dose)
    finally:
        w.stop()
        s.close()


# --------------------------------------------------------------------------- the window
@pytest.fixture(scope="module")
def window(qapp):
    from ids_engine.session import Session
    from ids_engine.viewer.app import MainWindow

    s = Session.from_phantom("horseshoe", "coarse", n_beams=3)
    w = MainWindow()
    w.resize(1300, 860)
    w.show()
    w.set_session(s)
    wait_until(qapp, lambda: w.idle and w.dose_gy is not None)
    yield w
    dlg = getattr(w, "_forward_dialog", None)
    if dlg is not None:
        dlg.close()
    w.close()
    w.deleteLater()
    qapp.processEvents()
    s.close()


def _settle(qapp, w, dlg):
    """Wait until the dialog's tasks and the window's jobs are done."""
    dlg.wait_idle()
    wait_until(qapp, lambda: dlg._task is None and w.idle)


def _box(dlg):
    for g in (0, 90):
        assert dlg.add_beam(gantry_deg=g, width_mm=130, height_mm=80)
    assert dlg.opposed_beam(0) and dlg.opposed_beam(1)


@needs_display
def test_the_selected_forward_plan_is_shown_with_its_plan_id(qapp, window, tmp_path):
    from ids_engine.planning import DoseToNormalisation, MonitorUnits

    w = window
    s = w.session
    session_dose = w.dose_gy.copy()
    dlg = w.show_forward_planning()
    assert dlg.follow_box.isVisible() and dlg.follow_box.isChecked()
    _box(dlg)
    qapp.processEvents()
    assert w.shown_plan is None  # no MU yet: the window keeps the session's dose
    dlg.mode_box.setCurrentIndex(2)
    dlg.rx_dose.setValue(2.0)
    assert dlg.apply_prescription(DoseToNormalisation(2.0, (1, 1, 1, 1)))
    _settle(qapp, w, dlg)
    p1 = dlg.plan
    doses = dlg.state.cached_doses(p1)
    assert w.shown_plan is not None and w.shown_plan.key == ("Plan 1", p1.plan_id)
    np.testing.assert_allclose(w.dose_gy, doses.dose(p1.mu), rtol=1e-6)
    # 100 % is the plan's normalisation point (the first beam's isocentre) for its whole MU.
    norm = float(doses.at_points(np.array([p1.beams[0].isocentre_mm_xyz]))[0] @ np.array(p1.mu))
    assert w.display_rx_gy == pytest.approx(norm) and abs(norm - 2.0) < 0.02
    assert all(v.prescription_gy == pytest.approx(norm) for v in w.slice_views.values())
    assert [lev.gy for lev in w.levels] == pytest.approx([norm * lev.pct / 100.0 for lev in w.levels])
    # The plan and its ID in every frame, the title and the status bar; the DVH panel's curves are its.
    tag = f"forward plan 'Plan 1', plan ID {p1.plan_id}"
    frame = f"Plan 1 · plan ID {p1.plan_id}"  # leads each header, so a narrow frame never clips it
    assert all(v.header.text().startswith(frame) for v in w.slice_views.values())
    assert w.view3d.header.text().startswith(frame)
    assert tag in w.windowTitle() and tag in w.perf.text() and w.dvh.plot.current.label == tag
    ptv = next(h for h in w.dvh.plot.current.curves if h.name == "PTV")
    mask = s.patient.structure("PTV").mask
    d50 = ptv.dose_gy[np.flatnonzero(ptv.volume_fraction >= 0.5)[-1]]  # bins of 0.5 % of 100 %
    assert ptv.dose_gy[1] == pytest.approx(norm / 200.0) and abs(d50 - np.median(w.dose_gy[mask])) <= norm / 200.0
    # Shaping is off while a forward plan is shown.
    assert not w.tool_actions["set_dose"].isEnabled() and w.act_show_session.isEnabled()
    assert not w.act_export.isEnabled()  # File > Export writes the session's plan, not the one shown
    assert not w.export_plan(str(tmp_path / "rt")) and "Not exported" in w.statusBar().currentMessage()
    assert not (tmp_path / "rt").exists()

    # A copy with other MU: switching plans switches the displayed dose.
    assert dlg.copy_plan("Plan 2")
    assert dlg.apply_prescription(MonitorUnits(tuple(2.0 * m for m in p1.mu)))
    _settle(qapp, w, dlg)
    p2 = dlg.plan
    assert w.shown_plan.key == ("Plan 2", p2.plan_id) and p2.plan_id == p1.plan_id + 1
    np.testing.assert_allclose(w.dose_gy, 2.0 * doses.dose(p1.mu), rtol=1e-5)
    assert w.slice_views["z"].header.text().startswith(f"Plan 2 · plan ID {p2.plan_id}")
    assert dlg.select_plan("Plan 1")
    _settle(qapp, w, dlg)
    assert w.shown_plan.key == ("Plan 1", p1.plan_id)
    np.testing.assert_allclose(w.dose_gy, doses.dose(p1.mu), rtol=1e-6)

    # A point added in the dialog is drawn with the shown plan's dose (on its slice).
    iso = p1.beams[0].isocentre_mm_xyz
    assert dlg.add_point("FW1", iso)
    wait_until(qapp, lambda: w.idle and any(m.label == "FW1" for m in w.slice_views["z"].points))
    mark = next(m for m in w.slice_views["z"].points if m.label == "FW1")
    assert abs(float(mark.lines[0].split()[0]) - norm) < 0.03 * norm, mark.lines  # the cube's dose there
    assert w.shown_plan.key == ("Plan 1", p1.plan_id)

    # The isodose control works in % of the shown plan's normalisation point.
    w.show_isodose_control()
    ctl = w._isodose_control
    assert "normalisation point of forward plan 'Plan 1'" in ctl.reference.text()
    assert ctl.add_level(42.0, "%")
    assert any(abs(lev.gy - 0.42 * norm) < 1e-9 and abs(lev.pct - 42.0) < 1e-6 for lev in w.levels)
    assert ctl.add_level(1.0, "Gy") and any(abs(lev.gy - 1.0) < 1e-5 for lev in w.levels)
    ctl.close()

    # Back to the shaping session's dose: its prescription, its plan ID, shaping on again.
    w.show_session_dose()
    wait_until(qapp, lambda: w.idle and w.shown_plan is None)
    assert not dlg.follow_box.isChecked()
    np.testing.assert_array_equal(w.dose_gy, session_dose)
    assert w.display_rx_gy == s.prescription_gy
    assert w.slice_views["y"].header.text().startswith(f"shaping · plan ID {s.plan_id}")
    assert "forward plan" not in w.windowTitle()
    assert w.tool_actions["set_dose"].isEnabled() and not w.act_show_session.isEnabled()
    assert w.act_export.isEnabled()
    # Ticking the box again shows the selected plan at once (its doses are cached).
    dlg.follow_box.setChecked(True)
    wait_until(qapp, lambda: w.idle and w.shown_plan is not None)
    assert w.shown_plan.key == ("Plan 1", p1.plan_id)
    w.show_session_dose()
    wait_until(qapp, lambda: w.idle and w.shown_plan is None)


@needs_display
def test_plan_dvhs_of_two_plans_and_the_summary_pdf(qapp, window, tmp_path):
    from ids_engine.evaluation import exact_dvh

    w = window
    dlg = w.show_forward_planning()
    if "Plan 2" not in dlg.state.book.names:
        pytest.skip("needs the plans of the test above")
    pop = w.show_plan_dvhs()
    assert pop is dlg.dvh_dialog and pop.isVisible()
    names = [pop.tree.topLevelItem(i).text(0) for i in range(pop.tree.topLevelItemCount())]
    assert names[:2] == ["Plan 1", "Plan 2"] and names[-1] == "shaping session"
    pop.set_chosen([("Plan 1", "PTV"), ("Plan 1", "OAR"), ("Plan 2", "PTV"), ("shaping session", "PTV")])
    assert pop.compute()
    assert pop.wait()
    assert pop.status_text == "done"
    book = dlg.state.book
    labels = [f"Plan 1 (plan ID {book.get('Plan 1').plan_id})", f"Plan 2 (plan ID {book.get('Plan 2').plan_id})"]
    assert pop.order[:2] == labels and pop.order[2].startswith("shaping session (plan ID")
    # Line style per plan: the first plan solid (current), the others the snapshot styles.
    assert pop.plot.current.label == labels[0] and [c.label for c in pop.plot.snapshots] == pop.order[1:]
    p = dlg.state.patient
    doses = dlg.state.cached_doses(book.get("Plan 1"))
    want = exact_dvh("PTV", doses.dose(book.get("Plan 2").mu), p.structure("PTV").mask, p.grid, bin_gy=pop.bin_gy)
    # One bin width for every plan: 1/500 of the highest dose (here the session's 60 Gy plan).
    assert pop.bin_gy == pytest.approx(float(w.dose_gy.max()) / 500.0, rel=1e-6)
    assert {round(float(h.dose_gy[1]), 9) for hs in pop.results.values() for h in hs} == {round(pop.bin_gy, 9)}
    got = next(h for h in pop.results[labels[1]] if h.name == "PTV")
    np.testing.assert_allclose(got.volume_fraction, want.volume_fraction)
    assert pop.save_png(tmp_path / "dvhs.png") and (tmp_path / "dvhs.png").read_bytes()[:4] == b"\x89PNG"
    # Sampled, in cc: the curves converge to the exact ones.
    pop.method_box.setCurrentText("sampled")
    pop.unit_box.setCurrentIndex(1)
    pop.set_chosen([("Plan 1", "PTV")])
    assert pop.compute() and pop.wait()
    sampled = pop.results[labels[0]][0]
    exact = exact_dvh("PTV", doses.dose(book.get("Plan 1").mu), p.structure("PTV").mask, p.grid, bin_gy=pop.bin_gy)
    n = min(len(sampled.volume_fraction), len(exact.volume_fraction))
    assert np.max(np.abs(sampled.volume_fraction[:n] - exact.volume_fraction[:n])) < 0.03
    assert pop.plot.volume_unit == "cc"
    pop.close()

    # Plan → Physics summary (PDF): Markdown, HTML and PDF with the plan ID.
    assert dlg.save_summary(tmp_path / "summary")
    dlg.wait_idle()
    md, html, pdf = dlg.last_summary
    assert pdf.suffix == ".pdf" and pdf.read_bytes()[:5] == b"%PDF-"
    assert f"plan ID {dlg.plan.plan_id}".encode() in pdf.read_bytes()
    menu = next(a.menu() for a in w.menuBar().actions() if a.text() == "&Plan")
    assert any(a.text().replace("&", "").startswith("Physics summary (PDF)") for a in menu.actions())


# --------------------------------------------------------------------------- points
@pytest.fixture()
def dialog(qapp):
    from ids_engine.phantoms import horseshoe

    yield from open_forward_dialog(qapp, horseshoe("coarse"))


@needs_display
def test_points_are_edited_and_removed_unless_a_plan_uses_them(dialog):
    from ids_engine.planning import PointRef

    d = dialog
    assert not d.follow_box.isVisible()  # no main window to show plans in
    assert d.add_beam(gantry_deg=0)
    n0 = len(d.state.patient.points)
    assert d.add_point("P1", (0.0, 30.0, 0.0)) and d.add_point("P2", (5.0, 5.0, 5.0))
    labels = [q.label for q in d.state.patient.points]
    assert labels[-2:] == ["P1", "P2"] and d.point_table.rowCount() == n0 + 2
    # Choosing a row fills the fields; Update renames and moves it.
    d.point_table.selectRow(n0)
    assert d.selected_point() == "P1" and d.point_label.text() == "P1" and d.point_xyz.text() == "0, 30, 0"
    d.point_label.setText("P1 moved")
    d.point_xyz.setText("1, 31, 2")
    d._update_point_clicked()
    q = d.state.patient.points[n0]
    assert q.label == "P1 moved" and q.position_mm_xyz == (1.0, 31.0, 2.0)
    assert d.point_table.item(n0, 0).text() == "P1 moved"
    assert not d.edit_point("P1 moved", "P2") and "exists already" in d.status.text()
    # A point a plan normalises to cannot be removed or moved (its MU would refer to it).
    assert d.set_normalisation(PointRef("point", label="P2"))
    assert not d.remove_point("P2") and "normalisation point of plan 'Plan 1'" in d.status.text()
    assert not d.edit_point("P2", xyz=(0, 0, 0)) and "P2" in [p.label for p in d.state.patient.points]
    assert d.set_normalisation(PointRef("isocentre", 0))
    assert d.remove_point("P2") and "P2" not in [p.label for p in d.state.patient.points]
    d.point_table.selectRow(n0)
    assert d.remove_point(d.selected_point())
    assert len(d.state.patient.points) == n0 and d.point_table.rowCount() == n0
    assert not d.remove_point(None) and "choose a point" in d.status.text()


def test_shown_plan_checks_its_reference():
    from ids_engine.viewer._shown import ShownPlan

    z = functools.partial(np.zeros, (2, 2, 2))
    assert ShownPlan("A", 3, 2.0, z).label == "forward plan 'A', plan ID 3"
    with pytest.raises(ValueError, match="reference_gy must be positive"):
        ShownPlan("A", 3, 0.0, z)


def test_a_viewer_plan_book_records_its_case_and_points_for_the_command_line(tmp_path, capsys):
    from ids_engine.cli import main
    from ids_engine.phantoms import water_box
    from ids_engine.planning import PlanBook
    from ids_engine.viewer.forward_state import ForwardState, ForwardStateError

    spec = {"phantom": "water", "resolution": "coarse"}
    st = ForwardState(water_box("coarse"), None, "phantom water (coarse)", spec)
    st.new_plan("Open")
    st.add_beam(gantry_deg=0, width_mm=60, height_mm=60)
    st.book.update(mu=(100.0,))
    st.add_point("Q1", (0.0, 20.0, 0.0))
    with pytest.raises(ForwardStateError, match="no point 'nope'"):
        st.remove_point("nope")
    st.save_book(tmp_path / "book")
    book = PlanBook.load(tmp_path / "book")
    assert book.case["spec"] == spec and book.case["points"][-1] == {"label": "Q1", "position_mm_xyz": [0.0, 20.0, 0.0]}
    rc = main(["planbook", str(tmp_path / "book"), "summary", "Open", "--out", str(tmp_path / "s")])
    assert rc == 0, capsys.readouterr().err
    md = (tmp_path / "s" / f"physics_Open_id{book.get('Open').plan_id}.md").read_text()
    assert "point Q1" in md and "phantom water (coarse)" in md and "| 100 |" in md


def test_isodose_colours_are_a_fixed_palette_by_level():
    """The seed assigns colours at random; here each level's default colour is fixed by its
    % of the normalisation (or prescription) dose, the same in every session and plan, and
    the default levels all differ."""
    from ids_engine.viewer._style import ISODOSE_PCT, isodose_colour, isodose_levels

    a, b = isodose_levels(60.0, ISODOSE_PCT), isodose_levels(2.0, ISODOSE_PCT)
    assert [lev.colour for lev in a] == [lev.colour for lev in b] == [isodose_colour(p / 100.0) for p in ISODOSE_PCT]
    assert len({lev.colour for lev in a}) == len(ISODOSE_PCT)
    assert isodose_colour(1.0) == (1.0, 0.55, 0.0) and isodose_colour(1.07) == (1.0, 0.25, 0.9)
