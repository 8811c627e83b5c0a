"""The live DVH panel: the current plan's cumulative DVHs plus pinned snapshots to compare.

Curves arrive as :class:`ids_engine.evaluation.DVH` values inside worker snapshots; this
panel only draws them (QPainter; a plot of a few hundred points per curve needs no GL).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PyQt6 import QtCore, QtGui, QtWidgets

from ids_engine.evaluation import DVH

__all__ = ["DVHPanel", "DVHPlot", "nice_ticks"]

_SNAPSHOT_STYLES = (QtCore.Qt.PenStyle.DashLine, QtCore.Qt.PenStyle.DotLine, QtCore.Qt.PenStyle.DashDotLine,
                    QtCore.Qt.PenStyle.DashDotDotLine)


def nice_ticks(lo: float, hi: float, n: int = 6) -> np.ndarray:
    """About ``n`` round tick values covering [lo, hi]."""
    span = max(hi - lo, 1e-9)
    raw = span / max(n, 1)
    mag = 10.0 ** np.floor(np.log10(raw))
    step = mag * min((m for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * mag >= raw), default=10.0)
    return np.arange(np.ceil(lo / step) * step, hi + 0.5 * step, step)


@dataclass
class _CurveSet:
    label: str
    curves: tuple[DVH, ...]
    visible: bool = True


class DVHPlot(QtWidgets.QWidget):
    """Draws DVH curve sets: the current one solid, snapshots in dashed styles."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setMinimumSize(240, 160)
        self.current: _CurveSet | None = None
        self.snapshots: list[_CurveSet] = []
        self.colours: dict[str, tuple[float, float, float]] = {}
        self.volume_unit = "%"
        self.prescription_gy = 0.0
        self.setMouseTracking(True)

    def _sets(self):
        if self.current is not None:
            yield self.current, QtCore.Qt.PenStyle.SolidLine
        for k, s in enumerate(self.snapshots):
            if s.visible:
                yield s, _SNAPSHOT_STYLES[k % len(_SNAPSHOT_STYLES)]

    def _y(self, c: DVH) -> np.ndarray:
        return c.volume_fraction * (100.0 if self.volume_unit == "%" else c.volume_cc)

    def _legend(self, sets, fg) -> list:
        """(text, colour, pen style): structures in their colours, then the curve sets' styles."""
        names = []
        for s, _ in sets:
            for c in s.curves:
                if c.name not in names:
                    names.append(c.name)
        entries = [(n, QtGui.QColor.fromRgbF(*self.colours.get(n, (0.8, 0.8, 0.8))), QtCore.Qt.PenStyle.SolidLine)
                   for n in names]
        if len(sets) > 1:
            entries += [(s.label, fg, style) for s, style in sets]
        return entries

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt name)
        p = QtGui.QPainter(self)
        p.setRenderHint(QtGui.QPainter.RenderHint.Antialiasing)
        bg = QtGui.QColor("#12151a")
        fg = QtGui.QColor("#c9d1d9")
        grid = QtGui.QColor("#2a3038")
        p.fillRect(self.rect(), bg)
        fm = p.fontMetrics()
        sets = list(self._sets())
        legend = self._legend(sets, fg)
        # Legend entries flow in rows above the plot so they never hide a curve.
        swatch, gap = 22, 14
        rows, x = [[]], 0.0
        avail = self.width() - 20
        for text, colour, style in legend:
            w = swatch + 4 + fm.horizontalAdvance(text) + gap
            if rows[-1] and x + w > avail:
                rows.append([])
                x = 0.0
            rows[-1].append((x, text, colour, style))
            x += w
        legend_h = (len(rows) * (fm.height() + 2) + 6) if legend else 4
        left, right, top, bottom = fm.horizontalAdvance("100000") + 12, 12, legend_h + 4, fm.height() * 2 + 8
        plot = QtCore.QRectF(left, top, max(self.width() - left - right, 10), max(self.height() - top - bottom, 10))
        for r, row in enumerate(rows):
            y = 6 + r * (fm.height() + 2) + fm.height() / 2
            for x0, text, colour, style in row:
                x0 += left
                p.setPen(QtGui.QPen(colour, 2, style))
                p.drawLine(QtCore.QPointF(x0, y), QtCore.QPointF(x0 + swatch, y))
                p.setPen(fg)
                p.drawText(QtCore.QPointF(x0 + swatch + 4, y + fm.ascent() / 2 - 1), text)
        xmax = max([self.prescription_gy * 1.15] + [float(c.dose_gy[np.flatnonzero(c.volume_fraction > 0)[-1]])
                                                     for s, _ in sets for c in s.curves
                                                     if np.any(c.volume_fraction > 0)]) * 1.03
        xmax = max(xmax, 1.0)
        ymax = 100.0
        if self.volume_unit == "cc":
            ymax = max([1.0] + [c.volume_cc for s, _ in sets for c in s.curves]) * 1.05

        def to_px(x, y):
            return (plot.left() + np.asarray(x) / xmax * plot.width(),
                    plot.bottom() - np.asarray(y) / ymax * plot.height())

        # Grid, ticks and labels.
        p.setPen(QtGui.QPen(grid, 1))
        for t in nice_ticks(0.0, xmax):
            if t > xmax:
                continue
            x, _ = to_px(t, 0)
            p.drawLine(QtCore.QPointF(x, plot.top()), QtCore.QPointF(x, plot.bottom()))
        for t in nice_ticks(0.0, ymax, 5):
            if t > ymax:
                continue
            _, y = to_px(0, t)
            p.drawLine(QtCore.QPointF(plot.left(), y), QtCore.QPointF(plot.right(), y))
        p.setPen(fg)
        for t in nice_ticks(0.0, xmax):
            if t > xmax:
                continue
            x, _ = to_px(t, 0)
            s = f"{t:g}"
            p.drawText(QtCore.QPointF(x - fm.horizontalAdvance(s) / 2, plot.bottom() + fm.ascent() + 3), s)
        for t in nice_ticks(0.0, ymax, 5):
            if t > ymax:
                continue
            _, y = to_px(0, t)
            s = f"{t:g}"
            p.drawText(QtCore.QPointF(plot.left() - fm.horizontalAdvance(s) - 5, y + fm.ascent() / 2 - 1), s)
        p.drawText(QtCore.QRectF(plot.left(), plot.bottom() + fm.height() + 4, plot.width(), fm.height()),
                   QtCore.Qt.AlignmentFlag.AlignHCenter, "Dose (Gy)")
        p.save()
        p.translate(fm.height() * 0.2 + 2, plot.center().y())
        p.rotate(-90)
        label = "Volume (%)" if self.volume_unit == "%" else "Volume (cc)"
        p.drawText(QtCore.QPointF(-fm.horizontalAdvance(label) / 2, fm.ascent()), label)
        p.restore()
        p.setPen(QtGui.QPen(QtGui.QColor("#59636e"), 1))
        p.drawRect(plot)
        if self.prescription_gy > 0:
            x, _ = to_px(self.prescription_gy, 0)
            p.setPen(QtGui.QPen(QtGui.QColor(255, 255, 255, 90), 1, QtCore.Qt.PenStyle.DashLine))
            p.drawLine(QtCore.QPointF(x, plot.top()), QtCore.QPointF(x, plot.bottom()))

        # Curves.
        p.setClipRect(plot.adjusted(-1, -1, 1, 1))
        for s, style in sets:
            for c in s.curves:
                rgb = self.colours.get(c.name, (0.8, 0.8, 0.8))
                colour = QtGui.QColor.fromRgbF(*rgb)
                pen = QtGui.QPen(colour, 2.0 if style == QtCore.Qt.PenStyle.SolidLine else 1.5, style)
                p.setPen(pen)
                x, y = to_px(c.dose_gy, self._y(c))
                poly = QtGui.QPolygonF([QtCore.QPointF(float(a), float(b)) for a, b in zip(x, y)])
                p.drawPolyline(poly)
        p.setClipping(False)

        p.end()


class DVHPanel(QtWidgets.QWidget):
    """DVH plot with the volume unit (% or cc), snapshot pinning and a list of pinned plans."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.plot = DVHPlot()
        self.unit_box = QtWidgets.QComboBox()
        self.unit_box.addItems(["Volume %", "Volume cc"])
        self.pin_button = QtWidgets.QPushButton("Pin snapshot")
        self.pin_button.setToolTip("Keep the current DVHs to compare with later plans")
        self.clear_button = QtWidgets.QPushButton("Clear")
        self.clear_button.setToolTip("Remove all pinned snapshots")
        self.snapshot_list = QtWidgets.QListWidget()
        self.snapshot_list.setMaximumHeight(64)
        self.snapshot_list.setToolTip("Pinned snapshots: tick to overlay")
        top = QtWidgets.QHBoxLayout()
        top.setContentsMargins(4, 4, 4, 0)
        top.addWidget(self.unit_box)
        top.addStretch(1)
        top.addWidget(self.pin_button)
        top.addWidget(self.clear_button)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(2)
        lay.addLayout(top)
        lay.addWidget(self.plot, 1)
        lay.addWidget(self.snapshot_list)
        self.plan_label = "plan"
        self.unit_box.currentIndexChanged.connect(self._on_unit)
        self.pin_button.clicked.connect(self.pin_snapshot)
        self.clear_button.clicked.connect(self.clear_snapshots)
        self.snapshot_list.itemChanged.connect(self._on_item)

    def set_case(self, colours: dict, prescription_gy: float) -> None:
        self.plot.colours = dict(colours)
        self.plot.prescription_gy = float(prescription_gy)
        self.plot.current = None
        self.clear_snapshots()

    def set_curves(self, curves, label: str) -> None:
        """The current plan's DVHs (a tuple of DVH) and its label (e.g. "plan 7")."""
        self.plan_label = label
        self.plot.current = _CurveSet(label, tuple(curves))
        self.plot.update()

    def pin_snapshot(self) -> None:
        if self.plot.current is None:
            return
        s = _CurveSet(self.plot.current.label, self.plot.current.curves)
        self.plot.snapshots.append(s)
        item = QtWidgets.QListWidgetItem(s.label)
        item.setFlags(item.flags() | QtCore.Qt.ItemFlag.ItemIsUserCheckable)
        item.setCheckState(QtCore.Qt.CheckState.Checked)
        self.snapshot_list.addItem(item)
        self.plot.update()

    def clear_snapshots(self) -> None:
        self.plot.snapshots.clear()
        self.snapshot_list.clear()
        self.plot.update()

    def _on_unit(self, index: int) -> None:
        self.plot.volume_unit = "%" if index == 0 else "cc"
        self.plot.update()

    def _on_item(self, item) -> None:
        row = self.snapshot_list.row(item)
        if 0 <= row < len(self.plot.snapshots):
            self.plot.snapshots[row].visible = item.checkState() == QtCore.Qt.CheckState.Checked
            self.plot.update()
