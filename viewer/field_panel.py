"""The open-field panel: the central-axis depth dose and a profile of a dose-display case
(a phantom without a target), drawn from the worker's :class:`~._field.FieldCurves` (QPainter).
"""

from __future__ import annotations

import numpy as np
from PyQt6 import QtCore, QtGui, QtWidgets

from ._field import FieldCurves
from .dvh import nice_ticks

__all__ = ["CurvePlot", "FieldPanel"]


class CurvePlot(QtWidgets.QWidget):
    """One curve, y in % (0 to 110) against x in mm, with a title."""

    def __init__(self, x_label: str, parent=None) -> None:
        super().__init__(parent)
        self.setMinimumSize(220, 140)
        self.x_label = x_label
        self.title = ""
        self.x_mm = np.zeros(0)
        self.y_pct = np.zeros(0)
        self.colour = QtGui.QColor("#f0c040")

    def set_curve(self, x_mm: np.ndarray, y_pct: np.ndarray, title: str) -> None:
        self.x_mm = np.asarray(x_mm, float)
        self.y_pct = np.asarray(y_pct, float)
        self.title = title
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt name)
        p = QtGui.QPainter(self)
        p.setRenderHint(QtGui.QPainter.RenderHint.Antialiasing)
        fg, grid = QtGui.QColor("#c9d1d9"), QtGui.QColor("#2a3038")
        p.fillRect(self.rect(), QtGui.QColor("#12151a"))
        fm = p.fontMetrics()
        left, right, top, bottom = fm.horizontalAdvance("100") + 14, 10, fm.height() + 8, fm.height() * 2 + 8
        plot = QtCore.QRectF(left, top, max(self.width() - left - right, 10), max(self.height() - top - bottom, 10))
        p.setPen(fg)
        p.drawText(QtCore.QRectF(0, 2, self.width(), fm.height()), QtCore.Qt.AlignmentFlag.AlignHCenter, self.title)
        if self.x_mm.size < 2:
            p.end()
            return
        x0, x1 = float(self.x_mm.min()), float(self.x_mm.max())
        y1 = 110.0

        def to_px(x, y):
            return (plot.left() + (np.asarray(x) - x0) / max(x1 - x0, 1e-9) * plot.width(),
                    plot.bottom() - np.asarray(y) / y1 * plot.height())

        for t in nice_ticks(x0, x1):
            if x0 <= t <= x1:
                x, _ = to_px(t, 0)
                p.setPen(QtGui.QPen(grid, 1))
                p.drawLine(QtCore.QPointF(x, plot.top()), QtCore.QPointF(x, plot.bottom()))
                p.setPen(fg)
                s = f"{t:g}"
                p.drawText(QtCore.QPointF(x - fm.horizontalAdvance(s) / 2, plot.bottom() + fm.ascent() + 3), s)
        for t in (0, 20, 40, 60, 80, 100):
            _, y = to_px(x0, t)
            p.setPen(QtGui.QPen(grid, 1))
            p.drawLine(QtCore.QPointF(plot.left(), y), QtCore.QPointF(plot.right(), y))
            p.setPen(fg)
            s = f"{t}"
            p.drawText(QtCore.QPointF(plot.left() - fm.horizontalAdvance(s) - 5, y + fm.ascent() / 2 - 1), s)
        p.drawText(QtCore.QRectF(plot.left(), plot.bottom() + fm.height() + 4, plot.width(), fm.height()),
                   QtCore.Qt.AlignmentFlag.AlignHCenter, self.x_label)
        p.setPen(QtGui.QPen(QtGui.QColor("#59636e"), 1))
        p.drawRect(plot)
        p.setClipRect(plot.adjusted(-1, -1, 1, 1))
        p.setPen(QtGui.QPen(self.colour, 2.0))
        x, y = to_px(self.x_mm, self.y_pct)
        p.drawPolyline(QtGui.QPolygonF([QtCore.QPointF(float(a), float(b)) for a, b in zip(x, y)]))
        p.end()


class FieldPanel(QtWidgets.QWidget):
    """Depth dose and profile of the open field (in % of the central-axis maximum)."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.summary = QtWidgets.QLabel("")
        self.summary.setWordWrap(True)
        self.depth_plot = CurvePlot("Depth below the surface (mm)")
        self.profile_plot = CurvePlot("Distance from the central axis (mm)")
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.setSpacing(4)
        lay.addWidget(self.summary)
        lay.addWidget(self.depth_plot, 1)
        lay.addWidget(self.profile_plot, 1)
        self.curves: FieldCurves | None = None

    def set_curves(self, c: FieldCurves | None) -> None:
        self.curves = c
        if c is None:
            self.summary.setText("")
            self.depth_plot.set_curve(np.zeros(0), np.zeros(0), "")
            self.profile_plot.set_curve(np.zeros(0), np.zeros(0), "")
            return
        k = int(np.argmin(np.abs(c.depth_mm - c.profile_depth_mm)))
        self.summary.setText(f"{c.beam_name}: SSD {c.ssd_mm:.0f} mm; 100 % = {c.max_gy:.3g} Gy at "
                             f"d<sub>max</sub> {c.dmax_mm:.0f} mm; {c.depth_dose_pct()[k]:.1f} % at "
                             f"{c.profile_depth_mm:.0f} mm")
        self.depth_plot.set_curve(c.depth_mm, c.depth_dose_pct(), "Central-axis depth dose (%)")
        self.profile_plot.set_curve(c.offaxis_mm, c.profile_pct(), f"Profile at {c.profile_depth_mm:.0f} mm depth (%)")
