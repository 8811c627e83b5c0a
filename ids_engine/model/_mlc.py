"""Multileaf collimator geometry (part of the machine model).

Frame: IEC 61217 beam limiting device (X_b, Y_b), projected to the isocentre plane, mm.
Leaves travel along X_b (the BEV ``u`` axis of :class:`~ids_engine.model.FluenceGrid`);
leaf pairs are stacked along Y_b (the BEV ``v`` axis). Bank A (``x2``) sits on the +X_b
side, bank B (``x1``) on the -X_b side, as in DICOM RT Plan's MLCX convention (the
``LeafJawPositions`` of an MLCX device list all B leaves, then all A leaves).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MLC", "default_mlc"]


@dataclass(frozen=True)
class MLC:
    """A multileaf collimator.

    Parameters
    ----------
    name : model name (reports, DICOM ``BeamLimitingDeviceSequence``).
    leaf_widths_mm : width of each leaf pair at the isocentre plane, from -Y_b to +Y_b.
    max_field_mm : (X, Y) the largest field the jaws open, centred on the axis.
    max_leaf_travel_mm : how far a leaf tip may go past the central axis (over-travel), mm.
    min_gap_mm : the smallest gap between the two leaves of a closed-but-moving pair.
    interdigitation : whether a leaf may pass the opposing leaf of a neighbouring pair.
    transmission : fraction of the open-field fluence passing through a closed leaf.
    """

    name: str = "generic-MLC-60"
    leaf_widths_mm: tuple[float, ...] = (10.0,) * 10 + (5.0,) * 40 + (10.0,) * 10
    max_field_mm: tuple[float, float] = (400.0, 400.0)
    max_leaf_travel_mm: float = 200.0
    min_gap_mm: float = 0.5
    interdigitation: bool = True
    transmission: float = 0.015

    def __post_init__(self) -> None:
        w = tuple(float(v) for v in self.leaf_widths_mm)
        if not w or not all(np.isfinite(v) and v > 0 for v in w):
            raise ValueError(f"MLC.leaf_widths_mm must be positive numbers, got {self.leaf_widths_mm!r}")
        f = tuple(float(v) for v in self.max_field_mm)
        if len(f) != 2 or not all(np.isfinite(v) and v > 0 for v in f):
            raise ValueError(f"MLC.max_field_mm must be two positive numbers, got {self.max_field_mm!r}")
        if not 0.0 <= float(self.transmission) < 1.0:
            raise ValueError(f"MLC.transmission must lie in [0, 1), got {self.transmission!r}")
        if not float(self.min_gap_mm) >= 0.0:
            raise ValueError(f"MLC.min_gap_mm must be >= 0, got {self.min_gap_mm!r}")
        if not float(self.max_leaf_travel_mm) > 0.0:
            raise ValueError(f"MLC.max_leaf_travel_mm must be positive, got {self.max_leaf_travel_mm!r}")
        object.__setattr__(self, "leaf_widths_mm", w)
        object.__setattr__(self, "max_field_mm", f)
        object.__setattr__(self, "transmission", float(self.transmission))
        object.__setattr__(self, "min_gap_mm", float(self.min_gap_mm))
        object.__setattr__(self, "max_leaf_travel_mm", float(self.max_leaf_travel_mm))

    @property
    def n_pairs(self) -> int:
        return len(self.leaf_widths_mm)

    def leaf_boundaries_mm(self) -> np.ndarray:
        """(n_pairs + 1,) Y_b edges of the leaf pairs, centred on the axis (DICOM ``LeafPositionBoundaries``)."""
        edges = np.concatenate([[0.0], np.cumsum(self.leaf_widths_mm)])
        return edges - edges[-1] / 2.0

    def leaf_centres_mm(self) -> np.ndarray:
        b = self.leaf_boundaries_mm()
        return 0.5 * (b[:-1] + b[1:])


def default_mlc() -> MLC:
    """60 leaf pairs, 40 x 5 mm in the centre and 10 x 10 mm on each side: 40 x 40 cm field."""
    return MLC()
