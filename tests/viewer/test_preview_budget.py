"""A drag preview's snapshot copies only what is displayed to the host (issue 10), counted on
the device-cost backend (what CuPy would transfer), so it holds without a GPU."""

from __future__ import annotations


import pytest

from .conftest import require_viewer_packages

require_viewer_packages()

from ids_engine._devicecost import counting  # noqa: E402
from ids_engine.viewer.worker import EngineWorker, _Job  # noqa: E402
from tests.conftest import use_backend  # noqa: E402

pytestmark = pytest.mark.viewer


@pytest.fixture(scope="module")
def counted_session():
    from ids_engine.session import Session

    with use_backend("devicecost"):
        yield Session.from_phantom("horseshoe", "coarse")


def test_a_preview_snapshot_copies_less_than_a_fifth_of_the_cube(counted_session):
    s = counted_session
    worker = EngineWorker(s, lambda snap: None)  # not started: its snapshots are built here
    nz, ny, nx = s.patient.grid.shape_zyx
    cube_bytes = nz * ny * nx * 4  # float32
    worker.set_display_index((nz // 2, ny // 3, nx // 4))
    with counting() as c:
        preview = worker._snapshot(_Job(1, "preview"), False, 0.0, None)
    assert preview.dose_gy is None and preview.dvhs is not None
    slices = (ny * nx + nz * nx + nz * ny) * 4
    assert slices <= c.d2h_bytes < cube_bytes / 5, (c.summary(), c.top("d2h"))
    # The counter sees a cube copy: a final snapshot makes one.
    with counting() as c:
        final = worker._snapshot(_Job(2, "refresh"), True, 0.0, None)
    assert final.dose_gy is not None and c.d2h_bytes >= cube_bytes
