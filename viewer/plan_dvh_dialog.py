"""The DVH popup of seed 001: DVHs of several plans together.

"Under the Select Volumes pull down on the popup will be a list of the plans. For each plan
... a list of all the volumes ... Each volume will be displayed in its chosen display color.
The line style will change each time the same volume is reselected for a different plan."

A tree of the forward-planning dialog's plans (and the shaping session's dose, when the main
window has one), each with the patient's structures to tick; the method (exact: every voxel
with partial volumes; or random sampling to 1 point per mm^3, converging live and
stoppable); % or cc; "Save PNG…" writes the same picture with
:func:`ids_engine.evaluation._dvh_plot.plans_dvh_png`.

Threads: the plans' doses per MU come from the forward dialog's own task (the one thread
that runs its engines); the DVHs are host NumPy work over those dose cubes, run on a plain
thread here like :class:`~.dvh_sampling.SampledDVHDialog`; curves reach the GUI thread by
queued signals and :class:`~.dvh.DVHPlot` draws them (first plan solid, the others dashed,
dotted, dash-dot).
"""

from __future__ import annotations

import threading

from PyQt6 import QtCore, QtWidgets

from ids_engine.evaluation import exact_dvh, sample_dvhs
from ids_engine.evaluation._dvh_plot import plans_dvh_png
from ids_engine.evaluation._dvh_sampling import DVHCurve

from .dvh import DVHPlot, _CurveSet
from .dvh_sampling import start_dvh_thread

__all__ = ["PlanDVHDialog", "SESSION_PLAN"]

SESSION_PLAN = "shaping session"


class PlanDVHDialog(QtWidgets.QDialog):
    """DVHs of several plans of a :class:`~.forward_dialog.ForwardPlanningDialog`."""

    curves_ready = QtCore.pyqtSignal(object, object, object)  # (plan label, tuple of DVH, run id)
    finished = QtCore.pyqtSignal(str, object)  # (how it ended, run id)

    def __init__(self, forward, parent=None) -> None:
        super().__init__(parent or forward)
        self.setWindowTitle("Dose-volume histograms of plans")
        self.setObjectName("plan-dvhs")
        self.forward = forward
        self.patient = forward.state.patient
        self.results: dict[str, tuple] = {}  # plan label -> tuple of DVH (the newest curves)
        self.order: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._run = 0
        self.status_text = ""

        self.tree = QtWidgets.QTreeWidget()
        self.tree.setHeaderLabels(["Plans and volumes"])
        self.tree.setMaximumWidth(230)
        self.method_box = QtWidgets.QComboBox()
        self.method_box.addItems(["exact", "sampled"])
        self.method_box.setToolTip("exact: every voxel, partial volumes at the edges; sampled: random points "
                                   "(Niemierko and Goitein 1990) until 1 per mm³")
        self.unit_box = QtWidgets.QComboBox()
        self.unit_box.addItems(["Volume %", "Volume cc"])
        self.compute_button = QtWidgets.QPushButton("Compute")
        self.stop_button = QtWidgets.QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.save_button = QtWidgets.QPushButton("Save PNG…")
        self.status = QtWidgets.QLabel("")
        self.status.setObjectName("planDvhStatus")
        self.status.setWordWrap(True)
        self.plot = DVHPlot()
        self.plot.colours = {s.name: tuple(s.colour) for s in self.patient.structures}
        top = QtWidgets.QHBoxLayout()
        top.addWidget(self.method_box)
        top.addWidget(self.unit_box)
        top.addWidget(self.status, 1)
        for b in (self.compute_button, self.stop_button, self.save_button):
            top.addWidget(b)
        body = QtWidgets.QHBoxLayout()
        body.addWidget(self.tree)
        body.addWidget(self.plot, 1)
        lay = QtWidgets.QVBoxLayout(self)
        lay.addLayout(top)
        lay.addLayout(body, 1)
        self.resize(820, 460)
        self.compute_button.clicked.connect(self.compute)
        self.stop_button.clicked.connect(self.stop)
        self.save_button.clicked.connect(self._save_clicked)
        self.unit_box.currentIndexChanged.connect(self._on_unit)
        self.curves_ready.connect(self._on_curves)
        self.finished.connect(self._on_finished)
        self.refresh_plans()

    # ------------------------------------------------------------------ the tree
    def _session_dose(self):
        w = self.forward.main_window
        if w is None or getattr(w, "session", None) is None or w.session.patient.grid != self.patient.grid:
            return None
        snap = getattr(w, "snapshot", None)
        # The session's newest dose: only while the window shows it (not a forward plan's).
        if snap is None or getattr(w, "shown_plan", None) is not None or w.dose_gy is None:
            return None
        return f"{SESSION_PLAN} (plan ID {snap.plan_id})", w.dose_gy

    def plan_names(self) -> list[str]:
        names = list(self.forward.state.book.names)
        return names + ([SESSION_PLAN] if self._session_dose() is not None else [])

    def refresh_plans(self) -> None:
        """List the plans (keeping the ticks of plans and volumes still there)."""
        ticked = set(self.chosen_pairs()) if self.tree.topLevelItemCount() else None
        selected = self.forward.state.book.selected
        self.tree.clear()
        names = [s.name for s in self.patient.structures if not s.is_empty]
        for plan in self.plan_names():
            top = QtWidgets.QTreeWidgetItem([plan])
            for n in names:
                child = QtWidgets.QTreeWidgetItem([n])
                child.setFlags(child.flags() | QtCore.Qt.ItemFlag.ItemIsUserCheckable)
                if ticked is None:
                    kind = self.patient.structure(n).kind.value
                    on = plan == selected and kind != "external"
                else:
                    on = (plan, n) in ticked
                child.setCheckState(0, QtCore.Qt.CheckState.Checked if on else QtCore.Qt.CheckState.Unchecked)
                top.addChild(child)
            self.tree.addTopLevelItem(top)
            top.setExpanded(True)

    def set_chosen(self, pairs) -> None:
        """Tick exactly these (plan, volume) pairs (tests, scripts)."""
        want = {tuple(p) for p in pairs}
        for i in range(self.tree.topLevelItemCount()):
            top = self.tree.topLevelItem(i)
            for j in range(top.childCount()):
                c = top.child(j)
                on = (top.text(0), c.text(0)) in want
                c.setCheckState(0, QtCore.Qt.CheckState.Checked if on else QtCore.Qt.CheckState.Unchecked)

    def chosen_pairs(self) -> list[tuple[str, str]]:
        out = []
        for i in range(self.tree.topLevelItemCount()):
            top = self.tree.topLevelItem(i)
            for j in range(top.childCount()):
                c = top.child(j)
                if c.checkState(0) == QtCore.Qt.CheckState.Checked:
                    out.append((top.text(0), c.text(0)))
        return out

    # ------------------------------------------------------------------ computing
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def compute(self) -> bool:
        """Compute the ticked plans' doses (forward dialog's thread), then their DVHs here."""
        pairs = self.chosen_pairs()
        if not pairs:
            self.status.setText("Tick at least one volume of one plan")
            return False
        plans: list[str] = []
        for plan, _ in pairs:
            if plan not in plans:
                plans.append(plan)
        session = self._session_dose() if SESSION_PLAN in plans else None
        book_plans = [p for p in plans if p != SESSION_PLAN]
        state = self.forward.state
        for p in book_plans:
            if state.book.get(p).n_beams == 0 or not any(m > 0 for m in state.book.get(p).mu):
                self.status.setText(f"plan {p!r} has no MU: apply a prescription or an auto weight first")
                return False
        self.stop()
        self._run += 1
        run = self._run
        labels = {p: f"{p} (plan ID {state.book.get(p).plan_id})" for p in book_plans}

        def doses(progress):
            try:
                return {p: state.plan_dose(p, progress) for p in book_plans}
            except ValueError as exc:  # reported here, so the Compute button comes back
                return exc

        def done(cubes):
            if run != self._run:
                return
            if isinstance(cubes, Exception):
                self.compute_button.setEnabled(True)
                self.status.setText(f"no DVHs: {cubes}")
                return
            jobs = []
            for p in plans:
                label, dose = (labels[p], cubes[p]) if p != SESSION_PLAN else session
                jobs.append((label, dose, [v for q, v in pairs if q == p]))
            self._start_dvhs(jobs, run)

        self.status.setText("computing the plans' doses…")
        self.compute_button.setEnabled(False)
        if not book_plans:
            done({})
            return True
        if not self.forward._start("Doses of the plans for the DVHs", doses, done):
            self.compute_button.setEnabled(True)
            self.status.setText("the forward-planning dialog is busy: try again when it is done")
            return False
        return True

    def _start_dvhs(self, jobs, run) -> None:
        """``jobs``: (plan label, dose cube, volume names) in plan order."""
        method = self.method_box.currentText()
        grid = self.patient.grid
        structures = {s.name: s for s in self.patient.structures}
        self._stop = threading.Event()
        stop = self._stop
        self.results, self.order = {}, [label for label, _, _ in jobs]
        # Common bins for all plans: 1/500 of the highest dose (0.1 Gy for 50 Gy, 4 mGy for 2 Gy).
        self.bin_gy = bin_gy = max(max(float(d.max()) for _, d, _ in jobs) / 500.0, 1e-4)
        self.plot.current, self.plot.snapshots = None, []
        self.status.setText("running")
        self.stop_button.setEnabled(True)

        def work():
            for label, dose, vols in jobs:
                chosen = [structures[v] for v in vols]
                if method == "exact":
                    self.curves_ready.emit(label, tuple(exact_dvh(s.name, dose, s.mask, grid, bin_gy=bin_gy)
                                                        for s in chosen), run)
                else:
                    for state in sample_dvhs(dose, chosen, grid, bin_gy=bin_gy, cancel=stop.is_set):
                        self.curves_ready.emit(label, state.dvhs, run)
                if stop.is_set():
                    break

        self._thread = start_dvh_thread(work, "plan-dvhs", stop, lambda how: self.finished.emit(how, run))

    def stop(self) -> None:
        """The seed's stop button: the curves drawn so far stay."""
        self._stop.set()

    def wait(self, timeout_s: float = 60.0) -> bool:
        """Process events until the plans' doses and DVHs are done (tests, closing)."""
        import time

        app = QtWidgets.QApplication.instance()
        t0 = time.perf_counter()
        while (self.forward.busy or self.running or not self.compute_button.isEnabled()) and \
                time.perf_counter() - t0 < timeout_s:
            app.processEvents()
            time.sleep(0.005)
        app.processEvents()
        return not self.running

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        self.stop()
        if self._thread is not None:
            self._thread.join(5.0)
        super().closeEvent(event)

    # ------------------------------------------------------------------ GUI thread
    def _on_curves(self, label, dvhs, run) -> None:
        if run != self._run:
            return
        self.results[label] = tuple(dvhs)
        sets = [_CurveSet(lab, self.results[lab]) for lab in self.order if lab in self.results]
        self.plot.current = sets[0] if sets else None
        self.plot.snapshots = sets[1:]
        self.plot.update()

    def _on_finished(self, how: str, run) -> None:
        if run != self._run:
            return
        self.compute_button.setEnabled(True)
        self.stop_button.setEnabled(False)
        self.status_text = how
        n = sum(len(v) for v in self.results.values())
        self.status.setText(f"{how}: {n} curves of {len(self.results)} plans (line style per plan)")

    def _on_unit(self, index: int) -> None:
        self.plot.volume_unit = "%" if index == 0 else "cc"
        self.plot.update()

    def curves(self) -> list[DVHCurve]:
        """The curves shown, as :class:`~ids_engine.evaluation.DVHCurve` (plan order kept)."""
        out = []
        for lab in self.order:
            for h in self.results.get(lab, ()):
                out.append(DVHCurve(lab, h, tuple(self.plot.colours.get(h.name, (0.5, 0.5, 0.5)))))
        return out

    def save_png(self, path) -> bool:
        curves = self.curves()
        if not curves:
            self.status.setText("Compute the DVHs first")
            return False
        unit = "%" if self.unit_box.currentIndex() == 0 else "cc"
        method = self.method_box.currentText()
        plans_dvh_png(path, curves, volume=unit, title=f"DVHs ({method}): " + ", ".join(self.order))
        self.status.setText(f"saved {path}")
        return True

    def _save_clicked(self) -> None:
        path, _ = QtWidgets.QFileDialog.getSaveFileName(self, "Save the DVHs as PNG", "dvhs.png", "PNG (*.png)")
        if path:
            self.save_png(path)

