"""The plan-metrics panel and Plan → Optimise… in the main window (pytest-qt, Xvfb).

The optimiser is a stand-in here (known fluences, or one that waits for Cancel): the real
optimisation runs once, at worker level, in ``test_metrics_worker.py``.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from .conftest import HAS_DISPLAY, NO_DISPLAY_REASON, build_coarse_session, require_viewer_packages, rewind

require_viewer_packages()

from ids_engine.evaluation import check_goals, conformity_index  # noqa: E402
from ids_engine.optimise import read_protocol  # noqa: E402
from ids_engine.viewer._metrics import METRIC_COLUMNS, protocol_checks  # noqa: E402
from ids_engine.viewer.metrics_panel import FAIL_COLOUR, PASS_COLOUR  # noqa: E402

from .test_metrics_worker import expected_row  # noqa: E402

pytestmark = [pytest.mark.viewer, pytest.mark.skipif(not HAS_DISPLAY, reason=NO_DISPLAY_REASON)]

WAIT_MS = 30000
HEADINGS = [h for h, _, _ in METRIC_COLUMNS]


def open_window(qtbot, session):
    from ids_engine.viewer._theme import apply_theme
    from ids_engine.viewer.app import MainWindow
    from PyQt6 import QtWidgets

    apply_theme(QtWidgets.QApplication.instance())
    w = MainWindow()
    w.resize(1400, 900)
    qtbot.addWidget(w)
    w.show()
    qtbot.waitExposed(w)
    w.set_session(session)
    qtbot.waitUntil(lambda: w.idle, timeout=WAIT_MS)
    return w


@pytest.fixture(scope="module")
def session():
    return build_coarse_session()


@pytest.fixture
def window(qtbot, session):
    w = open_window(qtbot, session)
    yield w
    w.close()
    rewind(session)


def assert_panel_shows(panel, session) -> None:
    dose = session.dose()
    for st in session.patient.structures:
        shown = [panel.value(st.name, h) for h in HEADINGS]
        np.testing.assert_allclose(shown, expected_row(dose, session, st.name), rtol=0, atol=1e-9)
    ptv = session.patient.targets[0]
    ci = conformity_index(dose, ptv.mask, session.prescription_gy)
    assert f"Paddick CI {ci:.3f}" in panel.summary.text()


def test_metrics_panel_shows_evaluation_values_after_a_request_and_after_undo(qtbot, window, session):
    panel = window.metrics
    assert window.metrics_dock.isVisible() and panel.table.rowCount() == len(session.patient.structures)
    assert_panel_shows(panel, session)
    assert panel.goal_note.isVisible() and not panel.goal_table.isVisible()  # no protocol yet
    before = [panel.value("PTV", h) for h in HEADINGS]
    ptv = np.argwhere(session.patient.structure("PTV").mask)
    window.select_voxel(tuple(int(v) for v in ptv[len(ptv) // 2]))
    window.set_voxel_dose(1.2 * session.prescription_gy)
    qtbot.waitUntil(lambda: window.idle and len(session.journal) == 1, timeout=WAIT_MS)
    assert_panel_shows(panel, session)
    assert [panel.value("PTV", h) for h in HEADINGS] != before
    window.undo()
    qtbot.waitUntil(lambda: window.idle and not session.journal, timeout=WAIT_MS)
    assert_panel_shows(panel, session)
    np.testing.assert_allclose([panel.value("PTV", h) for h in HEADINGS], before, atol=1e-4)


def test_optimise_needs_a_session_without_requests(qtbot, window, session):
    window.select_voxel(tuple(int(n) // 2 for n in session.patient.grid.shape_zyx))
    window.set_voxel_dose(20.0)
    qtbot.waitUntil(lambda: window.idle and len(session.journal) == 1, timeout=WAIT_MS)
    window.act_optimise.trigger()
    dlg = window.optimise_dlg
    assert dlg.isVisible() and "already has requests" in dlg.status.text()
    assert not dlg.start_button.isEnabled() and dlg.start("whatever.toml") is None
    dlg.cancel_button.click()
    assert not dlg.isVisible()


PROTOCOL = """
name = "horseshoe test"
[[goal]]
structure = "PTV"
dvh = "D95 >= 55 Gy"
[[goal]]
structure = "PTV"
kind = "max_dose"
dose_gy = 62
[[goal]]
structure = "OAR"
kind = "max_mean_dose"
dose_gy = 20
"""


def test_optimise_dialog_sets_the_plan_cancels_and_reports_bad_protocols(qtbot, tmp_path, monkeypatch):
    import ids_engine.planning as planning

    session = build_coarse_session()  # set_plan changes the plan: not the module's session
    w = open_window(qtbot, session)
    mode = {"cancel": False}

    def stub(engine, goals, *, progress=None, cancel=None, **kw):
        """Known fluences (1.1 x the open fields), or wait for Cancel."""
        fluences = [np.float32(1.1) * f for f in engine.fluences_host()]
        engine.set_fluences(fluences)
        n = 0
        while mode["cancel"] and not cancel():
            progress(n, 1000, "optimising")
            n += 1
            threading.Event().wait(0.01)
            assert n < 3000, "cancel() never came"
        progress(1, 1, "optimising")
        return SimpleNamespace(fluences=fluences, iterations=max(n, 7), result=SimpleNamespace(cancelled=cancel(), iterations=max(n, 7),
                                                                          unmet_constraints=()))

    monkeypatch.setattr(planning, "optimise_plan", stub)
    good = tmp_path / "good.toml"
    good.write_text(PROTOCOL)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[goal]]\nstructure = "PTV"\nkind = "min_dose"\ndoze_gy = 50\n')
    try:
        w.act_optimise.trigger()
        dlg = w.optimise_dlg
        done = lambda: dlg.outcome is not None and w.snapshot.job_id >= dlg.job_id  # noqa: E731

        # A bad protocol: a message in the dialog, no traceback, the plan as it was.
        plan_id = session.plan_id
        dlg.start(str(bad))
        qtbot.waitUntil(done, timeout=WAIT_MS)
        assert "doze_gy" in dlg.status.text() and "Traceback" not in dlg.status.text()
        assert session.plan_id == plan_id and dlg.start_button.isEnabled()

        # Cancel: the dialog's button stops it, the plan stays.
        mode["cancel"] = True
        initial = [f.copy() for f in session.initial_fluences]
        dlg.start(str(good))
        qtbot.waitUntil(lambda: dlg.bar.maximum() == 1000, timeout=WAIT_MS)  # progress reached the bar
        dlg.cancel_button.click()
        qtbot.waitUntil(done, timeout=WAIT_MS)
        assert dlg.outcome["cancelled"] and "Cancelled" in dlg.status.text() and dlg.isVisible()
        assert session.plan_id == plan_id
        for a, b in zip(session.initial_fluences, initial):
            np.testing.assert_array_equal(a, b)
        assert w.metrics.goal_note.isVisible()

        # A real run (stand-in fluences): the plan is set, the goals drive the panel's pass/fail.
        mode["cancel"] = False
        dlg.start(str(good))
        qtbot.waitUntil(done, timeout=WAIT_MS)
        assert dlg.outcome["error"] is None and not dlg.outcome["cancelled"], dlg.outcome
        assert "Optimised for horseshoe test" in dlg.status.text()
        assert session.plan_id == plan_id + 1
        for a, b in zip(session.initial_fluences, initial):
            np.testing.assert_allclose(a, np.float32(1.1) * b, rtol=1e-6)
        panel = w.metrics
        assert_panel_shows(panel, session)
        goals = protocol_checks(read_protocol(good).goals)
        expected = check_goals(session.dose(), session.patient, goals, prescription_gy=session.prescription_gy)
        rows = panel.goal_rows()
        assert [(t, p) for t, _, p in rows] == [(f"{r.goal.structure} {r.goal.metric} {r.goal.comparator} "
                                                 f"{r.goal.value:g} {r.goal.unit}", r.passed) for r in expected]
        np.testing.assert_allclose([a for _, a, _ in rows], [r.achieved for r in expected])
        assert len({p for _, _, p in rows}) == 2, "the test protocol should have a goal met and one not"
        assert panel.goal_table.isVisible() and not panel.goal_note.isVisible()
        # The table's cells that a goal checks take its colour; the others none.
        colour = {True: PASS_COLOUR, False: FAIL_COLOUR}
        assert panel.cell_colour("PTV", "D95") == colour[expected[0].passed]
        assert panel.cell_colour("PTV", "Dmax") == colour[expected[1].passed]
        assert panel.cell_colour("OAR", "Mean") == colour[expected[2].passed]
        assert panel.cell_colour("PTV", "D50") is None
        dlg.cancel_button.click()  # now "Close"
        assert not dlg.isVisible()
    finally:
        w.close()
        session.close()
