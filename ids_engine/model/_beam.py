"""Beams and the IEC 61217 coordinate chain from the patient to the beam's-eye view.

Coordinate systems (all right-handed, mm):

* **DICOM patient** (x, y, z): +x to the patient's left, +y posterior, +z superior.
* **IEC patient support** (X_s, Y_s, Z_s), origin at the isocentre: for a head-first
  supine (HFS) patient +X_s is the patient's left, +Y_s superior (towards the gantry),
  +Z_s anterior (up). HFP, FFS and FFP flip axes as in :data:`SUPPORT_FROM_PATIENT`.
* **IEC fixed** (X_f, Y_f, Z_f): the support frame rotated by the couch (patient support)
  angle about Z (positive = counter-clockwise seen from above).
* **IEC gantry** (X_g, Y_g, Z_g): the fixed frame rotated by the gantry angle about Y_f
  (positive = clockwise seen from the foot of the couch); +Z_g points to the source.
* **IEC beam limiting device** (X_b, Y_b, Z_b): the gantry frame rotated by the collimator
  angle about Z_g.

The beam's-eye view (BEV) coordinates of a point are its X_b, Y_b scaled to the
isocentre plane along the diverging ray from the source,
``u = X_b * SAD / (SAD - Z_b)``, ``v = Y_b * SAD / (SAD - Z_b)``, and its distance from
the source along the central axis ``SAD - Z_b``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Beam", "FluenceGrid", "SUPPORT_FROM_PATIENT", "rotation_matrix_patient_to_beam"]

# Rows: IEC support axes (X_s, Y_s, Z_s) expressed in DICOM patient axes (x, y, z).
SUPPORT_FROM_PATIENT = {
    "HFS": np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=np.float64),
    "HFP": np.array([[-1, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=np.float64),
    "FFS": np.array([[-1, 0, 0], [0, 0, -1], [0, -1, 0]], dtype=np.float64),
    "FFP": np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=np.float64),
}


def _rz(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float64)


def _ry(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=np.float64)


def rotation_matrix_patient_to_beam(
    gantry_deg: float, couch_deg: float, collimator_deg: float, patient_position: str = "HFS"
) -> np.ndarray:
    """3x3 matrix taking DICOM patient vectors to IEC beam-limiting-device vectors."""
    try:
        m_pos = SUPPORT_FROM_PATIENT[patient_position.upper()]
    except KeyError as exc:
        raise ValueError(f"patient_position {patient_position!r} is not one of {sorted(SUPPORT_FROM_PATIENT)}") from exc
    return _rz(collimator_deg).T @ _ry(gantry_deg).T @ _rz(couch_deg) @ m_pos


@dataclass(frozen=True)
class FluenceGrid:
    """A regular grid of fluence amplitudes in the isocentre plane, BEV coordinates.

    Parameters
    ----------
    shape_vu : (nv, nu) amplitudes along Y_b (rows) and X_b (columns).
    pitch_mm : spacing of the amplitudes at the isocentre plane, mm.
    origin_mm_uv : (u, v) BEV coordinate of amplitude [0, 0], mm.
    """

    shape_vu: tuple[int, int]
    pitch_mm: float
    origin_mm_uv: tuple[float, float]

    def __post_init__(self) -> None:
        shape = tuple(int(n) for n in self.shape_vu)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"FluenceGrid.shape_vu must be two positive integers, got {self.shape_vu!r}")
        if not float(self.pitch_mm) > 0:
            raise ValueError(f"FluenceGrid.pitch_mm must be positive, got {self.pitch_mm!r}")
        object.__setattr__(self, "shape_vu", shape)
        object.__setattr__(self, "pitch_mm", float(self.pitch_mm))
        object.__setattr__(self, "origin_mm_uv", tuple(float(v) for v in self.origin_mm_uv))

    @classmethod
    def centred(cls, width_mm_uv: tuple[float, float], pitch_mm: float) -> "FluenceGrid":
        """A grid centred on the beam axis covering at least ``width_mm_uv`` (u, v)."""
        nu = int(np.ceil(width_mm_uv[0] / pitch_mm)) + 1
        nv = int(np.ceil(width_mm_uv[1] / pitch_mm)) + 1
        return cls((nv, nu), pitch_mm, (-(nu - 1) * pitch_mm / 2.0, -(nv - 1) * pitch_mm / 2.0))

    def u_mm(self) -> np.ndarray:
        return self.origin_mm_uv[0] + self.pitch_mm * np.arange(self.shape_vu[1])

    def v_mm(self) -> np.ndarray:
        return self.origin_mm_uv[1] + self.pitch_mm * np.arange(self.shape_vu[0])

    def to_index(self, u_mm, v_mm) -> tuple[np.ndarray, np.ndarray]:
        """Fractional (row, column) index of BEV positions."""
        return ((np.asarray(v_mm) - self.origin_mm_uv[1]) / self.pitch_mm,
                (np.asarray(u_mm) - self.origin_mm_uv[0]) / self.pitch_mm)

    def rectangle_mask(self, u_range_mm: tuple[float, float], v_range_mm: tuple[float, float]) -> np.ndarray:
        """Bool (nv, nu): amplitudes whose centre lies in a BEV rectangle (an open field)."""
        uu, vv = np.meshgrid(self.u_mm(), self.v_mm())
        eps = 1e-6
        return ((uu >= u_range_mm[0] - eps) & (uu <= u_range_mm[1] + eps)
                & (vv >= v_range_mm[0] - eps) & (vv <= v_range_mm[1] + eps))


@dataclass(frozen=True)
class Beam:
    """One static photon beam (IEC 61217 angles, degrees).

    Parameters
    ----------
    name : display name.
    gantry_deg, couch_deg, collimator_deg : IEC 61217 angles.
    isocentre_mm_xyz : isocentre in DICOM patient coordinates.
    sad_mm : source-axis distance.
    energy_mv : nominal energy, selects the machine data.
    fluence_grid : where the beam's fluence amplitudes live (None: the dose engine
        chooses one covering the body's projection).
    """

    name: str = "beam"
    gantry_deg: float = 0.0
    couch_deg: float = 0.0
    collimator_deg: float = 0.0
    isocentre_mm_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0)
    sad_mm: float = 1000.0
    energy_mv: float = 6.0
    fluence_grid: FluenceGrid | None = None

    def __post_init__(self) -> None:
        for f in ("gantry_deg", "couch_deg", "collimator_deg", "sad_mm", "energy_mv"):
            v = float(getattr(self, f))
            if not np.isfinite(v):
                raise ValueError(f"Beam.{f} must be finite, got {getattr(self, f)!r}")
            object.__setattr__(self, f, v)
        if self.sad_mm <= 0:
            raise ValueError(f"Beam.sad_mm must be positive, got {self.sad_mm}")
        if self.energy_mv <= 0:
            raise ValueError(f"Beam.energy_mv must be positive, got {self.energy_mv}")
        iso = tuple(float(v) for v in self.isocentre_mm_xyz)
        if len(iso) != 3 or not all(np.isfinite(iso)):
            raise ValueError(f"Beam.isocentre_mm_xyz must be three finite numbers, got {self.isocentre_mm_xyz!r}")
        object.__setattr__(self, "isocentre_mm_xyz", iso)
        object.__setattr__(self, "gantry_deg", self.gantry_deg % 360.0)
        object.__setattr__(self, "couch_deg", self.couch_deg % 360.0)
        object.__setattr__(self, "collimator_deg", self.collimator_deg % 360.0)

    # ------------------------------------------------------------ transforms
    def rotation(self, patient_position: str = "HFS") -> np.ndarray:
        """3x3: DICOM patient vectors -> IEC beam limiting device vectors."""
        return rotation_matrix_patient_to_beam(self.gantry_deg, self.couch_deg, self.collimator_deg, patient_position)

    def patient_to_beam(self, points_xyz, patient_position: str = "HFS") -> np.ndarray:
        """Patient points (..., 3) -> IEC beam limiting device coordinates (..., 3), mm, origin at isocentre."""
        p = np.asarray(points_xyz, dtype=np.float64) - np.asarray(self.isocentre_mm_xyz)
        return p @ self.rotation(patient_position).T

    def beam_to_patient(self, points_b, patient_position: str = "HFS") -> np.ndarray:
        """IEC beam limiting device coordinates (..., 3) -> patient points (..., 3)."""
        p = np.asarray(points_b, dtype=np.float64)
        return p @ self.rotation(patient_position) + np.asarray(self.isocentre_mm_xyz)

    def patient_to_bev(self, points_xyz, patient_position: str = "HFS") -> np.ndarray:
        """Patient points (..., 3) -> (u_mm, v_mm, distance_mm): BEV position at the isocentre
        plane and distance from the source along the central axis."""
        b = self.patient_to_beam(points_xyz, patient_position)
        dist = self.sad_mm - b[..., 2]
        scale = self.sad_mm / dist
        return np.stack([b[..., 0] * scale, b[..., 1] * scale, dist], axis=-1)

    def bev_to_patient(self, u_mm, v_mm, distance_mm, patient_position: str = "HFS") -> np.ndarray:
        """Inverse of :meth:`patient_to_bev`: the patient point on the ray through (u, v) at the
        isocentre plane, ``distance_mm`` from the source along the central axis."""
        d = np.asarray(distance_mm, dtype=np.float64)
        scale = d / self.sad_mm
        b = np.stack(np.broadcast_arrays(np.asarray(u_mm) * scale, np.asarray(v_mm) * scale, self.sad_mm - d), axis=-1)
        return self.beam_to_patient(b, patient_position)

    def source_mm_xyz(self, patient_position: str = "HFS") -> np.ndarray:
        """The source position in patient coordinates."""
        return self.beam_to_patient(np.array([0.0, 0.0, self.sad_mm]), patient_position)

    def direction_xyz(self, patient_position: str = "HFS") -> np.ndarray:
        """Unit vector of the central axis (source -> isocentre) in patient coordinates."""
        return self.rotation(patient_position).T @ np.array([0.0, 0.0, -1.0])
