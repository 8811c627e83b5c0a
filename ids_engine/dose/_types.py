"""Value types of the dose engine: its discretisation options and a fluence patch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["EngineOptions", "FluencePatch"]


@dataclass(frozen=True)
class EngineOptions:
    """Discretisation of the engine.

    fluence_pitch_mm : amplitude spacing of the fine fluence grid at the isocentre plane.
    coarse_fluence_factor : fine amplitudes per coarse amplitude (per axis) for the broad components.
    coarse_factor_zyx : CT voxels per coarse dose voxel (per axis) for the broad components.
    tile_cells : fluence tile size (fine amplitudes per side) used to bucket voxels.
    kernel_fraction : lateral kernels are truncated where they fall below this fraction of their peak.
    field_margin_mm : margin of the automatic fluence grid around the body's projection.
    """

    fluence_pitch_mm: float = 1.0
    coarse_fluence_factor: int = 4
    coarse_factor_zyx: tuple[int, int, int] = (2, 4, 4)
    tile_cells: int = 8
    kernel_fraction: float = 1e-4
    field_margin_mm: float = 10.0

    def __post_init__(self) -> None:
        if not self.fluence_pitch_mm > 0:
            raise ValueError("EngineOptions.fluence_pitch_mm must be positive")
        if int(self.coarse_fluence_factor) < 1 or int(self.tile_cells) < 1:
            raise ValueError("EngineOptions.coarse_fluence_factor and tile_cells must be >= 1")
        if len(self.coarse_factor_zyx) != 3 or min(self.coarse_factor_zyx) < 1:
            raise ValueError("EngineOptions.coarse_factor_zyx must be three integers >= 1")


@dataclass(frozen=True, eq=False)
class FluencePatch:
    """A change of one beam's fluence on a rectangle of its fine fluence grid.

    beam : beam index.
    row0, col0 : fine-grid index of ``delta[0, 0]``.
    delta : (h, w) float32 change in fluence (MU), any sign.
    """

    beam: int
    row0: int
    col0: int
    delta: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.delta.shape)
