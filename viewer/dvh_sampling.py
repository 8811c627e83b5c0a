"""The DVH popup of seed 001: DVHs by random sampling (Niemierko and Goitein 1990), updated as
they converge, with "running" shown while points are drawn and a Stop button.

The sampling (:func:`ids_engine.evaluation.sample_dvhs`) runs on a plain thread over a host
copy of the displayed dose cube (it is host NumPy work, not the engine's); each round's curves
reach the GUI thread through a queued signal, where :class:`DVHPlot` draws them solid over
the exact DVHs (dashed, computed first on the same thread). It stops by itself when every
chosen structure has more than ``density`` points per mm^3 (the seed: 1), or on Stop.
"""

from __future__ import annotations

import threading

import numpy as np
from PyQt6 import QtCore, QtWidgets

from ids_engine.evaluation import exact_dvh, sample_dvhs

from .dvh import DVHPlot, _CurveSet

__all__ = ["SampledDVHDialog"]


def start_dvh_thread(work, name: str, stop: threading.Event, finished) -> threading.Thread:
    """Run ``work()`` on a daemon thread, then ``finished(how)``: "done", "stopped" (``stop``
    was set) or "failed: <error>" (shown, never raised on a thread nobody joins)."""

    def run():
        how = "done"
        try:
            work()
            if stop.is_set():
                how = "stopped"
        except Exception as exc:  # noqa: BLE001
            how = f"failed: {exc}"
        finished(how)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


class SampledDVHDialog(QtWidgets.QDialog):
    """DVH by random sampling for a dose cube and a patient's structures.

    Parameters
    ----------
    dose_gy : host (z, y, x) Gy on the patient's grid (the window's newest final dose).
    patient : :class:`ids_engine.model.Patient`.
    prescription_gy : drawn as a reference line.
    plan_label : e.g. "plan 7" (the plan ID), shown in the legend.
    density_per_mm3, seed : as :func:`sample_dvhs`.
    """

    state_ready = QtCore.pyqtSignal(object, object)  # (DVHSamplingState, run id)
    exact_ready = QtCore.pyqtSignal(object, object)  # (tuple of DVH, run id)
    finished = QtCore.pyqtSignal(str, object)  # (how it ended, run id)

    def __init__(self, dose_gy: np.ndarray, patient, prescription_gy: float, plan_label: str = "plan", *,
                 density_per_mm3: float = 1.0, seed: int = 0, parent=None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Dose-volume histograms by random sampling")
        self.setObjectName("dvh-sampling")
        self.dose_gy = np.array(dose_gy, dtype=np.float32, copy=True)
        self.patient = patient
        self.plan_label = plan_label
        self.density_per_mm3 = float(density_per_mm3)
        self.seed = int(seed)
        # Bins of 1/600 of the prescription: 0.1 Gy for 60 Gy, 3.3 mGy for a 2 Gy forward plan.
        self.bin_gy = max(float(prescription_gy) / 600.0, 1e-4)
        self.last_state = None
        self.exact: tuple = ()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._run = 0

        self.structure_list = QtWidgets.QListWidget()
        self.structure_list.setMaximumWidth(170)
        for s in patient.structures:
            if s.is_empty:
                continue
            item = QtWidgets.QListWidgetItem(s.name)
            item.setFlags(item.flags() | QtCore.Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(QtCore.Qt.CheckState.Unchecked if s.kind.value == "external"
                               else QtCore.Qt.CheckState.Checked)
            self.structure_list.addItem(item)
        self.plot = DVHPlot()
        self.plot.colours = {s.name: tuple(s.colour) for s in patient.structures}
        self.plot.prescription_gy = float(prescription_gy)
        self.unit_box = QtWidgets.QComboBox()
        self.unit_box.addItems(["Volume %", "Volume cc"])
        self.compute_button = QtWidgets.QPushButton("Compute")
        self.stop_button = QtWidgets.QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.status = QtWidgets.QLabel("")
        self.status.setObjectName("samplingStatus")

        top = QtWidgets.QHBoxLayout()
        top.addWidget(self.unit_box)
        top.addWidget(self.status, 1)
        top.addWidget(self.compute_button)
        top.addWidget(self.stop_button)
        body = QtWidgets.QHBoxLayout()
        body.addWidget(self.structure_list)
        body.addWidget(self.plot, 1)
        lay = QtWidgets.QVBoxLayout(self)
        lay.addLayout(top)
        lay.addLayout(body, 1)
        self.resize(760, 420)

        self.compute_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(self.stop)
        self.unit_box.currentIndexChanged.connect(self._on_unit)
        self.state_ready.connect(self._on_state)
        self.exact_ready.connect(self._on_exact)
        self.finished.connect(self._on_finished)

    # ------------------------------------------------------------------ control
    def chosen(self) -> list:
        names = [self.structure_list.item(i).text() for i in range(self.structure_list.count())
                 if self.structure_list.item(i).checkState() == QtCore.Qt.CheckState.Checked]
        return [self.patient.structure(n) for n in names]

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Compute the chosen structures' exact DVHs, then sample until the density is reached."""
        structures = self.chosen()
        if not structures:
            self.status.setText("Choose at least one volume")
            return
        self.stop()
        self._stop = threading.Event()
        self._run += 1
        run = self._run
        self.last_state = None
        self.plot.current = None
        self.plot.snapshots = []
        self.status.setText("running")
        self.compute_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        dose, grid, stop = self.dose_gy, self.patient.grid, self._stop
        density, seed, bin_gy = self.density_per_mm3, self.seed, self.bin_gy

        def work():
            exact = tuple(exact_dvh(s.name, dose, s.mask, grid, bin_gy=bin_gy) for s in structures)
            self.exact_ready.emit(exact, run)
            for state in sample_dvhs(dose, structures, grid, density_per_mm3=density, seed=seed, bin_gy=bin_gy,
                                     cancel=stop.is_set):
                self.state_ready.emit(state, run)

        self._thread = start_dvh_thread(work, "dvh-sampling", stop, lambda how: self.finished.emit(how, run))

    def stop(self) -> None:
        """The seed's stop button: the curves drawn so far stay."""
        self._stop.set()

    def wait(self, timeout_s: float = 30.0) -> bool:
        """Join the sampling thread (tests, closing); True when it ended."""
        if self._thread is not None:
            self._thread.join(timeout_s)
        return not self.running

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        self.stop()
        self.wait(5.0)
        super().closeEvent(event)

    # ------------------------------------------------------------------ GUI thread
    def _on_exact(self, exact, run) -> None:
        if run != self._run:
            return
        self.exact = exact
        self.plot.snapshots = [_CurveSet("exact", exact)]
        self.plot.update()

    def _on_state(self, state, run) -> None:
        if run != self._run:
            return
        self.last_state = state
        self.plot.current = _CurveSet(f"{self.plan_label} sampled", state.dvhs)
        lowest = min(state.density_per_mm3)
        self.status.setText(f"running: {sum(state.points)} points, {lowest:.2f} per mm³ in the sparsest volume")
        self.plot.update()

    def _on_finished(self, how: str, run) -> None:
        if run != self._run:
            return
        self.compute_button.setEnabled(True)
        self.stop_button.setEnabled(False)
        s = self.last_state
        if s is None:
            self.status.setText(how)
            return
        self.status.setText(f"{how}: {sum(s.points)} points, at least {min(s.density_per_mm3):.2f} per mm³")

    def _on_unit(self, index: int) -> None:
        self.plot.volume_unit = "%" if index == 0 else "cc"
        self.plot.update()
