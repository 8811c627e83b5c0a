"""Plan → Forward planning…: plans and their IDs, beams, prescription (whole MU), simplex auto
weight (the table against the library's own solution, infeasibility shown), point doses and
the physics summary, driven programmatically on the coarse horseshoe."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import HAS_DISPLAY, NO_DISPLAY_REASON, open_forward_dialog, require_viewer_packages, wait_until

require_viewer_packages()

pytestmark = [pytest.mark.viewer, pytest.mark.skipif(not HAS_DISPLAY, reason=NO_DISPLAY_REASON)]


@pytest.fixture(scope="module")
def patient():
    from ids_engine.phantoms import horseshoe

    return horseshoe("coarse")


@pytest.fixture()
def dialog(qapp, patient):
    yield from open_forward_dialog(qapp, patient)


def _cell(table, row, header):
    heads = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())]
    return table.item(row, heads.index(header)).text()


def _four_field_box(d):
    for g in (0, 90):
        assert d.add_beam(gantry_deg=g, width_mm=130, height_mm=80)
    assert d.opposed_beam(0) and d.opposed_beam(1)


def test_plans_keep_their_ids_through_copy_and_rename(dialog):
    d = dialog
    assert d.plan.name == "Plan 1" and d.plan.plan_id == 1
    assert d.add_beam(gantry_deg=0)
    assert d.plan.plan_id == 2 and "plan ID 2" in d.plan_label.text()
    assert d.copy_plan("Plan 2")
    assert d.state.book.names == ("Plan 1", "Plan 2") and d.plan.name == "Plan 2"
    assert d.plan.plan_id == 2  # same dose, same ID; the name tells them apart
    assert d.add_beam(gantry_deg=90)
    assert d.plan.plan_id == 3 and d.state.book.get("Plan 1").plan_id == 2  # the source is unchanged
    assert d.rename_plan("Lateral") and d.plan.plan_id == 3 and "plan ID 3" in d.plan_label.text()
    assert d.windowTitle() == "Forward planning — Lateral (plan ID 3)"
    assert not d.copy_plan("Plan 1")  # a taken name is refused, shown in red
    assert "exists already" in d.status.text() and d.plan.name == "Lateral"
    assert d.select_plan("Plan 1") and d.plan_list.currentItem().text() == "Plan 1"
    assert d.delete_plan() and d.state.book.names == ("Lateral",)


def test_beam_operations(dialog, patient):
    d = dialog
    _four_field_box(d)
    p = d.plan
    assert [b.gantry_deg for b in p.beams] == [0.0, 90.0, 180.0, 270.0]
    iso = tuple(float(v) for v in patient.structure("PTV").centroid_xyz())
    assert all(np.allclose(b.isocentre_mm_xyz, iso) for b in p.beams)  # each new beam: the prior one's isocentre
    assert p.fields[2].jaw_x_mm == (-65.0, 65.0) and p.fields[2].jaw_y_mm == (-40.0, 40.0)
    assert d.beam_table.rowCount() == 4 and _cell(d.beam_table, 3, "Gantry °") == "270"
    assert d.copy_beam(1) and d.plan.beams[4].gantry_deg == 90.0 and d.plan.beams[4].name == "Beam 2 copy"
    id_before = d.plan.plan_id
    assert d.delete_beam(4) and d.plan.n_beams == 4 and d.plan.plan_id == id_before + 1
    assert not d.copy_beam(-1) and "choose a beam" in d.status.text()
    # a new isocentre for one beam, then every beam moved to it
    assert d.set_isocentre(2, (10.0, -5.0, 0.0)) and d.plan.beams[2].isocentre_mm_xyz == (10.0, -5.0, 0.0)
    assert d.plan.beams[0].isocentre_mm_xyz != (10.0, -5.0, 0.0)
    id_before = d.plan.plan_id
    assert d.move_isocentres(2) and d.plan.plan_id == id_before + 1
    assert all(b.isocentre_mm_xyz == (10.0, -5.0, 0.0) for b in d.plan.beams)
    assert _cell(d.beam_table, 0, "Isocentre (x, y, z) mm") == "(10.0, -5.0, 0.0)"
    d.iso_edit.setText("1, 2")
    d._set_iso_clicked()
    assert "three coordinates" in d.status.text() and d.plan.plan_id == id_before + 1


def test_prescription_points_auto_weight_and_summary(dialog, patient, qapp, tmp_path):
    from ids_engine.planning import (
        AutoWeightProblem, DoseToNormalisation, MonitorUnits, VolumeGoal, auto_weight, compute_mu,
    )

    d = dialog
    _four_field_box(d)
    # Prescription: 2 Gy to the normalisation point (the first beam's isocentre), equal weights.
    d.mode_box.setCurrentIndex(2)
    d.rx_dose.setValue(2.0)
    plan0 = d.plan
    assert d.apply_prescription()
    assert d.busy  # off the GUI thread
    d.wait_idle()
    assert not d.last_error, d.last_error
    p = d.plan
    doses = d.state.cached_doses(p)
    want = compute_mu(plan0, patient, doses, DoseToNormalisation(2.0, (1, 1, 1, 1)))
    assert p.mu == want.mu and all(m == round(m) and m > 50 for m in p.mu)
    assert p.plan_id == plan0.plan_id + 1
    assert [_cell(d.beam_table, k, "MU") for k in range(4)] == [f"{m:g}" for m in p.mu]
    assert abs(d.mu_result.normalisation_gy - 2.0) < 0.02  # the whole MU's dose, not exactly 2 Gy

    # Points: the patient's ISO plus one in patient coordinates and one in the first beam's BEV.
    assert d.add_point("P1", (0.0, 30.0, 0.0))
    assert d.add_point("B1", (0.0, 0.0, 0.0), beam=0)  # the isocentre, given in BEV
    assert d.compute_points()
    d.wait_idle()
    rates = doses.at_points(np.array([q.position_mm_xyz for q in d.state.patient.points]))
    for i, q in enumerate(d.state.patient.points):
        assert float(_cell(d.point_table, i, "Total Gy")) == pytest.approx(rates[i] @ np.array(p.mu), abs=1e-3)
        assert float(_cell(d.point_table, i, "Beam 1 Gy")) == pytest.approx(rates[i][0] * p.mu[0], abs=1e-3)
    assert np.allclose(d.state.patient.points[-1].position_mm_xyz, p.beams[0].isocentre_mm_xyz)

    # Auto weight, simplex: PTV at least 2 Gy, OAR without a limit (minimised), BODY left out.
    d.set_volume("PTV", min_gy=2.0)
    d.set_volume("OAR", role="oar", min_gy="", max_gy="")
    d.set_volume("BODY", use=False)
    assert d.run_auto_weight("simplex")
    d.wait_idle()
    assert not d.last_error, d.last_error
    goals = [VolumeGoal("PTV", "target", 2.0, None, 1.0, 10.0), VolumeGoal("OAR", "oar", None, None, 1.0, 1.0)]
    lib = auto_weight(AutoWeightProblem.from_doses(doses, patient, goals, max_points=2000, seed=0), "simplex")
    whole = np.rint(lib.mu)
    assert [float(_cell(d.auto_table, 0, f"MU {b.name}")) for b in p.beams] == list(whole)
    dose = doses.dose(whole)
    ptv, oar = patient.structure("PTV").mask, patient.structure("OAR").mask
    assert float(_cell(d.auto_table, 0, "PTV min Gy")) == pytest.approx(dose[ptv].min(), abs=1e-3)
    assert float(_cell(d.auto_table, 0, "PTV max Gy")) == pytest.approx(dose[ptv].max(), abs=1e-3)
    assert float(_cell(d.auto_table, 0, "OAR max Gy")) == pytest.approx(dose[oar].max(), abs=1e-3)
    assert dose[ptv].min() >= 2.0 - 0.05  # whole MU, all voxels (the solver saw 2000 samples)
    id_before = d.plan.plan_id
    assert d.apply_auto_weight(0)
    assert d.plan.mu == tuple(whole) and d.plan.plan_id == id_before + 1
    assert isinstance(d.plan.prescription, MonitorUnits)

    # An OAR limit no MU can meet: simplex reports it, in red, naming the limit.
    d.set_volume("OAR", max_gy=0.05)
    assert d.run_auto_weight("simplex")
    d.wait_idle()
    assert "no feasible solution" in d.auto_table.item(0, 1).text()
    assert "simplex" in d.auto_message.text() and "PTV minimum" in d.auto_message.text()
    assert "ff7b72" in d.auto_message.styleSheet()
    assert not d.apply_auto_weight(0) and "nothing to apply" in d.status.text()

    # Physics summary: Markdown and HTML with the plan ID.
    assert d.save_summary(tmp_path)
    d.wait_idle()
    md, html, pdf = d.last_summary
    assert md.exists() and html.exists() and pdf.read_bytes().startswith(b"%PDF-")
    assert f"id{d.plan.plan_id}" in md.name and f"{d.plan.plan_id}" in md.read_text()


def test_dose_to_points_mode_and_normalisation_choice(dialog, patient):
    from ids_engine.planning import DoseToPoints, PointRef

    d = dialog
    _four_field_box(d)
    before = d.plan.plan_id
    assert d.set_normalisation(PointRef("dmax", 1))
    assert d.plan.plan_id == before + 1 and d.norm_box.currentText() == "dmax of Beam 2"
    d.mode_box.setCurrentIndex(0)  # 0.5 Gy from each beam to its own isocentre
    for k in range(4):
        d.rx_table.item(k, 1).setText("0.5")
    assert isinstance(d.prescription(), DoseToPoints)
    assert d.apply_prescription()
    d.wait_idle()
    assert not d.last_error, d.last_error
    res, rate = d.mu_result, d.state.cached_doses(d.plan).at_points(np.array([d.plan.beams[0].isocentre_mm_xyz]))[0]
    assert all(m == round(m) for m in d.plan.mu)
    # each beam's own dose for the whole MU is 0.5 Gy to within half a MU
    assert np.allclose(res.beam_dose_gy, 0.5, atol=0.5 * rate.max() + 1e-9)
    assert np.allclose(res.beam_dose_gy, rate * np.array(d.plan.mu))
    assert "MU (whole)" in d.rx_result.text()
    # all four auto-weight methods in one run: one row each, whole MU
    d.set_volume("BODY", use=False)
    assert d.run_auto_weight("all")
    d.wait_idle()
    assert [r.method for r in d.state.auto_rows] == ["simplex", "cimmino", "downhill", "annealing"]
    assert d.auto_table.rowCount() == 4
    assert all(m == round(m) for r in d.state.auto_rows for m in r.mu)


def test_plans_are_saved_and_reopened(dialog, tmp_path):
    d = dialog
    _four_field_box(d)
    assert d.copy_plan("Copy") and d.delete_beam(0)
    ids = {n: d.state.book.get(n).plan_id for n in d.state.book.names}
    assert d.save_book(tmp_path) and (tmp_path / "planbook.json").exists()
    for _ in range(2):
        assert d.delete_plan()
    assert d.state.book.names == () and "No plan" in d.plan_label.text()
    assert not d.compute_points() and "No plan" in d.status.text()
    assert d.open_book(tmp_path)
    assert {n: d.state.book.get(n).plan_id for n in d.state.book.names} == ids
    assert d.plan.name == "Copy" and d.beam_table.rowCount() == 3


def test_conform_on_arc_adds_mlc_beams(dialog):
    from PyQt6 import QtCore

    from ids_engine.viewer.forward_dialog import ConformDialog

    d = dialog
    form = ConformDialog(d.state.patient, d)
    assert form.target_box.currentText() == "PTV"
    row = [form.avoid.item(r, 0).text() for r in range(form.avoid.rowCount())].index("OAR")
    form.avoid.item(row, 0).setCheckState(QtCore.Qt.CheckState.Checked)
    form.avoid.item(row, 1).setText("3")
    form.increment.setValue(120.0)
    params = form.parameters()
    assert params["avoid"] == {"OAR": 3.0} and params["target_margin_mm"] == 5.0 and params["leaf_mode"] == "centre"
    assert d.conform(params)
    d.wait_idle()
    assert not d.last_error, d.last_error
    p = d.plan
    assert [b.gantry_deg for b in p.beams] == [0.0, 120.0, 240.0] and p.plan_id == 2
    assert all(f.kind == "aperture" for f in p.fields)
    assert _cell(d.beam_table, 0, "Field") == "MLC aperture"


def test_the_plan_menu_opens_one_dialog(qapp):
    from ids_engine.session import Session
    from ids_engine.viewer.app import MainWindow

    s = Session.from_phantom("horseshoe", "coarse", n_beams=3)
    w = MainWindow()
    try:
        w.show()
        w.set_session(s)
        wait_until(qapp, lambda: w.idle and w.dose_gy is not None)
        menu = next(a.menu() for a in w.menuBar().actions() if a.text() == "&Plan")
        act = next(a for a in menu.actions() if a.text().replace("&", "").startswith("Forward planning"))
        act.trigger()
        qapp.processEvents()
        dlg = w._forward_dialog
        assert dlg.isVisible() and not dlg.isModal() and dlg.state.patient is s.patient
        act.trigger()
        assert w._forward_dialog is dlg  # one instance, raised
        dlg.close()
    finally:
        w.close()
        w.deleteLater()
        qapp.processEvents()
