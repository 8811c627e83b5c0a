"""A drag preview's snapshot copies only what is displayed to the host (issue 10), counted on
the device-cost backend (what CuPy would transfer), so it holds without a GPU."""

from __future__ import annotations

import os

import pytest

from .conftest import require_viewer_packages

require_viewer_packages()

from ids_engine import backend  # noqa: E402
from ids_engine._devicecost import counting  # noqa: E402
from ids_engine.viewer.worker import EngineWorker, _Job  # noqa: E402

pytestmark = pytest.mark.viewer


@pytest.fixture(scope="module")
def counted_session():
    from ids_engine.session import Session

    old = os.environ.get("IDS_BACKEND")
    os.environ["IDS_BACKEND"] = "devicecost"
    backend.reset_backend()
    try:
        yield Session.from_phantom("horseshoe", "coarse")
    finally:
        if old is None:
            os.environ.pop("IDS_BACKEND", None)
        else:
            os.environ["IDS_BACKEND"] = old
        backend.reset_backend()


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
