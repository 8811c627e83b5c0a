"""Point-based rigid registration of matched markers, and the marker file."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.model import Grid
from ids_engine.registration import (
    RegistrationError,
    read_fiducials,
    register_fiducials,
    rotation_matrix,
    write_fiducials,
)

G = Grid((10, 10, 10), (2.0, 2.0, 2.0))


def _markers(rng, n=5):
    return rng.uniform(-40, 40, (n, 3))


def test_exact_markers_give_the_exact_transform(rng):
    for trial in range(10):
        r = rotation_matrix(rng.uniform(-30, 30, 3))
        t = rng.uniform(-20, 20, 3)
        p = _markers(rng, 3 + trial % 4)
        q = p @ r.T + t
        reg = register_fiducials(p, q, planning_grid=G, new_grid=G)
        assert reg.kind == "fiducial"
        np.testing.assert_allclose(reg.rotation, r, atol=1e-6)
        np.testing.assert_allclose(reg.translation_mm_xyz, t, atol=1e-6)
        assert reg.metrics["rms_residual_mm"] < 1e-6
        np.testing.assert_allclose(reg.map_points_xyz(p), q, atol=1e-6)


def test_noisy_markers_report_their_residuals(rng):
    r = rotation_matrix((2, -3, 5))
    t = np.array([4.0, -1.0, 2.0])
    p = _markers(rng, 6)
    noise = rng.normal(0, 0.5, p.shape)
    q = p @ r.T + t + noise
    labels = [f"seed{i}" for i in range(6)]
    reg = register_fiducials(p, q, labels=labels, planning_grid=G, new_grid=G)
    m = reg.metrics
    assert m["labels"] == labels and len(m["residual_mm"]) == 6
    resid = np.linalg.norm(p @ reg.rotation.T + reg.translation_mm_xyz - q, axis=1)
    np.testing.assert_allclose(m["residual_mm"], resid)
    np.testing.assert_allclose(m["rms_residual_mm"], np.sqrt(np.mean(resid**2)))
    # Least squares: no worse than the true transform, and the noise is not absorbed away.
    true_resid = np.linalg.norm(noise, axis=1)
    assert np.sum(resid**2) <= np.sum(true_resid**2) + 1e-9
    assert 0.2 < m["rms_residual_mm"] < 1.0
    # The recovered transform is close to the true one (6 markers spread over 80 mm).
    assert np.abs(reg.translation_mm_xyz - t).max() < 1.0


def test_dicts_match_by_label_and_mirror_configurations_give_a_rotation(rng):
    p = _markers(rng, 4)
    q = p * np.array([-1.0, 1.0, 1.0])  # a mirror image: no rotation fits exactly
    pd = {f"M{i}": tuple(v) for i, v in enumerate(p)}
    qd = {f"M{i}": tuple(v) for i, v in reversed(list(enumerate(q)))}
    reg = register_fiducials(pd, qd, planning_grid=G, new_grid=G)
    assert np.linalg.det(reg.rotation) == pytest.approx(1.0)
    assert reg.metrics["rms_residual_mm"] > 1.0


def test_fiducial_errors(rng):
    p = _markers(rng, 4)
    with pytest.raises(RegistrationError, match="at least 3"):
        register_fiducials(p[:2], p[:2], planning_grid=G, new_grid=G)
    with pytest.raises(RegistrationError, match="only in the planning set: B; only in the new set: C"):
        register_fiducials({"A": p[0], "B": p[1], "D": p[2]}, {"A": p[0], "C": p[1], "D": p[2]}, planning_grid=G, new_grid=G)
    line = np.array([[0.0, 0, 0], [1, 1, 1], [2, 2, 2], [5, 5, 5]])
    with pytest.raises(RegistrationError, match="collinear"):
        register_fiducials(line, line + 1, planning_grid=G, new_grid=G)
    with pytest.raises(RegistrationError, match="does not match"):
        register_fiducials(p, p[:3], planning_grid=G, new_grid=G)
    with pytest.raises(RegistrationError, match="labels"):
        register_fiducials(p, p, labels=["a", "b"], planning_grid=G, new_grid=G)
    with pytest.raises(RegistrationError, match="non-finite"):
        register_fiducials(np.full((3, 3), np.nan), p[:3], planning_grid=G, new_grid=G)


def test_marker_file_round_trip_and_errors(tmp_path):
    path = tmp_path / "markers.csv"
    write_fiducials(path, {"M1": (1.0, 2.0, 3.0), "M2": (-4.5, 0.0, 7.25)})
    assert read_fiducials(path) == {"M1": (1.0, 2.0, 3.0), "M2": (-4.5, 0.0, 7.25)}
    path.write_text("# seeds located by the tracking system\nlabel,x_mm,y_mm,z_mm\n\nA, 1, 2, 3\nB,4,5,6\n")
    assert read_fiducials(path) == {"A": (1.0, 2.0, 3.0), "B": (4.0, 5.0, 6.0)}
    cases = {
        "A,1,2\n": "line 1: expected 4 fields",
        "A,1,2,3\nB,1,x,3\n": "line 2: coordinates must be numbers",
        "A,1,2,3\nA,1,2,3\n": "line 2: duplicate label 'A'",
        "# nothing\n": "no markers",
        "A,1,2,inf\n": "line 1: coordinates must be finite",
        "A,1,2.o,3\nB,4,5,6\n": "line 1: coordinates must be numbers",  # a typo, not a header
    }
    for text, msg in cases.items():
        path.write_text(text)
        with pytest.raises(RegistrationError, match=msg) as info:
            read_fiducials(path)
        assert str(path) in str(info.value)
    with pytest.raises(RegistrationError, match="cannot read"):
        read_fiducials(tmp_path / "missing.csv")


def test_markers_located_in_the_new_ct_give_the_rigid_transform(moved):
    from ids_engine.registration import locate_markers, match_markers

    found_p = locate_markers(moved.planning)
    found_n = locate_markers(moved.patient)
    assert len(found_p) == len(found_n) == 4
    # Planning seeds sit on voxel centres: found exactly.
    planted = np.asarray(list(moved.fiducials_planning_xyz.values()))
    assert np.abs(found_p[:, None] - planted[None]).sum(-1).min(axis=1).max() < 1e-6
    # New CT: resampled seeds, centred by their first moment (measured 0.05-0.08 mm on 3.9 mm voxels).
    labelled = match_markers(moved.fiducials_planning_xyz, found_n)
    for k, p in labelled.items():
        assert np.linalg.norm(np.subtract(p, moved.fiducials_new_xyz[k])) < 0.3, k
    reg = register_fiducials(moved.fiducials_planning_xyz, labelled,
                             planning_grid=moved.planning.grid, new_grid=moved.patient.grid)
    assert reg.metrics["rms_residual_mm"] < 0.3
    np.testing.assert_allclose(reg.translation_mm_xyz, moved.truth.translation_mm_xyz, atol=0.5)


def test_locate_ignores_large_bright_regions_and_match_names_missing_markers(moved):
    from dataclasses import replace

    from ids_engine.registration import locate_markers, match_markers

    ct = moved.patient.ct_hu.copy()
    ct[5:12, 5:12, 5:12] = 1200.0  # a "bone": 343 voxels, far above a seed's size
    found = locate_markers(replace(moved.patient, ct_hu=ct))
    assert len(found) == 4
    with pytest.raises(RegistrationError, match="within 10 mm of M1"):
        labelled = dict(moved.fiducials_planning_xyz)
        labelled["M1"] = (500.0, 500.0, 500.0)
        match_markers(labelled, found)
    none = np.zeros(moved.patient.grid.shape_zyx, bool)
    assert locate_markers(moved.patient, region=none).shape == (0, 3)
    with pytest.raises(RegistrationError, match="no markers were found"):
        match_markers(moved.fiducials_planning_xyz, np.zeros((0, 3)))
