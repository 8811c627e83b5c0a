"""Plan → Optimise…: pick a protocol, optimise on the worker with progress and cancel.

The dialog only submits the worker's *optimise* job and follows its ``progress`` signal and
the job's snapshot (``Snapshot.optimised``); it never calls the engine (CONVENTIONS item 6).
Errors (a bad protocol, a structure the case lacks, a session that already has requests)
show as a line in the dialog.
"""

from __future__ import annotations

from pathlib import Path

from PyQt6 import QtWidgets

__all__ = ["OptimiseDialog", "default_protocol_folder"]


def default_protocol_folder() -> str:
    """The repository's ``examples/protocols`` when present, else the working folder."""
    here = Path(__file__).resolve()
    for root in (here.parent.parent, Path.cwd()):
        folder = root / "examples" / "protocols"
        if folder.is_dir():
            return str(folder)
    return str(Path.cwd())


class OptimiseDialog(QtWidgets.QDialog):
    """Parameters
    ----------
    worker : the window's :class:`~.worker.QtEngineWorker`.
    has_requests : True when the session already has requests (the dialog then refuses).
    """

    def __init__(self, worker, has_requests: bool, parent=None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Optimise the plan")
        self.worker = worker
        self.has_requests = bool(has_requests)
        self.job_id: int | None = None
        self.outcome: dict | None = None
        self.path_edit = QtWidgets.QLineEdit()
        self.path_edit.setPlaceholderText("protocol TOML, e.g. examples/protocols/tg119_harder.toml")
        browse = QtWidgets.QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        row = QtWidgets.QHBoxLayout()
        row.addWidget(self.path_edit, 1)
        row.addWidget(browse)
        self.bar = QtWidgets.QProgressBar()
        self.bar.setRange(0, 1)
        self.bar.setValue(0)
        self.status = QtWidgets.QLabel("")
        self.status.setWordWrap(True)
        self.start_button = QtWidgets.QPushButton("Optimise")
        self.start_button.clicked.connect(self.start)
        self.cancel_button = QtWidgets.QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QtWidgets.QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.cancel_button)
        lay = QtWidgets.QVBoxLayout(self)
        lay.addWidget(QtWidgets.QLabel("Protocol (goals per structure, TOML):"))
        lay.addLayout(row)
        lay.addWidget(self.bar)
        lay.addWidget(self.status)
        lay.addLayout(buttons)
        self.resize(560, 170)
        worker.progress.connect(self._on_progress)
        worker.snapshot.connect(self._on_snapshot)
        if self.has_requests:
            self._say("The session already has requests: the optimised plan would replace them. Open a fresh "
                      "case (File → Open) to optimise, then shape the optimised plan.", error=True)
            self.start_button.setEnabled(False)

    @property
    def running(self) -> bool:
        return self.job_id is not None and self.outcome is None

    def _say(self, text: str, error: bool = False) -> None:
        self.status.setStyleSheet("color: #ff7b72;" if error else "")
        self.status.setText(text)

    def _browse(self) -> None:
        path, _ = QtWidgets.QFileDialog.getOpenFileName(self, "Protocol", default_protocol_folder(),
                                                        "Protocols (*.toml);;All files (*)")
        if path:
            self.path_edit.setText(path)

    def start(self, path: str | None = None) -> int | None:
        """Submit the optimisation for the protocol at ``path`` (default: the path field)."""
        if self.has_requests or self.running:
            return None
        if path:
            self.path_edit.setText(str(path))
        text = self.path_edit.text().strip()
        if not text:
            self._say("Choose a protocol file first.", error=True)
            return None
        self.outcome = None
        self.bar.setRange(0, 0)  # busy until the first progress report
        self.start_button.setEnabled(False)
        self._say("Building the influence matrix…")
        self.job_id = self.worker.engine.optimise(text)
        return self.job_id

    def cancel(self) -> None:
        """Stop a running optimisation (the plan stays as it was), or close the dialog."""
        if self.running:
            self.worker.engine.cancel_optimisation()
            self._say("Cancelling…")
        else:
            self.reject()

    def _on_progress(self, done: int, total: int, label: str) -> None:
        if not self.running:
            return
        self.bar.setRange(0, max(int(total), 1))
        self.bar.setValue(int(done))
        self.bar.setFormat(f"{label} %p%")

    def _on_snapshot(self, snap) -> None:
        if self.job_id is None or snap.job_kind != "optimise" or snap.job_id < self.job_id or self.outcome:
            return
        out = snap.optimised or {"error": "the optimisation failed (see the status bar)"}
        self.outcome = out
        self.bar.setRange(0, 1)
        self.bar.setValue(0 if out.get("error") or out.get("cancelled") else 1)
        self.start_button.setEnabled(True)
        self.cancel_button.setText("Close")
        if out.get("error"):
            self._say(f"Could not optimise: {out['error']}", error=True)
        elif out.get("cancelled"):
            self._say("Cancelled: the plan is as it was.")
        else:
            unmet = out.get("unmet") or ()
            note = f"; constraints not met: {'; '.join(unmet)}" if unmet else ""
            self._say(f"Optimised for {out['protocol']}{note}. "
                      f"The metrics panel checks the protocol's goals.")

    def done(self, result: int) -> None:  # noqa: D401 - Qt override
        if self.running:
            self.worker.engine.cancel_optimisation()
        for sig, slot in ((self.worker.progress, self._on_progress), (self.worker.snapshot, self._on_snapshot)):
            try:
                sig.disconnect(slot)
            except (TypeError, RuntimeError):  # already disconnected, or the worker is gone
                pass
        super().done(result)
