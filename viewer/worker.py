"""The engine worker: the one thread that touches the session (CONVENTIONS item 6).

The GUI submits jobs (requests, drag previews, undo/redo, save); each gets an increasing id.
The worker thread drains its queues so that only the newest of each kind runs: drag previews
go through :class:`~ids_engine.session.LatestRequestQueue` (a coalescing slot), and runs of
queued jobs of the same kind and target (e.g. scrolling one voxel's dose) collapse to the
newest. After each job it emits a :class:`Snapshot`: host copies of what the views display.
A final snapshot carries the dose cube (the 3D view, scrolling, screenshots and the isodose
surface need it), DVHs, the surface mesh and the history; a drag preview carries only a
:class:`~ids_engine.session.DisplayReadout`: the three slices the GUI shows (it keeps the
worker told of them, :meth:`EngineWorker.set_display_index`) and the DVHs, computed where the
dose lives, so a preview never copies the cube to the host.

A drag is a *group*: while the mouse moves, previews run with few recovery steps; on release
the worker undoes the group's previews and runs the final request with full recovery, so
the journal holds one entry per drag and the result does not carry the previews' side effects.

A final snapshot also carries :class:`~._metrics.LiveMetrics` (per-structure DVH points, CI,
HI and the protocol's goals with pass/fail), computed here from the host cube so the metrics
panel only renders; previews carry none. An *optimise* job reads a protocol, runs
:func:`~ids_engine.planning.optimise_plan` (progress and cancel wired through the worker) and
makes the result the session's plan; the protocol's goals then drive the pass/fail.

A *show* job (:meth:`EngineWorker.show_plan`) makes the snapshots carry another plan's dose,
a forward plan's (:class:`~._shown.ShownPlan`, seed 001: plans are displayed in frames with
their plan ID), computed once on this thread; DVHs, metrics (% of that plan's normalisation
point) and the isodose surface then come from it, and jobs that would shape the session are
refused until the session's dose is shown again.

:class:`EngineWorker` is plain Python (threading + callbacks) so it can be tested without a
window or event loop; :class:`QtEngineWorker` forwards its callbacks as Qt signals.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PyQt6 import QtCore

from ids_engine.dmr import EraseSpot, MoveIsodoseLine, MoveIsodoseSurface, Pin, RequestError, SetVoxelDose, Unpin
from ids_engine.evaluation import DVH, dvh
from ids_engine.session import DisplayReadout, FolderLockedError, LatestRequestQueue, RequestResult, Session

from ._field import FieldCurves, field_curves
from ._meshes import SurfaceMesh, level_mesh
from ._metrics import LiveMetrics, live_metrics, protocol_checks
from ._shown import ShownPlan

__all__ = ["EngineWorker", "HistoryEntry", "QtEngineWorker", "ShownPlan", "Snapshot", "conflict_status_text",
           "describe_request", "voxel_text"]

# Jobs that change the session's plan: refused while another plan's dose is displayed (the
# planner would shape a dose they cannot see).
_SHAPING_JOBS = ("run", "preview", "commit", "undo", "redo", "goto", "optimise")

# Recovery steps of a drag preview (full recovery runs on release). Measured on the clinical
# horseshoe, 2 CPU cores, GUI idle: 3 steps on 6 voxels 245 ms, 1 step on 4 voxels 151 ms,
# no recovery on 4 voxels 102 ms (but then the preview shows the unrecovered streaks).
PREVIEW_RECOVERY_STEPS = 1
# Voxels a drag preview is solved on (the release uses the session's full setting): the
# preview's cost grows with this number, so a coarser preview keeps the drag fluid on a CPU.
PREVIEW_MAX_VOXELS = 4
# A preview carries DVHs only if the last final snapshot's DVH pass took less than this (ms);
# a preview's DVHs are binned where the dose lives, which costs less than that pass.
PREVIEW_DVH_BUDGET_MS = 25.0


@dataclass(frozen=True)
class HistoryEntry:
    """One journal entry as the history list shows it.

    id : the session's request id (drag previews consume ids, so these can skip).
    number : the entry's place in the history, 1 for the first request: what the history
        list and the status bar show (contiguous, as in a script's list of requests).
    conflicts : one line per :class:`~ids_engine.session.Conflict` of the request (what recovery
        could not keep); empty for drag previews, whose single recovery step would flag
        conflicts that the full recovery on release resolves.
    side_effects : one line per side effect (a conflict of kind "rise": far tissue that rose
        unasked); empty for drag previews, which skip the check.
    """

    id: int
    text: str
    engine_ms: float
    preview: bool = False
    conflicts: tuple[str, ...] = ()
    number: int = 0
    side_effects: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class Snapshot:
    """What the views display after a job (host arrays owned by the GUI from now on).

    dose_gy : (z, y, x) float32, Gy, in final snapshots; None in previews (see ``readout``).
    readout : a preview's slices through the displayed position, its maximum and DVHs
        (:meth:`Session.display_readout`); None in final snapshots.
    history : applied journal entries, oldest first.
    undone : undone entries that redo would bring back, in the order they were applied.
    pins_mask : bool (z, y, x) union of the pinned regions, or None when nothing is pinned.
    dvhs : one DVH per structure, or None when this snapshot did not recompute them.
    surface : the isodose surface at ``surface_level_gy``, or None when not recomputed.
    final : False for a drag preview (few recovery steps).
    dropped : stale jobs coalesced away so far.
    field : the open field's depth dose and profile, for a case without a target (final
        snapshots only), else None.
    save_refused : the folder of a save that was refused because it is not empty and not
        this session's (the window asks before replacing it), else None.
    """

    job_id: int
    job_kind: str
    final: bool
    dose_gy: np.ndarray | None
    plan_id: int
    history: tuple[HistoryEntry, ...]
    undone: tuple[HistoryEntry, ...]
    pins_mask: np.ndarray | None
    pin_names: tuple[str, ...]
    dvhs: tuple[DVH, ...] | None
    surface: SurfaceMesh | None
    surface_level_gy: float
    engine_ms: float
    submitted_at: float
    dropped: int = 0
    outcome: dict | None = None  # RequestResult.summary() of the request this job ran, if any
    field: FieldCurves | None = None
    save_refused: str | None = None
    readout: DisplayReadout | None = None
    metrics: LiveMetrics | None = None
    optimised: dict | None = None  # an optimise job's outcome (see EngineWorker.optimise)
    shown: ShownPlan | None = None  # the forward plan whose dose this snapshot carries; None: the session's


@dataclass(frozen=True)
class _Job:
    id: int
    kind: str  # run | preview | commit | undo | redo | goto | refresh | surface | save | optimise | show
    request: object = None
    group: int | None = None
    target: int | None = None
    path: str | None = None
    overwrite: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)

    def coalesce_key(self):
        """Jobs with equal non-None keys queued back to back collapse to the newest."""
        if self.kind == "run" and isinstance(self.request, SetVoxelDose):
            return ("set", self.request.index_zyx)
        if self.kind in ("refresh", "surface", "goto", "show"):
            return (self.kind,)
        return None


def voxel_text(index_zyx) -> str:
    """A voxel as scripts name it (``index_zyx``, 0-based): "(z=21, y=30, x=40)"; fractional
    positions are rounded to the nearest voxel."""
    k, j, i = (int(round(float(v))) for v in index_zyx)
    return f"(z={k}, y={j}, x={i})"


def describe_request(req) -> str:
    """A short human-readable line for a request (voxels and slices 0-based, in (z, y, x)
    order, as scripts give them)."""
    if isinstance(req, SetVoxelDose):
        return f"Set dose at voxel {voxel_text(req.index_zyx)} to {req.dose_gy:.3g} Gy"
    if isinstance(req, MoveIsodoseLine):
        plane = {"z": "axial", "y": "coronal", "x": "sagittal"}[req.axis]
        return f"Drag {req.level_gy:.3g} Gy line ({plane} slice {req.axis}={req.slice_index})"
    if isinstance(req, MoveIsodoseSurface):
        return f"Drag {req.level_gy:.3g} Gy surface from {voxel_text(req.start_zyx)}"
    if isinstance(req, EraseSpot):
        where = f" in {req.structure}" if req.structure else ""
        return (f"Erase spot at {voxel_text(req.centre_zyx)} r {req.radius_mm:g} mm to "
                f"[{req.low_gy:.3g}, {req.high_gy:.3g}] Gy{where}")
    if isinstance(req, Pin):
        return f"Pin {req.name} at {voxel_text(req.centre_zyx)} (r {req.radius_mm:g} mm)"
    if isinstance(req, Unpin):
        return f"Unpin {req.name}"
    return str(req)


def conflict_status_text(messages, side_effects=()) -> str:
    """The status bar line for a request's conflicts and side effects (``Conflict.message``
    strings in the order the session lists them): the first conflict in full (else the first
    side effect), then how many more; "" when there are none."""
    messages, side_effects = list(messages), list(side_effects)
    n = len(messages) + len(side_effects)
    if n == 0:
        return ""
    more = f"; +{n - 1} more (see the history)" if n > 1 else ""
    if messages:
        return f"⚠ Conflict: {messages[0]}{more}"
    return f"⚠ Side effect: {side_effects[0]}{more}"


def _entry(res: RequestResult, number: int, preview: bool = False) -> HistoryEntry:
    ms = sum(v for k, v in res.timings_ms.items() if k in ("resolve", "reference", "modify", "recovery", "side_effects"))
    conflicts = () if preview else tuple(c.message for c in res.conflicts if c.kind != "rise")
    side = () if preview else tuple(c.message for c in res.conflicts if c.kind == "rise")
    return HistoryEntry(res.id, describe_request(res.request), float(ms), preview, conflicts, number, side)


class EngineWorker:
    """Runs a session's requests on a background thread and reports snapshots.

    Parameters
    ----------
    session : the session; from now on only this worker's thread calls it.
    on_snapshot : called (on the worker thread) with each :class:`Snapshot`.
    on_message : called with (text, is_error) for request errors and notices.
    on_progress : called with (done, total, label) while an optimisation runs.
    preview_recovery_steps : recovery steps of drag previews.
    surface_level_gy : the isodose surface level (None: the prescription).
    """

    def __init__(self, session: Session, on_snapshot: Callable[[Snapshot], None],
                 on_message: Callable[[str, bool], None] | None = None, *,
                 on_progress: Callable[[int, int, str], None] | None = None,
                 preview_recovery_steps: int = PREVIEW_RECOVERY_STEPS, surface_level_gy: float | None = None) -> None:
        self.session = session
        self._on_snapshot = on_snapshot
        self._on_message = on_message or (lambda text, error: None)
        self._on_progress = on_progress or (lambda done, total, label: None)
        self._cancel = threading.Event()  # set by cancel_optimisation (any thread)
        self._goals: tuple = ()  # evaluation goals of the protocol the plan was optimised for
        self.preview_recovery_steps = int(preview_recovery_steps)
        self._surface_level_gy = float(surface_level_gy or session.prescription_gy)
        self._ids = itertools.count(1)
        self._ordered: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._latest = LatestRequestQueue()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        # Mirror of the session's redo stack: Session does not expose it, and drag previews
        # that are undone on release must never be redone.
        self._redo: list[RequestResult] = []
        self._previews: dict[int, list[int]] = {}  # group -> journal ids of its previews
        self._closed_groups: set[int] = set()
        self._dvh_ms = 0.0
        self.dropped = 0
        # The slices the GUI displays (axial z, coronal y, sagittal x): set from the GUI thread,
        # read by the worker's thread when it builds a preview.
        self._display_lock = threading.Lock()
        self._display_index_zyx = tuple(int(n) // 2 for n in session.patient.grid.shape_zyx)
        # Another plan's dose displayed instead of the session's (worker thread only), and its cube.
        self._shown: ShownPlan | None = None
        self._shown_dose: np.ndarray | None = None

    # ------------------------------------------------------------------ control
    def start(self) -> "EngineWorker":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ids-engine-worker", daemon=True)
            self._thread.start()
            self.refresh()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the job in progress, drop the rest, and end the thread."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _put(self, kind: str, **kw) -> int:
        job = _Job(next(self._ids), kind, **kw)
        self._ordered.put(job)
        self._wake.set()
        return job.id

    # ------------------------------------------------------------------ jobs (any thread)
    def submit(self, request) -> int:
        """Run a request with full recovery."""
        return self._put("run", request=request)

    def preview(self, request, group: int, display_index_zyx=None) -> int:
        """A drag's intermediate request: coalesced with the group's newer previews, few recovery
        steps. Its snapshot carries the slices through ``display_index_zyx`` (None: the newest
        :meth:`set_display_index`)."""
        if display_index_zyx is not None:
            self.set_display_index(display_index_zyx)
        job = _Job(next(self._ids), "preview", request=request, group=group)
        self._latest.put(job)
        self._wake.set()
        return job.id

    def commit(self, request, group: int) -> int:
        """End a drag: undo the group's previews, run ``request`` with full recovery.
        ``request`` None just takes the previews back (a cancelled drag)."""
        return self._put("commit", request=request, group=group)

    def undo(self) -> int:
        return self._put("undo")

    def redo(self) -> int:
        return self._put("redo")

    def goto(self, journal_length: int) -> int:
        """Undo or redo until the journal holds ``journal_length`` entries."""
        return self._put("goto", target=int(journal_length))

    def refresh(self) -> int:
        return self._put("refresh")

    def save(self, folder: str, overwrite: bool = False) -> int:
        """Save the session into ``folder`` (created if missing) and keep journaling there. A
        non-empty folder that is not this session's is refused (the snapshot's
        ``save_refused``) unless ``overwrite``."""
        return self._put("save", path=str(folder), overwrite=bool(overwrite))

    def optimise(self, protocol_path: str) -> int:
        """Optimise the session's plan for the protocol in ``protocol_path`` (TOML, see
        :func:`ids_engine.optimise.read_protocol`) and make it the session's starting plan. Only
        for a session without requests. The job's snapshot carries ``optimised``: ``protocol``
        (its name), ``cancelled``, ``error`` (a message, or None), ``iterations``,
        ``unmet`` (constraints not met); cancelled or failed, the plan stays as it was."""
        self._cancel.clear()
        return self._put("optimise", path=str(protocol_path))

    def cancel_optimisation(self) -> None:
        """Stop a running optimisation between iterations (any thread)."""
        self._cancel.set()

    @property
    def goals(self) -> tuple:
        """The :class:`~ids_engine.evaluation.Goal` checks the metrics' pass/fail follows."""
        return self._goals

    def set_display_index(self, index_zyx) -> None:
        """The slices the views display (0-based (z, y, x): the axial view's z, the coronal's y,
        the sagittal's x); previews copy these three slices to the host. Any thread."""
        shape = self.session.patient.grid.shape_zyx
        index = tuple(int(np.clip(int(v), 0, n - 1)) for v, n in zip(index_zyx, shape))
        with self._display_lock:
            self._display_index_zyx = index

    @property
    def display_index_zyx(self) -> tuple[int, int, int]:
        with self._display_lock:
            return self._display_index_zyx

    def show_plan(self, shown: ShownPlan | None) -> int:
        """Display ``shown``'s dose (a forward plan) instead of the session's from the next
        snapshot on, or the session's again with None. While another plan is shown, jobs
        that would shape the session (requests, drags, undo/redo, optimise) are refused with
        a message; saving still works. Queued show jobs collapse to the newest."""
        if shown is not None and not isinstance(shown, ShownPlan):
            raise TypeError(f"show_plan takes a ShownPlan or None, got {type(shown).__name__}")
        return self._put("show", request=shown)

    @property
    def shown(self) -> ShownPlan | None:
        """The plan displayed instead of the session's (None: the session's)."""
        return self._shown

    def set_surface_level(self, level_gy: float) -> int:
        self._surface_level_gy = float(level_gy)
        return self._put("surface")

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        while not self._stop:
            self._wake.wait()
            self._wake.clear()
            while not self._stop:
                batch = self._drain_ordered()
                if batch:
                    for job in batch:
                        if self._stop:
                            break
                        self._run_job(job)
                    continue
                job = self._latest.take(0)
                if job is None:
                    break
                self._run_job(job)

    def _run_job(self, job: _Job) -> None:
        try:
            self._run_job_unguarded(job)
        except Exception as exc:  # keep the thread alive; the GUI shows what went wrong
            self._on_message(f"{job.kind} failed: {type(exc).__name__}: {exc}", True)
            if job.kind != "preview":
                try:
                    self._on_snapshot(self._snapshot(job, True, 0.0, None))
                except Exception:  # noqa: BLE001 - nothing more to report than the message above
                    pass

    def _drain_ordered(self) -> list[_Job]:
        jobs: list[_Job] = []
        while True:
            try:
                jobs.append(self._ordered.get_nowait())
            except queue.Empty:
                break
        kept: list[_Job] = []
        for job in jobs:
            key = job.coalesce_key()
            if kept and key is not None and kept[-1].coalesce_key() == key:
                kept[-1] = job
                self.dropped += 1
            else:
                kept.append(job)
        return kept

    def _run_job_unguarded(self, job: _Job) -> None:
        s = self.session
        t0 = time.perf_counter()
        result = None
        final = True
        refused = None
        optimised = None
        if self._shown is not None and job.kind in _SHAPING_JOBS:
            if job.kind == "preview":
                return
            if job.kind == "commit":  # a drag begun before: take its previews back, run nothing
                job = _Job(job.id, "commit", None, job.group, submitted_at=job.submitted_at)
            else:
                self._on_message(f"Not done: {self._shown.label} is displayed; show the shaping session's "
                                 "dose (Plan > Forward planning > Show shaping dose) to shape it", True)
                self._on_snapshot(self._snapshot(job, True, 0.0, None))
                return
        try:
            if job.kind == "show":
                self._show(job.request)
            elif job.kind == "run":
                result = s.run(job.request)
                self._redo.clear()
            elif job.kind == "preview":
                if job.group in self._closed_groups:
                    return
                final = False
                try:
                    result = s.run(job.request, recovery_steps=self.preview_recovery_steps, max_voxels=PREVIEW_MAX_VOXELS,
                                   ignore_features_of=self._previews.get(job.group, ()), side_effects=False)
                except RequestError:
                    return  # e.g. the mouse has not left the isodose yet: nothing to show
                self._redo.clear()
                self._previews.setdefault(job.group, []).append(result.id)
            elif job.kind == "commit":
                self._closed_groups.add(job.group)
                pending = self._latest.take(0)
                if pending is not None and pending.group != job.group:
                    self._latest.put(pending)
                ids = set(self._previews.pop(job.group, []))
                while s.journal and s.journal[-1].id in ids:
                    s.undo()
                if job.request is not None:
                    result = s.run(job.request)
                    self._redo.clear()
            elif job.kind == "undo":
                res = s.undo()
                if res is not None:
                    self._redo.append(res)
            elif job.kind == "redo":
                self._redo_one()
            elif job.kind == "goto":
                while len(s.journal) > job.target:
                    self._redo.append(s.undo())
                while len(s.journal) < job.target and self._redo:
                    self._redo_one()
            elif job.kind == "save":
                try:
                    s.save(job.path, overwrite=job.overwrite)
                except FileExistsError as exc:
                    refused = job.path
                    self._on_message(str(exc), True)
                else:
                    self._on_message(f"Session saved to {job.path}", False)
            elif job.kind == "optimise":
                optimised = self._optimise(job.path)
            # "refresh" and "surface" only rebuild the snapshot.
        except (RequestError, ValueError, KeyError, OSError, FolderLockedError) as exc:
            # The plan is as before the job (a failed commit has still taken its previews back);
            # the snapshot below tells the GUI the job is done.
            self._on_message(str(exc), True)
        engine_ms = (time.perf_counter() - t0) * 1000.0
        self._on_snapshot(self._snapshot(job, final, engine_ms, result, refused, optimised))

    def _show(self, shown: ShownPlan | None) -> None:
        if shown is None:
            self._shown, self._shown_dose = None, None
            return
        dose = np.asarray(shown.dose(), dtype=np.float32)
        shape = tuple(self.session.patient.grid.shape_zyx)
        if dose.shape != shape:
            raise ValueError(f"{shown.label}: its dose is {dose.shape}, not the case's grid {shape}")
        self._shown, self._shown_dose = shown, dose

    def _optimise(self, path: str) -> dict:
        from ids_engine import planning
        from ids_engine.io import InputError
        from ids_engine.optimise import read_protocol

        s = self.session
        out = {"protocol": path, "cancelled": False, "error": None, "iterations": 0, "unmet": ()}
        try:
            protocol = read_protocol(path)
            out["protocol"] = protocol.name or path
            names = s.patient.structure_names
            missing = [n for n in protocol.structures if n not in names]
            if missing:
                raise ValueError(f"{path}: the protocol names {', '.join(missing)}, which this case does not have "
                                 f"(structures: {', '.join(names)})")
            if s.journal or self._redo:
                raise ValueError("the session already has requests: optimise a fresh case (File > Open), "
                                 "then shape the optimised plan")
            checks = protocol_checks(protocol.goals)
            before = s.engine.fluences_host()
            plan = planning.optimise_plan(s.engine, protocol.goals, progress=self._on_progress,
                                          cancel=self._cancel.is_set)
        except (InputError, ValueError, KeyError, OSError) as exc:
            out["error"] = str(exc).strip("'\"")
            self._on_message(f"Optimisation failed: {out['error']}", True)
            return out
        res = plan.result
        out["iterations"] = int(plan.iterations)
        if res.cancelled or self._cancel.is_set():
            s.engine.set_fluences(before)  # optimise_plan left its last iterate on the engine
            out["cancelled"] = True
            self._on_message("Optimisation cancelled: the plan is as before", False)
            return out
        s.set_plan(plan.fluences)
        self._goals = checks
        out["unmet"] = tuple(str(u) for u in res.unmet_constraints)
        self._on_message(f"Optimised for {out['protocol']} ({plan.iterations} iterations)", False)
        return out

    def _redo_one(self) -> None:
        if self._redo:
            expected = self._redo.pop()
            res = self.session.redo()
            if res is None or res.id != expected.id:
                raise RuntimeError("engine worker: the session's redo stack is out of step with the worker's")

    def _snapshot(self, job: _Job, final: bool, engine_ms: float, result, save_refused: str | None = None,
                  optimised: dict | None = None) -> Snapshot:
        s = self.session
        previews = {i for ids in self._previews.values() for i in ids}
        history = tuple(_entry(r, n, r.id in previews) for n, r in enumerate(s.journal, 1))
        undone = tuple(_entry(r, n) for n, r in enumerate(reversed(self._redo), len(history) + 1))
        pins_mask = None
        if s.pins:
            pins_mask = np.zeros(s.patient.grid.shape_zyx, bool)
            for m in s.pins.values():
                pins_mask |= m
        dose = readout = dvhs = surface = field = metrics = None
        if not final:
            # Only what is displayed comes to the host: three slices and the DVH bin counts.
            readout = s.display_readout(self.display_index_zyx, dvhs=self._dvh_ms < PREVIEW_DVH_BUDGET_MS)
            dvhs = readout.dvhs
        else:
            shown = self._shown
            dose = self._shown_dose if shown is not None else s.dose()
            t = time.perf_counter()
            vcc = s.patient.grid.voxel_volume_cc
            # A forward plan's dose is often a fraction's (2 Gy): bins of 0.5 % of its 100 %.
            bin_gy = 0.1 if shown is None else max(shown.reference_gy / 200.0, 1e-4)
            dvhs = tuple(dvh(st.name, dose, st.mask, vcc, bin_gy) for st in s.patient.structures if st.mask.any())
            self._dvh_ms = (time.perf_counter() - t) * 1000.0
            if shown is not None:  # % of its normalisation point; the protocol's goals are the session's
                metrics = live_metrics(dose, s.patient, shown.reference_gy, ())
            else:
                metrics = live_metrics(dose, s.patient, s.prescription_gy, self._goals)
            surface = level_mesh(dose, self._surface_level_gy, s.patient.grid.spacing_mm_zyx)
            p = s.patient
            if shown is None and not p.targets and len(s.engine.geometry) == 1:
                field = field_curves(dose, p.grid, s.engine.geometry[0].beam, p.external.mask,
                                     patient_position=p.patient_position)
        shown = self._shown if final else None
        plan_id = shown.plan_id if shown is not None else s.plan_id
        return Snapshot(job.id, job.kind, final, dose, plan_id, history, undone, pins_mask, tuple(s.pins),
                        dvhs, surface, self._surface_level_gy, engine_ms, job.submitted_at,
                        self.dropped + self._latest.dropped, result.summary() if result is not None else None,
                        field, save_refused, readout, metrics, optimised, shown)


class QtEngineWorker(QtCore.QObject):
    """An :class:`EngineWorker` (``.engine``) whose reports arrive as Qt signals.

    ``snapshot(Snapshot)``, ``message(str, bool)`` and ``progress(int, int, str)`` are emitted from the worker thread; Qt
    queues them to the receivers' (GUI) thread, so slots run there.
    """

    snapshot = QtCore.pyqtSignal(object)
    message = QtCore.pyqtSignal(str, bool)
    progress = QtCore.pyqtSignal(int, int, str)

    def __init__(self, session: Session, parent=None, **kwargs) -> None:
        super().__init__(parent)
        self.engine = EngineWorker(session, self.snapshot.emit, self.message.emit, on_progress=self.progress.emit,
                                   **kwargs)
