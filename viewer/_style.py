"""Colours, isodose levels and image composition shared by the views (host NumPy, no Qt)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DIFF_RANGE_PCT",
    "ISODOSE_PCT",
    "ORIENTATION",
    "WASH_RANGE",
    "WINDOW_PRESETS",
    "IsodoseDisplay",
    "IsodoseLevel",
    "TINT_COLOURS",
    "compose_slice_rgba",
    "difference_colour",
    "difference_wash_rgba",
    "dose_wash_rgba",
    "format_levels",
    "isodose_colour",
    "isodose_levels",
    "parse_isodose_levels",
]

# DICOM patient coordinates: +x towards the patient's left, +y posterior, +z towards the
# head. Letters of the (negative, positive) end of each (z, y, x) index axis (grid indices
# grow with the coordinates; see ids_engine.model.Grid).
ORIENTATION = {"x": ("R", "L"), "y": ("A", "P"), "z": ("F", "H")}

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


# The dose wash spans these fractions of the prescription (transparent below the first).
WASH_RANGE = (0.2, 1.2)

# The difference wash (plan - reference) saturates at this % of the prescription and is
# transparent within DIFF_THRESHOLD_PCT of zero.
DIFF_RANGE_PCT = 10.0
DIFF_THRESHOLD_PCT = 1.0
_DIFF_STOPS = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
_DIFF_RGB = np.array([
    [0.15, 0.30, 1.00],
    [0.35, 0.75, 1.00],
    [0.95, 0.95, 0.95],
    [1.00, 0.65, 0.20],
    [1.00, 0.15, 0.10],
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

    def label(self, unit: str, normalisation_gy: float | None = None) -> str:
        """The line's label: Gy, or % of the normalisation point's dose when one is given
        (seed 001: the same line, only its label changes), else % of the prescription."""
        if unit != "%":
            return f"{self.gy:.3g} Gy"
        if normalisation_gy:
            return f"{100.0 * self.gy / normalisation_gy:.4g}%"
        return f"{self.pct:g}%"


# The seed's tint colours: the primary colours and the additions of two of them.
TINT_COLOURS = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
}

NORMAL_LINE_WIDTH_PX = 1.4


def _pct_key(pct: float) -> float:
    return round(float(pct), 4)


@dataclass(frozen=True)
class IsodoseDisplay:
    """How the 2D isodose lines are drawn (seed 001, "2d Isodose Control"), for every slice view.

    styles : per level (keyed by % of the prescription) ``(pct, rgb or None, width_px)``: a
        colour replacing the table's, and a line width in pixels (0: the normal width).
    tint_pct : the one level whose region (dose at or above it) is tinted, or None.
    tint_colour, tint_alpha : the tint's colour (one of :data:`TINT_COLOURS` in the dialog) and opacity.
    ticks : tick marks on the downhill (lower dose) side of every line, as on a topographic map.
    hot_spot : mark each frame's hottest point with an asterisk and its dose.
    normalisation_gy : the dose at the normalisation point; % labels are % of it (None: of the
        prescription).
    """

    styles: tuple[tuple[float, tuple[float, float, float] | None, float], ...] = ()
    tint_pct: float | None = None
    tint_colour: tuple[float, float, float] = TINT_COLOURS["red"]
    tint_alpha: float = 0.3
    ticks: bool = True
    hot_spot: bool = True
    normalisation_gy: float | None = None

    def __post_init__(self) -> None:
        styles = []
        for pct, rgb, width in self.styles:
            if not float(width) >= 0:
                raise ValueError(f"IsodoseDisplay.styles: line width of {pct:g} % must be >= 0 pixels, got {width}")
            styles.append((_pct_key(pct), None if rgb is None else tuple(float(c) for c in rgb), float(width)))
        object.__setattr__(self, "styles", tuple(styles))
        if not 0.0 <= float(self.tint_alpha) <= 1.0:
            raise ValueError(f"IsodoseDisplay.tint_alpha must be in 0..1, got {self.tint_alpha}")
        if self.normalisation_gy is not None and not float(self.normalisation_gy) > 0:
            raise ValueError(f"IsodoseDisplay.normalisation_gy must be positive, got {self.normalisation_gy}")

    def style(self, level: "IsodoseLevel") -> tuple[tuple[float, float, float], float]:
        """(rgb, width in pixels) of a level's line."""
        key = _pct_key(level.pct)
        for pct, rgb, width in self.styles:
            if pct == key:
                return (rgb or level.colour), (width if width > 0 else NORMAL_LINE_WIDTH_PX)
        return level.colour, NORMAL_LINE_WIDTH_PX

    def with_style(self, pct: float, colour=None, width_px: float = 0.0) -> "IsodoseDisplay":
        """A copy with the line at ``pct`` % drawn in ``colour`` (None: the table's) and ``width_px``."""
        from dataclasses import replace

        key = _pct_key(pct)
        kept = tuple(s for s in self.styles if s[0] != key)
        return replace(self, styles=kept + ((key, colour, float(width_px)),))

    def tinted(self, level: "IsodoseLevel") -> bool:
        return self.tint_pct is not None and _pct_key(self.tint_pct) == _pct_key(level.pct)


def isodose_levels(prescription_gy: float, pcts=ISODOSE_PCT) -> tuple[IsodoseLevel, ...]:
    """The isodose levels for a prescription."""
    return tuple(IsodoseLevel(prescription_gy * p / 100.0, float(p), isodose_colour(p / 100.0)) for p in pcts)


_TOKEN = re.compile(r"\s*(?:([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(%|gy)|([,;]))\s*", re.IGNORECASE)
MAX_LEVEL_PCT = 300.0


def parse_isodose_levels(text: str, prescription_gy: float) -> tuple[float, ...]:
    """Isodose levels typed by the planner, as sorted % of the prescription.

    Values are separated by commas, semicolons or spaces; each may carry a unit ("57 Gy",
    "95%"). A unit also applies to the bare values before it back to the previous unit
    ("30, 50, 70 %" is three percentages); bare values after the last unit take that unit,
    and with no unit at all they are percentages. E.g. "20 Gy, 50 95 100 107 %".

    Raises ValueError naming the offending text: nothing typed, a value that is not a
    positive number, or a level above ``MAX_LEVEL_PCT`` % of the prescription.
    """
    if not prescription_gy > 0:
        raise ValueError(f"the prescription must be positive, got {prescription_gy:g} Gy")
    values: list[float] = []
    units: list[str | None] = []
    pos = 0
    text = str(text)
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            bad = text[pos:].split()[0] if text[pos:].split() else text[pos:]
            raise ValueError(f"{bad!r} is not a number, % or Gy")
        pos = m.end()
        if m.group(1) is not None:
            values.append(float(m.group(1)))
            units.append(None)
        elif m.group(2) is not None:
            unit = "%" if m.group(2) == "%" else "Gy"
            if not units or units[-1] is not None:
                raise ValueError(f"{m.group(2)!r} follows no value")
            k = len(units) - 1
            while k >= 0 and units[k] is None:
                units[k] = unit
                k -= 1
    if not values:
        raise ValueError("type at least one isodose level, e.g. 50, 95, 100 % or 57 Gy")
    last = next((u for u in reversed(units) if u is not None), "%")
    pcts = []
    for v, u in zip(values, units):
        pct = v if (u or last) == "%" else 100.0 * v / prescription_gy
        shown = f"{v:g} {u or last}"
        if not (np.isfinite(pct) and pct > 0):
            raise ValueError(f"isodose level {shown} must be positive")
        if pct > MAX_LEVEL_PCT:
            raise ValueError(f"isodose level {shown} is above {MAX_LEVEL_PCT:g} % of the prescription")
        pcts.append(round(pct, 6))
    return tuple(sorted(set(pcts)))


def format_levels(pcts) -> str:
    """Levels (% of the prescription) as the text :func:`parse_isodose_levels` reads back."""
    return ", ".join(f"{p:.6g}" for p in pcts) + " %"  # 6 digits: a level typed in Gy stays within 1e-5 of it


def difference_colour(fraction: float) -> tuple[float, float, float]:
    """RGB of the difference wash at ``fraction`` of its range (-1 .. 1)."""
    return tuple(float(np.interp(fraction, _DIFF_STOPS, _DIFF_RGB[:, k])) for k in range(3))


def difference_wash_rgba(diff_gy: np.ndarray, prescription_gy: float, alpha: float = 0.45) -> np.ndarray:
    """Colour-wash RGBA (float32, 0..1) of a dose difference slice (plan - reference, Gy):
    blue where the plan is lower, red where it is higher, saturating at
    ``DIFF_RANGE_PCT`` % of the prescription; transparent within ``DIFF_THRESHOLD_PCT`` %."""
    f = np.asarray(diff_gy, dtype=np.float32) / np.float32(DIFF_RANGE_PCT / 100.0 * prescription_gy)
    rgba = np.empty(f.shape + (4,), np.float32)
    for k in range(3):
        rgba[..., k] = np.interp(f, _DIFF_STOPS, _DIFF_RGB[:, k])
    t = DIFF_THRESHOLD_PCT / DIFF_RANGE_PCT
    rgba[..., 3] = alpha * np.clip((np.abs(f) - t) / t, 0.0, 1.0)
    return rgba


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
                       prescription_gy: float, wash_alpha: float = 0.45, *, difference: bool = False,
                       tint: tuple[float, tuple[float, float, float], float] | None = None) -> np.ndarray:
    """CT slice in grey (window/level) with the dose wash blended on top: (rows, cols, 4) uint8.
    With ``difference`` the slice ``dose_gy`` is a dose difference (Gy) and gets the
    difference wash. ``tint`` ``(level_gy, rgb, alpha)``: the region where the dose is at or
    above the level is tinted in one colour on top (seed 001: an isodose's boundary and
    interior), voxel by voxel: its edge lies within half a voxel of the isodose line."""
    lo = level_hu - window_hu / 2.0
    grey = np.clip((np.asarray(ct_hu, np.float32) - lo) / max(window_hu, 1.0), 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if dose_gy is not None and wash_alpha > 0:
        wash = (difference_wash_rgba(dose_gy, prescription_gy, wash_alpha) if difference
                else dose_wash_rgba(dose_gy, prescription_gy, wash_alpha))
        a = wash[..., 3:4]
        rgb = rgb * (1.0 - a) + wash[..., :3] * a
    if dose_gy is not None and tint is not None and not difference:
        level_gy, colour, alpha = tint
        inside = (np.asarray(dose_gy, np.float32) >= np.float32(level_gy))[..., None]
        rgb = np.where(inside, rgb * (1.0 - alpha) + np.asarray(colour, np.float32) * alpha, rgb)
    out = np.empty(rgb.shape[:2] + (4,), np.uint8)
    out[..., :3] = np.round(rgb * 255.0)
    out[..., 3] = 255
    return out
