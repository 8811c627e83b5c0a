"""The patient model: grid, structures, patient, beams (backend-neutral, NumPy on the host)."""

from ._beam import SUPPORT_FROM_PATIENT, Beam, FluenceGrid, rotation_matrix_patient_to_beam
from ._grid import Grid
from ._mlc import MLC, default_mlc
from ._machine import PhotonMachine, default_6mv
from ._patient import DEFAULT_DENSITY_CURVE, PATIENT_POSITIONS, DensityCurve, Patient, PointOfInterest
from ._structure import Structure, StructureKind, contract, default_colour, expand, intersection, subtract, union

__all__ = [
    "Beam",
    "DEFAULT_DENSITY_CURVE",
    "DensityCurve",
    "FluenceGrid",
    "Grid",
    "MLC",
    "PATIENT_POSITIONS",
    "Patient",
    "PhotonMachine",
    "PointOfInterest",
    "SUPPORT_FROM_PATIENT",
    "Structure",
    "StructureKind",
    "contract",
    "default_6mv",
    "default_mlc",
    "default_colour",
    "expand",
    "intersection",
    "rotation_matrix_patient_to_beam",
    "subtract",
    "union",
]
