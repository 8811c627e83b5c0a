"""A planning session: plan state, dose shaping requests, undo/redo, journal, save and reopen.

The session is the public API the CLI (``ids shape``) and the viewer use. It owns a dose
engine, the TPI maps, a modifier and the recovery settings. Every request is resolved to
voxels and target doses, modified (Algorithm 1), recovered (close-in recovery) and journaled
with the fluence patches it applied; undo applies the negated patches (exact by linearity),
and replaying the journal's patches rebuilds the identical plan, which is how a session is
saved and reopened.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ids_engine import __version__, backend
from ids_engine.dmr import (
    EraseSpot,
    Modifier,
    MoveIsodoseLine,
    MoveIsodoseSurface,
    Pin,
    RequestError,
    Resolved,
    SetVoxelDose,
    Unpin,
    recover,
    request_from_dict,
    tpi_maps,
)
from ids_engine.dmr._requests import ball_mask, capsule_mask, request_to_dict, subsample
from ids_engine.dose import DoseEngine, EngineOptions, FluencePatch
from ids_engine.model import Beam, Patient, PhotonMachine

__all__ = ["DMROptions", "LatestRequestQueue", "RequestResult", "Session", "case_from_spec"]


@dataclass(frozen=True)
class DMROptions:
    """Settings of dose modification and recovery.

    recovery_steps : maximum recovery steps per request (15-30 in the paper; 25 default).
    tolerance_pct : recovery tolerance on |D - D_ref|, % of the prescription.
    cp_cells : control point size (fine fluence amplitudes per side) of the TPI maps.
    max_request_voxels : a line, surface or spot request uses at most this many voxels.
    edge_margin_pct : how far past the level a dragged isodose is pushed (% of the level).
    """

    recovery_steps: int = 25
    tolerance_pct: float = 2.0
    cp_cells: int = 5
    max_request_voxels: int = 24
    edge_margin_pct: float = 1.0


@dataclass(frozen=True, eq=False)
class RequestResult:
    """The outcome of one request (what the journal keeps, plus read-outs for reports)."""

    id: int
    request: object
    voxels: np.ndarray
    requested_gy: np.ndarray
    before_gy: np.ndarray
    after_modification_gy: np.ndarray
    final_gy: np.ndarray
    recovery_steps: int
    remaining_candidates: int
    patches: list = field(default_factory=list)
    timings_ms: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "id": self.id,
            "request": request_to_dict(self.request),
            "voxels": int(self.voxels.size),
            "requested_gy": [round(float(v), 4) for v in self.requested_gy[:8]],
            "before_gy": [round(float(v), 4) for v in self.before_gy[:8]],
            "after_modification_gy": [round(float(v), 4) for v in self.after_modification_gy[:8]],
            "final_gy": [round(float(v), 4) for v in self.final_gy[:8]],
            "recovery_steps": self.recovery_steps,
            "remaining_candidates": self.remaining_candidates,
            "patches": len(self.patches),
            "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
        }


class LatestRequestQueue:
    """A thread-safe slot that keeps only the newest pending request (drag coalescing).

    ``put`` replaces whatever is pending; ``take`` returns and clears it (or None).
    ``dropped`` counts the stale requests that were never run.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending = None
        self._event = threading.Event()
        self.dropped = 0

    def put(self, request) -> None:
        with self._lock:
            if self._pending is not None:
                self.dropped += 1
            self._pending = request
            self._event.set()

    def take(self, timeout: float | None = None):
        if not self._event.wait(timeout):
            return None
        with self._lock:
            req, self._pending = self._pending, None
            self._event.clear()
            return req


# ---------------------------------------------------------------------------- cases
def case_from_spec(spec: dict) -> Patient:
    """Rebuild a patient from a case description: {"phantom": name, "resolution": r},
    {"dicom": folder} or {"matrad": file}."""
    if "phantom" in spec:
        from ids_engine.phantoms import PHANTOMS

        if spec["phantom"] not in PHANTOMS:
            raise ValueError(f"unknown phantom {spec['phantom']!r}; known: {', '.join(PHANTOMS)}")
        return PHANTOMS[spec["phantom"]](resolution=spec.get("resolution", "clinical"))
    if "dicom" in spec:
        from ids_engine.io import read_dicom

        return read_dicom(spec["dicom"])
    if "matrad" in spec:
        from ids_engine.io import read_matrad_phantom

        return read_matrad_phantom(spec["matrad"])
    raise ValueError(f"case description {spec!r} names no phantom, dicom folder or matrad file")


def _beam_to_dict(b: Beam) -> dict:
    return {"name": b.name, "gantry_deg": b.gantry_deg, "couch_deg": b.couch_deg, "collimator_deg": b.collimator_deg,
            "isocentre_mm_xyz": list(b.isocentre_mm_xyz), "sad_mm": b.sad_mm, "energy_mv": b.energy_mv}


# ---------------------------------------------------------------------------- session
class Session:
    """Plan state and the dose shaping loop.

    Parameters
    ----------
    patient : the patient.
    beams : the beams (fluence grids chosen by the engine).
    prescription_gy : the prescription (tolerances and % requests refer to it).
    fluences : starting fluence maps (host, one per beam, shapes of the engine's grids);
        None starts from zero fluence.
    machine, engine_options, dmr_options : see :class:`DoseEngine` and :class:`DMROptions`.
    case : a description the patient can be rebuilt from when the session is reopened
        (see :func:`case_from_spec`).
    progress : optional ``progress(done, total, label)`` for the set-up.
    """

    def __init__(self, patient: Patient, beams: Sequence[Beam], *, prescription_gy: float, fluences=None,
                 machine: PhotonMachine | None = None, engine_options: EngineOptions | None = None,
                 dmr_options: DMROptions | None = None, case: dict | None = None, progress=None) -> None:
        if not prescription_gy > 0:
            raise ValueError(f"prescription_gy must be positive, got {prescription_gy}")
        self.patient = patient
        self.prescription_gy = float(prescription_gy)
        self.options = dmr_options or DMROptions()
        self.case = dict(case or {})
        self.engine = DoseEngine(patient, beams, machine, options=engine_options, progress=progress)
        if fluences is not None:
            self.engine.set_fluences(fluences)
        self.initial_fluences = self.engine.fluences_host()
        t0 = time.perf_counter()
        targets = np.zeros(patient.grid.shape_zyx, bool)
        for s in patient.targets:
            targets |= s.mask
        oars = np.zeros(patient.grid.shape_zyx, bool)
        for s in patient.oars:
            oars |= s.mask
        self.target_mask = targets
        self.oar_mask = oars
        cp = self.options.cp_cells
        self.tpi_target = tpi_maps(self.engine, targets, cp)
        self.tpi_oar = tpi_maps(self.engine, oars, cp)
        self.tpi_ms = (time.perf_counter() - t0) * 1000
        self.modifier = Modifier(self.engine, self.tpi_target, self.tpi_oar, cp)
        self.pins: dict[str, np.ndarray] = {}
        self.journal: list[RequestResult] = []
        self._redo: list[RequestResult] = []
        self._next_id = 1
        self.plan_id = 1
        self._lock = threading.RLock()
        self._journal_dir: Path | None = None

    # ------------------------------------------------------------------ builders
    @classmethod
    def open_field_plan(cls, patient: Patient, *, n_beams: int = 9, prescription_gy: float = 60.0,
                        margin_mm: float = 8.0, case: dict | None = None, beams: Sequence[Beam] | None = None,
                        **kwargs) -> "Session":
        """The IDS paper's starting point: ``n_beams`` equispaced coplanar open fields (or the given
        ``beams``) conformed to the (first) target, weighted equally and normalised so the
        target's median dose is the prescription."""
        from ids_engine.planning import conformal_aperture, equispaced_beams

        if not patient.targets:
            raise ValueError("open_field_plan: the patient has no target structure")
        target = patient.targets[0]
        if beams is None:
            beams = equispaced_beams(n_beams, target.centroid_xyz())
        s = cls(patient, beams, prescription_gy=prescription_gy, case=case, **kwargs)
        maps = [conformal_aperture(g.beam, patient, target, margin_mm).astype(np.float32) for g in s.engine.geometry]
        s.engine.set_fluences(maps)
        median = float(np.median(backend.asnumpy(s.engine.dose_cube())[target.mask]))
        if median <= 0:
            raise ValueError("open_field_plan: the target receives no dose")
        s.engine.set_fluences([m * np.float32(prescription_gy / median) for m in maps])
        s.initial_fluences = s.engine.fluences_host()
        return s

    @classmethod
    def from_phantom(cls, name: str = "horseshoe", resolution: str = "clinical", **kwargs) -> "Session":
        case = {"phantom": name, "resolution": resolution}
        return cls.open_field_plan(case_from_spec(case), case=case, **kwargs)

    # ------------------------------------------------------------------ read-outs
    def dose(self) -> np.ndarray:
        """Host copy of the dose cube (Gy, (z, y, x))."""
        with self._lock:
            return self.engine.dose_cube_host()

    def dose_at(self, index_zyx) -> float:
        flat = int(np.ravel_multi_index(tuple(int(v) for v in index_zyx), self.patient.grid.shape_zyx))
        with self._lock:
            return float(backend.asnumpy(self.engine.dose_at_voxels([flat]))[0])

    @property
    def can_undo(self) -> bool:
        return bool(self.journal)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    @property
    def redo_stack(self) -> tuple:
        """The undone requests that :meth:`redo` would re-apply, the next one last."""
        return tuple(self._redo)

    def clear_redo(self) -> None:
        """Forget the undone requests (e.g. the previews of a cancelled drag)."""
        with self._lock:
            self._redo.clear()
            self._append_op({"op": "clear_redo"})

    def gy(self, percent_of_prescription: float) -> float:
        """A dose in Gy from a percentage of the prescription."""
        return float(percent_of_prescription) / 100.0 * self.prescription_gy

    # ------------------------------------------------------------------ resolving
    def _check_index(self, index_zyx, what: str) -> int:
        shape = self.patient.grid.shape_zyx
        idx = tuple(int(round(v)) for v in index_zyx)
        if any(i < 0 or i >= n for i, n in zip(idx, shape)):
            raise RequestError(f"{what}: voxel {idx} lies outside the grid {shape}")
        if not self.engine.body_mask[idx]:
            raise RequestError(f"{what}: voxel {idx} lies outside the body")
        return int(np.ravel_multi_index(idx, shape))

    def _resolve(self, req, max_voxels: int | None = None) -> Resolved:
        eng = self.engine
        grid = self.patient.grid
        opts = self.options
        limit = int(max_voxels or opts.max_request_voxels)
        if isinstance(req, SetVoxelDose):
            flat = self._check_index(req.index_zyx, "set voxel dose")
            mask = np.zeros(grid.shape_zyx, bool)
            mask[np.unravel_index(flat, grid.shape_zyx)] = True
            return Resolved(np.array([flat]), np.array([req.dose_gy]), mask)
        if isinstance(req, (MoveIsodoseLine, MoveIsodoseSurface)):
            if isinstance(req, MoveIsodoseLine):
                ax = "zyx".index(req.axis)
                a = list(req.start_rc)
                b = list(req.end_rc)
                a.insert(ax, req.slice_index)
                b.insert(ax, req.slice_index)
                band = capsule_mask(grid.shape_zyx, grid.spacing_mm_zyx, a, b, req.width_mm / 2.0)
                sl = [slice(None)] * 3
                keep = np.zeros(grid.shape_zyx, bool)
                sl[ax] = req.slice_index
                keep[tuple(sl)] = True
                band &= keep
                end = b
            else:
                band = capsule_mask(grid.shape_zyx, grid.spacing_mm_zyx, req.start_zyx, req.end_zyx, req.radius_mm)
                end = list(req.end_zyx)
            band &= eng.body_mask
            if not band.any():
                raise RequestError(f"{req.kind}: the dragged region lies outside the body")
            end_flat = self._check_index(end, req.kind)
            flat = np.flatnonzero(band.ravel())
            dose = backend.asnumpy(eng.dose_at_voxels(flat))
            end_dose = float(backend.asnumpy(eng.dose_at_voxels([end_flat]))[0])
            margin = opts.edge_margin_pct / 100.0 * req.level_gy
            if end_dose < req.level_gy:  # dragging outwards: raise the swept voxels above the level
                sel = dose < req.level_gy + margin
                goal = req.level_gy + margin
            else:  # dragging inwards: lower the swept voxels below the level
                sel = dose > req.level_gy - margin
                goal = req.level_gy - margin
            vox = subsample(flat[sel], limit)
            if vox.size == 0:
                raise RequestError(f"{req.kind}: the isodose already lies where it was dragged")
            return Resolved(vox, np.full(vox.size, goal), band)
        if isinstance(req, EraseSpot):
            region = ball_mask(grid.shape_zyx, grid.spacing_mm_zyx, req.centre_zyx, req.radius_mm) & eng.body_mask
            if req.structure:
                region &= self.patient.structure(req.structure).mask
            if not region.any():
                raise RequestError("erase spot: the region lies outside the body (or the structure)")
            flat = np.flatnonzero(region.ravel())
            dose = backend.asnumpy(eng.dose_at_voxels(flat))
            goal = np.clip(dose, req.low_gy, req.high_gy)
            off = np.abs(goal - dose) > 1e-6
            if not off.any():
                raise RequestError("erase spot: every voxel of the region is already within the bounds")
            # The worst voxels first.
            order = np.argsort(-np.abs(goal - dose)[off])
            pick = np.flatnonzero(off)[order][:limit]
            return Resolved(flat[pick], goal[pick], region)
        raise RequestError(f"cannot resolve request {req!r}")

    # ------------------------------------------------------------------ running
    def run(self, req, *, recovery_steps: int | None = None, max_voxels: int | None = None, cancel=None,
            progress=None) -> RequestResult:
        """Carry out a request: resolve, modify, recover, journal. Raises RequestError (plan untouched).

        ``recovery_steps`` and ``max_voxels`` (voxels a line, surface or spot request is solved
        on) override the session's options for this request: drag previews use fewer of both.
        """
        with self._lock:
            if isinstance(req, Pin):
                g = self.patient.grid
                m = ball_mask(g.shape_zyx, g.spacing_mm_zyx, req.centre_zyx, req.radius_mm) & self.engine.body_mask
                if not m.any():
                    raise RequestError("pin: the region lies outside the body")
                self.pins[req.name] = m
                return self._journal(req, Resolved(np.zeros(0, np.int64), np.zeros(0), m), None, None, {}, [])
            if isinstance(req, Unpin):
                if req.name not in self.pins:
                    raise RequestError(f"unpin: no pin called {req.name!r}")
                del self.pins[req.name]
                return self._journal(req, Resolved(np.zeros(0, np.int64), np.zeros(0), np.zeros(0, bool)), None, None, {}, [])
            timings = {}
            t0 = time.perf_counter()
            resolved = self._resolve(req, max_voxels)
            timings["resolve"] = (time.perf_counter() - t0) * 1000
            eng = self.engine
            # Reference: the dose before the request, at the voxels recovery watches.
            t0 = time.perf_counter()
            watch = self.target_mask | self.oar_mask
            for m in self.pins.values():
                watch = watch | m
            watch &= ~resolved.feature_mask
            cand = np.flatnonzero(watch.ravel())
            pinned = np.zeros(self.patient.grid.shape_zyx, bool)
            for m in self.pins.values():
                pinned |= m
            only_hotter = (self.oar_mask & ~self.target_mask & ~pinned).ravel()[cand]
            only_hotter = np.concatenate([only_hotter, np.zeros(resolved.voxels.size, bool)])
            feature = np.concatenate([np.zeros(only_hotter.size - resolved.voxels.size, bool),
                                      np.ones(resolved.voxels.size, bool)])
            reference = backend.asnumpy(eng.dose_at_voxels(cand)).astype(np.float64)
            # The requested feature is itself subject to recovery (section 3.1): its voxels are
            # watched too, with the requested doses as their reference.
            cand = np.concatenate([cand, resolved.voxels])
            reference = np.concatenate([reference, resolved.target_gy])
            timings["reference"] = (time.perf_counter() - t0) * 1000
            t0 = time.perf_counter()
            mod = self.modifier.modify(resolved.voxels, resolved.target_gy)
            timings["modify"] = (time.perf_counter() - t0) * 1000
            if not mod.patches:
                raise RequestError(
                    f"{req.kind}: no beam can change the dose there (no fluence reaches the voxel, "
                    "or the fluence is already at zero)")
            steps = self.options.recovery_steps if recovery_steps is None else int(recovery_steps)
            t0 = time.perf_counter()
            rec = None
            if steps > 0 and cand.size:
                tol = np.full(cand.size, self.options.tolerance_pct / 100.0 * self.prescription_gy)
                if isinstance(req, (MoveIsodoseLine, MoveIsodoseSurface)):
                    # A dragged isodose must stay on its side of the level: its voxels may drift
                    # by half the edge margin only (the general tolerance is larger than the margin).
                    tol[feature] = 0.5 * self.options.edge_margin_pct / 100.0 * req.level_gy
                rec = recover(self.modifier, cand, reference, resolved.feature_mask, steps=steps,
                              tol_gy=tol,
                              only_hotter=only_hotter, feature=feature, cancel=cancel, progress=progress)
                timings.update({f"recovery_{k}": v for k, v in rec.timings_ms.items()})
            timings["recovery"] = (time.perf_counter() - t0) * 1000
            backend.synchronize()
            patches = list(mod.patches) + (list(rec.patches) if rec else [])
            return self._journal(req, resolved, mod, rec, timings, patches)

    def _journal(self, req, resolved: Resolved, mod, rec, timings: dict, patches: list) -> RequestResult:
        final = (backend.asnumpy(self.engine.dose_at_voxels(resolved.voxels)).astype(np.float64)
                 if resolved.voxels.size else np.zeros(0))
        res = RequestResult(
            id=self._next_id, request=req, voxels=resolved.voxels, requested_gy=resolved.target_gy,
            before_gy=mod.before_gy if mod else np.zeros(0), after_modification_gy=mod.achieved_gy if mod else np.zeros(0),
            final_gy=final, recovery_steps=rec.steps if rec else 0,
            remaining_candidates=rec.remaining_candidates if rec else 0, patches=patches, timings_ms=timings)
        self._next_id += 1
        self.journal.append(res)
        self._redo.clear()
        if patches:
            self.plan_id += 1
        self._append_request(res)
        return res

    def undo(self) -> RequestResult | None:
        """Take back the last request (applies its patches negated, newest first)."""
        with self._lock:
            if not self.journal:
                return None
            res = self.journal.pop()
            self._apply_pins_undo(res)
            self.engine.apply_patches([FluencePatch(p.beam, p.row0, p.col0, -p.delta) for p in reversed(res.patches)])
            self._redo.append(res)
            if res.patches:
                self.plan_id += 1
            self._append_op({"op": "undo"})
            return res

    def redo(self) -> RequestResult | None:
        """Re-apply the last undone request's patches."""
        with self._lock:
            if not self._redo:
                return None
            res = self._redo.pop()
            self._apply_pins_redo(res)
            self.engine.apply_patches(res.patches)
            self.journal.append(res)
            if res.patches:
                self.plan_id += 1
            self._append_op({"op": "redo"})
            return res

    def _apply_pins_undo(self, res: RequestResult) -> None:
        if isinstance(res.request, Pin):
            self.pins.pop(res.request.name, None)
        elif isinstance(res.request, Unpin):
            self.pins[res.request.name] = self._pin_mask(res.request.name)

    def _apply_pins_redo(self, res: RequestResult) -> None:
        if isinstance(res.request, Pin):
            g = self.patient.grid
            self.pins[res.request.name] = ball_mask(g.shape_zyx, g.spacing_mm_zyx, res.request.centre_zyx, res.request.radius_mm) & self.engine.body_mask
        elif isinstance(res.request, Unpin):
            self.pins.pop(res.request.name, None)

    def _pin_mask(self, name: str) -> np.ndarray:
        for r in reversed(self.journal):
            if isinstance(r.request, Pin) and r.request.name == name:
                g = self.patient.grid
                return ball_mask(g.shape_zyx, g.spacing_mm_zyx, r.request.centre_zyx, r.request.radius_mm) & self.engine.body_mask
        raise KeyError(name)

    # ------------------------------------------------------------------ persistence
    # A session folder holds ``session.json`` (case, beams, options; written once),
    # ``initial_fluences.npz``, ``requests/r<id>.npz`` (the patches of one request) and
    # ``journal.jsonl``, one line per operation (a request, an undo, a redo) appended and
    # fsync'ed after the request's patches are safely on disk. A crash therefore loses at
    # most the operation in flight, and a torn last line is ignored when reopening.

    def save(self, folder: "str | Path") -> Path:
        """Write the whole session to a new folder ("save as") and keep journaling there."""
        folder = Path(folder)
        self._write_header(folder)
        self._journal_dir = folder
        for res in self.journal:
            self._append_request(res)
        # The redo stack is saved as requests followed by undos, newest first undone last.
        for res in reversed(self._redo):
            self._append_request(res)
        for _ in self._redo:
            self._append_op({"op": "undo"})
        return folder

    def attach_journal(self, folder: "str | Path") -> Path:
        """Start journaling to ``folder`` (autosave after every operation); same as :meth:`save`."""
        return self.save(folder)

    def _write_header(self, folder: Path) -> None:
        if not self.case:
            raise ValueError("save: this session has no case description (open it from a phantom, DICOM or matRad file)")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "requests").mkdir(exist_ok=True)
        for old in (folder / "requests").glob("r*.npz"):
            old.unlink()
        _atomic_npz(folder / "initial_fluences.npz", {f"fluence_{b}": f for b, f in enumerate(self.initial_fluences)})
        doc = {
            "format": "ids-engine session", "version": __version__, "case": self.case,
            "prescription_gy": self.prescription_gy,
            "beams": [_beam_to_dict(g.beam) for g in self.engine.geometry],
            "engine_options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.engine.options.__dict__.items()},
            "dmr_options": dict(self.options.__dict__),
        }
        _atomic_text(folder / "session.json", json.dumps(doc, indent=1))
        _atomic_text(folder / "journal.jsonl", "")

    def _append_request(self, res: RequestResult) -> None:
        folder = getattr(self, "_journal_dir", None)
        if folder is None:
            return
        name = f"r{res.id}.npz"
        arrays = {f"p{k}": p.delta for k, p in enumerate(res.patches)}
        _atomic_npz(folder / "requests" / name, arrays)
        self._append_op({"op": "request", "summary": res.summary(), "file": name,
                         "patches": [[f"p{k}", int(p.beam), int(p.row0), int(p.col0)] for k, p in enumerate(res.patches)]})

    def _append_op(self, entry: dict) -> None:
        folder = getattr(self, "_journal_dir", None)
        if folder is None:
            return
        entry = {**entry, "plan_id": self.plan_id}
        with open(folder / "journal.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def load(cls, folder: "str | Path", *, progress=None, keep_journaling: bool = True) -> "Session":
        """Reopen a session folder: rebuild the case and replay the journal (identical plan).

        With ``keep_journaling`` further operations are appended to the same folder.
        """
        folder = Path(folder)
        try:
            doc = json.loads((folder / "session.json").read_text())
            initial = np.load(folder / "initial_fluences.npz")
            lines = (folder / "journal.jsonl").read_text(encoding="utf-8").splitlines()
        except (OSError, ValueError) as exc:
            raise ValueError(f"{folder}: not a readable ids-engine session ({exc})") from exc
        if doc.get("format") != "ids-engine session":
            raise ValueError(f"{folder / 'session.json'}: field 'format' is not 'ids-engine session'")
        patient = case_from_spec(doc["case"])
        beams = [Beam(**{**b, "isocentre_mm_xyz": tuple(b["isocentre_mm_xyz"])}) for b in doc["beams"]]
        eo = dict(doc["engine_options"])
        eo["coarse_factor_zyx"] = tuple(eo["coarse_factor_zyx"])
        fluences = [initial[f"fluence_{b}"] for b in range(len(beams))]
        s = cls(patient, beams, prescription_gy=doc["prescription_gy"], fluences=fluences,
                engine_options=EngineOptions(**eo), dmr_options=DMROptions(**doc["dmr_options"]), case=doc["case"],
                progress=progress)
        plan_id = s.plan_id
        for n, line in enumerate(lines):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines) - 1:
                    break  # a torn last line: the operation in flight when the session stopped
                raise ValueError(f"{folder / 'journal.jsonl'}: line {n + 1} is not valid JSON") from None
            op = entry.get("op")
            if op == "undo":
                s.undo()
            elif op == "redo":
                s.redo()
            elif op == "clear_redo":
                s._redo.clear()
            elif op == "request":
                try:
                    arrays = np.load(folder / "requests" / entry["file"])
                except OSError as exc:
                    raise ValueError(f"{folder / 'requests' / entry['file']}: missing or unreadable ({exc})") from exc
                s._replay(entry["summary"], [FluencePatch(b, r, c, arrays[key]) for key, b, r, c in entry["patches"]])
            else:
                raise ValueError(f"{folder / 'journal.jsonl'}: line {n + 1}: unknown op {op!r}")
            plan_id = int(entry.get("plan_id", plan_id))
        s.plan_id = plan_id
        if keep_journaling:
            s._journal_dir = folder
        return s

    def _replay(self, summ: dict, patches: list) -> None:
        req = request_from_dict(summ["request"])
        if isinstance(req, Pin):
            g = self.patient.grid
            self.pins[req.name] = ball_mask(g.shape_zyx, g.spacing_mm_zyx, req.centre_zyx, req.radius_mm) & self.engine.body_mask
        elif isinstance(req, Unpin):
            self.pins.pop(req.name, None)
        if patches:
            self.engine.apply_patches(patches)
        res = RequestResult(id=summ["id"], request=req, voxels=np.zeros(0, np.int64), requested_gy=np.array(summ["requested_gy"]),
                            before_gy=np.array(summ["before_gy"]), after_modification_gy=np.array(summ["after_modification_gy"]),
                            final_gy=np.array(summ["final_gy"]), recovery_steps=summ["recovery_steps"],
                            remaining_candidates=summ["remaining_candidates"], patches=patches, timings_ms=summ["timings_ms"])
        self.journal.append(res)
        self._redo.clear()
        self._next_id = max(self._next_id, res.id + 1)


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_npz(path: Path, arrays: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz")
    os.close(fd)
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
