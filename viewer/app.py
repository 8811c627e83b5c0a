"""The main window and :func:`launch`.

The window wires the views' gestures to requests for the engine worker and the worker's
snapshots back to the views. It never calls the engine itself: sessions are built on a loader
thread, and from then on only the worker's thread touches them.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PyQt6 import QtCore, QtGui, QtWidgets

from ids_engine.dmr import EraseSpot, MoveIsodoseLine, MoveIsodoseSurface, Pin, SetVoxelDose, Unpin
from ids_engine.session import Session

from ._backend import use_qt
from ._loading import (DEFAULT_PRESCRIPTION_GY, CaseDisplay, SessionLoader, build_session, case_display,
                       open_field_session)
from ._style import ISODOSE_PCT, WINDOW_PRESETS, format_levels, isodose_levels, parse_isodose_levels
from ._theme import apply_theme
from .dvh import DVHPanel
from .field_panel import FieldPanel
from .legend import WashLegend
from .metrics_panel import MetricsPanel
from .optimise_dialog import OptimiseDialog
from .panels import BeamPanel, HistoryList
from .slices import AXES, SliceView, patient_point_marks
from .view3d import View3D
from .worker import QtEngineWorker, Snapshot, conflict_status_text, voxel_text

__all__ = ["MainWindow", "launch"]

# How long a request's conflicts stay in the status bar (ms); the history entry keeps them.
CONFLICT_MESSAGE_MS = 15000

_TOOLS = (
    ("navigate", "Navigate", "N", "Click to move the crosshair; wheel changes slice, Ctrl+wheel zooms, "
                                  "middle-drag pans, right-drag sets window/level"),
    ("set_dose", "Set dose", "D", "Click a voxel, then type its dose and press Enter (or scroll)"),
    ("drag_isodose", "Drag isodose", "I", "Press on the selected isodose line (or surface in 3D) and drag it"),
    ("erase", "Erase spot", "E", "Click a hot or cold spot to bring it within the erase bounds"),
    ("pin", "Pin", "P", "Click to pin a region whose dose recovery must keep"),
)


class _Exporter(QtCore.QObject):
    """Runs File → Export's work on a background thread; ``done(result)``, ``failed(str)`` and
    ``progress(done, total, label)`` arrive in the GUI thread."""

    done = QtCore.pyqtSignal(object)
    failed = QtCore.pyqtSignal(str)
    progress = QtCore.pyqtSignal(int, int, str)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.busy = False

    def start(self, work) -> None:
        self.busy = True

        def run():
            try:
                result = work(lambda d, t, label="": self.progress.emit(int(d), int(t), str(label)))
            except Exception as exc:  # shown to the planner; the plan is untouched
                self.busy = False
                self.failed.emit(f"{type(exc).__name__}: {exc}")
                return
            self.busy = False
            self.done.emit(result)

        threading.Thread(target=run, name="ids-viewer-export", daemon=True).start()


class MainWindow(QtWidgets.QMainWindow):
    """Slices, 3D view, DVH, beams and history around one engine worker."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("ids-main-window")
        self.setWindowTitle("ids-engine — interactive dose shaping")
        self.resize(1500, 940)
        self.session: Session | None = None
        self.worker: QtEngineWorker | None = None
        self.snapshot: Snapshot | None = None
        # The newest final snapshot's dose cube (host (z, y, x) Gy): previews carry only the
        # displayed slices, so the 3D view, scrolling and screenshots keep this one.
        self.dose_gy: np.ndarray | None = None
        self.last_job_id = 0
        self.levels = ()
        self.level_pcts: tuple[float, ...] = ISODOSE_PCT  # the isodose levels shown, % of the prescription
        self.selected_voxel: tuple[int, int, int] | None = None
        self.reference_gy: np.ndarray | None = None  # a reference dose (RT Dose of a DICOM case), host (z, y, x) Gy
        self.display_only = False  # a case without a target: dose display, nothing to shape
        # A forward plan displayed instead of the session's dose (from the newest snapshot),
        # and the dose 100 % means in the display: the session's prescription, or that plan's
        # normalisation point dose (seed 001).
        self.shown_plan = None
        self.display_rx_gy = 1.0
        self._hover_zyx = None  # where the mouse is (voxel units), for the read-out
        self._awaiting_dose = False  # a case is open but its first dose has not arrived
        self._drag: dict | None = None
        self._groups = 0
        self._pending_commit = 0
        self._draw_t0: dict[int, float] = {}
        self._frame_ms = 0.0
        self._latency_ms = 0.0
        self._split_done = False
        self._loader = SessionLoader(self)
        self._loader.done.connect(self._on_loaded)
        self._loader.failed.connect(self._on_load_failed)
        self._loader.progress.connect(self._on_load_progress)
        self._exporter = _Exporter(self)
        self._exporter.done.connect(self._on_exported)
        self._exporter.failed.connect(self._on_export_failed)
        self._exporter.progress.connect(self._on_load_progress)
        self.last_export = None  # (folder, ExportedSet, DeliverablePlan, agreement) of the last export

        self.slice_views = {a: SliceView(a) for a in AXES}
        self.view3d = View3D()
        self._build_central()
        self.dvh = DVHPanel()
        self.metrics = MetricsPanel()
        self.optimise_dlg: OptimiseDialog | None = None
        self.field = FieldPanel()
        self.beams = BeamPanel()
        self.history = HistoryList()
        self._case_notes: tuple[str, ...] = ()
        self._build_docks()
        self._build_actions()
        self._build_toolbars()
        self._build_menus()
        self._build_status()
        self._connect_views()
        self._set_enabled(False)
        self._show_hint()

    # ------------------------------------------------------------------ layout
    def _build_central(self) -> None:
        v = self.slice_views
        top = QtWidgets.QSplitter(QtCore.Qt.Orientation.Horizontal)
        top.addWidget(v["z"])
        top.addWidget(v["y"])
        bottom = QtWidgets.QSplitter(QtCore.Qt.Orientation.Horizontal)
        bottom.addWidget(v["x"])
        bottom.addWidget(self.view3d)
        split = QtWidgets.QSplitter(QtCore.Qt.Orientation.Vertical)
        split.addWidget(top)
        split.addWidget(bottom)
        for s in (top, bottom, split):
            s.setHandleWidth(2)
            s.setChildrenCollapsible(False)
            s.setStretchFactor(0, 1)
            s.setStretchFactor(1, 1)
        self._splitters = (top, bottom, split)
        self.setCentralWidget(split)

    def _build_docks(self) -> None:
        def dock(title, widget, name):
            d = QtWidgets.QDockWidget(title, self)
            d.setObjectName(name)
            d.setWidget(widget)
            d.setFeatures(QtWidgets.QDockWidget.DockWidgetFeature.DockWidgetMovable
                          | QtWidgets.QDockWidget.DockWidgetFeature.DockWidgetFloatable)
            self.addDockWidget(QtCore.Qt.DockWidgetArea.RightDockWidgetArea, d)
            return d

        self.dvh_dock = dock("Dose-volume histogram", self.dvh, "dvh")
        self.metrics_dock = dock("Plan metrics", self.metrics, "metrics")
        # The metrics right under the DVH, in view together (split before the DVH dock gets
        # the field as a tab: Qt does not split a tabbed dock); side by side they would take
        # half the slices' width.
        self.splitDockWidget(self.dvh_dock, self.metrics_dock, QtCore.Qt.Orientation.Vertical)
        self.field_dock = dock("Open field", self.field, "field")
        self.tabifyDockWidget(self.dvh_dock, self.field_dock)
        self.field_dock.hide()
        self.beams_dock = dock("Beams", self.beams, "beams")
        self.history_dock = dock("History", self.history, "history")
        self.resizeDocks([self.dvh_dock], [470], QtCore.Qt.Orientation.Horizontal)
        self.resizeDocks([self.dvh_dock, self.metrics_dock, self.beams_dock, self.history_dock], [290, 300, 120, 140],
                         QtCore.Qt.Orientation.Vertical)

    def _action(self, text, slot=None, shortcut=None, tip=None, checkable=False) -> QtGui.QAction:
        a = QtGui.QAction(text, self)
        if shortcut:
            a.setShortcut(QtGui.QKeySequence(shortcut))
        if tip:
            a.setToolTip(tip)
            a.setStatusTip(tip)
        a.setCheckable(checkable)
        if slot is not None:
            a.triggered.connect(slot)
        return a

    def _build_actions(self) -> None:
        A = self._action
        self.act_open_phantom = A("Open &phantom…", self.open_phantom_dialog, "Ctrl+O")
        self.act_open_dicom = A("Open &DICOM folder…", self.open_dicom_dialog)
        self.act_open_matrad = A("Open &matRad file…", self.open_matrad_dialog)
        self.act_open_session = A("Open &session…", self.open_session_dialog, "Ctrl+Shift+O")
        self.act_save_session = A("&Save session…", self.save_session_dialog, "Ctrl+S")
        self.act_screenshot = A("Save screens&hot…", self.save_screenshot_dialog)
        self.act_export = A("&Export DICOM RT…", self.export_dialog, "Ctrl+E",
                            "Sequence the plan into MLC segments and write CT, RT Structure Set, RT Plan (research "
                            "use only), RT Dose and a summary into a folder")
        self.act_quit = A("&Quit", self.close, "Ctrl+Q")
        self.act_undo = A("&Undo", self.undo, "Ctrl+Z", "Take back the last request")
        self.act_redo = A("&Redo", self.redo, "Ctrl+Shift+Z", "Re-apply the last undone request")
        self.act_unpin = A("Remove all &pins", self.remove_pins)
        self.act_reset = A("&Reset views", self.reset_views, "Home")
        self.act_percent = A("Isodose labels in &%", lambda on: self._set_label_unit("%" if on else "Gy"),
                             checkable=True)
        self.act_wash = A("Dose colour &wash", self._toggle_wash, checkable=True)
        self.act_wash.setChecked(True)
        self.act_pin_dvh = A("&Pin DVH snapshot", self.dvh.pin_snapshot, "Ctrl+B")
        self.act_clear_dvh = A("&Clear DVH snapshots", self.dvh.clear_snapshots)
        self.act_cc = A("Volume in &cc", lambda on: self.dvh.unit_box.setCurrentIndex(1 if on else 0), checkable=True)
        self.act_optimise = A("&Optimise…", self.optimise_dialog, None,
                              "Optimise the plan's fluences for a protocol's goals (a session without requests)")
        self.act_forward = A("&Forward planning…", self.show_forward_planning, None,
                             "Plans, beams, points, prescription, auto weight and the physics summary (seed 001)")
        self.act_show_session = A("Show the s&haping session's dose", self.show_session_dose, None,
                                  "Display the shaping session's dose again (instead of a forward plan's)")
        self.act_show_session.setEnabled(False)
        self.act_plan_dvhs = A("DVHs of &plans…", self.show_plan_dvhs, None,
                               "DVHs of several plans together (line style per plan, colour per structure), "
                               "exact or by random sampling, % or cc, saved as PNG")
        self.act_summary_pdf = A("Physics summary (&PDF)…", self.save_physics_summary_dialog, None,
                                 "The selected forward plan's physics summary as PDF (with Markdown and HTML)")
        self.act_isodose_control = A("&Isodose control…", self.show_isodose_control, None,
                                     "Isodose levels in Gy or % of the normalisation point, line colour and width, "
                                     "tinted region, the 3D surface's level and mode")
        self.act_sampled_dvh = A("DVH by random &sampling…", self.show_sampled_dvh, None,
                                 "Niemierko-Goitein random sampling to 1 point per mm³, converging live, stoppable")
        self.act_help = A("&Mouse and keys", self.show_help, "F1")
        self.tool_group = QtGui.QActionGroup(self)
        self.tool_actions = {}
        for name, text, key, tip in _TOOLS:
            a = A(text, lambda _=False, n=name: self.set_tool(n), key, f"{text} ({key}): {tip}", checkable=True)
            self.tool_group.addAction(a)
            self.tool_actions[name] = a
        self.tool_actions["navigate"].setChecked(True)

    def _build_toolbars(self) -> None:
        tb = self.addToolBar("Tools")
        tb.setObjectName("tools")
        tb.setMovable(False)
        for a in self.tool_actions.values():
            tb.addAction(a)
        tb.addSeparator()
        tb.addAction(self.act_undo)
        tb.addAction(self.act_redo)
        tb.addSeparator()

        tb.addWidget(QtWidgets.QLabel("Isodose"))
        self.level_box = QtWidgets.QComboBox()
        self.level_box.setToolTip("Isodose level to drag (and shown as the 3D surface)")
        self.level_box.setMinimumContentsLength(12)
        tb.addWidget(self.level_box)
        tb.addWidget(QtWidgets.QLabel("Voxel dose"))
        self.dose_box = QtWidgets.QDoubleSpinBox()
        self.dose_box.setRange(0.0, 500.0)
        self.dose_box.setDecimals(2)
        self.dose_box.setSingleStep(0.5)
        self.dose_box.setSuffix(" Gy")
        self.dose_box.setKeyboardTracking(False)
        self.dose_box.setToolTip("Dose to set at the selected voxel: type and press Enter, or scroll")
        self.dose_box.setEnabled(False)
        tb.addWidget(self.dose_box)
        tb.addSeparator()
        tb.addWidget(QtWidgets.QLabel("Brush"))
        self.radius_box = QtWidgets.QDoubleSpinBox()
        self.radius_box.setRange(2.0, 60.0)
        self.radius_box.setValue(10.0)
        self.radius_box.setSuffix(" mm")
        self.radius_box.setToolTip("Radius of the erase and pin brush")
        tb.addWidget(self.radius_box)
        tb.addWidget(QtWidgets.QLabel("Erase to"))
        self.erase_low = QtWidgets.QDoubleSpinBox()
        self.erase_high = QtWidgets.QDoubleSpinBox()
        for box, v in ((self.erase_low, 95.0), (self.erase_high, 107.0)):
            box.setRange(0.0, 200.0)
            box.setDecimals(0)
            box.setValue(v)
            box.setSuffix(" %")
            box.setToolTip("Erase-spot bounds, % of the prescription")
        tb.addWidget(self.erase_low)
        tb.addWidget(QtWidgets.QLabel("–"))
        tb.addWidget(self.erase_high)
        self.erase_structure = QtWidgets.QComboBox()
        self.erase_structure.setToolTip("Restrict the erase brush to one structure")
        tb.addWidget(self.erase_structure)
        self.tools_bar = tb

        self.addToolBarBreak()
        db = self.addToolBar("Display")
        db.setObjectName("display")
        db.setMovable(False)
        db.addWidget(QtWidgets.QLabel("CT window"))
        self.preset_box = QtWidgets.QComboBox()
        self.preset_box.addItems(list(WINDOW_PRESETS) + ["Custom"])
        db.addWidget(self.preset_box)
        self.window_box = QtWidgets.QDoubleSpinBox()
        self.level_hu_box = QtWidgets.QDoubleSpinBox()
        for box, prefix, lo in ((self.window_box, "W ", 1.0), (self.level_hu_box, "L ", -1500.0)):
            box.setRange(lo, 5000.0)
            box.setDecimals(0)
            box.setPrefix(prefix)
            box.setSuffix(" HU")
            box.setKeyboardTracking(False)
            db.addWidget(box)
        w, lvl = WINDOW_PRESETS["Soft tissue"]
        self.window_box.setValue(w)
        self.level_hu_box.setValue(lvl)
        db.addSeparator()
        db.addWidget(QtWidgets.QLabel("Labels"))
        self.unit_box = QtWidgets.QComboBox()
        self.unit_box.addItems(["Gy", "%"])
        self.unit_box.setToolTip("Label isodose lines in Gy or % of the prescription")
        db.addWidget(self.unit_box)
        db.addWidget(QtWidgets.QLabel("Wash"))
        self.wash_slider = QtWidgets.QSlider(QtCore.Qt.Orientation.Horizontal)
        self.wash_slider.setRange(0, 90)
        self.wash_slider.setValue(45)
        self.wash_slider.setFixedWidth(100)
        self.wash_slider.setToolTip("Dose colour-wash opacity")
        db.addWidget(self.wash_slider)
        db.addSeparator()
        self.case_label = QtWidgets.QLabel("")
        self.case_label.setObjectName("caseLabel")
        db.addWidget(self.case_label)
        self.display_bar = db

        self.addToolBarBreak()
        lb = self.addToolBar("Dose display")
        lb.setObjectName("dose-display")
        lb.setMovable(False)
        lb.addWidget(QtWidgets.QLabel("Isodoses"))
        self.levels_edit = QtWidgets.QLineEdit(format_levels(self.level_pcts))
        self.levels_edit.setMinimumWidth(230)
        self.levels_edit.setMaximumWidth(320)
        self.levels_edit.setToolTip("Isodose levels shown: values in % of the prescription or Gy, e.g. "
                                    "\"20 Gy, 50 95 100 107 %\"; press Enter to apply")
        lb.addWidget(self.levels_edit)
        lb.addWidget(QtWidgets.QLabel("Dose"))
        self.dose_mode_box = QtWidgets.QComboBox()
        self.dose_mode_box.addItem("Plan", "plan")
        self.dose_mode_box.addItem("Plan − reference", "difference")
        self.dose_mode_box.setToolTip("What the slices' colour wash shows; Plan − reference needs a reference "
                                      "dose (an RT Dose in the DICOM folder)")
        self.dose_mode_box.setEnabled(False)
        lb.addWidget(self.dose_mode_box)
        lb.addSeparator()
        self.legend = WashLegend()
        lb.addWidget(self.legend)
        self.dose_bar = lb

        self.level_box.currentIndexChanged.connect(self._on_level_changed)
        self.dose_box.valueChanged.connect(self._on_dose_value)
        self.radius_box.valueChanged.connect(lambda r: [v.set_brush_radius(r) for v in self.slice_views.values()])
        self.preset_box.currentTextChanged.connect(self._on_preset)
        self.window_box.valueChanged.connect(self._on_window_boxes)
        self.level_hu_box.valueChanged.connect(self._on_window_boxes)
        self.unit_box.currentTextChanged.connect(self._set_label_unit)
        self.wash_slider.valueChanged.connect(lambda _v: self._toggle_wash(self.act_wash.isChecked()))
        self.levels_edit.returnPressed.connect(self._on_levels_typed)
        self.dose_mode_box.currentIndexChanged.connect(self._on_dose_mode)

    def _build_menus(self) -> None:
        mb = self.menuBar()
        m = mb.addMenu("&File")
        for a in (self.act_open_phantom, self.act_open_dicom, self.act_open_matrad, None, self.act_open_session,
                  self.act_save_session, self.act_export, None, self.act_screenshot, None, self.act_quit):
            m.addSeparator() if a is None else m.addAction(a)
        m = mb.addMenu("&Edit")
        for a in (self.act_undo, self.act_redo, None, self.act_unpin):
            m.addSeparator() if a is None else m.addAction(a)
        m = mb.addMenu("&Tools")
        for a in self.tool_actions.values():
            m.addAction(a)
        m = mb.addMenu("&View")
        for a in (self.act_reset, self.act_percent, self.act_wash, self.act_isodose_control):
            m.addAction(a)
        m = mb.addMenu("&Plan")
        for a in (self.act_optimise, self.act_forward, self.act_show_session, None, self.act_summary_pdf):
            m.addSeparator() if a is None else m.addAction(a)
        m = mb.addMenu("&DVH")
        for a in (self.act_pin_dvh, self.act_clear_dvh, self.act_cc, self.act_sampled_dvh, self.act_plan_dvhs):
            m.addAction(a)
        m = mb.addMenu("&Help")
        m.addAction(self.act_help)

    def _build_status(self) -> None:
        sb = self.statusBar()
        self.readout = QtWidgets.QLabel("")
        self.perf = QtWidgets.QLabel("")
        self.load_progress = QtWidgets.QProgressBar()
        self.load_progress.setMaximumWidth(220)
        self.load_progress.setTextVisible(True)
        self.load_progress.hide()
        sb.addWidget(self.readout, 1)
        sb.addPermanentWidget(self.load_progress)
        sb.addPermanentWidget(self.perf)

    def _connect_views(self) -> None:
        for axis, v in self.slice_views.items():
            v.hovered.connect(lambda zyx, a=axis: self._on_hover(zyx, a))
            v.slice_changed.connect(self._on_slice_changed)
            v.crosshair_moved.connect(self._on_crosshair)
            v.voxel_picked.connect(self.select_voxel)
            v.brush_clicked.connect(self._on_brush)
            v.drag_started.connect(self._on_line_drag_started)
            v.drag_moved.connect(self._on_line_drag_moved)
            v.drag_finished.connect(self._on_line_drag_finished)
            v.drag_cancelled.connect(self._on_drag_cancelled)
            v.window_changed.connect(self._on_window_drag)
            v.dose_scrolled.connect(lambda step: self.dose_box.stepBy(step))
            v.message.connect(lambda text: self.statusBar().showMessage(text, 4000))
        v3 = self.view3d
        v3.surface_drag_started.connect(self._on_surface_drag_started)
        v3.surface_drag_moved.connect(self._on_surface_drag_moved)
        v3.surface_drag_finished.connect(self._on_surface_drag_finished)
        v3.surface_drag_cancelled.connect(self._on_drag_cancelled)
        v3.message.connect(lambda text: self.statusBar().showMessage(text, 4000))
        self.history.goto.connect(self._on_history_goto)
        self.dvh.unit_box.currentIndexChanged.connect(lambda i: self.act_cc.setChecked(i == 1))
        self.beams.rebuild_requested.connect(self.rebuild_with_beams)
        for c in [v.canvas for v in self.slice_views.values()] + [v3.canvas]:
            key = id(c)
            c.events.draw.connect(lambda e, k=key: self._draw_started(k), position="first")
            c.events.draw.connect(lambda e, k=key: self._draw_ended(k), position="last")

    # ------------------------------------------------------------------ cases and sessions
    def open_case(self, case: dict, prescription_gy: float | None = None) -> None:
        """Build a session for a case on the loader thread, then show it."""
        rx = float(prescription_gy or case.get("prescription_gy", DEFAULT_PRESCRIPTION_GY))
        self._begin_loading(f"Building the plan for {self._case_name(case)}…")
        self._loader.start(lambda progress: build_session(case, rx, progress=progress))

    def open_session(self, folder: str) -> None:
        if self.session is not None and _same_folder(_journal_folder(self.session), folder):
            # Reopening the folder the open session journals to: it holds the folder's lock,
            # and what it would reopen is this session, so let it go first.
            self._stop_worker()
            self.session.close()
        self._begin_loading(f"Reopening the session in {folder}…")
        self._loader.start(lambda progress: Session.load(folder, progress=progress))

    def rebuild_with_beams(self, beams: list) -> None:
        """Start a new open-field plan on the current patient with ``beams`` (after confirming:
        the request history does not carry over to a new beam set)."""
        if self.session is None or not beams:
            return
        if self.session.journal and not self.confirm(
                "Rebuild the plan",
                f"Start a new open-field plan with {len(beams)} beams? The current plan and its "
                f"{len(self.session.journal)} requests are discarded."):
            return
        patient, rx, case = self.session.patient, self.session.prescription_gy, dict(self.session.case)
        self._begin_loading(f"Rebuilding the plan with {len(beams)} beams…")
        self._stop_worker()  # the old session is no longer shaped while the new one builds
        self._loader.start(lambda progress: open_field_session(patient, beams, rx, case, progress=progress))

    def confirm(self, title: str, text: str) -> bool:
        answer = QtWidgets.QMessageBox.question(self, title, text)
        return answer == QtWidgets.QMessageBox.StandardButton.Yes

    def set_session(self, session: Session, display: CaseDisplay | None = None) -> None:
        """Show a session (built elsewhere); from now on only the worker's thread uses it."""
        self._stop_worker()
        display = display or case_display(session)
        dlg = getattr(self, "_forward_dialog", None)
        if dlg is not None and dlg.session is not session:  # its plans were for the old patient
            dlg.close()
            dlg.deleteLater()
            self._forward_dialog = None
        if self.session is not None and self.session is not session:
            self.session.close()  # stop journaling the replaced plan and free its folder
        self.session = session
        p = session.patient
        rx = session.prescription_gy
        self.selected_voxel = None
        self.snapshot = None
        self.dose_gy = None
        self._hover_zyx = None
        self.shown_plan = None
        self.display_rx_gy = float(rx)
        self.act_show_session.setEnabled(False)
        self.display_only = not p.targets
        self.reference_gy = display.reference_gy
        for v in self.slice_views.values():
            v.set_case(p.ct_hu, p.grid, display.structures, rx)
            v.set_brush_radius(self.radius_box.value())
            v.set_window(self.window_box.value(), self.level_hu_box.value())
            v.set_reference(display.reference_gy)
        self.dose_mode_box.blockSignals(True)
        self.dose_mode_box.setCurrentIndex(0)
        self.dose_mode_box.blockSignals(False)
        self.dose_mode_box.setEnabled(display.reference_gy is not None)
        self.legend.set_prescription(rx)
        self.legend.set_mode("plan")
        self.view3d.set_case(p.grid.spacing_mm_zyx, p.grid.shape_zyx, display.body_mesh, display.structure_meshes)
        self.dvh.set_case({s.name: tuple(s.colour) for s in p.structures}, rx)
        self.metrics.clear()
        self.field.set_curves(None)
        if self.display_only:
            self.field_dock.show()
            self.field_dock.raise_()
        else:
            self.field_dock.hide()
        self.beams.set_beams([g.beam for g in session.engine.geometry])
        self.history.set_history((), ())
        self._set_levels(self.level_pcts, select_pct=95.0)
        self.erase_structure.clear()
        self.erase_structure.addItem("any structure", None)
        for s in p.structures:
            self.erase_structure.addItem(f"in {s.name}", s.name)
        n_beams = len(session.engine.geometry)
        what = "dose display (no target)" if self.display_only else f"{n_beams} beams"
        self.case_label.setText(f"{p.name}  ·  {p.grid.describe()}  ·  Rx {rx:g} Gy  ·  {what}")
        self.setWindowTitle(f"ids-engine — {p.name}")
        self.worker = QtEngineWorker(session, self, surface_level_gy=self.selected_level_gy)
        self.worker.snapshot.connect(self._on_snapshot)
        self.worker.message.connect(self._on_worker_message)
        self.worker.engine.set_display_index(self.display_index_zyx())
        self.worker.engine.start()
        self.last_job_id = 1  # start() queues a refresh, job 1
        if self.display_only and not self.tool_actions["navigate"].isChecked():
            self.set_tool("navigate")
        self._set_enabled(True)
        # The case is open but its dose is not: no "Ready" (and no stale hint) until it arrives.
        self.readout.setText("")
        self._case_notes = display.notes
        self._awaiting_dose = True
        self.statusBar().showMessage(f"Computing the dose of {p.name}…")

    def _begin_loading(self, text: str) -> None:
        self._set_enabled(False)
        self.statusBar().showMessage(text)
        self.load_progress.setRange(0, 0)
        self.load_progress.show()
        QtWidgets.QApplication.setOverrideCursor(QtCore.Qt.CursorShape.BusyCursor)

    def _end_loading(self) -> None:
        self.load_progress.hide()
        QtWidgets.QApplication.restoreOverrideCursor()

    def _on_load_progress(self, done: int, total: int, label: str) -> None:
        self.load_progress.setRange(0, max(total, 1))
        self.load_progress.setValue(done)
        self.load_progress.setFormat(f"{label} %p%")

    def _on_loaded(self, session: Session, display: CaseDisplay) -> None:
        self._end_loading()
        self.set_session(session, display)

    def _on_load_failed(self, text: str) -> None:
        self._end_loading()
        if self.session is not None and self.worker is None:  # a failed rebuild: keep shaping the old plan
            self.set_session(self.session)
        self._set_enabled(self.session is not None)
        self.statusBar().showMessage("Could not open the case", 5000)
        QtWidgets.QMessageBox.warning(self, "Could not open the case", text)

    @staticmethod
    def _case_name(case: dict) -> str:
        if "phantom" in case:
            return f"the {case['phantom']} phantom ({case.get('resolution', 'clinical')})"
        return str(case.get("dicom") or case.get("matrad") or case)

    def _stop_worker(self) -> None:
        if self.optimise_dlg is not None:
            self.optimise_dlg.reject()
            self.optimise_dlg = None
        if self.worker is not None:
            self.worker.snapshot.disconnect(self._on_snapshot)
            self.worker.message.disconnect(self._on_worker_message)
            self.worker.engine.stop()
            self.worker.deleteLater()
            self.worker = None

    def showEvent(self, event) -> None:  # noqa: N802 (Qt name)
        super().showEvent(event)
        if not self._split_done:
            # Four equal quadrants to start with (sizes set before the first show are not kept).
            for s in self._splitters:
                total = sum(s.sizes()) or 2
                s.setSizes([total // 2, total - total // 2])
            self._split_done = True

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        self._stop_worker()
        super().closeEvent(event)

    # ------------------------------------------------------------------ dialogs
    def open_phantom_dialog(self) -> None:
        from ids_engine.phantoms import PHANTOMS

        d = QtWidgets.QDialog(self)
        d.setWindowTitle("Open a built-in phantom")
        form = QtWidgets.QFormLayout(d)
        names = QtWidgets.QComboBox()
        names.addItems(list(PHANTOMS))
        res = QtWidgets.QComboBox()
        res.addItems(["clinical", "coarse"])
        rx = QtWidgets.QDoubleSpinBox()
        rx.setRange(0.1, 200.0)
        rx.setValue(DEFAULT_PRESCRIPTION_GY)
        rx.setSuffix(" Gy")
        form.addRow("Phantom", names)
        form.addRow("Resolution", res)
        form.addRow("Prescription", rx)
        bb = QtWidgets.QDialogButtonBox(QtWidgets.QDialogButtonBox.StandardButton.Ok
                                        | QtWidgets.QDialogButtonBox.StandardButton.Cancel)
        bb.accepted.connect(d.accept)
        bb.rejected.connect(d.reject)
        form.addRow(bb)
        if d.exec() == QtWidgets.QDialog.DialogCode.Accepted:
            self.open_case({"phantom": names.currentText(), "resolution": res.currentText()}, rx.value())

    def _ask_prescription(self) -> float | None:
        value, ok = QtWidgets.QInputDialog.getDouble(self, "Prescription", "Prescription dose (Gy):",
                                                     DEFAULT_PRESCRIPTION_GY, 0.1, 200.0, 2)
        return value if ok else None

    def open_dicom_dialog(self) -> None:
        folder = QtWidgets.QFileDialog.getExistingDirectory(self, "Open a DICOM folder (CT + RTSTRUCT)")
        if folder and (rx := self._ask_prescription()):
            self.open_case({"dicom": folder}, rx)

    def open_matrad_dialog(self) -> None:
        path, _ = QtWidgets.QFileDialog.getOpenFileName(self, "Open a matRad phantom", "", "matRad files (*.mat)")
        if path and (rx := self._ask_prescription()):
            self.open_case({"matrad": path}, rx)

    def open_session_dialog(self) -> None:
        folder = QtWidgets.QFileDialog.getExistingDirectory(self, "Open a saved session folder")
        if folder:
            self.open_session(folder)

    def save_session_dialog(self) -> None:
        if self.worker is None:
            return
        # A save dialog, so the planner can name a new folder (it is created).
        folder, _ = QtWidgets.QFileDialog.getSaveFileName(
            self, "Save the session as a folder", "", "Session folder (*)",
            options=QtWidgets.QFileDialog.Option.ShowDirsOnly)
        if folder:
            self.save_session(folder)

    def save_session(self, folder: str, overwrite: bool = False) -> int:
        """Queue a save into ``folder`` (created if missing; the worker writes it between
        requests); returns the job id. A non-empty folder that is not this session's is
        refused by the worker unless ``overwrite``, and the window then asks the planner."""
        self.last_job_id = self.worker.engine.save(folder, overwrite)
        return self.last_job_id

    def _on_save_refused(self, folder: str) -> None:
        if self.worker is None:
            return
        if self.confirm("Replace the folder?",
                        f"{folder} is not empty and is not this session's folder. Replace its contents with "
                        "this session?"):
            self.save_session(folder, overwrite=True)
        else:
            self.statusBar().showMessage(f"Not saved: {folder} is not empty", 6000)

    def save_screenshot_dialog(self) -> None:
        path, _ = QtWidgets.QFileDialog.getSaveFileName(self, "Save a screenshot", "ids-engine.png", "PNG (*.png)")
        if path:
            self.grab().save(path)
            self.statusBar().showMessage(f"Screenshot saved to {path}", 4000)

    def export_dialog(self) -> None:
        if self.session is None:
            return
        folder = QtWidgets.QFileDialog.getExistingDirectory(self, "Export the plan as DICOM RT into a folder")
        if folder:
            self.export_plan(folder)

    def export_plan(self, folder: str, *, fractions: int = 1, anonymise: bool = False) -> bool:
        """File → Export…: sequence the current plan and write its DICOM RT set into ``folder``
        (see ``ids export``) on a background thread, with a busy bar in the status bar. The plan
        is copied there under the session's own lock (:func:`ids_engine.cli_export.plan_state`),
        so shaping may go on meanwhile. A non-empty folder is replaced only after the planner
        confirms (the new set is written beside it and swapped in). Returns whether the export
        started; ``last_export`` holds its result once done."""
        from ids_engine.cli_export import export_state, plan_state
        from ids_engine.scripting import _swap_in
        from ids_engine.session import case_label

        if self.session is None or self._exporter.busy:
            return False
        if self.shown_plan is not None:
            self.statusBar().showMessage(f"Not exported: the frames show {self.shown_plan.label}; show the shaping "
                                         "session's dose first (Plan menu)", 6000)
            return False
        out = Path(folder)
        if out.exists() and not out.is_dir():
            self.statusBar().showMessage(f"Not exported: {out} is a file", 6000)
            return False
        replace = out.is_dir() and any(out.iterdir())
        if replace and not self.confirm("Replace the folder?", f"{out} is not empty. Replace its contents with the "
                                                              "exported plan?"):
            self.statusBar().showMessage(f"Not exported: {out} is not empty", 6000)
            return False
        session = self.session
        label = case_label(session.case) if session.case else session.patient.name
        dest = out.parent / f"{out.name}.partial-{time.time_ns()}" if replace else out

        def work(progress):
            try:
                result = export_state(plan_state(session), dest, fractions=fractions, anonymise=anonymise,
                                      case_label=label, progress=progress)
            except BaseException:
                if replace:
                    shutil.rmtree(dest, ignore_errors=True)
                raise
            if replace:
                _swap_in(dest, out)
            return (str(out), *result)

        self.statusBar().showMessage(f"Exporting the plan to {out}…")
        self.load_progress.setRange(0, 0)
        self.load_progress.show()
        QtWidgets.QApplication.setOverrideCursor(QtCore.Qt.CursorShape.BusyCursor)
        self._exporter.start(work)
        self.act_export.setEnabled(False)
        return True

    def _export_finished(self) -> None:
        self.load_progress.hide()
        QtWidgets.QApplication.restoreOverrideCursor()
        self.act_export.setEnabled(self.session is not None and self.shown_plan is None)

    def _on_exported(self, result) -> None:
        self._export_finished()
        self.last_export = result
        folder, exported, plan, agreement = result
        segments = sum(1 for sb in plan.beams for seg in sb.segments if seg.mu > 0)
        self.statusBar().showMessage(
            f"Exported to {folder}: {len(plan.beams)} beams, {segments} segments, "
            f"{sum(sb.mu for sb in plan.beams):.0f} MU; deliverable vs shown dose: gamma 3 %/3 mm "
            f"{agreement['pass_rate_pct']:.1f} % pass (research use only)", 15000)

    def _on_export_failed(self, text: str) -> None:
        self._export_finished()
        self.statusBar().showMessage("Export failed", 6000)
        QtWidgets.QMessageBox.warning(self, "Export failed", text)

    def optimise_dialog(self) -> OptimiseDialog | None:
        """Plan → Optimise…: a (non-modal) dialog that optimises on the worker."""
        if self.worker is None or self.display_only:
            return None
        if self.optimise_dlg is not None:
            self.optimise_dlg.reject()
        snap = self.snapshot
        has_requests = bool(snap is not None and (snap.history or snap.undone))
        self.optimise_dlg = OptimiseDialog(self.worker, has_requests, self)
        self.optimise_dlg.show()
        return self.optimise_dlg

    def show_help(self) -> None:
        lines = [f"<b>{text}</b> ({key}): {tip}" for _, text, key, tip in _TOOLS]
        lines += ["<b>Slices</b>: wheel or PageUp/PageDown/Up/Down change slice; Ctrl+wheel zooms; Home resets; "
                  "Esc cancels a drag",
                  "<b>3D</b>: left-drag rotates, wheel zooms; with Drag isodose, press on the surface and drag",
                  "<b>Undo/redo</b>: Ctrl+Z / Ctrl+Shift+Z, or click an entry in the history"]
        QtWidgets.QMessageBox.information(self, "Mouse and keys", "<br>".join(lines))

    # ------------------------------------------------------------------ state helpers
    def _set_enabled(self, on: bool) -> None:
        # A case without a target has nothing to shape; a displayed forward plan is not shaped.
        shape = on and not self.display_only and self.shown_plan is None
        for a in (self.act_save_session, self.act_pin_dvh, self.act_clear_dvh, self.act_reset,
                  self.tool_actions["navigate"]):
            a.setEnabled(on)
        self.act_optimise.setEnabled(shape)
        # Export writes the session's plan: not while the frames show another plan's dose.
        self.act_export.setEnabled(on and not self._exporter.busy and self.shown_plan is None)
        for name, a in self.tool_actions.items():
            if name != "navigate":
                a.setEnabled(shape)
        self.act_undo.setEnabled(shape and bool(self.snapshot and self.snapshot.history))
        self.act_redo.setEnabled(shape and bool(self.snapshot and self.snapshot.undone))
        self.act_unpin.setEnabled(shape and bool(self.snapshot and self.snapshot.pin_names))
        for w in (self.radius_box, self.erase_low, self.erase_high, self.erase_structure, self.beams):
            w.setEnabled(shape)
        self.level_box.setEnabled(on)
        self.levels_edit.setEnabled(on)
        self.dose_box.setEnabled(shape and self.selected_voxel is not None)

    HINT = "Open a case: File → Open phantom, DICOM folder or matRad file, or a saved session"

    def _show_hint(self) -> None:
        self.readout.setText(self.HINT)

    @property
    def selected_level_gy(self) -> float:
        data = self.level_box.currentData()
        return float(data) if data is not None else (self.session.prescription_gy if self.session else 1.0)

    def _selected_level(self):
        for lev in self.levels:
            if abs(lev.gy - self.selected_level_gy) < 1e-9:
                return lev
        return None

    def _set_levels(self, pcts, select_pct: float | None = None) -> None:
        """Show isodose lines at ``pcts`` (% of the prescription) and offer them for dragging;
        keeps the selected level when it is still there, else the one nearest ``select_pct``
        (or 95 %)."""
        rx = self.display_rx_gy if self.session is not None else 1.0
        keep = self._selected_level().pct if select_pct is None and self._selected_level() else select_pct
        self.level_pcts = tuple(float(v) for v in pcts)
        self.levels = isodose_levels(rx, self.level_pcts)
        self.levels_edit.setText(format_levels(self.level_pcts))
        self.levels_edit.setStyleSheet("")
        self.level_box.blockSignals(True)
        self.level_box.clear()
        for lev in self.levels:
            self.level_box.addItem(f"{lev.pct:g}%  ({lev.gy:.3g} Gy)", lev.gy)
        target = 95.0 if keep is None else keep
        self.level_box.setCurrentIndex(int(np.argmin([abs(p - target) for p in self.level_pcts])))
        self.level_box.blockSignals(False)
        self._push_levels()
        if self.worker is not None:
            self.last_job_id = self.worker.engine.set_surface_level(self.selected_level_gy)

    def set_isodose_levels(self, text: str) -> bool:
        """Apply isodose levels typed by the planner (% or Gy, see
        :func:`~ids_engine.viewer._style.parse_isodose_levels`); a bad entry is reported and
        changes nothing. Returns whether the levels were applied."""
        rx = self.display_rx_gy if self.session is not None else 100.0
        try:
            pcts = parse_isodose_levels(text, rx)
        except ValueError as exc:
            self.levels_edit.setStyleSheet("QLineEdit { border: 1px solid #e5534b; }")
            self.statusBar().showMessage(f"⚠ Isodose levels not changed: {exc}", 8000)
            return False
        self._set_levels(pcts)
        shown = ", ".join(f"{lev.pct:.4g}% ({lev.gy:.3g} Gy)" for lev in self.levels)
        self.statusBar().showMessage(f"Isodose levels: {shown}", 5000)
        return True

    def _on_levels_typed(self) -> None:
        self.set_isodose_levels(self.levels_edit.text())

    def _on_dose_mode(self, _index: int) -> None:
        mode = self.dose_mode_box.currentData() or "plan"
        if mode == "difference" and self.reference_gy is None:
            return
        for v in self.slice_views.values():
            v.set_dose_mode(mode)
        self.legend.set_mode(mode)
        self._update_readout()

    def _push_levels(self) -> None:
        unit = self.unit_box.currentText()
        for v in self.slice_views.values():
            v.set_levels(self.levels, self.selected_level_gy, unit)

    def _on_level_changed(self, _index: int) -> None:
        self._push_levels()
        if self.worker is not None:
            self.last_job_id = self.worker.engine.set_surface_level(self.selected_level_gy)

    def _set_label_unit(self, unit: str) -> None:
        if self.unit_box.currentText() != unit:
            self.unit_box.setCurrentText(unit)
            return
        self.act_percent.setChecked(unit == "%")
        self._push_levels()

    def _toggle_wash(self, on: bool) -> None:
        for s in self.slice_views.values():
            s.set_wash_alpha(self.wash_slider.value() / 100.0 if on else 0.0)

    def _on_preset(self, name: str) -> None:
        if name in WINDOW_PRESETS:
            w, lvl = WINDOW_PRESETS[name]
            for box, v in ((self.window_box, w), (self.level_hu_box, lvl)):
                box.blockSignals(True)
                box.setValue(v)
                box.blockSignals(False)
            self._apply_window()

    def _on_window_boxes(self, _value=None) -> None:
        self.preset_box.blockSignals(True)
        self.preset_box.setCurrentText("Custom")
        for name, (w, lvl) in WINDOW_PRESETS.items():
            if (w, lvl) == (self.window_box.value(), self.level_hu_box.value()):
                self.preset_box.setCurrentText(name)
        self.preset_box.blockSignals(False)
        self._apply_window()

    def _on_window_drag(self, window: float, level: float) -> None:
        for box, v in ((self.window_box, window), (self.level_hu_box, level)):
            box.blockSignals(True)
            box.setValue(v)
            box.blockSignals(False)
        self._on_window_boxes()

    def _apply_window(self) -> None:
        for v in self.slice_views.values():
            v.set_window(self.window_box.value(), self.level_hu_box.value())

    def reset_views(self) -> None:
        for v in self.slice_views.values():
            v.reset_zoom()

    def set_tool(self, tool: str) -> None:
        self.tool_actions[tool].setChecked(True)
        for v in self.slice_views.values():
            v.set_tool(tool)
        self.view3d.set_tool(tool)
        tip = {name: tip for name, _, _, tip in _TOOLS}[tool]
        self.statusBar().showMessage(tip, 5000)

    # ------------------------------------------------------------------ navigation
    def display_index_zyx(self) -> tuple[int, int, int]:
        """The displayed slices: the axial view's z, the coronal's y, the sagittal's x."""
        return tuple(self.slice_views[a].slice_index for a in "zyx")

    def _push_display_index(self) -> None:
        """Tell the worker which slices are displayed (what a preview copies to the host)."""
        if self.worker is not None:
            self.worker.engine.set_display_index(self.display_index_zyx())

    def _on_crosshair(self, zyx) -> None:
        for axis, v in self.slice_views.items():
            v.set_crosshair(zyx)
            v.set_slice(int(round(zyx["zyx".index(axis)])))
        self._push_display_index()

    def _on_slice_changed(self, axis: str, index: int) -> None:
        k = "zyx".index(axis)
        zyx = list(self.slice_views["z"].crosshair_zyx)
        zyx[k] = float(index)
        for v in self.slice_views.values():
            v.set_crosshair(zyx)
        self._push_display_index()

    def _on_hover(self, zyx, axis: str | None = None) -> None:
        """The mouse moved over a slice view (``zyx`` in voxel units, None: off the image)."""
        if zyx is not None and axis is not None:
            for a, v in self.slice_views.items():  # one brush ring: the view under the mouse
                if a != axis:
                    v.hide_brush()
        self._hover_zyx = None if zyx is None else tuple(float(v) for v in zyx)
        self._update_readout()

    def readout_index(self) -> tuple[int, int, int] | None:
        """The voxel (index_zyx) the read-out describes, or None."""
        if self._hover_zyx is None or self.session is None:
            return None
        shape = self.session.patient.grid.shape_zyx
        return tuple(int(np.clip(round(v), 0, n - 1)) for v, n in zip(self._hover_zyx, shape))

    def _update_readout(self) -> None:
        """The read-out under the cursor, from the newest snapshot (called on every hover and
        every snapshot, so it never shows a dose from before a request)."""
        idx = self.readout_index()
        if idx is None:
            self.readout.setText("")
            return
        p = self.session.patient
        x, y, z = p.grid.index_to_world(idx)
        text = f"voxel {voxel_text(idx)}   ·   x {x:.1f}  y {y:.1f}  z {z:.1f} mm   ·   {p.ct_hu[idx]:.0f} HU"
        rx = self.display_rx_gy
        d = self.dose_at(idx)
        if d is not None:
            text += f"   ·   {d:.2f} Gy ({100.0 * d / rx:.1f} %)"
            if self.reference_gy is not None:
                ref = float(self.reference_gy[idx])
                text += (f"   ·   reference {ref:.2f} Gy, plan − reference {d - ref:+.2f} Gy "
                         f"({100.0 * (d - ref) / rx:+.1f} %)")
        else:
            text += "   ·   dose not computed yet"
        names = [s.name for s in p.structures if s.mask[idx]]
        if names:
            text += "   ·   " + ", ".join(names)
        self.readout.setText(text)

    def dose_at(self, index_zyx) -> float | None:
        """The displayed plan dose (Gy) at a voxel: a preview's slice when the voxel lies on one
        of the slices it carries, else the newest final cube; None before the first dose."""
        idx = tuple(int(v) for v in index_zyx)
        r = self.snapshot.readout if self.snapshot is not None else None
        if r is not None:
            (k, j, i), (k0, j0, i0) = idx, r.index_zyx
            if k == k0:
                return float(r.axial_gy[j, i])
            if j == j0:
                return float(r.coronal_gy[k, i])
            if i == i0:
                return float(r.sagittal_gy[k, j])
        return None if self.dose_gy is None else float(self.dose_gy[idx])

    # ------------------------------------------------------------------ requests
    def _submit(self, request) -> int:
        self.last_job_id = self.worker.engine.submit(request)
        return self.last_job_id

    def select_voxel(self, index_zyx) -> None:
        """Select a voxel for the set-dose tool and put its current dose in the dose box."""
        if self.session is None:
            return
        self.selected_voxel = tuple(int(v) for v in index_zyx)
        for v in self.slice_views.values():
            v.set_marker(self.selected_voxel)
        self.dose_box.setEnabled(True)
        d = self.dose_at(self.selected_voxel)
        if d is not None:
            self.dose_box.blockSignals(True)
            self.dose_box.setValue(d)
            self.dose_box.blockSignals(False)
        self.dose_box.setFocus()
        self.dose_box.selectAll()
        self.statusBar().showMessage(f"Voxel {voxel_text(self.selected_voxel)}: type its dose and press Enter, "
                                     "or scroll", 6000)

    def set_voxel_dose(self, dose_gy: float) -> int:
        """Request the selected voxel's dose (what Enter in the dose box does)."""
        return self._submit(SetVoxelDose(self.selected_voxel, float(dose_gy)))

    def _on_dose_value(self, value: float) -> None:
        if self.selected_voxel is not None and self.worker is not None:
            self.set_voxel_dose(value)

    def _on_brush(self, tool: str, centre_zyx) -> None:
        if self.worker is None:
            return
        r = self.radius_box.value()
        rx = self.session.prescription_gy
        if tool == "erase":
            lo, hi = sorted((self.erase_low.value(), self.erase_high.value()))
            self._submit(EraseSpot(centre_zyx, r, lo / 100.0 * rx, hi / 100.0 * rx, self.erase_structure.currentData()))
        else:
            names = set(self.snapshot.pin_names) if self.snapshot else set()
            n = 1
            while f"pin {n}" in names:
                n += 1
            self._submit(Pin(f"pin {n}", centre_zyx, r))

    def remove_pins(self) -> None:
        if self.snapshot is not None and self.worker is not None:
            for name in self.snapshot.pin_names:
                self._submit(Unpin(name))

    def undo(self) -> None:
        if self.worker is not None and not self._dragging():
            self.last_job_id = self.worker.engine.undo()

    def redo(self) -> None:
        if self.worker is not None and not self._dragging():
            self.last_job_id = self.worker.engine.redo()

    def _on_history_goto(self, n: int) -> None:
        if self.worker is not None and not self._dragging():
            self.last_job_id = self.worker.engine.goto(n)

    def _dragging(self) -> bool:
        return self._drag is not None

    # Isodose line drag: previews while moving, one committed request on release.
    def _on_line_drag_started(self, axis: str, slice_index: int, start_rc) -> None:
        self._groups += 1
        self._drag = {"group": self._groups, "axis": axis, "slice": slice_index, "start": tuple(start_rc),
                      "level": self.selected_level_gy, "last": tuple(start_rc)}

    def _line_request(self, end_rc) -> MoveIsodoseLine:
        d = self._drag
        return MoveIsodoseLine(d["axis"], d["slice"], d["level"], d["start"], tuple(end_rc))

    def _on_line_drag_moved(self, rc) -> None:
        d = self._drag
        if d is None or "axis" not in d or np.hypot(*np.subtract(rc, d["last"])) < 0.5:
            return
        d["last"] = tuple(rc)
        self.last_job_id = self.worker.engine.preview(self._line_request(rc), d["group"], self.display_index_zyx())

    def _on_line_drag_finished(self, rc) -> None:
        d = self._drag
        if d is None or "axis" not in d:
            return
        moved = np.hypot(*np.subtract(rc, d["start"])) >= 0.5
        self.last_job_id = self.worker.engine.commit(self._line_request(rc) if moved else None, d["group"])
        self._pending_commit = self.last_job_id
        self._drag = None

    def _on_drag_cancelled(self) -> None:
        if self._drag is not None:
            self.last_job_id = self.worker.engine.commit(None, self._drag["group"])
            self._pending_commit = self.last_job_id
            self._drag = None

    # Isodose surface drag (3D view).
    def _on_surface_drag_started(self, start_zyx) -> None:
        self._groups += 1
        self._drag = {"group": self._groups, "start_zyx": tuple(start_zyx), "level": self.selected_level_gy,
                      "last": tuple(start_zyx)}

    def _surface_request(self, end_zyx) -> MoveIsodoseSurface:
        d = self._drag
        return MoveIsodoseSurface(d["level"], d["start_zyx"], tuple(end_zyx))

    def _on_surface_drag_moved(self, end_zyx) -> None:
        d = self._drag
        if d is None or "start_zyx" not in d or np.linalg.norm(np.subtract(end_zyx, d["last"])) < 0.5:
            return
        d["last"] = tuple(end_zyx)
        self.last_job_id = self.worker.engine.preview(self._surface_request(end_zyx), d["group"],
                                                      self.display_index_zyx())

    def _on_surface_drag_finished(self, end_zyx) -> None:
        d = self._drag
        if d is None or "start_zyx" not in d:
            return
        moved = np.linalg.norm(np.subtract(end_zyx, d["start_zyx"])) >= 0.5
        self.last_job_id = self.worker.engine.commit(self._surface_request(end_zyx) if moved else None, d["group"])
        self._pending_commit = self.last_job_id
        self._drag = None

    # ------------------------------------------------------------------ snapshots
    @property
    def idle(self) -> bool:
        """True when the newest submitted job's snapshot is shown and no drag is under way."""
        return self.snapshot is not None and self.snapshot.job_id >= self.last_job_id and self._drag is None

    def show_isodose_control(self) -> None:
        from .isodose_control import IsodoseControl

        if getattr(self, "_isodose_control", None) is None:
            self._isodose_control = IsodoseControl(self)
        self._isodose_control.refresh()
        self._isodose_control.show()
        self._isodose_control.raise_()

    def show_forward_planning(self):
        """Plan → Forward planning…: one non-modal dialog on the session's patient (raised if open)."""
        from .forward_dialog import ForwardPlanningDialog

        if self.session is None:
            self.statusBar().showMessage("Open a case first: forward planning needs a patient", 4000)
            return None
        dlg = getattr(self, "_forward_dialog", None)
        if dlg is None or dlg.session is not self.session:
            if dlg is not None:  # a new case: the old dialog's plans were for the old patient
                dlg.close()
                dlg.deleteLater()
            dlg = self._forward_dialog = ForwardPlanningDialog(self)
        dlg.show()
        dlg.raise_()
        dlg.activateWindow()
        return dlg

    def show_plan_dvhs(self):
        """DVH → DVHs of plans…: the seed's DVH popup over the forward plans (and the shaping
        session's dose), opened from the forward-planning dialog."""
        dlg = self.show_forward_planning()
        return None if dlg is None else dlg.show_dvh_dialog()

    def save_physics_summary_dialog(self) -> None:
        """Plan → Physics summary (PDF)…: the forward dialog's selected plan's summary
        (Markdown, HTML and PDF) into a folder."""
        dlg = self.show_forward_planning()
        if dlg is None:
            return
        if dlg.state.book.selected is None or dlg.plan.n_beams == 0:
            self.statusBar().showMessage("Forward planning: make a plan with beams first", 5000)
            return
        folder = QtWidgets.QFileDialog.getExistingDirectory(self, "Folder for the physics summary (PDF)")
        if folder:
            dlg.save_summary(folder, pdf=True)

    def show_sampled_dvh(self) -> None:
        from .dvh_sampling import SampledDVHDialog

        if self.session is None or self.dose_gy is None:
            self.statusBar().showMessage("Open a case first: no dose to sample", 4000)
            return
        dlg = SampledDVHDialog(self.dose_gy, self.session.patient, self.display_rx_gy,
                               self.plan_label() if self.snapshot else "plan", parent=self)
        dlg.setAttribute(QtCore.Qt.WidgetAttribute.WA_DeleteOnClose)
        dlg.show()

    # ------------------------------------------------------------------ forward plans in the frames
    def show_plan(self, shown) -> int | None:
        """Display a forward plan's dose (a :class:`~._shown.ShownPlan`) in the slices,
        isodoses, 3D view, DVH and metrics instead of the session's, with its plan ID in every
        frame's header, the title and the status bar; None shows the session's dose again.
        The worker computes the snapshots (one worker, CONVENTIONS item 6); returns the job id."""
        if self.worker is None:
            return None
        self.last_job_id = self.worker.engine.show_plan(shown)
        return self.last_job_id

    def show_session_dose(self) -> int | None:
        """Plan → Show the shaping session's dose (after a forward plan was displayed)."""
        dlg = getattr(self, "_forward_dialog", None)
        if dlg is not None:
            dlg.follow_box.setChecked(False)  # the dialog stops sending its selected plan
        return self.show_plan(None)

    def plan_label(self) -> str:
        """What the frames show, with its plan ID: "shaping session, plan ID 4" or
        "forward plan 'Box', plan ID 7"."""
        if self.shown_plan is not None:
            return self.shown_plan.label
        return f"shaping session, plan ID {self.snapshot.plan_id}" if self.snapshot is not None else ""

    def _apply_shown(self, shown) -> None:
        """The displayed plan changed (a snapshot says so): 100 % now means its reference
        dose; shaping tools are off while a forward plan is shown."""
        self.shown_plan = shown
        rx = shown.reference_gy if shown is not None else self.session.prescription_gy
        self.display_rx_gy = float(rx)
        for v in self.slice_views.values():
            v.set_prescription(rx)
        self.legend.set_prescription(rx)
        self.dvh.plot.prescription_gy = float(rx)
        self._set_levels(self.level_pcts)
        self.act_show_session.setEnabled(shown is not None)
        self._set_enabled(True)
        if shown is not None:
            if self._drag is not None:
                self._on_drag_cancelled()
            self.set_tool("navigate")
            self.statusBar().showMessage(f"Showing {shown.label}: 100 % = {rx:.4g} Gy ({shown.reference_note}); "
                                         "shaping is off until Plan → Show the shaping session's dose", 8000)
        iso = getattr(self, "_isodose_control", None)
        if iso is not None:
            iso.refresh()

    def _show_plan_tags(self) -> None:
        label = self.plan_label()
        tag = self.shown_plan.frame_tag if self.shown_plan is not None else (
            f"shaping · plan ID {self.snapshot.plan_id}" if self.snapshot is not None else "")
        for v in self.slice_views.values():
            v.set_plan_tag(tag)
        self.view3d.set_plan_tag(tag)
        name = self.session.patient.name if self.session is not None else ""
        self.setWindowTitle(f"ids-engine — {name}" + (f" — {label}" if self.shown_plan is not None else ""))

    def _on_snapshot(self, snap: Snapshot) -> None:
        t0 = time.perf_counter()
        self.snapshot = snap
        if snap.final and snap.shown is not self.shown_plan:
            self._apply_shown(snap.shown)
        self._show_plan_tags()
        if snap.dose_gy is not None:
            self.dose_gy = snap.dose_gy
            points_of = self.session.patient if self.session is not None else None
            if snap.shown is not None and snap.shown.patient is not None:
                points_of = snap.shown.patient
            marks = patient_point_marks(points_of, snap.dose_gy) if points_of is not None else ()
            for v in self.slice_views.values():
                v.set_dose(snap.dose_gy, snap.pins_mask)
                v.set_points(marks)
            self.view3d.set_dose(snap.dose_gy)
        elif snap.readout is not None:
            # A preview: each view shows its slice if it is the one displayed, else keeps its
            # image; the 3D view keeps the last final dose.
            r = snap.readout
            for axis, sl in (("z", r.axial_gy), ("y", r.coronal_gy), ("x", r.sagittal_gy)):
                self.slice_views[axis].set_preview(sl, r.index_zyx["zyx".index(axis)], snap.pins_mask)
        if snap.surface is not None:
            lev = self._selected_level()
            self.view3d.set_surface(snap.surface, snap.surface_level_gy, lev.colour if lev else (1.0, 0.8, 0.1))
        if snap.dvhs is not None:
            # The session's curves as before ("plan 7"); a forward plan's by name and plan ID.
            self.dvh.set_curves(snap.dvhs, self.shown_plan.label if self.shown_plan is not None
                                else f"plan {snap.plan_id}")
        if snap.metrics is not None:
            self.metrics.set_metrics(snap.metrics)
        if snap.field is not None:
            self.field.set_curves(snap.field)
        self.history.set_history(snap.history, snap.undone)
        self._update_readout()  # the dose under the cursor is this snapshot's, not the last hover's
        if self._pending_commit and snap.job_id >= self._pending_commit:
            self._pending_commit = 0
            for v in self.slice_views.values():
                v.clear_drag_preview()
            self.view3d.clear_drag_preview()
        idle = self._drag is None and not self._loader.busy and not self.display_only and self.shown_plan is None
        self.act_undo.setEnabled(idle and bool(snap.history))
        self.act_redo.setEnabled(idle and bool(snap.undone))
        self.act_unpin.setEnabled(bool(snap.pin_names))
        found = list(snap.outcome.get("conflicts", ())) if snap.outcome is not None else []
        conflicts = [c["message"] for c in found if c.get("kind") != "rise"]
        side_effects = [c["message"] for c in found if c.get("kind") == "rise"]
        number = next((e.number for e in snap.history if snap.outcome and e.id == snap.outcome["id"]), None)
        if self._awaiting_dose:
            self._awaiting_dose = False
            notes = "; ".join(self._case_notes)
            self.statusBar().showMessage(f"Ready: {self.session.patient.name}" + (f". {notes}" if notes else ""),
                                         12000 if notes else 3000)
        elif snap.final and (conflicts or side_effects):
            # Never silent: what recovery could not keep, and far tissue that rose unasked,
            # stays longer than the usual read-out.
            self.statusBar().showMessage(conflict_status_text(conflicts, side_effects), CONFLICT_MESSAGE_MS)
        elif snap.outcome is not None and snap.final and snap.outcome["final_gy"]:
            r = snap.outcome
            self.statusBar().showMessage(
                f"#{number or r['id']}: requested {r['requested_gy'][0]:.2f} Gy, reached {r['final_gy'][0]:.2f} Gy "
                f"after {r['recovery_steps']} recovery steps", 5000)
        if snap.save_refused:
            folder = snap.save_refused
            QtCore.QTimer.singleShot(0, lambda: self._on_save_refused(folder))
        # Frame time: applying the snapshot plus the canvas draws it causes (added as they end).
        self._frame_ms = (time.perf_counter() - t0) * 1000.0
        self._latency_ms = (time.perf_counter() - snap.submitted_at) * 1000.0
        self._update_perf()

    def _update_perf(self) -> None:
        snap = self.snapshot
        if snap is None:
            return
        kind = "preview" if not snap.final else snap.job_kind
        self.perf.setText(f"{self.plan_label()}   ·   engine {snap.engine_ms:5.0f} ms ({kind})   ·   "
                          f"latency {self._latency_ms:5.0f} ms   ·   frame {self._frame_ms:4.0f} ms   ·   "
                          f"coalesced {snap.dropped}")

    def _on_worker_message(self, text: str, error: bool) -> None:
        self.statusBar().showMessage(("⚠ " if error else "") + text, 6000 if error else 4000)

    def _draw_started(self, key: int) -> None:
        self._draw_t0[key] = time.perf_counter()

    def _draw_ended(self, key: int) -> None:
        t = self._draw_t0.pop(key, None)
        if t is not None:
            self._frame_ms += (time.perf_counter() - t) * 1000.0
            self._update_perf()


def _journal_folder(session: Session) -> Path | None:
    return session.folder


def _same_folder(a, b) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def launch(case: dict | None = None, session_folder: str | None = None) -> int:
    """Open the viewer and run the Qt event loop; returns the exit status.

    Parameters
    ----------
    case : a case description to open ({"phantom": name, "resolution": r}, {"dicom": folder} or
        {"matrad": file}; an optional "prescription_gy" key, default 60 Gy), or None.
    session_folder : a saved session to reopen instead (see :meth:`Session.save`), or None.
    """
    use_qt()
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    app.setApplicationName("ids-engine viewer")
    apply_theme(app)
    window = MainWindow()
    window.show()
    if session_folder:
        window.open_session(str(session_folder))
    elif case:
        window.open_case(dict(case))
    return app.exec()
