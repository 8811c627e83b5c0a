"""The plan-metrics panel beside the DVH: renders a final snapshot's :class:`~._metrics.LiveMetrics`.

Per structure D98, D95, D50, D2, Dmax, V95, V107 and the mean; the first target's Paddick CI
and ICRU 83 HI; and, once the plan has a protocol (Plan > Optimise…), each of its goals with
the achieved value, coloured pass (green) or fail (red). A table cell whose metric a goal
checks takes that goal's colour too. The numbers come from the worker; this only draws them.
"""

from __future__ import annotations

from PyQt6 import QtCore, QtGui, QtWidgets

from ids_engine.evaluation import parse_metric

from ._metrics import METRIC_COLUMNS, LiveMetrics

__all__ = ["FAIL_COLOUR", "PASS_COLOUR", "MetricsPanel"]

PASS_COLOUR = "#1f6f3a"
FAIL_COLOUR = "#8c2a2a"
VALUE_ROLE = QtCore.Qt.ItemDataRole.UserRole  # the unrounded value of a cell (float)
NO_PROTOCOL = "No protocol: Plan → Optimise… sets the goals that pass/fail follows"


def _same_metric(a: str, b: str) -> bool:
    ma, mb = parse_metric(a), parse_metric(b)
    return (ma.kind, ma.argument) == (mb.kind, mb.argument)


class MetricsPanel(QtWidgets.QWidget):
    """Metrics per structure, target indices and goal checks of the newest final snapshot."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.metrics: LiveMetrics | None = None
        self.summary = QtWidgets.QLabel("")
        self.summary.setWordWrap(True)
        self.table = QtWidgets.QTableWidget(0, len(METRIC_COLUMNS))
        self.table.setHorizontalHeaderLabels([f"{h}\n{u}" for h, _, u in METRIC_COLUMNS])
        self.goal_table = QtWidgets.QTableWidget(0, 3)
        self.goal_table.setHorizontalHeaderLabels(["Goal", "Achieved", ""])
        self.goal_note = QtWidgets.QLabel(NO_PROTOCOL)
        self.goal_note.setWordWrap(True)
        for t in (self.table, self.goal_table):
            t.setEditTriggers(QtWidgets.QAbstractItemView.EditTrigger.NoEditTriggers)
            t.setSelectionMode(QtWidgets.QAbstractItemView.SelectionMode.NoSelection)
            t.verticalHeader().setDefaultSectionSize(20)
            t.horizontalHeader().setSectionResizeMode(QtWidgets.QHeaderView.ResizeMode.ResizeToContents)
        # Eight numeric columns beside the DVH: tight headers keep them in the dock's width.
        self.table.setStyleSheet("QHeaderView::section { padding: 2px 3px; }")
        self.table.horizontalHeader().setMinimumSectionSize(28)
        self.goal_table.verticalHeader().hide()
        self.goal_table.horizontalHeader().setSectionResizeMode(0, QtWidgets.QHeaderView.ResizeMode.Stretch)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addWidget(self.summary)
        lay.addWidget(self.table)
        lay.addWidget(self.goal_note)
        lay.addWidget(self.goal_table)
        lay.addStretch(1)
        self.clear()

    def clear(self) -> None:
        self.metrics = None
        self.summary.setText("")
        self.table.setRowCount(0)
        self.goal_table.setRowCount(0)
        self.goal_table.hide()
        self.goal_note.show()

    def set_metrics(self, m: LiveMetrics) -> None:
        self.metrics = m
        parts = [f"Rx {m.prescription_gy:g} Gy"]
        if m.target is not None:
            ci = "–" if m.ci is None else f"{m.ci:.3f}"
            hi = "–" if m.hi is None else f"{m.hi:.3f}"
            parts.append(f"{m.target}: Paddick CI {ci} · ICRU 83 HI {hi}")
        self.summary.setText("   ·   ".join(parts))
        # A goal colours the cell of the metric it checks (its first goal there decides).
        cell_state: dict[tuple[str, int], bool] = {}
        for c in m.goals:
            for col, (_, expr, _) in enumerate(METRIC_COLUMNS):
                if _same_metric(c.goal.metric, expr):
                    cell_state[(c.goal.structure, col)] = cell_state.get((c.goal.structure, col), True) and c.passed
        self.table.setRowCount(len(m.structures))
        self.table.setVerticalHeaderLabels([s.name for s in m.structures])
        for row, s in enumerate(m.structures):
            for col, v in enumerate(s.values):
                item = QtWidgets.QTableWidgetItem(f"{v:.1f}")
                item.setData(VALUE_ROLE, float(v))
                item.setTextAlignment(QtCore.Qt.AlignmentFlag.AlignRight | QtCore.Qt.AlignmentFlag.AlignVCenter)
                state = cell_state.get((s.name, col))
                if state is not None:
                    item.setBackground(QtGui.QColor(PASS_COLOUR if state else FAIL_COLOUR))
                self.table.setItem(row, col, item)
        self.goal_table.setRowCount(len(m.goals))
        for row, c in enumerate(m.goals):
            unit = c.goal.unit
            cells = (c.text, f"{c.achieved:.2f} {unit}", "pass" if c.passed else "FAIL")
            for col, text in enumerate(cells):
                item = QtWidgets.QTableWidgetItem(text)
                item.setBackground(QtGui.QColor(PASS_COLOUR if c.passed else FAIL_COLOUR))
                if col == 1:
                    item.setData(VALUE_ROLE, float(c.achieved))
                self.goal_table.setItem(row, col, item)
        self._fit_height(self.table)
        self._fit_height(self.goal_table)
        self.goal_table.setVisible(bool(m.goals))
        self.goal_note.setVisible(not m.goals)

    @staticmethod
    def _fit_height(t: QtWidgets.QTableWidget) -> None:
        """As tall as the rows (a few structures need no scrolling; many scroll past 8)."""
        rows = min(t.rowCount(), 8)
        h = t.horizontalHeader().sizeHint().height() + rows * t.verticalHeader().defaultSectionSize()
        t.setMaximumHeight(h + 2 * t.frameWidth() + t.horizontalScrollBar().sizeHint().height() + 4)

    # ------------------------------------------------------------------ read back (tests, scripts)
    def value(self, structure: str, heading: str) -> float:
        """The value shown for ``structure`` under ``heading`` (a :data:`METRIC_COLUMNS` heading)."""
        col = [h for h, _, _ in METRIC_COLUMNS].index(heading)
        for row in range(self.table.rowCount()):
            if self.table.verticalHeaderItem(row).text() == structure:
                return float(self.table.item(row, col).data(VALUE_ROLE))
        raise KeyError(structure)

    def cell_colour(self, structure: str, heading: str) -> str | None:
        """The background colour (``#rrggbb``) of a table cell, None when no goal checks it."""
        col = [h for h, _, _ in METRIC_COLUMNS].index(heading)
        for row in range(self.table.rowCount()):
            if self.table.verticalHeaderItem(row).text() == structure:
                brush = self.table.item(row, col).background()
                return brush.color().name() if brush.style() != QtCore.Qt.BrushStyle.NoBrush else None
        raise KeyError(structure)

    def goal_rows(self) -> list[tuple[str, float, bool]]:
        """(goal text, achieved, passed) as the goal table shows them."""
        return [(self.goal_table.item(r, 0).text(), float(self.goal_table.item(r, 1).data(VALUE_ROLE)),
                 self.goal_table.item(r, 2).text() == "pass") for r in range(self.goal_table.rowCount())]
