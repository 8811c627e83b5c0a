"""View > Isodose control… and DVH > DVH by random sampling… open from the window's menus, and
the patient's points are marked with their dose on every slice view."""

from __future__ import annotations


import numpy as np
import pytest

from .conftest import HAS_DISPLAY, NO_DISPLAY_REASON, require_viewer_packages, wait_until

require_viewer_packages()

pytestmark = [pytest.mark.viewer, pytest.mark.skipif(not HAS_DISPLAY, reason=NO_DISPLAY_REASON)]


@pytest.fixture(scope="module")
def session():
    from ids_engine.model import PointOfInterest
    from ids_engine.session import Session

    s = Session.from_phantom("horseshoe", "coarse", n_beams=3)
    centre = s.patient.grid.index_to_world(np.array([[s.patient.grid.shape_zyx[0] // 2, 20, 20]]))[0]
    s.patient = s.patient.with_points(PointOfInterest("probe", tuple(float(v) for v in centre)))
    yield s
    s.close()


@pytest.fixture(scope="module")
def window(qapp, session):
    from ids_engine.viewer.app import MainWindow

    w = MainWindow()
    w.show()
    w.set_session(session)
    wait_until(qapp, lambda: w.idle and w.dose_gy is not None)
    yield w
    w.close()
    w.deleteLater()
    qapp.processEvents()


def _menu_action(window, menu_text, text):
    menu = next(a.menu() for a in window.menuBar().actions() if a.text() == menu_text)
    return next(a for a in menu.actions() if a.text().replace("&", "").startswith(text))


def test_isodose_control_opens_from_the_view_menu(qapp, window):
    _menu_action(window, "&View", "Isodose control").trigger()
    qapp.processEvents()
    assert window._isodose_control.isVisible()
    window._isodose_control.close()


def test_sampled_dvh_opens_from_the_dvh_menu(qapp, window):
    from ids_engine.viewer.dvh_sampling import SampledDVHDialog

    before = set(id(w) for w in qapp.topLevelWidgets() if isinstance(w, SampledDVHDialog))
    _menu_action(window, "&DVH", "DVH by random sampling").trigger()
    qapp.processEvents()
    new = [w for w in qapp.topLevelWidgets() if isinstance(w, SampledDVHDialog) and id(w) not in before]
    assert len(new) == 1 and new[0].isVisible()
    new[0].close()
    qapp.processEvents()


def test_points_are_marked_with_their_dose(window, session):
    from scipy import ndimage

    p = session.patient.points[-1]
    idx = session.patient.grid.world_to_index(np.array([p.position_mm_xyz]))
    want = float(ndimage.map_coordinates(window.dose_gy, idx.T, order=1, mode="nearest")[0])
    for v in window.slice_views.values():
        marks = [m for m in v.points if m.label == "probe"]
        assert marks, "no mark for the patient's point"
        assert f"{want:.2f}" in " ".join(marks[0].lines)
