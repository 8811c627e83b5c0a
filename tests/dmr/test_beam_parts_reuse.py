"""A rejected joint DMR step's per-beam retry takes its matrix from the beam parts the joint
read kept (``Modifier.solve_step``, ``ReadOuts.delta_matrix(beam_parts=True)``): no second
read of the same columns, and the same plan bit for bit as reading them again."""

from __future__ import annotations

import numpy as np
import pytest

import ids_engine.dmr._modify as modify_mod
from ids_engine import backend
from ids_engine.dmr import SetVoxelDose
from ids_engine.dose import FluencePatch
from ids_engine.dose._readout import ReadOuts

RX = 60.0


def _oar_rim_voxel(s) -> tuple[int, int, int]:
    oar = s.patient.structure("OAR").mask
    c = np.argwhere(oar).mean(axis=0).round().astype(int)
    j = int(np.flatnonzero(oar[c[0], :, c[2]]).min())
    return (int(c[0]), j, int(c[2]))


def _run(s, monkeypatch, reuse: bool) -> tuple[np.ndarray, list, dict]:
    """The paper's request (OAR rim voxel to 55 %, 25 recovery steps): dose, patches, and the
    counts of reads and of retries served from the parts."""
    seen = {"reads": 0, "reused": 0, "retries": 0}
    orig_read, orig_parts = ReadOuts.delta_matrix, modify_mod._from_beam_parts

    def read(self, columns, flat_index, beam_parts=False):
        seen["reads"] += 1
        return orig_read(self, columns, flat_index, beam_parts=beam_parts)

    def parts(*args):
        seen["retries"] += 1
        got = orig_parts(*args) if reuse else None
        seen["reused"] += got is not None
        return got

    monkeypatch.setattr(ReadOuts, "delta_matrix", read)
    monkeypatch.setattr(modify_mod, "_from_beam_parts", parts)
    res = s.run(SetVoxelDose(_oar_rim_voxel(s), 0.55 * RX), recovery_steps=25)
    dose = backend.asnumpy(s.dose()).copy()
    patches = [(p.beam, p.row0, p.col0, np.asarray(p.delta).copy()) for p in res.patches]
    s.undo()
    monkeypatch.undo()
    return dose, patches, seen


def test_a_per_beam_retry_reuses_the_joint_read_and_changes_nothing(coarse_horseshoe_session, monkeypatch):
    s = coarse_horseshoe_session
    dose_fresh, patches_fresh, fresh = _run(s, monkeypatch, reuse=False)
    dose_reused, patches_reused, reused = _run(s, monkeypatch, reuse=True)
    assert fresh["retries"] > 0, "no joint step was rejected: pick a request with a per-beam retry"
    assert reused["reused"] == reused["retries"] == fresh["retries"]
    assert reused["reads"] == fresh["reads"] - reused["reused"]
    np.testing.assert_array_equal(dose_reused, dose_fresh)
    assert len(patches_reused) == len(patches_fresh)
    for a, b in zip(patches_reused, patches_fresh):
        assert a[:3] == b[:3]
        np.testing.assert_array_equal(a[3], b[3])


def test_parts_of_other_rows_or_other_patches_are_not_used(coarse_horseshoe_session):
    eng = coarse_horseshoe_session.engine
    rows = eng.body_index[:: max(1, eng.body_index.size // 300)]
    p0 = FluencePatch(0, 40, 40, np.full((6, 6), 0.05, np.float32))
    p1 = FluencePatch(1, 30, 30, np.full((5, 5), 0.02, np.float32))
    joint, beam_parts = eng.delta_matrix([[p0, p1]], rows, beam_parts=True)
    stash = (tuple(eng.geometry), rows, [[p0, p1]], beam_parts)
    g = modify_mod._from_beam_parts(stash, eng, rows, [[p0], [p1]])
    np.testing.assert_array_equal(g, eng.delta_matrix([[p0], [p1]], rows).astype(np.float64))
    other = FluencePatch(1, 30, 30, np.full((5, 5), 0.03, np.float32))
    assert modify_mod._from_beam_parts(stash, eng, rows, [[p0], [other]]) is None
    assert modify_mod._from_beam_parts(stash, eng, rows[1:], [[p0], [p1]]) is None
    assert modify_mod._from_beam_parts(stash, eng, rows, [[p0, p1]]) is None  # not one patch a column
    assert modify_mod._from_beam_parts(stash, eng, rows, [[p1], [p0]]) is None  # another order
    assert modify_mod._from_beam_parts(stash, eng, rows, [[p0]]) is None  # a subset: another stack box
    stale = ((), rows, [[p0, p1]], beam_parts)  # another set of beams
    assert modify_mod._from_beam_parts(stale, eng, rows, [[p0], [p1]]) is None
