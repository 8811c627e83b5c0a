"""``Modifier._combine`` and ``Modifier._clip_nonnegative``, made cheaper (a beam's single patch
scaled without the zeroed union box; the clip written into one array), give the patches of the
earlier code bit for bit: the same boxes, dtypes and values, -0.0, NaN and inf included."""

from __future__ import annotations

import numpy as np
import pytest

from ids_engine.dmr._modify import Modifier
from ids_engine.dose import FluencePatch


def _combine_reference(scaled):
    """The earlier ``_combine``: every beam summed in float64 on the union of its boxes."""
    by_beam = {}
    for fk, ps in scaled:
        for p in ps:
            by_beam.setdefault(p.beam, []).append((fk, p))
    out = []
    for b, items in sorted(by_beam.items()):
        r0 = min(p.row0 for _, p in items)
        c0 = min(p.col0 for _, p in items)
        r1 = max(p.row0 + p.delta.shape[0] for _, p in items)
        c1 = max(p.col0 + p.delta.shape[1] for _, p in items)
        acc = np.zeros((r1 - r0, c1 - c0), np.float64)
        for fk, p in items:
            ph, pw = p.delta.shape
            acc[p.row0 - r0 : p.row0 - r0 + ph, p.col0 - c0 : p.col0 - c0 + pw] += fk * p.delta
        out.append(FluencePatch(b, r0, c0, acc.astype(np.float32)))
    return out


def _clip_reference(fluence, patches, report=False):
    """The earlier ``_clip_nonnegative`` (``fluence``: beam -> host map)."""
    out = []
    cut = False
    for p in patches:
        h, w = p.shape
        psi = fluence[p.beam][p.row0 : p.row0 + h, p.col0 : p.col0 + w]
        raw = psi + p.delta
        cut = cut or bool(np.any(raw < 0))
        delta = (np.maximum(raw, np.float32(0)) - psi).astype(np.float32)
        if np.any(delta != 0):
            out.append(FluencePatch(p.beam, p.row0, p.col0, delta))
        else:
            cut = True
    return (out, cut) if report else out


class _Engine:
    def __init__(self, fluence):
        self.fluence = fluence

    def fluence_host(self, b):
        v = self.fluence[b].view()
        v.setflags(write=False)
        return v


def _modifier(fluence):
    mod = Modifier.__new__(Modifier)
    mod.engine = _Engine(fluence)
    return mod


def _same(a, b):
    assert len(a) == len(b)
    for p, q in zip(a, b):
        assert (int(p.beam), int(p.row0), int(p.col0)) == (int(q.beam), int(q.row0), int(q.col0))
        assert p.delta.dtype == q.delta.dtype and p.delta.shape == q.delta.shape
        assert p.delta.tobytes() == q.delta.tobytes()


def _delta(rng, h, w, dtype=np.float32, specials=True):
    d = (rng.standard_normal((h, w)) * 10.0 ** rng.uniform(-6, 3, (h, w))).astype(dtype)
    if specials:
        d[rng.random((h, w)) < 0.15] = 0.0
        d[rng.random((h, w)) < 0.15] = -0.0
        d[rng.random((h, w)) < 0.03] = np.nan
        d[rng.random((h, w)) < 0.03] = np.inf
        d[rng.random((h, w)) < 0.03] = -np.inf
    return d


@pytest.mark.parametrize("seed", range(6))
def test_combine_equals_the_union_box_sum(seed):
    rng = np.random.default_rng(seed)
    scaled = []
    for k in range(int(rng.integers(1, 6))):
        # Python floats (a take-back's -1.0), NumPy float64 scales (a solve's), 0 and -0.0
        fk = [-1.0, 1.0, np.float64(rng.uniform(0, 3)), 0.0, -0.0, np.float64(-0.0)][int(rng.integers(0, 6))]
        beams = rng.choice(5, size=int(rng.integers(1, 4)), replace=False)
        ps = [FluencePatch(int(b), int(rng.integers(0, 8)), int(rng.integers(0, 8)),
                           _delta(rng, int(rng.integers(1, 7)), int(rng.integers(1, 7)),
                                  np.float64 if rng.random() < 0.2 else np.float32, specials=seed % 2 == 0))
              for b in beams]
        scaled.append((fk, ps))
    with np.errstate(invalid="ignore", over="ignore"):  # (0 * inf: both warn)
        _same(Modifier._combine(None, scaled), _combine_reference(scaled))


def test_combine_of_nothing_and_of_one_patch():
    assert Modifier._combine(None, []) == []
    d = np.array([[-0.0, 0.0, 1.5], [np.nan, -np.inf, -2.0]], np.float32)
    for fk in (1.0, -1.0, np.float64(0.5), -0.0):
        scaled = [(fk, [FluencePatch(2, 3, 4, d)])]
        with np.errstate(invalid="ignore"):
            _same(Modifier._combine(None, scaled), _combine_reference(scaled))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("report", [False, True])
def test_clip_nonnegative_equals_the_earlier_clip(seed, report):
    rng = np.random.default_rng(100 + seed)
    fluence = {b: np.maximum(_delta(rng, 12, 12, specials=seed % 3 == 0), 0).astype(np.float32) for b in range(4)}
    fluence[0][:2] = 0.0  # (amplitudes at zero fluence: a lowering there is cut)
    patches = []
    for _ in range(int(rng.integers(0, 7))):
        h, w = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        dtype = np.float64 if rng.random() < 0.2 else np.float32
        patches.append(FluencePatch(int(rng.integers(0, 4)), int(rng.integers(0, 12 - h + 1)),
                                    int(rng.integers(0, 12 - w + 1)),
                                    _delta(rng, h, w, dtype, specials=seed % 2 == 0)))
    with np.errstate(invalid="ignore"):  # (inf - inf: both warn)
        got = _modifier(fluence)._clip_nonnegative(patches, report=report)
        ref = _clip_reference(fluence, patches, report=report)
    if report:
        assert got[1] == ref[1]
        got, ref = got[0], ref[0]
    _same(got, ref)


def test_clip_nonnegative_drops_empty_patches_and_reports_cuts():
    fluence = {0: np.array([[0.0, 1.0], [2.0, 0.0]], np.float32)}
    patches = [FluencePatch(0, 0, 0, np.array([[-1.0, -0.0]], np.float32)),  # all cut to nothing
               FluencePatch(0, 1, 0, np.array([[-3.0, np.nan]], np.float32)),  # cut, and a NaN
               FluencePatch(0, 0, 1, np.array([[0.5], [1.0]], np.float32))]
    got, cut = _modifier(fluence)._clip_nonnegative(patches, report=True)
    ref, cut_ref = _clip_reference(fluence, patches, report=True)
    assert cut and cut_ref
    _same(got, ref)
    assert len(got) == 2
