"""Apertures, segments and sequenced beams, and an aperture's fluence on a beam's grid.

Positions are IEC 61217 beam-limiting-device coordinates at the isocentre plane, mm: leaves
move along X_b (the fluence grid's ``u``), pairs are stacked along Y_b (``v``); see
:mod:`ids_engine.model._mlc`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model import Beam, FluenceGrid
from ..model._mlc import MLC

__all__ = ["Aperture", "Segment", "SequencedBeam", "DeliverablePlan", "aperture_fluence"]


@dataclass(frozen=True, eq=False)
class Aperture:
    """One MLC shape with its jaws.

    Parameters
    ----------
    leaf_x1_mm, leaf_x2_mm : (n_pairs,) tips of the B (-X_b) and A (+X_b) leaves; a pair
        with ``x1 == x2`` is closed.
    jaw_x_mm, jaw_y_mm : (lower, upper) jaw positions along X_b and Y_b.
    """

    leaf_x1_mm: np.ndarray
    leaf_x2_mm: np.ndarray
    jaw_x_mm: tuple[float, float]
    jaw_y_mm: tuple[float, float]

    def __post_init__(self) -> None:
        x1 = np.asarray(self.leaf_x1_mm, dtype=np.float64).copy()
        x2 = np.asarray(self.leaf_x2_mm, dtype=np.float64).copy()
        if x1.ndim != 1 or x1.shape != x2.shape:
            raise ValueError(f"Aperture: leaf_x1_mm and leaf_x2_mm must be 1-D of one length, got {x1.shape} and {x2.shape}")
        if not (np.all(np.isfinite(x1)) and np.all(np.isfinite(x2))):
            raise ValueError("Aperture: leaf positions must be finite")
        if np.any(x1 > x2 + 1e-9):
            i = int(np.argmax(x1 > x2 + 1e-9))
            raise ValueError(f"Aperture: leaf pair {i} has x1 {x1[i]:.2f} mm beyond x2 {x2[i]:.2f} mm")
        for name in ("jaw_x_mm", "jaw_y_mm"):
            j = tuple(float(v) for v in getattr(self, name))
            if len(j) != 2 or not all(np.isfinite(j)) or j[0] > j[1]:
                raise ValueError(f"Aperture.{name} must be (lower, upper) finite with lower <= upper, got {getattr(self, name)!r}")
            object.__setattr__(self, name, j)
        x1.setflags(write=False)
        x2.setflags(write=False)
        object.__setattr__(self, "leaf_x1_mm", x1)
        object.__setattr__(self, "leaf_x2_mm", x2)


@dataclass(frozen=True)
class Segment:
    """An aperture and its share of the beam's monitor units (``weight`` >= 0, MU)."""

    aperture: Aperture
    mu: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.mu) and self.mu >= 0):
            raise ValueError(f"Segment.mu must be finite and >= 0, got {self.mu!r}")
        object.__setattr__(self, "mu", float(self.mu))


@dataclass(frozen=True)
class SequencedBeam:
    """A beam delivered as step-and-shoot segments on an MLC."""

    beam: Beam
    mlc: MLC
    segments: tuple[Segment, ...]

    @property
    def mu(self) -> float:
        return float(sum(s.mu for s in self.segments))


@dataclass(frozen=True)
class DeliverablePlan:
    """Sequenced beams with the prescription they deliver."""

    name: str
    beams: tuple[SequencedBeam, ...]
    prescription_gy: float
    fractions: int = 1


def _overlap(lo: np.ndarray, hi: np.ndarray, a, b) -> np.ndarray:
    """Length of [lo, hi] ∩ [a, b], elementwise, >= 0."""
    return np.clip(np.minimum(hi, b) - np.maximum(lo, a), 0.0, None)


def aperture_fluence(aperture: Aperture, mlc: MLC, grid: FluenceGrid, *, transmission: float | None = None) -> np.ndarray:
    """(nv, nu) fluence of one MU through ``aperture`` on ``grid``: the open area fraction of
    each amplitude's cell (pitch x pitch, centred on it), plus ``transmission`` (default the
    MLC's) of the closed part inside the jaws. Jaws are taken as opaque."""
    if aperture.leaf_x1_mm.size != mlc.n_pairs:
        raise ValueError(f"aperture has {aperture.leaf_x1_mm.size} leaf pairs, the MLC {mlc.name!r} {mlc.n_pairs}")
    t = mlc.transmission if transmission is None else float(transmission)
    p = grid.pitch_mm
    u = grid.u_mm()
    v = grid.v_mm()
    u_lo, u_hi = u - p / 2, u + p / 2
    v_lo, v_hi = v - p / 2, v + p / 2
    edges = mlc.leaf_boundaries_mm()
    jx, jy = aperture.jaw_x_mm, aperture.jaw_y_mm
    # Fraction of each cell's v-extent covered by leaf pair k and inside the Y jaws: (n_pairs, nv).
    fv = _overlap(v_lo[None, :], v_hi[None, :], np.maximum(edges[:-1], jy[0])[:, None],
                  np.minimum(edges[1:], jy[1])[:, None]) / p
    # Fraction of each cell's u-extent open between pair k's leaves and the X jaws: (n_pairs, nu).
    a = np.maximum(aperture.leaf_x1_mm, jx[0])[:, None]
    b = np.minimum(aperture.leaf_x2_mm, jx[1])[:, None]
    fu_open = _overlap(u_lo[None, :], u_hi[None, :], a, np.maximum(a, b)) / p
    fu_jaw = _overlap(u_lo[None, :], u_hi[None, :], jx[0], jx[1]) / p
    # (einsum, not a BLAS product: these are small, and BLAS threads contend on a busy machine)
    open_ = np.einsum("kv,ku->vu", fv, fu_open)
    inside_jaws = np.einsum("kv,ku->vu", fv, np.broadcast_to(fu_jaw, fu_open.shape))
    return (open_ + t * (inside_jaws - open_)).astype(np.float32)
