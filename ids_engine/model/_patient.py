"""The patient model: CT, density, structures and points of interest."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

import numpy as np

from ._grid import Grid
from ._structure import Structure, StructureKind, contract, expand, subtract

__all__ = ["DensityCurve", "Patient", "PointOfInterest", "DEFAULT_DENSITY_CURVE", "PATIENT_POSITIONS"]

PATIENT_POSITIONS = ("HFS", "HFP", "FFS", "FFP")


@dataclass(frozen=True)
class DensityCurve:
    """A piecewise-linear HU -> relative electron density calibration.

    ``hu`` strictly increasing; values outside the table are extrapolated
    with the end segments and clipped at zero density.
    """

    hu: tuple[float, ...]
    relative_electron_density: tuple[float, ...]
    name: str = "custom"

    def __post_init__(self) -> None:
        hu = tuple(float(v) for v in self.hu)
        red = tuple(float(v) for v in self.relative_electron_density)
        if len(hu) != len(red) or len(hu) < 2:
            raise ValueError("DensityCurve: hu and relative_electron_density need the same length, at least 2")
        if any(b <= a for a, b in zip(hu, hu[1:])):
            raise ValueError("DensityCurve.hu must be strictly increasing")
        if min(red) < 0:
            raise ValueError("DensityCurve.relative_electron_density must be >= 0")
        object.__setattr__(self, "hu", hu)
        object.__setattr__(self, "relative_electron_density", red)

    def __call__(self, ct_hu: np.ndarray) -> np.ndarray:
        """Relative electron density (float32) of a HU array of any shape."""
        hu = np.asarray(self.hu)
        red = np.asarray(self.relative_electron_density)
        x = np.asarray(ct_hu, dtype=np.float64)
        out = np.interp(x, hu, red)
        lo_slope = (red[1] - red[0]) / (hu[1] - hu[0])
        hi_slope = (red[-1] - red[-2]) / (hu[-1] - hu[-2])
        out = np.where(x < hu[0], red[0] + (x - hu[0]) * lo_slope, out)
        out = np.where(x > hu[-1], red[-1] + (x - hu[-1]) * hi_slope, out)
        return np.clip(out, 0.0, None).astype(np.float32)


# A generic kV CT calibration (air, lung, water, soft tissue, bone), close to the
# stoichiometric curves published for clinical scanners (Schneider et al. 1996);
# replace it with the scanner's own curve for clinical use.
DEFAULT_DENSITY_CURVE = DensityCurve(
    hu=(-1000.0, -800.0, 0.0, 100.0, 1000.0, 3000.0),
    relative_electron_density=(0.001, 0.20, 1.0, 1.07, 1.55, 2.55),
    name="generic kV CT (default)",
)


@dataclass(frozen=True)
class PointOfInterest:
    """A labelled point in patient coordinates (x, y, z) mm."""

    label: str
    position_mm_xyz: tuple[float, float, float]

    def __post_init__(self) -> None:
        if not str(self.label).strip():
            raise ValueError("PointOfInterest.label must be non-empty")
        p = tuple(float(v) for v in self.position_mm_xyz)
        if len(p) != 3 or not all(np.isfinite(p)):
            raise ValueError(f"PointOfInterest {self.label!r}: position_mm_xyz must be three finite numbers")
        object.__setattr__(self, "position_mm_xyz", p)


@dataclass(frozen=True, eq=False)
class Patient:
    """CT, density, structures and points of interest on one grid.

    Parameters
    ----------
    grid : the CT grid.
    ct_hu : float32 array, shape ``grid.shape_zyx`` (z, y, x), Hounsfield units.
    structures : the structures, each on ``grid``; names unique.
    points : points of interest.
    density_curve : HU -> relative electron density calibration.
    name : a display name (never a patient identifier in logs).
    patient_position : DICOM patient position (HFS, HFP, FFS, FFP); sets the
        IEC 61217 patient-support axes (see :mod:`ids_engine.model._beam`).
    frame_of_reference_uid : DICOM frame of reference, when known.
    """

    grid: Grid
    ct_hu: np.ndarray
    structures: tuple[Structure, ...] = ()
    points: tuple[PointOfInterest, ...] = ()
    density_curve: DensityCurve = DEFAULT_DENSITY_CURVE
    name: str = "patient"
    patient_position: str = "HFS"
    frame_of_reference_uid: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        ct = np.asarray(self.ct_hu, dtype=np.float32)
        if ct.shape != self.grid.shape_zyx:
            raise ValueError(f"Patient.ct_hu shape {ct.shape} does not match grid shape {self.grid.shape_zyx}")
        ct = ct.copy()
        ct.setflags(write=False)
        object.__setattr__(self, "ct_hu", ct)
        structures = tuple(self.structures)
        names = [s.name for s in structures]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"Patient.structures: duplicate names {dupes}")
        for s in structures:
            if s.grid != self.grid:
                raise ValueError(f"Patient.structures: {s.name!r} is not on the CT grid")
        object.__setattr__(self, "structures", structures)
        object.__setattr__(self, "points", tuple(self.points))
        pos = str(self.patient_position).upper()
        if pos not in PATIENT_POSITIONS:
            raise ValueError(f"Patient.patient_position {self.patient_position!r} is not one of {PATIENT_POSITIONS}")
        object.__setattr__(self, "patient_position", pos)

    # -------------------------------------------------------------- density
    def relative_electron_density(self) -> np.ndarray:
        """Relative electron density, float32 (z, y, x), from the CT and the density curve."""
        return self.density_curve(self.ct_hu)

    # ------------------------------------------------------------ structures
    @property
    def structure_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.structures)

    def structure(self, name: str) -> Structure:
        """The structure called ``name`` (KeyError naming the known ones otherwise)."""
        for s in self.structures:
            if s.name == name:
                return s
        raise KeyError(f"no structure {name!r}; known: {', '.join(self.structure_names) or 'none'}")

    def of_kind(self, kind: "str | StructureKind") -> tuple[Structure, ...]:
        k = StructureKind.parse(kind)
        return tuple(s for s in self.structures if s.kind is k)

    @property
    def targets(self) -> tuple[Structure, ...]:
        return self.of_kind(StructureKind.TARGET)

    @property
    def oars(self) -> tuple[Structure, ...]:
        return self.of_kind(StructureKind.OAR)

    def kind_mask(self, kind: "str | StructureKind") -> np.ndarray:
        """Bool (z, y, x): the union of every structure of one kind (e.g. all targets)."""
        out = np.zeros(self.grid.shape_zyx, bool)
        for s in self.of_kind(kind):
            out |= s.mask
        return out

    @property
    def external(self) -> Structure:
        """The external (body) contour; falls back to CT > -500 HU if none is given."""
        ext = self.of_kind(StructureKind.EXTERNAL)
        if ext:
            return ext[0]
        return Structure("BODY (CT > -500 HU)", StructureKind.EXTERNAL, self.ct_hu > -500.0, self.grid, (0.7, 0.7, 0.7))

    def body_mask(self) -> np.ndarray:
        """Bool (z, y, x): voxels inside the external contour."""
        return self.external.mask

    def with_structures(self, *structures: Structure, replace_existing: bool = False) -> "Patient":
        """A new patient with structures added (or replaced by name when ``replace_existing``)."""
        new = {s.name: s for s in structures}
        kept = []
        for s in self.structures:
            if s.name in new:
                if not replace_existing:
                    raise ValueError(f"structure {s.name!r} exists already")
                continue
            kept.append(s)
        return replace(self, structures=tuple(kept) + tuple(structures))

    def without_structures(self, *names: str) -> "Patient":
        for n in names:
            self.structure(n)
        return replace(self, structures=tuple(s for s in self.structures if s.name not in names))

    def with_points(self, *points: PointOfInterest) -> "Patient":
        return replace(self, points=self.points + tuple(points))

    def new_structure_from(
        self,
        name: str,
        source: str,
        margin_mm: float = 0.0,
        subtract_names: Sequence[str] = (),
        subtract_margins_mm: Iterable[float] | None = None,
        kind: "str | StructureKind | None" = None,
        colour=None,
    ) -> "Patient":
        """"New volume from old" (forward-planning manual, seed 001): ``source`` grown
        (margin > 0) or shrunk (margin < 0) by ``margin_mm``, minus other structures, each
        with its own margin, added to the patient as ``name``.

        Example: a ring for a dose constraint is
        ``new_structure_from("ring", "BODY", subtract_names=["PTV"], subtract_margins_mm=[20])``.
        """
        base = self.structure(source)
        grown = expand(name, base, margin_mm) if margin_mm >= 0 else contract(name, base, -margin_mm)
        margins = list(subtract_margins_mm) if subtract_margins_mm is not None else [0.0] * len(subtract_names)
        if len(margins) != len(subtract_names):
            raise ValueError("new_structure_from: one margin per subtracted structure")
        others = []
        for n, m in zip(subtract_names, margins):
            o = self.structure(n)
            others.append(expand(n, o, m) if m >= 0 else contract(n, o, -m))
        if kind is None:
            # A volume made from the body (a ring, "body minus target") is a region to
            # constrain, not a second external contour.
            kind = StructureKind.OAR if base.kind is StructureKind.EXTERNAL else base.kind
        if colour is None:
            from ._structure import default_colour

            colour = default_colour(len(self.structures))
        result = subtract(name, grown, *others, kind=StructureKind.parse(kind), colour=colour)
        if result.is_empty:
            raise ValueError(f"new structure {name!r} from {source!r} is empty")
        return self.with_structures(result)

    def summary(self) -> list[dict]:
        """One row per structure: name, kind, voxel count, volume in cm^3."""
        return [
            {"name": s.name, "kind": s.kind.value, "voxels": s.voxel_count, "volume_cc": s.volume_cc}
            for s in self.structures
        ]
