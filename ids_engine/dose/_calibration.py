"""Absolute calibration of a machine with the engine's own discretisation of the kernels."""

from __future__ import annotations

import numpy as np

from ids_engine.model import PhotonMachine

from ._geometry import _kernel_grid
from ._types import EngineOptions

__all__ = ["calibrate"]


def calibrate(machine: PhotonMachine, options: EngineOptions | None = None, *, field_mm: float = 100.0,
              ssd_mm: float | None = None, gy_per_mu_at_dmax: float = 0.01) -> PhotonMachine:
    """Absolute calibration: ``gy_per_mu_at_dmax`` (default 1 cGy/MU) at dmax on the axis of a
    ``field_mm`` square field at SSD = SAD (100 cm), in water.

    Uses the engine's own discretisation of the lateral kernels (fine grid for the narrow
    components, block sums on the coarse grid for the broad ones), evaluated on the axis, so
    that the engine reproduces the calibration.
    """
    options = options or EngineOptions()
    ssd = float(ssd_mm if ssd_mm is not None else machine.sad_mm)
    # The reference condition's kernels (matRad machines tabulate one set per SSD); the
    # resulting Gy per MU holds for every set.
    reference = machine.for_ssd(ssd)
    pitch = options.fluence_pitch_mm
    f = int(options.coarse_fluence_factor)
    c_axis = np.zeros(3)
    for comp in range(3):
        coarse = comp not in machine.narrow_components
        p = pitch * f if coarse else pitch
        k = _kernel_grid(reference, comp, p, options.kernel_fraction).astype(np.float64)
        half = (k.shape[0] - 1) // 2
        # Sum of the kernel over the field's cells (a cell grid with a node on the axis). On
        # the coarse grid a cell counts with the fraction of it inside the field, as block
        # sums of a fine open field give.
        x = np.arange(-half, half + 1) * p
        if coarse:
            cover = np.clip(np.minimum(x + p / 2 + field_mm / 2.0, field_mm / 2.0 - (x - p / 2)) / p, 0.0, 1.0)
        else:
            cover = (np.abs(x) <= field_mm / 2.0 + 1e-9).astype(float)
        c_axis[comp] = float((cover[:, None] * cover[None, :] * k).sum())
    depth = np.arange(0.0, 60.0, 0.05)
    isq = (machine.sad_mm / (ssd + depth)) ** 2
    dd = (machine.depth_components(depth) * c_axis[:, None]).sum(axis=0) * isq
    return machine.with_calibration(gy_per_mu_at_dmax / dd.max())
