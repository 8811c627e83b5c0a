"""Dose modification and recovery (DMR), sections 2.2-2.3 and Algorithm 1 of the IDS paper."""

from ._modify import ModificationResult, Modifier
from ._recovery import RecoveryResult, distance_grid, recover
from ._requests import (
    EraseSpot,
    MoveIsodoseLine,
    MoveIsodoseSurface,
    Pin,
    Request,
    RequestError,
    Resolved,
    SetVoxelDose,
    Unpin,
    request_from_dict,
)
from ._tpi import tpi_maps

__all__ = [
    "EraseSpot",
    "ModificationResult",
    "Modifier",
    "MoveIsodoseLine",
    "MoveIsodoseSurface",
    "Pin",
    "RecoveryResult",
    "Request",
    "RequestError",
    "Resolved",
    "SetVoxelDose",
    "Unpin",
    "distance_grid",
    "recover",
    "request_from_dict",
    "tpi_maps",
]
