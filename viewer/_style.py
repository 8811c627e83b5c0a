"""Colours, isodose levels and image composition shared by the views (host NumPy, no Qt)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "ISODOSE_PCT",
    "WINDOW_PRESETS",
    "IsodoseLevel",
    "compose_slice_rgba",
    "dose_wash_rgba",
    "isodose_colour",
    "isodose_levels",
]

# Isodose levels shown by default, % of the prescription.
ISODOSE_PCT = (30.0, 50.0, 70.0, 90.0, 95.0, 100.0, 107.0)

# Window/level presets (window_hu, level_hu).
WINDOW_PRESETS = {
    "Soft tissue": (400.0, 40.0),
    "Full range": (1400.0, -300.0),
    "Lung": (1500.0, -600.0),
    "Bone": (2000.0, 300.0),
}

# Dose colour table (fraction of the prescription -> RGB): blue-cyan-green-yellow-orange, then
# magenta for hot spots, so neither the 100 % nor the 107 % line looks like a red target contour.
_WASH_STOPS = np.array([0.0, 0.3, 0.5, 0.7, 0.9, 0.95, 1.0, 1.07, 1.2])
_WASH_RGB = np.array([
    [0.10, 0.10, 0.50],
    [0.20, 0.40, 1.00],
    [0.00, 0.80, 0.90],
    [0.20, 0.85, 0.25],
    [0.75, 0.92, 0.10],
    [1.00, 0.88, 0.10],
    [1.00, 0.55, 0.00],
    [1.00, 0.25, 0.90],
    [1.00, 0.70, 1.00],
])


def isodose_colour(fraction: float) -> tuple[float, float, float]:
    """RGB (0..1) of the isodose at ``fraction`` of the prescription (same table as the wash)."""
    return tuple(float(np.interp(fraction, _WASH_STOPS, _WASH_RGB[:, k])) for k in range(3))


@dataclass(frozen=True)
class IsodoseLevel:
    """One isodose line: its dose (Gy), % of prescription and display colour (RGB 0..1)."""

    gy: float
    pct: float
    colour: tuple[float, float, float]

    def label(self, unit: str) -> str:
        return f"{self.pct:g}%" if unit == "%" else f"{self.gy:.3g} Gy"


def isodose_levels(prescription_gy: float, pcts=ISODOSE_PCT) -> tuple[IsodoseLevel, ...]:
    """The isodose levels for a prescription."""
    return tuple(IsodoseLevel(prescription_gy * p / 100.0, float(p), isodose_colour(p / 100.0)) for p in pcts)


def dose_wash_rgba(dose_gy: np.ndarray, prescription_gy: float, alpha: float = 0.45,
                   threshold_fraction: float = 0.2) -> np.ndarray:
    """Colour-wash RGBA (float32, 0..1) of a dose slice; transparent below the threshold."""
    f = np.asarray(dose_gy, dtype=np.float32) / np.float32(prescription_gy)
    rgba = np.empty(f.shape + (4,), np.float32)
    for k in range(3):
        rgba[..., k] = np.interp(f, _WASH_STOPS, _WASH_RGB[:, k])
    # Fade in over the first 10 % above the threshold so the wash has no hard edge.
    rgba[..., 3] = alpha * np.clip((f - threshold_fraction) / 0.1, 0.0, 1.0)
    return rgba


def compose_slice_rgba(ct_hu: np.ndarray, window_hu: float, level_hu: float, dose_gy: np.ndarray | None,
                       prescription_gy: float, wash_alpha: float = 0.45) -> np.ndarray:
    """CT slice in grey (window/level) with the dose wash blended on top: (rows, cols, 4) uint8."""
    lo = level_hu - window_hu / 2.0
    grey = np.clip((np.asarray(ct_hu, np.float32) - lo) / max(window_hu, 1.0), 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if dose_gy is not None and wash_alpha > 0:
        wash = dose_wash_rgba(dose_gy, prescription_gy, wash_alpha)
        a = wash[..., 3:4]
        rgb = rgb * (1.0 - a) + wash[..., :3] * a
    out = np.empty(rgb.shape[:2] + (4,), np.uint8)
    out[..., :3] = np.round(rgb * 255.0)
    out[..., 3] = 255
    return out
