"""Live plan metrics and the optimise job, at worker level (no window).

The one real optimisation of the viewer tests runs here (coarse TG-119, a module fixture);
cancelling is tested with a stand-in optimiser that waits for the cancel.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from .conftest import build_coarse_session, require_viewer_packages, rewind

require_viewer_packages()

from ids_engine.dmr import SetVoxelDose  # noqa: E402
from ids_engine.evaluation import StructureDose, check_goals, conformity_index, homogeneity_index  # noqa: E402
from ids_engine.optimise import read_protocol  # noqa: E402
from ids_engine.viewer._metrics import METRIC_COLUMNS, protocol_checks  # noqa: E402
from ids_engine.viewer.worker import EngineWorker  # noqa: E402

from .test_worker import Recorder  # noqa: E402

pytestmark = pytest.mark.viewer

TG119_PROTOCOL = "examples/protocols/tg119_harder.toml"


def expected_row(dose, session, name) -> tuple[float, ...]:
    """The panel's row for a structure, straight from ids_engine.evaluation."""
    st = session.patient.structure(name)
    sd = StructureDose(dose, st.mask, session.patient.grid.voxel_volume_cc, name)
    rx = session.prescription_gy
    return (sd.dose_at_volume_pct(98), sd.dose_at_volume_pct(95), sd.dose_at_volume_pct(50),
            sd.dose_at_volume_pct(2), sd.dmax(), sd.volume_at_dose(0.95 * rx), sd.volume_at_dose(1.07 * rx),
            sd.dmean())


def assert_metrics_match(metrics, session) -> None:
    dose = session.dose()
    assert [h for h, _, _ in METRIC_COLUMNS] == ["D98", "D95", "D50", "D2", "Dmax", "V95", "V107", "Mean"]
    assert {s.name for s in metrics.structures} == {s.name for s in session.patient.structures}
    for row in metrics.structures:
        np.testing.assert_allclose(row.values, expected_row(dose, session, row.name), rtol=0, atol=1e-9)
    target = session.patient.targets[0]
    assert metrics.target == target.name
    assert metrics.ci == pytest.approx(conformity_index(dose, target.mask, session.prescription_gy), abs=1e-12)
    assert metrics.hi == pytest.approx(homogeneity_index(dose, target.mask), abs=1e-12)


def start_worker(session) -> EngineWorker:
    rec = Recorder()
    progress = []
    w = EngineWorker(session, rec.snapshot, rec.message, on_progress=lambda *a: progress.append(a)).start()
    w.recorder, w.progress_reports = rec, progress
    rec.wait_for(1)
    return w


@pytest.fixture(scope="module")
def session():
    return build_coarse_session()


@pytest.fixture
def worker(session):
    w = start_worker(session)
    yield w
    w.stop()
    rewind(session)


def test_final_snapshots_carry_metrics_equal_to_evaluation_and_previews_none(worker, session):
    rec = worker.recorder
    assert_metrics_match(rec.snapshots[0].metrics, session)
    assert rec.snapshots[0].metrics.goals == ()  # no protocol yet
    ptv = session.patient.structure("PTV").mask
    idx = tuple(int(v) for v in np.argwhere(ptv)[len(np.argwhere(ptv)) // 2])
    before = rec.snapshots[0].metrics
    snap = rec.wait_for(worker.submit(SetVoxelDose(idx, 1.2 * session.prescription_gy)))
    assert len(session.journal) == 1
    assert_metrics_match(snap.metrics, session)
    assert snap.metrics.structure("PTV").values != before.structure("PTV").values
    snap = rec.wait_for(worker.undo())
    assert_metrics_match(snap.metrics, session)
    np.testing.assert_allclose(snap.metrics.structure("PTV").values, before.structure("PTV").values, atol=1e-4)


def test_bad_protocols_and_a_shaped_session_give_messages(worker, session, tmp_path):
    rec = worker.recorder
    plan_id = session.plan_id
    typo = tmp_path / "typo.toml"
    typo.write_text('[[goal]]\nstructure = "PTV"\nkind = "min_dose"\ndose_gy = 50\nimportanse = 3\n')
    missing = tmp_path / "missing.toml"
    missing.write_text('[[goal]]\nstructure = "Lung"\nkind = "max_dose"\ndose_gy = 20\n')
    for path, words in ((typo, "importanse"), (missing, "Lung"), (tmp_path / "absent.toml", "absent.toml")):
        snap = rec.wait_for(worker.optimise(str(path)))
        err = snap.optimised["error"]
        assert err and words in err and "Traceback" not in err
        assert rec.messages[-1][1] and words in rec.messages[-1][0]
        assert session.plan_id == plan_id and snap.metrics is not None
    rec.wait_for(worker.submit(SetVoxelDose(tuple(int(n) // 2 for n in session.patient.grid.shape_zyx), 30.0)))
    good = tmp_path / "good.toml"
    good.write_text('[[goal]]\nstructure = "PTV"\nkind = "min_dose"\ndose_gy = 50\n')
    plan_id = session.plan_id  # a request makes a new plan
    snap = rec.wait_for(worker.optimise(str(good)))
    assert "already has requests" in snap.optimised["error"]
    assert session.plan_id == plan_id


def test_cancel_stops_the_optimisation_and_keeps_the_plan(worker, session, tmp_path, monkeypatch):
    import ids_engine.planning as planning

    started = threading.Event()
    calls = []

    def stub(engine, goals, *, progress=None, cancel=None, **kw):
        engine.set_fluences([2.0 * f for f in engine.fluences_host()])  # as the real one: the iterate on the engine
        started.set()
        n = 0
        while not cancel():
            progress(n, 1000, "optimising")
            n += 1
            threading.Event().wait(0.01)
            assert n < 3000, "cancel() never came"
        calls.append(n)
        return SimpleNamespace(fluences=engine.fluences_host(), iterations=n, result=SimpleNamespace(cancelled=True, iterations=n,
                                                                                        unmet_constraints=()))

    monkeypatch.setattr(planning, "optimise_plan", stub)
    protocol = tmp_path / "p.toml"
    protocol.write_text('[[goal]]\nstructure = "PTV"\nkind = "min_dose"\ndose_gy = 50\n')
    dose_before, plan_id = session.dose(), session.plan_id
    job = worker.optimise(str(protocol))
    assert started.wait(30)
    worker.cancel_optimisation()
    snap = worker.recorder.wait_for(job)
    assert calls and snap.optimised["cancelled"] and snap.optimised["error"] is None
    assert worker.progress_reports and worker.progress_reports[-1][2] == "optimising"
    assert session.plan_id == plan_id and worker.goals == ()
    # The same fluences (the dose recomputed from them: float32 summation order aside).
    np.testing.assert_allclose(session.dose(), dose_before, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def tg119_optimised():
    """The one real optimisation: coarse TG-119, the harder protocol, through the worker."""
    from ids_engine.phantoms import PHANTOMS
    from ids_engine.session import Session

    patient = PHANTOMS["tg119"](resolution="coarse")
    s = Session.open_field_plan(patient, prescription_gy=50.0, case={"phantom": "tg119", "resolution": "coarse"})
    w = start_worker(s)
    plan_id = s.plan_id
    before = s.dose()
    snap = w.recorder.wait_for(w.optimise(TG119_PROTOCOL), timeout=300)
    yield SimpleNamespace(session=s, worker=w, snap=snap, plan_id=plan_id, before=before)
    w.stop()


def test_optimise_sets_the_plan_and_the_goals_drive_pass_fail(tg119_optimised):
    t = tg119_optimised
    s, snap, w = t.session, t.snap, t.worker
    assert snap.optimised["error"] is None and not snap.optimised["cancelled"], snap.optimised
    assert snap.optimised["protocol"] == "TG-119 C-shape, harder goals" and snap.optimised["iterations"] > 0
    assert s.plan_id == t.plan_id + 1 == snap.plan_id
    assert w.progress_reports, "no progress reported"
    dose = s.dose()
    assert not np.allclose(dose, t.before)
    # The snapshot's dose is the session's, and the optimised plan is its starting plan.
    np.testing.assert_allclose(snap.dose_gy, dose)
    assert_metrics_match(snap.metrics, s)
    goals = protocol_checks(read_protocol(TG119_PROTOCOL).goals)
    assert w.goals == goals and len(goals) == 6
    expected = check_goals(dose, s.patient, goals, prescription_gy=s.prescription_gy)
    assert [(c.goal, c.passed) for c in snap.metrics.goals] == [(r.goal, r.passed) for r in expected]
    np.testing.assert_allclose([c.achieved for c in snap.metrics.goals], [r.achieved for r in expected])
    # TG-119's published coverage goal (D95 >= 50 Gy) is met by the optimised plan.
    assert snap.metrics.structure("OuterTarget").values[1] >= 50.0
    # Shaping afterwards keeps the goals in the metrics.
    snap = w.recorder.wait_for(w.refresh())
    assert [c.goal for c in snap.metrics.goals] == list(goals)
