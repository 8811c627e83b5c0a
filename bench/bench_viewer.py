"""Viewer benchmark: the GUI's hot paths on the horseshoe phantom (9 beams), in a real window.

Run under a display (Xvfb + Mesa in CI and on a CPU machine):

    xvfb-run -a -s "-screen 0 1920x1200x24" python bench/bench_viewer.py [--resolution clinical|coarse] [--frames 30]

Set-up (building the session and the window's meshes, creating and showing the window, the
worker's first snapshot) stays outside the timed part; every stage is warmed up first.

Stages (milliseconds):

- ``snapshot``: the worker building a final :class:`~ids_engine.viewer.worker.Snapshot` after a
  request (``EngineWorker._snapshot``: host dose copy, history, DVHs of every structure and the
  isodose surface mesh), called on the GUI thread while the worker is idle.
  ``snapshot_preview``: the same for a drag preview (no surface; DVHs only within the
  worker's budget). ``snapshot_dvh`` and ``snapshot_surface`` are its two costly parts.
- ``apply_snapshot``: ``MainWindow._on_snapshot`` with a final snapshot: the three slice views
  (CT + dose wash, isodose lines and labels), the 3D surface, the DVH curves and the history
  list; the UI-thread cost of one engine update, not counting the canvas draws it schedules.
  ``apply_snapshot_preview``: the same with a preview snapshot (no surface).
- ``render_frame_axial`` / ``_coronal`` / ``_sagittal`` / ``_3d``: one full render of each canvas
  (``canvas.render()``: the scene into an off-screen framebuffer, read back);
  ``render_frame``: the four one after the other. ``window_frame``: the path a screen frame
  takes: the four canvases marked dirty, then the window's update request, synchronously (each
  canvas's paintGL, Qt's composition of the GL widgets with the rest of the window, the flush
  to the X server); ``window_frame_axial``: the same with only the axial canvas dirty, which is
  what one mouse move of a line drag redraws; ``window_frame_3d``: only the 3D canvas (what a
  move of an isodose-surface drag redraws).
- A drag: real mouse events (``QTest.mousePress/mouseMove/mouseRelease``, as the window tests
  do) on the axial canvas with the "Drag isodose" tool, pressing on the 95 % line at its
  right-most point and moving outwards ``--drag-mm`` in ``--moves`` mouse moves at
  ``--mouse-hz``, the Qt event loop running between moves. Each move the window turns into a
  MoveIsodoseLine preview for the worker (coalesced with newer ones); the release commits the
  final request. Repeated ``--drags`` times after one warm-up drag, undoing in between.
  ``drag_preview_latency``: from the move that submitted a preview (its job's
  ``submitted_at``) to its snapshot arriving on the GUI thread (before it is applied), for
  every preview snapshot that arrived; it includes waiting behind a preview in progress.
  ``drag_preview_engine``: the worker's time running those previews (Snapshot.engine_ms).
  ``drag_release_latency``: release (the commit job) to the final snapshot arriving;
  ``drag_release_engine``: the worker's time on it (undoing the previews, the full request).
  ``drag_preview_applied``: a preview's move to the window having applied its snapshot.
  ``preview_request_idle`` / ``release_request_idle``: the last drag's final request run
  directly with the window idle, with the worker's preview settings (no side-effect check) and
  with full recovery: the engine's cost when nothing competes with it for the CPU.
  ``drag_move_handler``: the synchronous handling of one mouse move on the GUI thread (the
  view's move handler and drag-preview line, the window's hover read-out and preview request;
  the redraw it schedules comes later). ``drag_frame``: the time between consecutive draws of the axial canvas while the button is
  down. ``frames_per_second_during_drag``: per drag, axial draws / the drag's wall time
  (press to release); its ``median_ms`` etc. are milliseconds per frame (1000 / fps) so the
  table keeps one unit, and ``median_fps`` etc. carry the rates.

Writes ``bench/results/viewer-horseshoe[-coarse]-<backend>-<device>.json`` (BENCH.md format).
The reference is the issue's target of 20 frames per second during a drag (50 ms per frame)
on a GPU machine. Here rendering is Mesa's software OpenGL (llvmpipe) under Xvfb, on the same
CPU cores as the engine: frame times are an upper bound.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, time_stage, write_result  # noqa: E402

from ids_engine import backend  # noqa: E402

RX = 60.0
TARGET_MS = {"drag_frame": 50.0}
WAIT_S = 120.0


def stats(values_ms) -> dict:
    t = np.asarray(values_ms, float)
    if t.size == 0:
        return {"median_ms": float("nan"), "p10_ms": float("nan"), "p90_ms": float("nan"), "n": 0}
    return {"median_ms": float(np.median(t)), "p10_ms": float(np.percentile(t, 10)),
            "p90_ms": float(np.percentile(t, 90)), "n": int(t.size)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", default="clinical", choices=["clinical", "coarse"])
    ap.add_argument("--frames", type=int, default=30, help="timed repetitions of the per-frame stages")
    ap.add_argument("--moves", type=int, default=60, help="mouse moves per drag")
    ap.add_argument("--mouse-hz", type=float, default=60.0, help="mouse move rate during a drag")
    ap.add_argument("--drag-mm", type=float, default=10.0, help="how far each drag moves the line outwards")
    ap.add_argument("--drags", type=int, default=3, help="timed drags (after one warm-up drag)")
    ap.add_argument("--profile", action="store_true", help="print cProfile tops of apply_snapshot and snapshot")
    args = ap.parse_args(argv)

    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        print("bench_viewer needs a display with OpenGL: run it as\n"
              '  xvfb-run -a -s "-screen 0 1920x1200x24" python bench/bench_viewer.py', file=sys.stderr)
        return 2

    from PyQt6 import QtCore, QtWidgets
    from PyQt6.QtTest import QTest

    from ids_engine.viewer._backend import use_qt
    from ids_engine.viewer._loading import build_session, case_display
    from ids_engine.viewer._theme import apply_theme
    from ids_engine.viewer.app import MainWindow
    from ids_engine.viewer.worker import PREVIEW_MAX_VOXELS, PREVIEW_RECOVERY_STEPS, Snapshot, _Job

    use_qt()
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    apply_theme(app)

    def pump(ms: float) -> None:
        """Run the Qt event loop for ``ms`` (blocking on events, not spinning)."""
        loop = QtCore.QEventLoop()
        QtCore.QTimer.singleShot(max(0, int(round(ms))), loop.quit)
        loop.exec()

    def wait_until(pred, timeout_s: float = WAIT_S) -> None:
        t_end = time.perf_counter() + timeout_s
        while not pred():
            if time.perf_counter() > t_end:
                raise TimeoutError("the viewer did not get there in time")
            pump(2)

    # ------------------------------------------------------------------ set-up (untimed)
    t0 = time.perf_counter()
    session = build_session({"phantom": "horseshoe", "resolution": args.resolution}, RX)
    display = case_display(session)
    setup_session_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    w = MainWindow()
    w.show()
    QTest.qWaitForWindowExposed(w)
    w.activateWindow()
    w.set_session(session, display)
    wait_until(lambda: w.idle)
    pump(100)  # the canvases take their laid-out sizes and draw once
    setup_window_s = time.perf_counter() - t0

    views = w.slice_views
    canvases = {"axial": views["z"].canvas, "coronal": views["y"].canvas, "sagittal": views["x"].canvas,
                "3d": w.view3d.canvas}

    # Every real draw of every canvas (paintGL -> vispy's draw event), time-stamped.
    draws: dict[str, list[float]] = {k: [] for k in canvases}
    for name, c in canvases.items():
        c.events.draw.connect(lambda _e, n=name: draws[n].append(time.perf_counter()), position="last")

    # Snapshot arrival on the GUI thread (before the window applies it) and after it is applied.
    class Recorder(QtCore.QObject):
        def __init__(self):
            super().__init__()
            self.rows: dict[int, dict] = {}

        @QtCore.pyqtSlot(object)
        def arrived(self, snap: Snapshot) -> None:
            self.rows[snap.job_id] = {"kind": snap.job_kind, "final": snap.final, "submitted": snap.submitted_at,
                                      "arrived": time.perf_counter(), "engine_ms": snap.engine_ms}

        @QtCore.pyqtSlot(object)
        def applied(self, snap: Snapshot) -> None:
            if snap.job_id in self.rows:
                self.rows[snap.job_id]["applied"] = time.perf_counter()

    rec = Recorder()
    sig = w.worker.snapshot
    sig.disconnect(w._on_snapshot)
    sig.connect(rec.arrived)
    sig.connect(w._on_snapshot)
    sig.connect(rec.applied)

    from vispy.gloo import gl

    canvases["axial"].set_current()
    gl_renderer = gl.glGetParameter(gl.GL_RENDERER)
    gl_version = gl.glGetParameter(gl.GL_VERSION)

    stages: dict[str, dict] = {}
    n = args.frames
    eng = w.worker.engine

    # ------------------------------------------------------------------ snapshot (worker side)
    def make_snapshot(final: bool) -> Snapshot:
        job = _Job(w.snapshot.job_id, "refresh" if final else "preview")
        return eng._snapshot(job, final, 0.0, None)

    wait_until(lambda: w.idle)
    stages["snapshot"] = time_stage(lambda: make_snapshot(True), n=max(5, n // 3))
    stages["snapshot_preview"] = time_stage(lambda: make_snapshot(False), n=max(5, n // 3))
    from ids_engine.evaluation import dvh as _dvh
    from ids_engine.viewer._meshes import level_mesh

    dose = session.dose()
    vcc = session.patient.grid.voxel_volume_cc
    stages["snapshot_dvh"] = time_stage(
        lambda: [_dvh(st.name, dose, st.mask, vcc) for st in session.patient.structures if st.mask.any()],
        n=max(5, n // 3))
    stages["snapshot_surface"] = time_stage(
        lambda: level_mesh(dose, w.selected_level_gy, session.patient.grid.spacing_mm_zyx), n=max(5, n // 3))

    final_snap = make_snapshot(True)
    preview_snap = make_snapshot(False)
    surface_faces = int(len(final_snap.surface.faces)) if final_snap.surface is not None else 0

    # ------------------------------------------------------------------ apply a snapshot (GUI thread)
    stages["apply_snapshot"] = time_stage(lambda: w._on_snapshot(final_snap), n=n)
    pump(50)
    stages["apply_snapshot_preview"] = time_stage(lambda: w._on_snapshot(preview_snap), n=n)
    w._on_snapshot(final_snap)
    pump(100)

    # ------------------------------------------------------------------ render
    for name, c in canvases.items():
        stages[f"render_frame_{name}"] = time_stage(c.render, n=n)
    stages["render_frame"] = time_stage(lambda: [c.render() for c in canvases.values()], n=n)
    # A screen frame: mark canvases dirty and let the window's update request paint them (each
    # canvas's paintGL into its framebuffer), compose the GL widgets with the rest of the window
    # and flush it to the X server, synchronously. (QWidget.repaint() paints nothing here: with
    # GL widgets Qt6 defers it to the next update request.)
    def window_frame(names) -> None:
        for k in names:
            canvases[k].native.update()
        QtWidgets.QApplication.sendEvent(w, QtCore.QEvent(QtCore.QEvent.Type.UpdateRequest))

    frame_draws = {}
    for stage, names in (("window_frame", tuple(canvases)), ("window_frame_axial", ("axial",)),
                         ("window_frame_3d", ("3d",))):
        pump(50)
        n_draws = sum(len(v) for v in draws.values())
        stages[stage] = time_stage(lambda names=names: window_frame(names), n=n)
        frame_draws[stage] = round((sum(len(v) for v in draws.values()) - n_draws) / (n + 1), 2)
    pump(100)

    profiles = {}
    if args.profile:
        profiles = _profiles(w, make_snapshot, final_snap, canvases)

    # ------------------------------------------------------------------ drags
    axial = views["z"]
    native = axial.canvas.native
    w.tool_actions["drag_isodose"].trigger()
    level = w.selected_level_gy
    left = QtCore.Qt.MouseButton.LeftButton
    nomod = QtCore.Qt.KeyboardModifier.NoModifier

    def qpoint(p) -> QtCore.QPoint:
        return QtCore.QPoint(int(round(float(p[0]))), int(round(float(p[1]))))

    def one_drag() -> dict:
        wait_until(lambda: w.idle)
        segs = axial.isodose_segments(level)
        if not len(segs):
            raise RuntimeError(f"no {level:g} Gy isodose on the axial slice")
        mid = segs.mean(axis=1)
        a_rc = mid[np.argmax(mid[:, 1])]  # the right-most point of the line
        b_rc = (a_rc[0], a_rc[1] + args.drag_mm / axial.spacing_rc[1])
        pa, pb = axial.rc_to_canvas(a_rc), axial.rc_to_canvas(b_rc)
        group0 = w._groups
        jobs: list[int] = []
        handler_ms: list[float] = []
        draw_mark = len(draws["axial"])
        interval = 1.0 / args.mouse_hz
        t_press = time.perf_counter()
        QTest.mousePress(native, left, nomod, qpoint(pa))
        if not axial.dragging or w._groups != group0 + 1:
            raise RuntimeError("the press did not grab the isodose line")
        t_next = t_press
        for t in np.linspace(0.0, 1.0, args.moves + 1)[1:]:
            t_next += interval
            pump((t_next - time.perf_counter()) * 1000.0)
            before = w.last_job_id
            tm = time.perf_counter()
            QTest.mouseMove(native, qpoint(pa + t * (pb - pa)))
            handler_ms.append((time.perf_counter() - tm) * 1000.0)
            if w.last_job_id != before:
                jobs.append(w.last_job_id)
        pump((t_next + interval - time.perf_counter()) * 1000.0)
        t_release = time.perf_counter()
        QTest.mouseRelease(native, left, nomod, qpoint(pb))
        commit = w._pending_commit
        wait_until(lambda: w.idle and w._pending_commit == 0 and commit in rec.rows)
        frames = [t for t in draws["axial"][draw_mark:] if t_press <= t <= t_release]
        previews = [rec.rows[j] for j in jobs if j in rec.rows]
        c = rec.rows[commit]
        out = {
            "wall_s": t_release - t_press,
            "frames": len(frames),
            "frame_intervals_ms": list(np.diff(frames) * 1000.0),
            "all_canvas_draws": sum(1 for k in draws for t in draws[k] if t_press <= t <= t_release),
            "move_handler_ms": handler_ms,
            "previews_submitted": len(jobs),
            "previews_shown": len(previews),
            "preview_latency_ms": [(r["arrived"] - r["submitted"]) * 1000.0 for r in previews],
            "preview_applied_ms": [(r["applied"] - r["submitted"]) * 1000.0 for r in previews if "applied" in r],
            "preview_engine_ms": [r["engine_ms"] for r in previews],
            "release_latency_ms": (c["arrived"] - c["submitted"]) * 1000.0,
            "release_applied_ms": (c["applied"] - c["submitted"]) * 1000.0,
            "release_engine_ms": c["engine_ms"],
        }
        if len(session.journal) != 1:
            raise RuntimeError(f"a drag should leave one journal entry, found {len(session.journal)}")
        out["request"] = session.journal[-1].request
        w.undo()
        wait_until(lambda: w.idle and not session.journal)
        pump(50)
        return out

    one_drag()  # warm-up
    drags = [one_drag() for _ in range(args.drags)]

    # The last drag's final request run on the GUI thread with the window idle (worker waiting),
    # with preview settings and with full recovery: the engine's cost without the GUI competing.
    wait_until(lambda: w.idle)
    req = drags[-1]["request"]

    def run_idle(n_runs: int, **kw) -> dict:
        times = []
        for i in range(n_runs + 1):
            t0 = time.perf_counter()
            session.run(req, **kw)
            backend.synchronize()
            if i:
                times.append((time.perf_counter() - t0) * 1000.0)
            session.undo()
            session.clear_redo()
        return stats(times)

    # As the worker runs a preview: no side-effect check or repair (the release does them).
    stages["preview_request_idle"] = run_idle(5, recovery_steps=PREVIEW_RECOVERY_STEPS, max_voxels=PREVIEW_MAX_VOXELS,
                                              side_effects=False)
    stages["release_request_idle"] = run_idle(3)

    def cat(key):
        return [v for d in drags for v in d[key]]

    stages["drag_preview_latency"] = stats(cat("preview_latency_ms"))
    stages["drag_preview_applied"] = stats(cat("preview_applied_ms"))
    stages["drag_preview_engine"] = stats(cat("preview_engine_ms"))
    stages["drag_release_latency"] = stats([d["release_latency_ms"] for d in drags])
    stages["drag_release_engine"] = stats([d["release_engine_ms"] for d in drags])
    stages["drag_move_handler"] = stats(cat("move_handler_ms"))
    stages["drag_frame"] = stats(cat("frame_intervals_ms"))
    fps = np.array([d["frames"] / d["wall_s"] for d in drags])
    fps_stage = stats(1000.0 / np.maximum(fps, 1e-9))
    fps_stage.update({"median_fps": float(np.median(fps)), "p10_fps": float(np.percentile(fps, 10)),
                      "p90_fps": float(np.percentile(fps, 90))})
    stages["frames_per_second_during_drag"] = fps_stage

    sizes = {k: [int(c.size[0]), int(c.size[1])] for k, c in canvases.items()}
    case = {
        "phantom": "horseshoe", "resolution": args.resolution,
        **{k: v for k, v in session.engine.describe().items() if k in ("grid_shape_zyx", "spacing_mm_zyx", "beams",
                                                                      "body_voxels")},
        "prescription_gy": RX,
        "rendering": ("Mesa software OpenGL (llvmpipe) under Xvfb on the CPU, no GPU: the engine worker, Qt and "
                      "the rasteriser share the same cores, so frame times are an upper bound"),
        "gl_renderer": str(gl_renderer), "gl_version": str(gl_version), "cpu_cores": os.cpu_count(),
        "window_px": [w.width(), w.height()], "canvas_px": sizes,
        "isodose_levels": len(w.levels), "surface_faces": surface_faces,
        "drag": {"how": "real Qt mouse events (QTest) on the axial canvas, Drag isodose tool, from the right-most "
                        "point of the 95 % line outwards",
                 "level_gy": level, "drag_mm": args.drag_mm, "moves": args.moves, "mouse_hz": args.mouse_hz,
                 "drags": args.drags, "warmup_drags": 1,
                 "preview_recovery_steps": PREVIEW_RECOVERY_STEPS, "preview_max_voxels": PREVIEW_MAX_VOXELS,
                 "previews_submitted_per_drag": [d["previews_submitted"] for d in drags],
                 "previews_shown_per_drag": [d["previews_shown"] for d in drags],
                 "axial_frames_per_drag": [d["frames"] for d in drags],
                 "all_canvas_draws_per_drag": [d["all_canvas_draws"] for d in drags],
                 "drag_wall_s": [round(d["wall_s"], 3) for d in drags]},
        "canvas_draws_per_window_frame": frame_draws,
        "setup_session_s": round(setup_session_s, 2), "setup_window_s": round(setup_window_s, 2),
    }
    path = write_result("viewer-horseshoe", case, stages,
                        reference={"source": "issue target", "stages_ms": TARGET_MS}, quality={},
                        suffix="" if args.resolution == "clinical" else args.resolution)
    info = backend.backend_info()
    print_table(f"Viewer, horseshoe ({args.resolution}), 9 beams, engine {info.name} on {info.device}; "
                f"GL: {gl_renderer}", stages, TARGET_MS)
    print(f"  frames per second during a drag: median {fps_stage['median_fps']:.1f} "
          f"(p10 {fps_stage['p10_fps']:.1f}, p90 {fps_stage['p90_fps']:.1f}, {args.drags} drags); target 20")
    for k in ("previews_submitted_per_drag", "previews_shown_per_drag", "axial_frames_per_drag",
              "all_canvas_draws_per_drag", "drag_wall_s"):
        print(f"  {k}: {case['drag'][k]}")
    print(f"  window {case['window_px']} px, canvases {sizes}; surface {surface_faces} faces; "
          f"set-up: session {setup_session_s:.1f} s, window {setup_window_s:.1f} s")
    for title, text in profiles.items():
        print(f"\n--- profile: {title}\n{text}")
    print(f"  -> {path}")
    w.close()
    app.processEvents()
    return 0


def _profiles(w, make_snapshot, final_snap, canvases) -> dict:
    import cProfile
    import io
    import pstats

    out = {}
    for title, fn in (("apply_snapshot x10", lambda: [w._on_snapshot(final_snap) for _ in range(10)]),
                      ("snapshot x5", lambda: [make_snapshot(True) for _ in range(5)]),
                      ("render_frame x10", lambda: [[c.render() for c in canvases.values()] for _ in range(10)])):
        pr = cProfile.Profile()
        pr.enable()
        fn()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(22)
        out[title] = "\n".join(line for line in s.getvalue().splitlines() if line.strip())
    return out


if __name__ == "__main__":
    sys.exit(main())
