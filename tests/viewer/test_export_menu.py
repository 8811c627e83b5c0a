"""File → Export… in the window: the plan is exported on a background thread with a busy bar,
the folder then holds a DICOM RT set that reads back with the plan's beams and dose; a
non-empty folder is left alone unless the planner confirms."""

from __future__ import annotations

import pydicom
import pytest

from .conftest import HAS_DISPLAY, NO_DISPLAY_REASON, require_viewer_packages, wait_until

require_viewer_packages()

pytestmark = [pytest.mark.viewer, pytest.mark.skipif(not HAS_DISPLAY, reason=NO_DISPLAY_REASON)]

WAIT_MS = 60000


@pytest.fixture(scope="module")
def session():
    from ids_engine.session import Session

    s = Session.from_phantom("horseshoe", "coarse", n_beams=3)
    yield s
    s.close()


@pytest.fixture(scope="module")
def window(qapp, session):
    """One window for the module (building one costs seconds under Xvfb)."""
    from ids_engine.viewer.app import MainWindow

    w = MainWindow()
    w.show()
    w.set_session(session)
    wait_until(qapp, lambda: w.idle)
    yield w
    w.close()
    w.deleteLater()
    qapp.processEvents()


def _file_menu_action(window, text):
    menu = next(a.menu() for a in window.menuBar().actions() if a.text() == "&File")
    return next(a for a in menu.actions() if a.text().replace("&", "").startswith(text))


def test_file_export_writes_the_dicom_rt_set(qtbot, window, tmp_path, monkeypatch):
    from PyQt6 import QtWidgets

    from ids_engine.io import missing_required_attributes, read_rt_set

    out = tmp_path / "export"
    monkeypatch.setattr(QtWidgets.QFileDialog, "getExistingDirectory", lambda *a, **k: str(out))
    action = _file_menu_action(window, "Export DICOM RT")
    assert action.isEnabled()
    action.trigger()
    assert window.load_progress.isVisible() and not action.isEnabled()  # busy while it runs
    qtbot.waitUntil(lambda: window.last_export is not None, timeout=WAIT_MS)
    assert not window.load_progress.isVisible() and action.isEnabled()
    assert "Exported to" in window.statusBar().currentMessage()
    names = {p.name for p in out.iterdir()}
    assert {"RS.dcm", "RP.dcm", "RD.dcm", "summary.md", "CT_0000.dcm"} <= names
    for name in ("RS.dcm", "RP.dcm", "RD.dcm", "CT_0000.dcm"):
        assert missing_required_attributes(pydicom.dcmread(out / name)) == []
    rt = read_rt_set(out)
    assert rt.plan.research_export and len(rt.plan.plan.beams) == 3
    assert [b.beam.gantry_deg for b in rt.plan.plan.beams] == [g.beam.gantry_deg for g in window.session.engine.geometry]
    # The exported dose is the deliverable plan's: the target's median near the prescription.
    import numpy as np

    median = float(np.median(rt.dose_gy[rt.patient.structure("PTV").mask]))
    assert median == pytest.approx(window.session.prescription_gy, rel=0.03)


def test_a_non_empty_folder_is_kept_unless_confirmed(window, tmp_path, monkeypatch):
    out = tmp_path / "full"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    monkeypatch.setattr(window, "confirm", lambda title, text: False)
    assert window.export_plan(str(out)) is False
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert "not empty" in window.statusBar().currentMessage()
