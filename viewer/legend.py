"""The colour-wash legend: a colour bar in % of the prescription and Gy (QPainter).

It draws the same colour tables as the slices' wash (:mod:`._style`): the dose wash from
20 % to 120 % of the prescription, or in the difference mode plan - reference from
-``DIFF_RANGE_PCT`` % to +``DIFF_RANGE_PCT`` %.
"""

from __future__ import annotations

import numpy as np
from PyQt6 import QtCore, QtGui, QtWidgets

from ._style import DIFF_RANGE_PCT, WASH_RANGE, difference_colour, isodose_colour

__all__ = ["WashLegend"]

_PLAN_TICKS = (0.2, 0.5, 0.7, 0.9, 1.0, 1.2)
_DIFF_TICKS = (-1.0, -0.5, 0.0, 0.5, 1.0)


class WashLegend(QtWidgets.QWidget):
    """A horizontal colour bar: % of the prescription above, Gy below.

    ``ticks`` holds (position 0..1 along the bar, "% label", "Gy label") of what is drawn.
    """

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("washLegend")
        self.setFixedSize(330, 40)
        self.prescription_gy = 0.0
        self.mode = "plan"
        self.ticks: list[tuple[float, str, str]] = []
        self.setToolTip("Dose colour wash: % of the prescription (top) and Gy (bottom)")

    def set_prescription(self, prescription_gy: float) -> None:
        self.prescription_gy = float(prescription_gy)
        self._update_ticks()

    def set_mode(self, mode: str) -> None:
        """"plan" (the dose wash) or "difference" (plan - reference)."""
        self.mode = mode
        self.setToolTip("Plan − reference: % of the prescription (top) and Gy (bottom); blue where the plan is "
                        "lower, red where it is higher" if mode == "difference" else
                        "Dose colour wash: % of the prescription (top) and Gy (bottom)")
        self._update_ticks()

    def _update_ticks(self) -> None:
        rx = self.prescription_gy
        if self.mode == "difference":
            r = DIFF_RANGE_PCT
            self.ticks = [((f + 1.0) / 2.0, f"{f * r:+.3g}%".replace("+0%", "0%"),
                           f"{f * r / 100.0 * rx:+.3g} Gy".replace("+0 Gy", "0 Gy")) for f in _DIFF_TICKS]
        else:
            lo, hi = WASH_RANGE
            self.ticks = [((f - lo) / (hi - lo), f"{100 * f:.3g}%", f"{f * rx:.3g} Gy") for f in _PLAN_TICKS]
        self.update()

    def fraction_at(self, t: float) -> float:
        """The value at position ``t`` (0..1) along the bar: a fraction of the prescription
        (plan mode) or of the difference range (-1..1)."""
        if self.mode == "difference":
            return 2.0 * t - 1.0
        lo, hi = WASH_RANGE
        return lo + t * (hi - lo)

    def colour_at(self, t: float) -> tuple[float, float, float]:
        f = self.fraction_at(t)
        return difference_colour(f) if self.mode == "difference" else isodose_colour(f)

    def bar_rect(self) -> QtCore.QRectF:
        return QtCore.QRectF(14.0, 14.0, self.width() - 28.0, 11.0)

    def x_of(self, t: float) -> float:
        r = self.bar_rect()
        return r.left() + t * r.width()

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt name)
        p = QtGui.QPainter(self)
        fg = QtGui.QColor("#c9d1d9")
        r = self.bar_rect()
        n = max(int(r.width()), 2)
        for k in range(n):
            t = (k + 0.5) / n
            p.fillRect(QtCore.QRectF(r.left() + k, r.top(), 1.0, r.height()),
                       QtGui.QColor.fromRgbF(*self.colour_at(t)))
        p.setPen(QtGui.QPen(fg, 1))
        p.drawRect(r)
        font = p.font()
        font.setPointSizeF(7.0)
        p.setFont(font)
        fm = QtGui.QFontMetricsF(font)
        for t, pct, gy in self.ticks:
            x = self.x_of(t)
            p.drawLine(QtCore.QPointF(x, r.top() - 2), QtCore.QPointF(x, r.bottom() + 2))
            for text, y in ((pct, r.top() - 3), (gy, r.bottom() + 3 + fm.ascent())):
                w = fm.horizontalAdvance(text)
                xl = float(np.clip(x - w / 2.0, 0.0, self.width() - w))
                p.drawText(QtCore.QPointF(xl, y), text)
        p.end()
