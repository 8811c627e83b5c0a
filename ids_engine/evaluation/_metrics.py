"""DVH metrics as exact order statistics, metric expressions, conformity and homogeneity indices.

Every voxel of a structure counts with its whole volume (no partial voxels, no DVH
binning), as in :func:`~ids_engine.evaluation.dvh_metrics`. With the ``n`` voxel doses of a
structure sorted ascending, ``d[0] <= ... <= d[n-1]``, and ``v`` the volume of one voxel:

* ``Dx%`` (dose to x % of the volume): ``d[floor((1 - x/100) n)]``, the highest dose that at
  least x % of the voxels receive; ``D100`` is the true minimum, ``D0`` the maximum.
* ``Dxcc`` (dose to x cc): ``d[n - m]`` with ``m = ceil(x / v)`` the fewest hottest voxels
  that hold at least x cc; when the structure is smaller than x cc, its minimum.
* ``Dmax`` is ``D0.03cc`` (ICRU 83's advice against a single-voxel maximum).
* ``Dmin`` is ``D(V - 0.03cc)``: the dose that all but the coldest 0.03 cc receive,
  ``d[floor(0.03 / v)]`` (the true minimum when a voxel is larger than 0.03 cc; ``D100``
  gives the true minimum always).
* ``Dmean``: the mean voxel dose.
* ``VxGy`` / ``Vx%`` (of the prescription): the volume whose dose is at least x Gy, in % of
  the structure or cc.

Volumes in cc are counted in whole voxels, so a threshold that is not a multiple of the
voxel volume rounds up to the next voxel (``D2cc`` with 1 cc voxels is the third-hottest
voxel's dose).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DMAX_VOLUME_CC",
    "Metric",
    "StructureDose",
    "conformity_index",
    "gradient_index",
    "homogeneity_index",
    "parse_metric",
]

#: The volume of the near-maximum (and near-minimum) "point" dose, cc.
DMAX_VOLUME_CC = 0.03

# Relative slack when a cc threshold is divided by the voxel volume: 0.1 cc / 0.001 cc is
# 100.00000000000001 in floating point and must count as 100 voxels, not 101.
_COUNT_RTOL = 1e-9


def _host(a) -> np.ndarray:
    from ids_engine import backend

    return backend.asnumpy(a)


class StructureDose:
    """The sorted voxel doses of one structure, for many metrics from one sort.

    Parameters
    ----------
    dose_gy : dose, Gy, any shape (a (z, y, x) cube), NumPy or CuPy (copied to the host).
    mask : bool, the same shape as ``dose_gy``: the structure's voxels.
    voxel_volume_cc : volume of one voxel, cm^3.
    name : the structure's name, for messages.
    """

    def __init__(self, dose_gy, mask, voxel_volume_cc: float, name: str = "structure") -> None:
        dose = _host(dose_gy)
        m = np.asarray(_host(mask), dtype=bool)
        if dose.shape != m.shape:
            raise ValueError(f"{name!r}: dose shape {dose.shape} does not match the mask shape {m.shape}")
        if not voxel_volume_cc > 0:
            raise ValueError(f"{name!r}: voxel_volume_cc must be positive, got {voxel_volume_cc!r}")
        d = np.sort(np.asarray(dose, dtype=np.float64)[m])
        if d.size == 0:
            raise ValueError(f"{name!r}: the structure is empty")
        self.name = name
        self.sorted_gy = d
        self.voxel_volume_cc = float(voxel_volume_cc)

    @property
    def n(self) -> int:
        return int(self.sorted_gy.size)

    @property
    def volume_cc(self) -> float:
        return self.n * self.voxel_volume_cc

    def _voxels_in(self, volume_cc: float) -> int:
        """Fewest whole voxels holding at least ``volume_cc``."""
        q = volume_cc / self.voxel_volume_cc
        return int(math.ceil(q * (1.0 - _COUNT_RTOL)))

    def dose_at_volume_pct(self, pct: float) -> float:
        """D_pct (Gy): the highest dose that at least ``pct`` % of the volume receives."""
        if not 0.0 <= pct <= 100.0:
            raise ValueError(f"D{pct:g}%: the volume must be within 0..100 %")
        k = int(np.floor((1.0 - pct / 100.0) * self.n))
        return float(self.sorted_gy[min(max(k, 0), self.n - 1)])

    def dose_at_volume_cc(self, volume_cc: float) -> float:
        """D_volume_cc (Gy): the highest dose that at least ``volume_cc`` receives (whole voxels)."""
        if not volume_cc >= 0.0:
            raise ValueError(f"D{volume_cc:g}cc: the volume must be >= 0 cc")
        m = min(max(self._voxels_in(volume_cc), 1), self.n)
        return float(self.sorted_gy[self.n - m])

    def dmax(self) -> float:
        """Near-maximum D0.03cc (Gy)."""
        return self.dose_at_volume_cc(DMAX_VOLUME_CC)

    def dmin(self) -> float:
        """Near-minimum D(V - 0.03cc) (Gy): all but the coldest 0.03 cc receive at least this."""
        c = int(math.floor(DMAX_VOLUME_CC / self.voxel_volume_cc * (1.0 + _COUNT_RTOL)))
        return float(self.sorted_gy[min(c, self.n - 1)])

    def dmean(self) -> float:
        return float(self.sorted_gy.mean())

    def volume_at_dose(self, dose_gy: float, unit: str = "%") -> float:
        """V_dose: the volume whose dose is at least ``dose_gy``, in % of the structure or cc."""
        count = self.n - int(np.searchsorted(self.sorted_gy, dose_gy, side="left"))
        if unit == "%":
            return 100.0 * count / self.n
        if unit == "cc":
            return count * self.voxel_volume_cc
        raise ValueError(f"volume unit {unit!r} is not % or cc")


# ---------------------------------------------------------------- expressions

_NUM = r"(\d+(?:\.\d*)?|\.\d+)"
_D_RE = re.compile(rf"^D{_NUM}(%|cc)?$", re.IGNORECASE)
_V_RE = re.compile(rf"^V{_NUM}(Gy|%)$", re.IGNORECASE)


@dataclass(frozen=True)
class Metric:
    """A parsed DVH metric expression.

    Attributes
    ----------
    expression : the text as given (stripped), e.g. ``"D95"``, ``"D2cc"``, ``"V20Gy"``.
    kind : ``"dose_at_pct"``, ``"dose_at_cc"``, ``"volume_at_gy"``, ``"volume_at_pct_rx"``,
        ``"mean"``, ``"max"`` (D0.03cc) or ``"min"`` (D(V - 0.03cc)).
    argument : the number in the expression (volume in % or cc, dose in Gy or % of the
        prescription); 0 for mean, max and min.
    """

    expression: str
    kind: str
    argument: float = 0.0

    @property
    def is_dose(self) -> bool:
        """True when the metric is a dose (Gy); False for a volume (% or cc)."""
        return not self.kind.startswith("volume")

    @property
    def needs_prescription(self) -> bool:
        return self.kind == "volume_at_pct_rx"

    def evaluate(self, sd: StructureDose, *, prescription_gy: float | None = None, volume_unit: str = "%") -> float:
        """The metric's value: Gy for a dose, ``volume_unit`` (% or cc) for a volume."""
        k, a = self.kind, self.argument
        if k == "dose_at_pct":
            return sd.dose_at_volume_pct(a)
        if k == "dose_at_cc":
            return sd.dose_at_volume_cc(a)
        if k == "mean":
            return sd.dmean()
        if k == "max":
            return sd.dmax()
        if k == "min":
            return sd.dmin()
        if k == "volume_at_gy":
            return sd.volume_at_dose(a, volume_unit)
        if not prescription_gy or prescription_gy <= 0:
            raise ValueError(f"metric {self.expression!r} is relative to the prescription: give prescription_gy")
        return sd.volume_at_dose(a / 100.0 * prescription_gy, volume_unit)


def parse_metric(expression: str) -> Metric:
    """Parse a DVH metric expression.

    Accepted (case-insensitive): ``Dmean``, ``Dmax`` (D0.03cc), ``Dmin`` (D(V - 0.03cc)),
    ``D<x>`` or ``D<x>%`` (dose to x % of the volume), ``D<x>cc`` (dose to x cc),
    ``V<x>Gy`` (volume receiving at least x Gy), ``V<x>%`` (volume receiving at least x % of
    the prescription).

    Raises
    ------
    ValueError
        naming the expression and what is accepted.
    """
    if not isinstance(expression, str):
        raise ValueError(f"metric must be a string such as 'D95', got {expression!r}")
    text = expression.strip()
    low = text.lower()
    named = {"dmean": "mean", "dmax": "max", "dmin": "min"}
    if low in named:
        return Metric(text, named[low])
    m = _D_RE.match(text)
    if m:
        x = float(m.group(1))
        if (m.group(2) or "%").lower() == "cc":
            return Metric(text, "dose_at_cc", x)
        if x > 100.0:
            raise ValueError(f"metric {text!r}: a volume percentage must be within 0..100")
        return Metric(text, "dose_at_pct", x)
    m = _V_RE.match(text)
    if m:
        x = float(m.group(1))
        return Metric(text, "volume_at_gy" if m.group(2).lower() == "gy" else "volume_at_pct_rx", x)
    raise ValueError(
        f"metric {expression!r} is not one of Dmean, Dmax, Dmin, D<x>[%], D<x>cc, V<x>Gy, V<x>%"
    )


# ---------------------------------------------------------------- indices

def _volume_at_least(dose: np.ndarray, level_gy: float, region) -> int:
    if region is None:
        return int(np.count_nonzero(dose >= level_gy))
    return int(np.count_nonzero((dose >= level_gy) & np.asarray(_host(region), dtype=bool)))


def conformity_index(dose_gy, target_mask, reference_gy: float, *, region=None) -> float:
    """Paddick conformity index, ``CI = TV_PIV^2 / (TV * PIV)``.

    TV is the target volume, PIV the volume inside the reference (prescription) isodose,
    ``dose >= reference_gy``, and TV_PIV the part of the target inside it. CI is 1 when the
    isodose and the target coincide, smaller when the isodose misses target or spills
    outside. Reference: I. Paddick, "A simple scoring ratio to index the conformity of
    radiosurgical treatment plans", J. Neurosurg. 93 (suppl. 3), 219-222 (2000).

    Parameters
    ----------
    dose_gy : dose, Gy, (z, y, x).
    target_mask : bool (z, y, x), the target.
    reference_gy : the prescription isodose level, Gy.
    region : optional bool (z, y, x) limiting PIV (e.g. the body); the whole cube otherwise.

    Returns
    -------
    float
        CI in 0..1; 0 when no voxel reaches the reference dose.
    """
    dose = np.asarray(_host(dose_gy), dtype=np.float64)
    target = np.asarray(_host(target_mask), dtype=bool)
    if dose.shape != target.shape:
        raise ValueError(f"conformity_index: dose shape {dose.shape} does not match the target shape {target.shape}")
    tv = int(np.count_nonzero(target))
    if tv == 0:
        raise ValueError("conformity_index: the target is empty")
    piv = _volume_at_least(dose, reference_gy, region)
    if piv == 0:
        return 0.0
    tv_piv = int(np.count_nonzero(target & (dose >= reference_gy)))
    return tv_piv * tv_piv / (tv * piv)


def homogeneity_index(dose_gy, target_mask) -> float:
    """ICRU 83 homogeneity index, ``HI = (D2 - D98) / D50`` of the target.

    0 for a uniform dose, larger for a less homogeneous one; D2, D98 and D50 are the exact
    order statistics of :meth:`StructureDose.dose_at_volume_pct`. Reference: ICRU Report 83,
    "Prescribing, recording, and reporting photon-beam intensity-modulated radiation therapy
    (IMRT)", J. ICRU 10(1) (2010).
    """
    sd = StructureDose(dose_gy, target_mask, 1.0, "target")
    d50 = sd.dose_at_volume_pct(50)
    if d50 <= 0:
        raise ValueError("homogeneity_index: D50 of the target is not positive")
    return (sd.dose_at_volume_pct(2) - sd.dose_at_volume_pct(98)) / d50


def gradient_index(dose_gy, reference_gy: float, *, region=None) -> float:
    """Gradient index, ``GI = V(50 % of Rx) / V(100 % of Rx)``.

    The volume inside the half-prescription isodose over the volume inside the
    prescription isodose (both ``dose >= level``): how fast the dose falls off outside the
    target; lower is steeper. Reference: I. Paddick and B. Lippitz, "A simple dose gradient
    measurement tool to complement the conformity index", J. Neurosurg. 105 (suppl.),
    194-201 (2006).

    Parameters
    ----------
    dose_gy : dose, Gy, (z, y, x).
    reference_gy : the prescription dose, Gy.
    region : optional bool (z, y, x) limiting both volumes (e.g. the body).

    Returns
    -------
    float
        GI >= 1; ``inf`` when no voxel reaches the prescription.
    """
    dose = np.asarray(_host(dose_gy), dtype=np.float64)
    v100 = _volume_at_least(dose, reference_gy, region)
    v50 = _volume_at_least(dose, 0.5 * reference_gy, region)
    return v50 / v100 if v100 else float("inf")
