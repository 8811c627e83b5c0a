"""Side panels: the beam list (with editing) and the request history; both show host values."""

from __future__ import annotations

from dataclasses import replace

from PyQt6 import QtCore, QtGui, QtWidgets

from ids_engine.model import Beam

from .worker import HistoryEntry

__all__ = ["BeamDialog", "BeamPanel", "BeamTable", "HistoryList"]


class BeamTable(QtWidgets.QTableWidget):
    """The plan's beams: name, gantry, couch and collimator angles, energy (read-only)."""

    COLUMNS = ("Beam", "Gantry °", "Couch °", "Coll. °", "MV")

    def __init__(self, parent=None) -> None:
        super().__init__(0, len(self.COLUMNS), parent)
        self.setHorizontalHeaderLabels(self.COLUMNS)
        self.verticalHeader().setVisible(False)
        self.setEditTriggers(QtWidgets.QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setSelectionBehavior(QtWidgets.QAbstractItemView.SelectionBehavior.SelectRows)
        self.setAlternatingRowColors(True)
        self.setShowGrid(False)
        h = self.horizontalHeader()
        h.setSectionResizeMode(0, QtWidgets.QHeaderView.ResizeMode.Stretch)
        for c in range(1, len(self.COLUMNS)):
            h.setSectionResizeMode(c, QtWidgets.QHeaderView.ResizeMode.ResizeToContents)
        self.verticalHeader().setDefaultSectionSize(20)

    def set_beams(self, beams) -> None:
        """``beams``: a sequence of :class:`ids_engine.model.Beam`."""
        self.setRowCount(len(beams))
        for r, b in enumerate(beams):
            values = (b.name, f"{b.gantry_deg:g}", f"{b.couch_deg:g}", f"{b.collimator_deg:g}", f"{b.energy_mv:g}")
            for c, v in enumerate(values):
                item = QtWidgets.QTableWidgetItem(v)
                if c:
                    item.setTextAlignment(QtCore.Qt.AlignmentFlag.AlignRight | QtCore.Qt.AlignmentFlag.AlignVCenter)
                self.setItem(r, c, item)


class BeamDialog(QtWidgets.QDialog):
    """Edit one beam's name and IEC 61217 angles."""

    def __init__(self, beam: Beam, title: str, parent=None) -> None:
        super().__init__(parent)
        self.setWindowTitle(title)
        self._beam = beam
        form = QtWidgets.QFormLayout(self)
        self.name = QtWidgets.QLineEdit(beam.name)
        self.angles = {}
        for field, label in (("gantry_deg", "Gantry"), ("couch_deg", "Couch"), ("collimator_deg", "Collimator")):
            box = QtWidgets.QDoubleSpinBox()
            box.setRange(0.0, 359.9)
            box.setDecimals(1)
            box.setWrapping(True)
            box.setSuffix(" °")
            box.setValue(getattr(beam, field))
            self.angles[field] = box
            form.addRow(label, box)
        form.insertRow(0, "Name", self.name)
        bb = QtWidgets.QDialogButtonBox(QtWidgets.QDialogButtonBox.StandardButton.Ok
                                        | QtWidgets.QDialogButtonBox.StandardButton.Cancel)
        bb.accepted.connect(self.accept)
        bb.rejected.connect(self.reject)
        form.addRow(bb)

    def beam(self) -> Beam:
        """The edited beam (its fluence grid is left for the new engine to choose)."""
        return replace(self._beam, name=self.name.text().strip() or self._beam.name, fluence_grid=None,
                       **{f: box.value() for f, box in self.angles.items()})


class BeamPanel(QtWidgets.QWidget):
    """The beam table with add / edit / delete; edits stay pending until "Rebuild plan".

    Rebuilding starts a new plan from open fields with the edited beams (the engine's
    geometry depends on the beams), so ``rebuild_requested(list of Beam)`` asks the window to
    do it after the planner confirms.
    """

    rebuild_requested = QtCore.pyqtSignal(list)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.table = BeamTable()
        self.add_button = QtWidgets.QPushButton("Add")
        self.edit_button = QtWidgets.QPushButton("Edit")
        self.delete_button = QtWidgets.QPushButton("Delete")
        self.rebuild_button = QtWidgets.QPushButton("Rebuild plan")
        self.rebuild_button.setToolTip("Start a new open-field plan with these beams (clears the history)")
        row = QtWidgets.QHBoxLayout()
        row.setContentsMargins(4, 2, 4, 4)
        for b in (self.add_button, self.edit_button, self.delete_button):
            row.addWidget(b)
        row.addStretch(1)
        row.addWidget(self.rebuild_button)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(0)
        lay.addWidget(self.table, 1)
        lay.addLayout(row)
        self.beams: list[Beam] = []
        self._applied: list[Beam] = []
        self.add_button.clicked.connect(self.add_beam)
        self.edit_button.clicked.connect(self.edit_beam)
        self.delete_button.clicked.connect(self.delete_beam)
        self.rebuild_button.clicked.connect(lambda: self.rebuild_requested.emit(list(self.beams)))
        self.table.itemDoubleClicked.connect(lambda _item: self.edit_beam())
        self.table.itemSelectionChanged.connect(self._update_buttons)
        self._update_buttons()

    def set_beams(self, beams) -> None:
        """The plan's beams (what the engine was built with)."""
        self.beams = list(beams)
        self._applied = list(beams)
        self._refresh()

    @property
    def pending(self) -> bool:
        return [self._key(b) for b in self.beams] != [self._key(b) for b in self._applied]

    @staticmethod
    def _key(b: Beam):
        return (b.name, b.gantry_deg, b.couch_deg, b.collimator_deg)

    def _refresh(self) -> None:
        self.table.set_beams(self.beams)
        self._update_buttons()

    def _update_buttons(self) -> None:
        has = bool(self.table.selectedItems())
        self.edit_button.setEnabled(has)
        self.delete_button.setEnabled(has and len(self.beams) > 1)
        self.add_button.setEnabled(bool(self.beams))
        self.rebuild_button.setEnabled(self.pending)

    def _row(self) -> int:
        rows = sorted({i.row() for i in self.table.selectedItems()})
        return rows[0] if rows else -1

    def add_beam(self) -> None:
        template = self.beams[self._row()] if self._row() >= 0 else self.beams[-1]
        n = len(self.beams) + 1
        d = BeamDialog(replace(template, name=f"B{n}"), "Add a beam", self)
        if d.exec() == QtWidgets.QDialog.DialogCode.Accepted:
            self.beams.append(d.beam())
            self._refresh()

    def edit_beam(self) -> None:
        r = self._row()
        if r < 0:
            return
        d = BeamDialog(self.beams[r], f"Edit {self.beams[r].name}", self)
        if d.exec() == QtWidgets.QDialog.DialogCode.Accepted:
            self.beams[r] = d.beam()
            self._refresh()
            self.table.selectRow(r)

    def delete_beam(self) -> None:
        r = self._row()
        if r >= 0 and len(self.beams) > 1:
            del self.beams[r]
            self._refresh()


class HistoryList(QtWidgets.QListWidget):
    """The request history: the starting plan, applied requests, then undone ones (greyed).

    Entries are numbered by their place in the history (#1 the first request), so the
    numbers run on without gaps whatever ids drag previews consumed.
    A request with conflicts (what recovery could not keep) is drawn in amber with a warning
    icon and a "⚠ N conflicts" tag; its tooltip lists the conflicts' messages.
    Clicking a row emits ``goto(n)``: undo or redo until ``n`` requests are applied.
    """

    goto = QtCore.pyqtSignal(int)
    CONFLICT_COLOUR = "#f0a830"

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setAlternatingRowColors(True)
        self.itemClicked.connect(self._clicked)
        self.applied = 0

    def set_history(self, history: tuple[HistoryEntry, ...], undone: tuple[HistoryEntry, ...]) -> None:
        self.blockSignals(True)
        self.clear()
        start = QtWidgets.QListWidgetItem("Starting plan")
        self.addItem(start)
        grey = QtGui.QColor("#6b737c")
        for e in history:
            tag = "  (preview)" if e.preview else ""
            item = QtWidgets.QListWidgetItem(f"#{e.number}  {e.text}{tag}   {e.engine_ms:.0f} ms")
            self._mark_conflicts(item, e)
            self.addItem(item)
        for e in undone:
            item = QtWidgets.QListWidgetItem(f"#{e.number}  {e.text}  (undone)")
            self._mark_conflicts(item, e)
            item.setForeground(grey)
            f = item.font()
            f.setItalic(True)
            item.setFont(f)
            self.addItem(item)
        self.applied = len(history)
        self.setCurrentRow(len(history))
        self.blockSignals(False)
        self.scrollToItem(self.item(len(history)))

    def _mark_conflicts(self, item: QtWidgets.QListWidgetItem, e: HistoryEntry) -> None:
        """Warning icon, tags, colour and tooltip for an entry whose request has conflicts or
        side effects."""
        side = tuple(getattr(e, "side_effects", ()))
        if not e.conflicts and not side:
            return
        tags = []
        if e.conflicts:
            n = len(e.conflicts)
            tags.append(f"⚠ {n} conflict{'s' if n != 1 else ''}")
        if side:
            tags.append(f"↑ {len(side)} side effect{'s' if len(side) != 1 else ''}")
        item.setText(f"{item.text()}   " + "  ".join(tags))
        item.setIcon(self.style().standardIcon(QtWidgets.QStyle.StandardPixmap.SP_MessageBoxWarning))
        item.setForeground(QtGui.QColor(self.CONFLICT_COLOUR))
        tip = []
        if e.conflicts:
            tip += ["Recovery could not keep:"] + [f"• {m}" for m in e.conflicts]
        if side:
            tip += ["Side effects (far tissue that rose unasked):"] + [f"• {m}" for m in side]
        item.setToolTip("\n".join(tip))

    def _clicked(self, item) -> None:
        row = self.row(item)
        if row != self.applied:
            self.goto.emit(row)
