"""The joint solve's scales (``_solve_scales``) equal, bit for bit, the textbook formulation it
streamlines: column norms by ``np.linalg.norm``, the augmented system by ``vstack`` / ``diag``."""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import nnls

from ids_engine.dmr._modify import _solve_scales


def _reference(g, need, weight, regularisation):
    sw = np.sqrt(weight)
    a = sw[:, None] * g
    b = sw * need
    norms = np.linalg.norm(a, axis=0)
    keep = norms > 0
    f = np.zeros(g.shape[1])
    if keep.any():
        lam = math.sqrt(regularisation) * np.maximum(norms[keep], 0.1 * float(norms.max()))
        aug = np.vstack([a[:, keep], np.diag(lam)])
        rhs = np.concatenate([b, np.zeros(int(keep.sum()))])
        f[keep], _ = nnls(aug, rhs, maxiter=50 * aug.shape[1])
    return f


def test_solve_scales_equals_the_reference_bit_for_bit():
    rng = np.random.default_rng(5)
    for n, k, zero_cols in ((1, 1, ()), (40, 1, ()), (300, 9, ()), (200, 12, (0, 5)), (50, 3, (0, 1, 2)), (120, 27, (26,))):
        g = rng.normal(size=(n, k)) * rng.uniform(0.01, 2.0, size=k)
        g[:, list(zero_cols)] = 0.0
        need = rng.normal(size=n)
        weight = np.where(rng.uniform(size=n) < 0.3, 1.0, 0.01) * rng.uniform(0.5, 4.0, size=n)
        for reg in (1e-3, 0.0):
            got, ref = _solve_scales(g, need, weight, reg), _reference(g, need, weight, reg)
            assert got.dtype == ref.dtype == np.float64
            np.testing.assert_array_equal(got.view(np.int64), ref.view(np.int64))
