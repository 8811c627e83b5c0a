"""Plan → Forward planning…: plans, beams, points, prescription, auto weight and the physics
summary of seed 001 (issue 12), on the window's patient.

A non-modal dialog with its own plan book (:class:`~.forward_state.ForwardState`): the
plans on the left (new, copy under a new name, rename, delete, select; the selected plan's
ID above the tabs, updated on every change), and four tabs:

* **Beams**: the selected plan's beams (name, gantry, couch, collimator, isocentre, field,
  MU); add an open-field beam (it takes the prior beam's isocentre), copy, parallel-opposed,
  delete, move every isocentre to the selected beam's, and "Conform on arc…" (Make
  Conformed Beams: target and margin, avoided volumes each with its margin, the arc, the
  leaf mode).
* **Points**: the patient's points plus points added in patient coordinates or in a beam's
  BEV frame; Compute fills the dose per point per beam for the plan's MU.
* **Prescription**: the normalisation point and the three modes; Apply installs whole MU.
* **Auto weight**: volumes (role, min, max, importance, penalty), the method (or all four);
  Run fills a comparison table (MU per beam, target min/max, OAR max, time), infeasible
  methods show the solver's message; Apply puts the chosen row's MU in the plan.

"Save summary…" writes the plan's physics summary (Markdown, HTML and PDF) to a folder;
"DVHs…" opens the seed's DVH popup for several plans together (:mod:`.plan_dvh_dialog`).

**The plan in the main window** (seed 001: a plan is displayed in chosen frames, with its plan
ID): with "Show in main window" ticked (the default), the selected plan's dose, once it has
monitor units, replaces the shaping session's in the main window's slices, isodoses, 3D view,
DVH and metrics, each frame naming the plan and its plan ID; selecting another plan or
changing this one (a new plan ID) switches the display. The dialog hands the window a
:class:`~._shown.ShownPlan` (the dose for the MU is summed on the window's engine worker);
when the doses per MU are not cached it first computes them on its own thread.
"Show shaping dose" gives the window the session's dose back (and unticks the box).

Threads: the forward plans are not the plan the window shapes, so they get their own dose
engine (built by :class:`~ids_engine.planning.BeamDoses` on the same patient and machine)
rather than going through the window's worker, which keeps shaping the session's plan. The
slow work (doses per MU, conformal beams, point doses, prescriptions, auto weight,
summaries) runs on one :class:`QThread` at a time with a busy bar; the GUI thread only
edits the plan book and fills the tables.
"""

from __future__ import annotations

import numpy as np
from PyQt6 import QtCore, QtWidgets

from ids_engine.planning import (
    LEAF_MODES, DoseToNormalisation, DoseToPoints, MonitorUnits, PlanBookError, PointRef, VolumeGoal,
)

from .forward_state import METHODS, ForwardState, beam_row

__all__ = ["ConformDialog", "ForwardPlanningDialog"]

_RED = "color: #ff7b72;"
MODES = ("Dose to a point per beam", "Monitor units per beam", "Dose to the normalisation point")


class _Task(QtCore.QThread):
    """Runs ``fn(progress)`` off the GUI thread; the result (or the exception) comes back
    through ``result_ready`` on the GUI thread."""

    result_ready = QtCore.pyqtSignal(object, object)  # (result, exception or None)
    progress_made = QtCore.pyqtSignal(int, int, str)

    def __init__(self, fn, parent=None) -> None:
        super().__init__(parent)
        self.fn = fn

    def run(self) -> None:  # noqa: D401 - QThread override
        try:
            out = self.fn(lambda done, total, label="": self.progress_made.emit(int(done), int(total), str(label)))
        except Exception as exc:  # shown in the dialog, never raised on a thread nobody joins
            self.result_ready.emit(None, exc)
            return
        self.result_ready.emit(out, None)


def _num(text: str, what: str, *, allow_blank: bool = False) -> float | None:
    t = str(text).strip()
    if not t and allow_blank:
        return None
    try:
        v = float(t)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a number") from None
    if not np.isfinite(v):
        raise ValueError(f"{what}: {text!r} is not finite")
    return v


def _xyz(text: str, what: str) -> list[float]:
    parts = [v for v in str(text).replace(";", ",").split(",")]
    if len(parts) != 3:
        raise ValueError(f"{what}: give three coordinates x, y, z in mm, got {text!r}")
    return [_num(v, f"{what} coordinate") for v in parts]


def _spin(lo, hi, value, suffix="", decimals=1, step=1.0) -> QtWidgets.QDoubleSpinBox:
    s = QtWidgets.QDoubleSpinBox()
    s.setRange(lo, hi)
    s.setDecimals(decimals)
    s.setSingleStep(step)
    s.setValue(value)
    if suffix:
        s.setSuffix(suffix)
    return s


def _item(text: str, editable: bool = False) -> QtWidgets.QTableWidgetItem:
    it = QtWidgets.QTableWidgetItem(text)
    if not editable:
        it.setFlags(it.flags() & ~QtCore.Qt.ItemFlag.ItemIsEditable)
    return it


class ConformDialog(QtWidgets.QDialog):
    """The parameters of "Conform on arc…" (Make Conformed Beams); :meth:`parameters` gives
    the keywords of :meth:`ForwardState.conformed_beams`."""

    def __init__(self, patient, parent=None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Conform on arc")
        names = [s.name for s in patient.structures if not s.is_empty]
        targets = [s.name for s in patient.targets if not s.is_empty] or names
        self.target_box = QtWidgets.QComboBox()
        self.target_box.addItems(targets)
        self.margin = _spin(0, 100, 5.0, " mm")
        self.avoid = QtWidgets.QTableWidget(0, 2)
        self.avoid.setHorizontalHeaderLabels(["Avoid", "Margin mm"])
        self.avoid.horizontalHeader().setStretchLastSection(True)
        for n in names:
            r = self.avoid.rowCount()
            self.avoid.insertRow(r)
            it = _item(n)
            it.setFlags(it.flags() | QtCore.Qt.ItemFlag.ItemIsUserCheckable)
            it.setCheckState(QtCore.Qt.CheckState.Unchecked)
            self.avoid.setItem(r, 0, it)
            self.avoid.setItem(r, 1, _item("0", editable=True))
        self.start = _spin(0, 359.9, 0.0, "°")
        self.length = _spin(0.1, 360, 360.0, "°")
        self.increment = _spin(1, 360, 40.0, "°")
        self.direction = QtWidgets.QComboBox()
        self.direction.addItems(["CW", "CCW"])
        self.leaf_mode = QtWidgets.QComboBox()
        self.leaf_mode.addItems(list(LEAF_MODES))
        self.min_area = _spin(0, 1e5, 0.0, " mm²", 0, 10)
        form = QtWidgets.QFormLayout(self)
        form.addRow("Target", self.target_box)
        form.addRow("Target margin (3D)", self.margin)
        form.addRow(self.avoid)
        form.addRow("Arc start", self.start)
        form.addRow("Arc length", self.length)
        form.addRow("Increment", self.increment)
        form.addRow("Direction", self.direction)
        form.addRow("Leaf mode", self.leaf_mode)
        form.addRow("Minimum area", self.min_area)
        bb = QtWidgets.QDialogButtonBox(QtWidgets.QDialogButtonBox.StandardButton.Ok
                                        | QtWidgets.QDialogButtonBox.StandardButton.Cancel)
        bb.accepted.connect(self.accept)
        bb.rejected.connect(self.reject)
        form.addRow(bb)

    def parameters(self) -> dict:
        avoid = {}
        for r in range(self.avoid.rowCount()):
            it = self.avoid.item(r, 0)
            if it.checkState() == QtCore.Qt.CheckState.Checked:
                avoid[it.text()] = _num(self.avoid.item(r, 1).text(), f"margin of {it.text()}")
        return {"target": self.target_box.currentText(), "target_margin_mm": self.margin.value(), "avoid": avoid,
                "start_deg": self.start.value(), "length_deg": self.length.value(),
                "increment_deg": self.increment.value(), "direction": self.direction.currentText(),
                "leaf_mode": self.leaf_mode.currentText(), "min_area_mm2": self.min_area.value()}


class ForwardPlanningDialog(QtWidgets.QDialog):
    """Forward planning on ``window.session``'s patient (see the module docstring).

    ``window`` needs ``.session`` (an :class:`ids_engine.session.Session`: ``.patient``,
    ``.engine.machine``, ``.prescription_gy``, ``.case``).
    """

    def __init__(self, window, parent=None) -> None:
        super().__init__(parent if parent is not None else (window if isinstance(window, QtWidgets.QWidget) else None))
        self.setWindowTitle("Forward planning")
        self.setObjectName("forward-planning")
        self.setModal(False)
        self.session = window.session
        s = self.session
        from ids_engine.session import case_label

        try:
            label = case_label(dict(s.case))
        except Exception:  # a session without a case spec still plans
            label = "case"
        engine = getattr(s, "engine", None)
        spec = getattr(s, "case", None)
        self.state = ForwardState(s.patient, getattr(engine, "machine", None), label,
                                  dict(spec) if isinstance(spec, dict) and spec else None)
        # The main window (it displays the selected plan) if it can: tests pass a bare namespace.
        self.main_window = window if hasattr(window, "show_plan") else None
        self._shown_key: tuple | None = None  # (plan, plan ID) last handed to the main window
        self._display_failed: tuple | None = None
        self.dvh_dialog = None
        self.prescription_gy = float(getattr(s, "prescription_gy", 2.0) or 2.0)
        self.state.new_plan("Plan 1")
        self._task: _Task | None = None
        self.last_error: str = ""
        self.mu_result = None
        self.point_rows: list = []
        self.last_summary = None

        self._build()
        self.rx_dose.setValue(self.prescription_gy)
        self.refresh()
        self.resize(980, 640)

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        # Plans
        self.plan_list = QtWidgets.QListWidget()
        self.plan_list.setMaximumWidth(200)
        self.plan_list.currentTextChanged.connect(self._on_plan_clicked)
        b_new, b_copy, b_ren, b_del = (QtWidgets.QPushButton(t) for t in ("New…", "Copy…", "Rename…", "Delete"))
        b_new.clicked.connect(lambda: self._ask_name("New plan", self.new_plan))
        b_copy.clicked.connect(lambda: self._ask_name("Copy the plan as", self.copy_plan))
        b_ren.clicked.connect(lambda: self._ask_name("Rename the plan to", self.rename_plan))
        b_del.clicked.connect(self.delete_plan)
        b_save, b_open = QtWidgets.QPushButton("Save plans…"), QtWidgets.QPushButton("Open plans…")
        b_save.setToolTip("Write the plan book (planbook.json) into a folder")
        b_save.clicked.connect(lambda: self._folder("Save the plans into", self.save_book))
        b_open.clicked.connect(lambda: self._folder("Open the plans of", self.open_book))
        left = QtWidgets.QVBoxLayout()
        left.addWidget(QtWidgets.QLabel("Plans"))
        left.addWidget(self.plan_list, 1)
        grid = QtWidgets.QGridLayout()
        for k, b in enumerate((b_new, b_copy, b_ren, b_del, b_save, b_open)):
            grid.addWidget(b, k // 2, k % 2)
        left.addLayout(grid)
        self.plan_label = QtWidgets.QLabel("")
        self.plan_label.setObjectName("forwardPlanId")
        self.plan_label.setStyleSheet("font-weight: bold;")

        self.tabs = QtWidgets.QTabWidget()
        self.tabs.addTab(self._beams_tab(), "Beams")
        self.tabs.addTab(self._points_tab(), "Points")
        self.tabs.addTab(self._prescription_tab(), "Prescription")
        self.tabs.addTab(self._auto_tab(), "Auto weight")

        self.bar = QtWidgets.QProgressBar()
        self.bar.setRange(0, 1)
        self.bar.setValue(0)
        self.bar.setMaximumWidth(220)
        self.status = QtWidgets.QLabel("")
        self.status.setObjectName("forwardStatus")
        self.status.setWordWrap(True)
        self.summary_button = QtWidgets.QPushButton("Save summary…")
        self.summary_button.setToolTip("The plan's physics summary (Markdown, HTML and PDF) into a folder")
        self.summary_button.clicked.connect(self._summary_clicked)
        self.dvh_button = QtWidgets.QPushButton("DVHs…")
        self.dvh_button.setToolTip("DVHs of several plans together: line style per plan, colour per structure")
        self.dvh_button.clicked.connect(self.show_dvh_dialog)
        self.follow_box = QtWidgets.QCheckBox("Show in main window")
        self.follow_box.setToolTip("The main window shows the selected plan's dose (once it has MU), with its "
                                   "plan ID in every frame")
        self.follow_box.setChecked(self.main_window is not None)
        self.follow_box.setVisible(self.main_window is not None)
        self.follow_box.toggled.connect(self._on_follow)
        self.session_button = QtWidgets.QPushButton("Show shaping dose")
        self.session_button.setToolTip("The main window shows the shaping session's dose again")
        self.session_button.setVisible(self.main_window is not None)
        self.session_button.clicked.connect(self.show_session_dose)
        close = QtWidgets.QPushButton("Close")
        close.clicked.connect(self.close)
        bottom = QtWidgets.QHBoxLayout()
        bottom.addWidget(self.status, 1)
        bottom.addWidget(self.bar)
        bottom.addWidget(self.follow_box)
        bottom.addWidget(self.session_button)
        bottom.addWidget(self.dvh_button)
        bottom.addWidget(self.summary_button)
        bottom.addWidget(close)

        right = QtWidgets.QVBoxLayout()
        right.addWidget(self.plan_label)
        right.addWidget(self.tabs, 1)
        body = QtWidgets.QHBoxLayout()
        body.addLayout(left)
        body.addLayout(right, 1)
        lay = QtWidgets.QVBoxLayout(self)
        lay.addLayout(body, 1)
        lay.addLayout(bottom)
        self._busy_widgets = [b_new, b_copy, b_ren, b_del, b_save, b_open, self.plan_list, self.summary_button,
                              *self._point_buttons]

    def _beams_tab(self) -> QtWidgets.QWidget:
        w = QtWidgets.QWidget()
        self.beam_table = QtWidgets.QTableWidget(0, 7)
        self.beam_table.setHorizontalHeaderLabels(["Name", "Gantry °", "Couch °", "Coll. °",
                                                   "Isocentre (x, y, z) mm", "Field", "MU"])
        self.beam_table.setSelectionBehavior(QtWidgets.QAbstractItemView.SelectionBehavior.SelectRows)
        self.beam_table.setSelectionMode(QtWidgets.QAbstractItemView.SelectionMode.SingleSelection)
        self.beam_table.horizontalHeader().setStretchLastSection(True)
        self.gantry = _spin(0, 359.9, 0.0, "°")
        self.couch = _spin(0, 359.9, 0.0, "°")
        self.collimator = _spin(0, 359.9, 0.0, "°")
        self.jaw_w = _spin(5, 400, 100.0, " mm", 0, 5)
        self.jaw_h = _spin(5, 400, 100.0, " mm", 0, 5)
        add = QtWidgets.QPushButton("Add beam")
        add.setToolTip("An open field at the prior beam's isocentre (the first beam: the target's centroid)")
        add.clicked.connect(lambda: self.add_beam(self.gantry.value(), self.couch.value(), self.collimator.value(),
                                                  self.jaw_w.value(), self.jaw_h.value()))
        row = QtWidgets.QHBoxLayout()
        for lab, wid in (("Gantry", self.gantry), ("Couch", self.couch), ("Coll.", self.collimator),
                         ("Jaws X", self.jaw_w), ("Y", self.jaw_h)):
            row.addWidget(QtWidgets.QLabel(lab))
            row.addWidget(wid)
        row.addWidget(add)
        ops = QtWidgets.QHBoxLayout()
        buttons = []
        for text, slot in (("Copy", self.copy_beam), ("Parallel-opposed", self.opposed_beam),
                           ("Delete", self.delete_beam), ("Move isocentres here", self.move_isocentres)):
            b = QtWidgets.QPushButton(text)
            b.clicked.connect(lambda _=False, f=slot: f(self.selected_beam()))
            ops.addWidget(b)
            buttons.append(b)
        self.iso_edit = QtWidgets.QLineEdit()
        self.iso_edit.setPlaceholderText("isocentre x, y, z mm")
        self.iso_edit.setMaximumWidth(160)
        set_iso = QtWidgets.QPushButton("Set isocentre")
        set_iso.setToolTip("Move the selected beam's isocentre (patient mm); new beams take the prior beam's")
        set_iso.clicked.connect(self._set_iso_clicked)
        ops.addWidget(self.iso_edit)
        ops.addWidget(set_iso)
        buttons.append(set_iso)
        conform = QtWidgets.QPushButton("Conform on arc…")
        conform.clicked.connect(self._conform_clicked)
        ops.addWidget(conform)
        ops.addStretch(1)
        lay = QtWidgets.QVBoxLayout(w)
        lay.addWidget(self.beam_table, 1)
        lay.addLayout(row)
        lay.addLayout(ops)
        self._beam_buttons = [add, conform, *buttons]
        return w

    def _points_tab(self) -> QtWidgets.QWidget:
        w = QtWidgets.QWidget()
        self.point_table = QtWidgets.QTableWidget(0, 2)
        self.point_label = QtWidgets.QLineEdit()
        self.point_label.setPlaceholderText("label")
        self.point_xyz = QtWidgets.QLineEdit()
        self.point_xyz.setPlaceholderText("x, y, z mm")
        self.point_frame = QtWidgets.QComboBox()
        add = QtWidgets.QPushButton("Add point")
        add.clicked.connect(self._add_point_clicked)
        self.compute_points_button = QtWidgets.QPushButton("Compute")
        self.compute_points_button.setToolTip("Dose per point per beam for the plan's MU")
        self.compute_points_button.clicked.connect(self.compute_points)
        update = QtWidgets.QPushButton("Update point")
        update.setToolTip("Give the point chosen in the table the label and position typed (patient mm)")
        update.clicked.connect(self._update_point_clicked)
        remove = QtWidgets.QPushButton("Remove point")
        remove.setToolTip("Remove the point chosen in the table (not while a plan normalises or prescribes to it)")
        remove.clicked.connect(lambda: self.remove_point(self.selected_point()))
        self.point_table.setSelectionBehavior(QtWidgets.QAbstractItemView.SelectionBehavior.SelectRows)
        self.point_table.setSelectionMode(QtWidgets.QAbstractItemView.SelectionMode.SingleSelection)
        self.point_table.itemSelectionChanged.connect(self._on_point_chosen)
        row = QtWidgets.QHBoxLayout()
        row.addWidget(self.point_label)
        row.addWidget(self.point_xyz, 1)
        row.addWidget(QtWidgets.QLabel("in"))
        row.addWidget(self.point_frame)
        row.addWidget(add)
        row.addWidget(update)
        row.addWidget(remove)
        row.addWidget(self.compute_points_button)
        self._point_buttons = [add, update, remove]
        lay = QtWidgets.QVBoxLayout(w)
        lay.addWidget(self.point_table, 1)
        lay.addLayout(row)
        return w

    def _prescription_tab(self) -> QtWidgets.QWidget:
        w = QtWidgets.QWidget()
        self.norm_box = QtWidgets.QComboBox()
        self.norm_box.setToolTip("The normalisation point: a beam's isocentre, its dmax point or a named point")
        self.norm_box.activated.connect(lambda _i: self.set_normalisation(self.norm_box.currentData()))
        self.mode_box = QtWidgets.QComboBox()
        self.mode_box.addItems(list(MODES))
        self.mode_box.currentIndexChanged.connect(lambda _i: self._fill_rx_table())
        self.rx_dose = _spin(0.001, 1000, 2.0, " Gy", 3, 0.1)
        self.rx_percent = _spin(1, 200, 100.0, " %", 1)
        self.rx_table = QtWidgets.QTableWidget(0, 3)
        self.rx_table.horizontalHeader().setStretchLastSection(True)
        self.apply_rx_button = QtWidgets.QPushButton("Apply")
        self.apply_rx_button.clicked.connect(lambda: self.apply_prescription())
        self.rx_result = QtWidgets.QLabel("")
        self.rx_result.setWordWrap(True)
        form = QtWidgets.QFormLayout()
        form.addRow("Normalisation point", self.norm_box)
        form.addRow("Mode", self.mode_box)
        dr = QtWidgets.QHBoxLayout()
        dr.addWidget(self.rx_dose)
        dr.addWidget(QtWidgets.QLabel("at"))
        dr.addWidget(self.rx_percent)
        dr.addStretch(1)
        form.addRow("Dose (normalisation mode)", dr)
        lay = QtWidgets.QVBoxLayout(w)
        lay.addLayout(form)
        lay.addWidget(self.rx_table, 1)
        r = QtWidgets.QHBoxLayout()
        r.addWidget(self.rx_result, 1)
        r.addWidget(self.apply_rx_button)
        lay.addLayout(r)
        return w

    def _auto_tab(self) -> QtWidgets.QWidget:
        w = QtWidgets.QWidget()
        self.volume_table = QtWidgets.QTableWidget(0, 6)
        self.volume_table.setHorizontalHeaderLabels(["Volume", "Role", "Min Gy", "Max Gy", "Importance", "Penalty"])
        for s in self.state.patient.structures:
            if s.is_empty:
                continue
            target = s.kind.value == "target"
            self._add_volume_row(s.name, "target" if target else "oar",
                                 f"{self.prescription_gy:g}" if target else "", "", "1", "10" if target else "1",
                                 checked=s.kind.value != "external")
        self.volume_table.horizontalHeader().setStretchLastSection(True)
        self.method_box = QtWidgets.QComboBox()
        self.method_box.addItems([*METHODS, "all"])
        self.points_per_volume = QtWidgets.QSpinBox()
        self.points_per_volume.setRange(50, 100000)
        self.points_per_volume.setValue(2000)
        self.run_auto_button = QtWidgets.QPushButton("Run")
        self.run_auto_button.clicked.connect(lambda: self.run_auto_weight())
        self.apply_auto_button = QtWidgets.QPushButton("Apply chosen")
        self.apply_auto_button.setToolTip("Put the chosen row's whole MU in the plan")
        self.apply_auto_button.clicked.connect(lambda: self.apply_auto_weight())
        self.auto_table = QtWidgets.QTableWidget(0, 1)
        self.auto_table.setSelectionBehavior(QtWidgets.QAbstractItemView.SelectionBehavior.SelectRows)
        self.auto_table.setSelectionMode(QtWidgets.QAbstractItemView.SelectionMode.SingleSelection)
        self.auto_message = QtWidgets.QLabel("")
        self.auto_message.setObjectName("autoWeightMessage")
        self.auto_message.setWordWrap(True)
        self.auto_message.setTextInteractionFlags(QtCore.Qt.TextInteractionFlag.TextSelectableByMouse)
        row = QtWidgets.QHBoxLayout()
        row.addWidget(QtWidgets.QLabel("Method"))
        row.addWidget(self.method_box)
        row.addWidget(QtWidgets.QLabel("Points per volume"))
        row.addWidget(self.points_per_volume)
        row.addStretch(1)
        row.addWidget(self.run_auto_button)
        row.addWidget(self.apply_auto_button)
        lay = QtWidgets.QVBoxLayout(w)
        lay.addWidget(self.volume_table, 2)
        lay.addLayout(row)
        lay.addWidget(self.auto_table, 2)
        lay.addWidget(self.auto_message)
        return w

    def _add_volume_row(self, name, role, lo, hi, imp, pen, checked=True) -> None:
        t = self.volume_table
        r = t.rowCount()
        t.insertRow(r)
        it = _item(name)
        it.setFlags(it.flags() | QtCore.Qt.ItemFlag.ItemIsUserCheckable)
        it.setCheckState(QtCore.Qt.CheckState.Checked if checked else QtCore.Qt.CheckState.Unchecked)
        t.setItem(r, 0, it)
        box = QtWidgets.QComboBox()
        box.addItems(["target", "oar"])
        box.setCurrentText(role)
        t.setCellWidget(r, 1, box)
        for c, v in ((2, lo), (3, hi), (4, imp), (5, pen)):
            t.setItem(r, c, _item(v, editable=True))

    # ------------------------------------------------------------------ state shown
    @property
    def plan(self):
        return self.state.plan

    @property
    def busy(self) -> bool:
        return self._task is not None

    def _say(self, text: str, error: bool = False) -> None:
        self.status.setStyleSheet(_RED if error else "")
        self.status.setText(text)
        if error:
            self.last_error = text

    def refresh(self) -> None:
        """Show the book: plans, the selected plan's ID, beams, points and choices."""
        book = self.state.book
        self.plan_list.blockSignals(True)
        self.plan_list.clear()
        self.plan_list.addItems(list(book.names))
        if book.selected is not None:
            self.plan_list.setCurrentRow(list(book.names).index(book.selected))
        self.plan_list.blockSignals(False)
        if book.selected is None:
            self.plan_label.setText("No plan: make one with New…")
            self.setWindowTitle("Forward planning")
            self.beam_table.setRowCount(0)
            self._fill_point_table()
            return
        p = self.plan
        total = sum(p.mu)
        self.plan_label.setText(f"Plan {p.name!r} — plan ID {p.plan_id} — {p.n_beams} beams, {total:g} MU")
        self.setWindowTitle(f"Forward planning — {p.name} (plan ID {p.plan_id})")
        sel = self.beam_table.currentRow()
        self.beam_table.setRowCount(p.n_beams)
        for r, (b, f, m) in enumerate(zip(p.beams, p.fields, p.mu)):
            for c, text in enumerate(beam_row(b, f, m)):
                self.beam_table.setItem(r, c, _item(text))
        if p.n_beams:
            self.beam_table.selectRow(min(max(sel, 0), p.n_beams - 1))
        self.beam_table.resizeColumnsToContents()
        # point frames and normalisation choices follow the beams and points
        self.point_frame.clear()
        self.point_frame.addItem("patient", None)
        for k, b in enumerate(p.beams):
            self.point_frame.addItem(f"BEV of {b.name}", k)
        self.norm_box.clear()
        current = p.normalisation
        for ref in self._point_refs(p):
            self.norm_box.addItem(ref.describe(p), ref)
            if ref == current:
                self.norm_box.setCurrentIndex(self.norm_box.count() - 1)
        self._fill_point_table()
        self._fill_rx_table()
        self._sync_display()

    def _point_refs(self, p) -> list[PointRef]:
        refs = [PointRef("isocentre", k) for k in range(p.n_beams)] + [PointRef("dmax", k) for k in range(p.n_beams)]
        return refs + [PointRef("point", label=q.label) for q in self.state.patient.points]

    def _fill_point_table(self) -> None:
        sel = self.selected_point()
        self.point_table.blockSignals(True)
        try:
            self._fill_point_rows()
            labels = [q.label for q in self.state.patient.points]
            if sel in labels:
                self.point_table.selectRow(labels.index(sel))
        finally:
            self.point_table.blockSignals(False)

    def _fill_point_rows(self) -> None:
        pts = self.state.patient.points
        if self.state.book.selected is None:
            self.point_table.setColumnCount(2)
            self.point_table.setHorizontalHeaderLabels(["Point", "x, y, z mm"])
            self.point_table.setRowCount(len(pts))
            for i, q in enumerate(pts):
                self.point_table.setItem(i, 0, _item(q.label))
                self.point_table.setItem(i, 1, _item(", ".join(f"{v:.1f}" for v in q.position_mm_xyz)))
            return
        p = self.plan
        heads = ["Point", "x, y, z mm"] + [f"{b.name} Gy" for b in p.beams] + ["Total Gy"]
        self.point_table.setColumnCount(len(heads))
        self.point_table.setHorizontalHeaderLabels(heads)
        self.point_table.setRowCount(len(pts))
        rows = {r.label: r for r in self.point_rows} if self._points_current() else {}
        for i, q in enumerate(pts):
            self.point_table.setItem(i, 0, _item(q.label))
            self.point_table.setItem(i, 1, _item(", ".join(f"{v:.1f}" for v in q.position_mm_xyz)))
            r = rows.get(q.label)
            for k in range(p.n_beams):
                self.point_table.setItem(i, 2 + k, _item(f"{r.beam_gy[k]:.3f}" if r else ""))
            self.point_table.setItem(i, 2 + p.n_beams, _item(f"{r.total_gy:.3f}" if r else ""))
        self.point_table.resizeColumnsToContents()

    def _points_current(self) -> bool:
        return bool(self.point_rows) and getattr(self, "_point_rows_key", None) == (self.plan.name, self.plan.plan_id)

    def _fill_rx_table(self) -> None:
        p = self.plan
        mode = self.mode_box.currentIndex()
        head = ("Dose Gy", "MU", "Weight")[mode]
        rx = p.prescription
        for r in range(self.rx_table.rowCount()):  # a replaced cell widget is not deleted by the table
            w = self.rx_table.cellWidget(r, 2)
            if w is not None:
                self.rx_table.removeCellWidget(r, 2)
                w.hide()
                w.deleteLater()
        self.rx_table.setRowCount(0)
        self.rx_table.setColumnCount(3)
        self.rx_table.setHorizontalHeaderLabels(["Beam", head, "Point"])
        self.rx_table.setRowCount(p.n_beams)
        refs = self._point_refs(p)
        same_mode = (DoseToPoints, MonitorUnits, DoseToNormalisation)[mode]
        for k, b in enumerate(p.beams):
            self.rx_table.setItem(k, 0, _item(b.name))
            value = {0: f"{self.prescription_gy / max(p.n_beams, 1):.3g}", 1: f"{p.mu[k]:g}", 2: "1"}[mode]
            if isinstance(rx, same_mode) and len(rx.points) == p.n_beams:
                value = f"{(rx.doses_gy if mode == 0 else rx.mu if mode == 1 else rx.weights)[k]:g}"
            self.rx_table.setItem(k, 1, _item(value, editable=True))
            box = QtWidgets.QComboBox()
            for ref in refs:
                box.addItem(ref.describe(p), ref)
            own = PointRef("isocentre", k)
            if isinstance(rx, same_mode) and len(rx.points) == p.n_beams:
                own = rx.points[k]
            box.setCurrentIndex(next((j for j, ref in enumerate(refs) if ref == own), k))
            self.rx_table.setCellWidget(k, 2, box)

    # ------------------------------------------------------------------ running off the GUI thread
    def _start(self, what: str, fn, on_done) -> bool:
        """Run ``fn(progress)`` on a thread; ``on_done(result)`` on the GUI thread."""
        if self._task is not None:
            self._say("Busy: wait for the running computation to finish.", error=True)
            return False
        task = _Task(fn, self)
        self._task = task
        self.bar.setRange(0, 0)
        self._say(f"{what}…")
        self._set_busy(True)
        task.progress_made.connect(self._on_progress)
        task.result_ready.connect(lambda out, exc: self._finish(task, what, out, exc, on_done))
        task.start()
        return True

    def _set_busy(self, on: bool) -> None:
        for b in (*self._busy_widgets, *self._beam_buttons, self.compute_points_button, self.apply_rx_button,
                  self.run_auto_button, self.apply_auto_button):
            b.setEnabled(not on)

    def _on_progress(self, done: int, total: int, label: str) -> None:
        if self._task is None:
            return
        self.bar.setRange(0, max(total, 1))
        self.bar.setValue(done)
        self.bar.setFormat(f"{label} %p%" if label else "%p%")

    def _finish(self, task, what, out, exc, on_done) -> None:
        task.wait()
        task.deleteLater()
        self._task = None
        self.bar.setRange(0, 1)
        self.bar.setValue(0 if exc else 1)
        self.bar.setFormat("%p%")
        self._set_busy(False)
        if exc is not None:
            self._say(f"{what} failed: {exc}" if isinstance(exc, ValueError) else f"{what} failed: "
                      f"{type(exc).__name__}: {exc}", error=True)
            self.refresh()
            return
        try:
            on_done(out)
        except ValueError as e:
            self._say(f"{what}: {e}", error=True)
        self.refresh()

    def wait_idle(self, timeout_s: float = 60.0) -> None:
        """Process events until no computation runs (tests, closing)."""
        import time

        t0 = time.perf_counter()
        app = QtWidgets.QApplication.instance()
        while self._task is not None and time.perf_counter() - t0 < timeout_s:
            app.processEvents()
            time.sleep(0.005)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        if self._task is not None:
            self._task.wait(30000)
            QtWidgets.QApplication.instance().processEvents()
        if self.dvh_dialog is not None:
            self.dvh_dialog.close()
        super().closeEvent(event)

    # ------------------------------------------------------------------ edits (each refreshes)
    def _edit(self, fn, done_text: str = "") -> bool:
        if self._task is not None:
            self._say("Busy: wait for the running computation to finish.", error=True)
            return False
        try:
            fn()
        except (ValueError, IndexError) as exc:  # PlanBookError, ForwardStateError, bad indices
            self._say(str(exc), error=True)
            self.refresh()
            return False
        self.refresh()
        if done_text:
            self._say(done_text)
        return True

    def _ask_name(self, title: str, action) -> None:
        text, ok = QtWidgets.QInputDialog.getText(self, title, "Plan name:")
        if ok:
            action(text)

    def new_plan(self, name: str) -> bool:
        return self._edit(lambda: self.state.new_plan(name), f"new plan {name!r}")

    def copy_plan(self, new_name: str) -> bool:
        return self._edit(lambda: self.state.copy_plan(new_name), f"copied as {new_name!r}")

    def rename_plan(self, new_name: str) -> bool:
        return self._edit(lambda: self.state.rename_plan(new_name), f"renamed to {new_name!r}")

    def delete_plan(self) -> bool:
        if self.state.book.selected is None:
            return False
        return self._edit(self.state.delete_plan, "plan deleted")

    def select_plan(self, name: str) -> bool:
        return self._edit(lambda: self.state.select_plan(name))

    def _on_plan_clicked(self, name: str) -> None:
        if name and name != self.state.book.selected:
            self.select_plan(name)

    def _folder(self, title: str, action) -> None:
        folder = QtWidgets.QFileDialog.getExistingDirectory(self, title)
        if folder:
            action(folder)

    def save_book(self, folder) -> bool:
        return self._edit(lambda: self.state.save_book(folder), f"plans saved in {folder}")

    def open_book(self, folder) -> bool:
        """Replace the plans by those saved in ``folder`` (for this case)."""
        if not self._edit(lambda: self.state.load_book(folder), f"plans opened from {folder}"):
            return False
        self.auto_table.setRowCount(0)
        return True

    def _no_plan(self) -> bool:
        """True (and says so) when no plan is selected."""
        if self.state.book.selected is None:
            self._say("No plan: make one with New… (or open saved plans)", error=True)
            return True
        return False

    def selected_beam(self) -> int:
        return self.beam_table.currentRow()

    def _need_beam(self, index: int) -> int:
        if not 0 <= index < self.plan.n_beams:
            raise PlanBookError(f"plan {self.plan.name!r}: choose a beam in the table first")
        return index

    def add_beam(self, gantry_deg=0.0, couch_deg=0.0, collimator_deg=0.0, width_mm=100.0, height_mm=100.0) -> bool:
        return self._edit(lambda: self.state.add_beam(gantry_deg=gantry_deg, couch_deg=couch_deg,
                                                      collimator_deg=collimator_deg, width_mm=width_mm,
                                                      height_mm=height_mm))

    def copy_beam(self, index: int) -> bool:
        return self._edit(lambda: self.state.copy_beam(self._need_beam(index)))

    def opposed_beam(self, index: int) -> bool:
        return self._edit(lambda: self.state.opposed_beam(self._need_beam(index)))

    def delete_beam(self, index: int) -> bool:
        return self._edit(lambda: self.state.delete_beam(self._need_beam(index)))

    def move_isocentres(self, index: int) -> bool:
        return self._edit(lambda: self.state.move_isocentres(self._need_beam(index)), "isocentres moved")

    def _set_iso_clicked(self) -> None:
        try:
            xyz = _xyz(self.iso_edit.text(), "isocentre")
        except ValueError as exc:
            self._say(str(exc), error=True)
            return
        self.set_isocentre(self.selected_beam(), xyz)

    def set_isocentre(self, index: int, xyz) -> bool:
        return self._edit(lambda: self.state.set_isocentre(self._need_beam(index), xyz), "isocentre set")

    def set_normalisation(self, ref) -> bool:
        if self._no_plan():
            return False
        if ref is None or ref == self.plan.normalisation:
            return False
        return self._edit(lambda: self.state.set_normalisation(ref))

    def _conform_clicked(self) -> None:
        dlg = ConformDialog(self.state.patient, self)
        if dlg.exec() == QtWidgets.QDialog.DialogCode.Accepted:
            try:
                params = dlg.parameters()
            except ValueError as exc:
                self._say(str(exc), error=True)
                return
            self.conform(params)

    def conform(self, params: dict) -> bool:
        """Make Conformed Beams with ``params`` (ConformDialog.parameters) and add them."""
        if self._no_plan():
            return False
        state, name = self.state, self.plan.name

        def done(conformed):
            if self.state.book.selected != name:
                raise ValueError(f"plan {name!r} is no longer selected: the beams were not added")
            if not conformed:
                raise ValueError("no beam: every projection was below the minimum area")
            state.add_conformed(conformed)
            self._say(f"{len(conformed)} conformed beams added to {name!r}")

        return self._start("Conforming beams", lambda progress: state.conformed_beams(**params), done)

    # ------------------------------------------------------------------ points
    def _add_point_clicked(self) -> None:
        try:
            xyz = _xyz(self.point_xyz.text(), "point")
        except ValueError as exc:
            self._say(str(exc), error=True)
            return
        self.add_point(self.point_label.text(), xyz, self.point_frame.currentData())

    def add_point(self, label: str, xyz, beam: int | None = None) -> bool:
        """A point in patient coordinates (``beam`` None) or in beam ``beam``'s BEV frame (x, y,
        z mm; IEC beam limiting device, origin at the isocentre, z towards the source)."""
        if beam is None:
            return self._edit(lambda: self.state.add_point(label, xyz), f"point {label!r} added")
        return self._edit(lambda: self.state.add_point_bev(beam, label, xyz), f"point {label!r} added (BEV)")

    def selected_point(self) -> str | None:
        """The label of the point chosen in the points table, or None."""
        r = self.point_table.currentRow()
        pts = self.state.patient.points
        items = self.point_table.selectedItems()
        return pts[r].label if items and 0 <= r < len(pts) else None

    def _on_point_chosen(self) -> None:
        label = self.selected_point()
        if label is None:
            return
        q = self.state.patient.points[[p.label for p in self.state.patient.points].index(label)]
        self.point_label.setText(q.label)
        self.point_xyz.setText(", ".join(f"{v:g}" for v in q.position_mm_xyz))
        self.point_frame.setCurrentIndex(0)

    def remove_point(self, label: str | None) -> bool:
        """Remove a point (refused, with the reason, while a plan normalises or prescribes to it)."""
        if label is None:
            self._say("choose a point in the table first", error=True)
            return False
        return self._edit(lambda: self.state.remove_point(label), f"point {label!r} removed")

    def edit_point(self, label: str | None, new_label: str | None = None, xyz=None) -> bool:
        """Rename and/or move a point (patient mm)."""
        if label is None:
            self._say("choose a point in the table first", error=True)
            return False
        return self._edit(lambda: self.state.edit_point(label, new_label, xyz), f"point {label!r} updated")

    def _update_point_clicked(self) -> None:
        if self.point_frame.currentData() is not None:
            self._say("edit a point in patient coordinates (choose 'patient')", error=True)
            return
        try:
            xyz = _xyz(self.point_xyz.text(), "point")
        except ValueError as exc:
            self._say(str(exc), error=True)
            return
        self.edit_point(self.selected_point(), self.point_label.text(), xyz)

    def compute_points(self) -> bool:
        if self._no_plan():
            return False
        plan, state = self.plan, self.state
        if plan.n_beams == 0:
            self._say(f"plan {plan.name!r} has no beams", error=True)
            return False

        def done(rows):
            self.point_rows = rows
            self._point_rows_key = (plan.name, plan.plan_id)
            self._say(f"point doses of plan {plan.name!r} (plan ID {plan.plan_id}) for its MU")

        return self._start("Computing point doses", lambda progress: state.point_table(plan, progress), done)

    # ------------------------------------------------------------------ prescription
    def prescription(self):
        """The prescription the tab describes (ValueError naming the field)."""
        p = self.plan
        if p.n_beams == 0:
            raise ValueError(f"plan {p.name!r} has no beams")
        mode = self.mode_box.currentIndex()
        head = self.rx_table.horizontalHeaderItem(1).text()
        values = tuple(_num(self.rx_table.item(k, 1).text(), f"{p.beams[k].name}: {head}") for k in range(p.n_beams))
        points = tuple(self.rx_table.cellWidget(k, 2).currentData() for k in range(p.n_beams))
        if mode == 0:
            return DoseToPoints(values, points)
        if mode == 1:
            return MonitorUnits(values, points)
        return DoseToNormalisation(self.rx_dose.value(), values, self.rx_percent.value(), points)

    def apply_prescription(self, prescription=None) -> bool:
        """Apply the prescription (default: the tab's) to the selected plan: whole MU."""
        if self._no_plan():
            return False
        try:
            rx = prescription if prescription is not None else self.prescription()
        except ValueError as exc:
            self._say(str(exc), error=True)
            return False
        plan, state = self.plan, self.state

        def done(out):
            new, res = out
            state.book.put(new)
            self.mu_result = res
            mus = ", ".join(f"{b.name} {m:g}" for b, m in zip(new.beams, new.mu))
            beam_gy = ", ".join(f"{b.name} {d:.3f}" for b, d in zip(new.beams, res.beam_dose_gy))
            self.rx_result.setText(f"MU (whole): {mus}. Each beam's dose to its point for these MU: {beam_gy} Gy; "
                                   f"normalisation point {res.normalisation_gy:.3f} Gy.")
            self._say(f"prescription applied: plan ID {new.plan_id}")

        return self._start("Applying the prescription", lambda progress: state.prescribe(plan, rx, progress), done)

    # ------------------------------------------------------------------ auto weight
    def goals(self) -> list[VolumeGoal]:
        """The checked volumes of the table (ValueError naming the volume and field)."""
        t, out = self.volume_table, []
        for r in range(t.rowCount()):
            it = t.item(r, 0)
            if it.checkState() != QtCore.Qt.CheckState.Checked:
                continue
            n = it.text()
            role = t.cellWidget(r, 1).currentText()
            out.append(VolumeGoal(n, role, _num(t.item(r, 2).text(), f"{n}: min Gy", allow_blank=True),
                                  _num(t.item(r, 3).text(), f"{n}: max Gy", allow_blank=True),
                                  _num(t.item(r, 4).text(), f"{n}: importance"),
                                  _num(t.item(r, 5).text(), f"{n}: penalty")))
        if not out:
            raise ValueError("check at least one volume (and one target)")
        return out

    def set_volume(self, name: str, *, use: bool = True, role: str | None = None, min_gy=None, max_gy=None,
                   importance=None, penalty=None) -> None:
        """Set a volume's row (tests and scripts); None leaves a field, "" blanks min/max."""
        t = self.volume_table
        for r in range(t.rowCount()):
            if t.item(r, 0).text() == name:
                t.item(r, 0).setCheckState(QtCore.Qt.CheckState.Checked if use else QtCore.Qt.CheckState.Unchecked)
                if role is not None:
                    t.cellWidget(r, 1).setCurrentText(role)
                for c, v in ((2, min_gy), (3, max_gy), (4, importance), (5, penalty)):
                    if v is not None:
                        t.item(r, c).setText(str(v))
                return
        raise ValueError(f"no volume {name!r} in the table")

    def run_auto_weight(self, method: str | None = None) -> bool:
        if self._no_plan():
            return False
        if method is not None:
            self.method_box.setCurrentText(method)
        m = self.method_box.currentText()
        methods = METHODS if m == "all" else (m,)
        plan, state = self.plan, self.state
        if plan.n_beams == 0:
            self._say(f"plan {plan.name!r} has no beams", error=True)
            return False
        try:
            goals = self.goals()
        except ValueError as exc:
            self._say(str(exc), error=True)
            return False
        npts = self.points_per_volume.value()

        def done(rows):
            state.auto_rows, state.auto_goals = rows, goals
            self._fill_auto_table(plan)
            self._say(f"auto weight of plan {plan.name!r}: " + ", ".join(
                f"{r.method} {'no solution' if r.error else 'done'}" for r in rows))

        return self._start("Auto weight", lambda progress: state.run_auto_weight(
            plan, goals, methods, points_per_volume=npts, progress=progress), done)

    def _fill_auto_table(self, plan) -> None:
        rows, goals = self.state.auto_rows, self.state.auto_goals
        targets = [g.name for g in goals if g.role == "target"]
        oars = [g.name for g in goals if g.role == "oar"]
        heads = (["Method"] + [f"MU {b.name}" for b in plan.beams] + [f"{t} min Gy" for t in targets]
                 + [f"{t} max Gy" for t in targets] + [f"{o} max Gy" for o in oars] + ["Limits met", "Time s"])
        t = self.auto_table
        t.clearSpans()
        t.setColumnCount(len(heads))
        t.setHorizontalHeaderLabels(heads)
        t.setRowCount(len(rows))
        errors, notes = [], []
        for i, r in enumerate(rows):
            t.setItem(i, 0, _item(r.method))
            if r.error:
                text = r.error if r.error.startswith(f"{r.method}:") else f"{r.method}: {r.error}"
                cell = _item("no feasible solution (see below)")
                cell.setToolTip(text)
                t.setItem(i, 1, cell)
                t.setSpan(i, 1, 1, len(heads) - 1)
                errors.append(text)
                continue
            if not r.limits_met:
                notes.append(f"{r.method} leaves limits unmet on the sample points: {'; '.join(r.violations)}")
            v = r.volumes
            cells = ([f"{m:g}" for m in r.mu] + [f"{v[n]['min_gy']:.3f}" for n in targets]
                     + [f"{v[n]['max_gy']:.3f}" for n in targets] + [f"{v[n]['max_gy']:.3f}" for n in oars]
                     + ["yes" if r.limits_met else "no", f"{r.time_s:.2f}"])
            for c, text in enumerate(cells):
                t.setItem(i, 1 + c, _item(text))
            t.item(i, len(cells) - 1).setToolTip("; ".join(r.violations) or "every limit met")
        t.resizeColumnsToContents()
        ok = [i for i, r in enumerate(rows) if not r.error]
        if ok:
            t.selectRow(ok[0])
        self.auto_message.setStyleSheet(_RED if errors else "")
        self.auto_message.setText("\n".join(errors + notes + [
            "Doses for the whole MU on every voxel of each volume; 'limits met' on the solver's sample points."]))

    def apply_auto_weight(self, row: int | None = None) -> bool:
        """Put the chosen result's whole MU in the selected plan."""
        if self._no_plan():
            return False
        i = self.auto_table.currentRow() if row is None else int(row)
        rows = self.state.auto_rows
        if not 0 <= i < len(rows):
            self._say("run the auto weight and choose a result first", error=True)
            return False
        r = rows[i]
        if not self._edit(lambda: self.state.apply_auto_weight(r)):
            return False
        self._say(f"{r.method}'s whole MU applied to plan {self.plan.name!r}: plan ID {self.plan.plan_id}")
        return True

    # ------------------------------------------------------------------ physics summary
    def _summary_clicked(self) -> None:
        folder = QtWidgets.QFileDialog.getExistingDirectory(self, "Folder for the physics summary")
        if folder:
            self.save_summary(folder)

    def save_summary(self, folder, *, pdf: bool = True) -> bool:
        if self._no_plan():
            return False
        plan, state = self.plan, self.state
        rx_gy = self.prescription_gy

        def done(paths):
            self.last_summary = paths
            self._say(f"physics summary of plan {plan.name!r} (plan ID {plan.plan_id}): {paths[0]} and "
                      + ", ".join(p.name for p in paths[1:]))

        return self._start("Writing the physics summary",
                           lambda progress: state.write_summary(plan, folder, rx_gy, progress, pdf=pdf), done)

    # ------------------------------------------------------------------ the plan in the main window
    def _on_follow(self, on: bool) -> None:
        self._shown_key = None
        if on:
            self._sync_display()

    def show_session_dose(self) -> None:
        """The main window shows the shaping session's dose again (the box is unticked)."""
        self.follow_box.setChecked(False)
        self._shown_key = None
        if self.main_window is not None:
            self.main_window.show_plan(None)
            self._say("the main window shows the shaping session's dose")

    def _sync_display(self) -> None:
        """Hand the selected plan to the main window when it changed (see the module docstring)."""
        w = self.main_window
        if w is None or not self.follow_box.isChecked() or self.state.book.selected is None:
            return
        p = self.plan
        # The points too: the window draws them with the plan's dose (seed 001: "Display Point Dose").
        key = (p.name, p.plan_id, tuple((q.label, q.position_mm_xyz) for q in self.state.patient.points))
        if key == self._shown_key or key == self._display_failed:
            return
        if p.n_beams == 0 or not any(m > 0 for m in p.mu):
            return  # nothing to show yet: the window keeps what it shows (its frames say what)
        try:
            shown = self.state.shown_plan(p, compute=False)
        except ValueError as exc:
            self._display_failed = key
            self._say(f"plan {p.name!r} cannot be shown: {exc}", error=True)
            return
        if shown is not None:
            self._shown_key = key
            w.show_plan(shown)
            return
        if self._task is not None:
            return  # the running task's end refreshes and comes back here
        state = self.state

        def work(progress):
            try:
                return state.shown_plan(p, progress)
            except ValueError as exc:
                return exc

        def done(out):
            if isinstance(out, Exception):
                self._display_failed = key
                raise ValueError(f"plan {p.name!r} cannot be shown: {out}")
            if self.follow_box.isChecked() and self.state.book.selected == p.name and self.plan.plan_id == p.plan_id:
                self._shown_key = key
                w.show_plan(out)
                self._say(f"the main window shows plan {p.name!r} (plan ID {p.plan_id})")

        self._start("Computing the dose for the main window", work, done)

    # ------------------------------------------------------------------ DVHs of several plans
    def show_dvh_dialog(self):
        """The DVH popup of seed 001 for this dialog's plans (one, raised if open)."""
        from .plan_dvh_dialog import PlanDVHDialog

        if self.dvh_dialog is None:
            self.dvh_dialog = PlanDVHDialog(self)
        self.dvh_dialog.refresh_plans()
        self.dvh_dialog.show()
        self.dvh_dialog.raise_()
        return self.dvh_dialog
