"""The 3D view: body and structures as meshes, one isodose surface (solid, wire or off, with
adjustable opacity), and the isodose-surface drag.

Like the slice views it only renders what it is given (meshes from the loader and the worker,
the latest dose cube for picking) and reports gestures as Qt signals in voxel coordinates.
The scene is in millimetres from the centre of voxel 0 along the grid axes (x, y, z).

An orientation cue sits in the bottom-left corner: three axes along +x (red, the patient's
left, "L"), +y (green, posterior, "P") and +z (blue, the head, "H"), DICOM patient
coordinates, in a small view whose camera turns with the main one (the scene's axes are the
grid's, which grow with x, y and z).

Surface drag: a press casts the mouse ray through the dose cube and grabs the first point
where the dose reaches the surface level; moving the mouse drags that point within the
plane through it that faces the camera.
"""

from __future__ import annotations

import numpy as np
from PyQt6 import QtCore, QtWidgets
from vispy import scene
from vispy.visuals.filters import WireframeFilter

from ._backend import use_qt
from ._meshes import SurfaceMesh

__all__ = ["View3D"]

_PREVIEW_RADIUS_MM = 20.0
SURFACE_MODES = ("Solid", "Wire", "Off")


class _TranslucentMesh:
    """A see-through mesh without sorting artefacts: a depth-only pass, then a colour pass that
    blends only the front-most layer over what is already drawn (draw it after opaque things)."""

    def __init__(self, parent, order: int) -> None:
        # Fully transparent fragments with blending on leave the colour alone but write depth.
        self.depth_pass = scene.visuals.Mesh(parent=parent, color=(0.0, 0.0, 0.0, 0.0))
        self.depth_pass.set_gl_state("translucent", depth_test=True, depth_mask=True, cull_face=False)
        self.colour_pass = scene.visuals.Mesh(parent=parent, shading="smooth")
        # depth_mask stays on (writing the same depths is harmless): GL state outlives the draw
        # call, and with depth writes off the next frame's clear would leave the depth buffer stale.
        self.colour_pass.set_gl_state("translucent", depth_test=True, depth_func="lequal", depth_mask=True,
                                      cull_face=False)
        self.depth_pass.order = order
        self.colour_pass.order = order + 1
        self.visible = False

    @property
    def visible(self) -> bool:
        return self.colour_pass.visible

    @visible.setter
    def visible(self, on: bool) -> None:
        self.depth_pass.visible = bool(on)
        self.colour_pass.visible = bool(on)

    def set_data(self, vertices, faces, colour=None) -> None:
        self.depth_pass.set_data(vertices=vertices, faces=faces)
        self.colour_pass.set_data(vertices=vertices, faces=faces)
        if colour is not None:
            self.set_colour(colour)
        self.visible = True

    def set_colour(self, rgba) -> None:
        self.colour_pass.color = rgba

    def remove(self) -> None:
        self.depth_pass.parent = None
        self.colour_pass.parent = None


class View3D(QtWidgets.QFrame):
    """Meshes of the body, the structures and one isodose surface in a turntable view.

    Signals (positions in (z, y, x) voxel units): surface_drag_started(object start),
    surface_drag_moved(object end), surface_drag_finished(object end), surface_drag_cancelled(),
    message(str).
    """

    AXIS_LETTERS = ("L", "P", "H")  # the +x, +y, +z ends (DICOM patient coordinates)
    AXIS_COLOURS = ((1.0, 0.3, 0.3), (0.3, 1.0, 0.4), (0.35, 0.55, 1.0))
    CUE_PX = 90  # side of the orientation cue, logical pixels

    surface_drag_started = QtCore.pyqtSignal(object)
    surface_drag_moved = QtCore.pyqtSignal(object)
    surface_drag_finished = QtCore.pyqtSignal(object)
    surface_drag_cancelled = QtCore.pyqtSignal()
    message = QtCore.pyqtSignal(str)

    def __init__(self, parent=None) -> None:
        use_qt()
        super().__init__(parent)
        self.setObjectName("view-3d")
        self.header = QtWidgets.QLabel("3D")
        self.header.setObjectName("viewHeader")
        self.header.setSizePolicy(QtWidgets.QSizePolicy.Policy.Ignored, QtWidgets.QSizePolicy.Policy.Preferred)
        self.mode_box = QtWidgets.QComboBox()
        self.mode_box.addItems(SURFACE_MODES)
        self.mode_box.setToolTip("Isodose surface: solid, wireframe or hidden")
        self.opacity = QtWidgets.QSlider(QtCore.Qt.Orientation.Horizontal)
        self.opacity.setRange(5, 100)
        self.opacity.setValue(55)
        self.opacity.setFixedWidth(90)
        self.opacity.setToolTip("Isodose surface opacity")
        bar = QtWidgets.QWidget()
        bar.setObjectName("viewHeaderBar")
        hl = QtWidgets.QHBoxLayout(bar)
        hl.setContentsMargins(0, 0, 6, 0)
        hl.setSpacing(6)
        hl.addWidget(self.header, 1)
        hl.addWidget(QtWidgets.QLabel("Surface"))
        hl.addWidget(self.mode_box)
        hl.addWidget(QtWidgets.QLabel("Opacity"))
        hl.addWidget(self.opacity)

        self.canvas = scene.SceneCanvas(keys=None, show=False, bgcolor="#0b0d10", size=(320, 320))
        self.canvas.native.setMinimumSize(160, 160)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(0)
        lay.addWidget(bar)
        lay.addWidget(self.canvas.native, 1)
        self.view = self.canvas.central_widget.add_view()
        self.view.camera = scene.TurntableCamera(fov=30.0, elevation=38.0, azimuth=-25.0, up="+z")

        self._body: _TranslucentMesh | None = None
        self._structures: list[scene.visuals.Mesh] = []
        self._surface = _TranslucentMesh(self.view.scene, order=5)
        self._wire = WireframeFilter(width=1.0, wireframe_only=True, enabled=False)
        self._surface.colour_pass.attach(self._wire)
        self._drag_line = scene.visuals.Line(parent=self.view.scene, width=3, color=(1, 1, 1, 1))
        self._drag_line.order = 10
        self._drag_line.set_gl_state(depth_test=False)
        self._drag_line.visible = False
        self.cue = scene.widgets.ViewBox(parent=self.canvas.scene)
        self.cue.order = 50
        self.cue.size = (self.CUE_PX, self.CUE_PX)
        cam = self.view.camera
        self.cue.camera = scene.TurntableCamera(fov=0.0, elevation=cam.elevation, azimuth=cam.azimuth, up="+z",
                                                interactive=False)
        self.cue.camera.center = (0.0, 0.0, 0.0)
        self.cue.camera.scale_factor = 3.0
        self.cue.camera.link(cam, props=["azimuth", "elevation", "roll"])
        ends = np.eye(3, dtype=np.float32)
        colours = np.array([(*c, 1.0) for c in self.AXIS_COLOURS], np.float32)
        self._axes = scene.visuals.Line(pos=np.stack([np.zeros((3, 3), np.float32), ends], 1).reshape(-1, 3),
                                        color=np.repeat(colours, 2, axis=0), connect="segments", width=3,
                                        parent=self.cue.scene)
        self._axis_labels = scene.visuals.Text(list(self.AXIS_LETTERS), pos=1.3 * ends, color=colours, font_size=10,
                                               bold=True, face="DejaVu Sans", anchor_x="center", anchor_y="center",
                                               parent=self.cue.scene)
        for v in (self._axes, self._axis_labels):
            v.set_gl_state(depth_test=False)
        self.canvas.events.resize.connect(lambda _e: self._place_cue())
        self._place_cue()

        self.spacing_mm_zyx = (1.0, 1.0, 1.0)
        self.dose_gy: np.ndarray | None = None
        self.surface_mesh: SurfaceMesh | None = None
        self.surface_level_gy = 0.0
        self.plan_tag = ""  # which plan the frame shows, with its plan ID (seed 001)
        self.surface_colour = (1.0, 0.8, 0.1)
        self.tool = "navigate"
        self._drag: dict | None = None

        self.mode_box.currentTextChanged.connect(lambda _: self._style_surface())
        self.opacity.valueChanged.connect(lambda _: self._style_surface())
        ev = self.canvas.events
        # First in line so a surface grab can switch the camera off before it sees the press.
        ev.mouse_press.connect(self._on_press, position="first")
        ev.mouse_move.connect(self._on_move, position="first")
        ev.mouse_release.connect(self._on_release, position="first")

    # ------------------------------------------------------------------ inputs
    def set_case(self, spacing_mm_zyx, shape_zyx, body: SurfaceMesh | None, structures) -> None:
        """A new patient: grid spacing and shape, the body mesh and [(name, rgb, mesh)]."""
        self.spacing_mm_zyx = tuple(float(v) for v in spacing_mm_zyx)
        for m in self._structures:
            m.parent = None
        if self._body is not None:
            self._body.remove()
        self._structures = []
        self._body = None
        for _, rgb, mesh in structures:
            if mesh.empty:
                continue
            v = scene.visuals.Mesh(mesh.vertices_mm_xyz, mesh.faces, color=(*rgb, 0.85), shading="smooth",
                                   parent=self.view.scene)
            v.set_gl_state("translucent", depth_test=True, depth_mask=True, cull_face=False)
            v.order = 2  # structures before the translucent surfaces
            self._structures.append(v)
        if body is not None and not body.empty:
            self._body = _TranslucentMesh(self.view.scene, order=20)
            self._body.set_data(body.vertices_mm_xyz, body.faces, (0.80, 0.84, 0.90, 0.12))
        self.dose_gy = None
        self.surface_mesh = None
        self._surface.visible = False
        extent = np.asarray(shape_zyx, float)[::-1] * np.asarray(self.spacing_mm_zyx)[::-1]
        cam = self.view.camera
        cam.center = tuple(extent / 2.0)
        cam.scale_factor = float(np.linalg.norm(extent)) * 0.8
        self.canvas.update()

    def _place_cue(self) -> None:
        h = self.canvas.size[1]
        self.cue.pos = (4, h - self.CUE_PX - 4)
        self.canvas.update()

    def cue_to_canvas(self, xyz) -> np.ndarray:
        """Canvas pixel (logical) of a point of the orientation cue (unit axes along x, y, z)."""
        tr = self.cue.scene.node_transform(self.canvas.scene)
        p = np.asarray(tr.map([*xyz, 1.0]), float)
        return p[:2] / p[3]

    def set_dose(self, dose_gy: np.ndarray | None) -> None:
        """The latest dose cube (used for picking the surface)."""
        self.dose_gy = dose_gy

    def set_surface(self, mesh: SurfaceMesh | None, level_gy: float, colour) -> None:
        """The one isodose surface shown (seed 001: only one at a time), its level and colour."""
        self.surface_mesh = mesh
        self.surface_level_gy = float(level_gy)
        self.surface_colour = tuple(colour)
        self._refresh_header()
        if self._drag is None:
            self._show_mesh(mesh)

    def set_plan_tag(self, text: str) -> None:
        """Name the plan this frame shows (with its plan ID) in the header."""
        self.plan_tag = str(text)
        self._refresh_header()

    def _refresh_header(self) -> None:
        text = "3D"
        if self.surface_mesh is not None:
            text += f"    isodose surface {self.surface_level_gy:.3g} Gy"
        tag = self.plan_tag
        self.header.setText((f"{tag}    ·    " if tag else "") + text)
        self.header.setToolTip(self.header.text())

    def set_surface_mode(self, mode: str, opacity_pct: int | None = None) -> None:
        """Solid, Wire or Off, and optionally the opacity (5-100 %), as the header's controls do."""
        if mode not in SURFACE_MODES:
            raise ValueError(f"surface mode must be one of {SURFACE_MODES}, got {mode!r}")
        if opacity_pct is not None:
            self.opacity.setValue(int(opacity_pct))
        self.mode_box.setCurrentText(mode)
        self._style_surface()

    @property
    def surface_visible(self) -> bool:
        return bool(self._surface.visible)

    @property
    def wireframe(self) -> bool:
        return bool(self._wire.enabled)

    def set_tool(self, tool: str) -> None:
        if self._drag is not None:
            self._end_drag(cancel=True)
        self.tool = tool

    def clear_drag_preview(self) -> None:
        if self._drag is None:
            self._drag_line.visible = False
            self._show_mesh(self.surface_mesh)

    @property
    def dragging(self) -> bool:
        return self._drag is not None

    # ------------------------------------------------------------------ drawing
    def _show_mesh(self, mesh: SurfaceMesh | None, vertices: np.ndarray | None = None) -> None:
        if mesh is None or mesh.empty:
            self._surface.visible = False
        else:
            self._surface.set_data(mesh.vertices_mm_xyz if vertices is None else vertices, mesh.faces)
            self._style_surface()
        self.canvas.update()

    def _style_surface(self) -> None:
        mode = self.mode_box.currentText()
        has_mesh = self.surface_mesh is not None and not self.surface_mesh.empty
        self._surface.visible = has_mesh and mode != "Off"
        alpha = self.opacity.value() / 100.0
        self._surface.set_colour((*self.surface_colour, alpha))
        self._surface.depth_pass.visible = self._surface.visible and mode == "Solid"
        self._wire.enabled = mode == "Wire"
        self._wire.color = (*self.surface_colour, max(alpha, 0.6))
        self.canvas.update()

    # ------------------------------------------------------------------ picking
    def mouse_ray(self, pos) -> tuple[np.ndarray, np.ndarray]:
        """The ray under canvas pixel ``pos``: (origin, unit direction) in scene mm (x, y, z)."""
        tr = self.canvas.scene.node_transform(self.view.scene)
        p0 = np.asarray(tr.map([pos[0], pos[1], -1.0, 1.0]), float)
        p1 = np.asarray(tr.map([pos[0], pos[1], 1.0, 1.0]), float)
        p0 = p0[:3] / p0[3]
        p1 = p1[:3] / p1[3]
        d = p1 - p0
        return p0, d / np.linalg.norm(d)

    def scene_to_canvas(self, xyz_mm) -> np.ndarray:
        tr = self.canvas.scene.node_transform(self.view.scene)
        p = np.asarray(tr.imap([*xyz_mm, 1.0]), float)
        return p[:2] / p[3]

    def zyx_to_mm(self, zyx) -> np.ndarray:
        return np.asarray(zyx, float)[::-1] * np.asarray(self.spacing_mm_zyx)[::-1]

    def mm_to_zyx(self, xyz) -> np.ndarray:
        return (np.asarray(xyz, float) / np.asarray(self.spacing_mm_zyx)[::-1])[::-1]

    def pick_surface(self, pos) -> np.ndarray | None:
        """First point (z, y, x voxel units) along the mouse ray where the dose reaches the
        surface level, or None."""
        if self.dose_gy is None or self.surface_level_gy <= 0:
            return None
        origin, direction = self.mouse_ray(pos)
        shape = np.asarray(self.dose_gy.shape, float)
        hi_mm = (shape - 1.0)[::-1] * np.asarray(self.spacing_mm_zyx)[::-1]
        # Clip the ray to the grid box (slab method).
        with np.errstate(divide="ignore", invalid="ignore"):
            t0 = (0.0 - origin) / direction
            t1 = (hi_mm - origin) / direction
        tmin = np.nanmax(np.minimum(t0, t1))
        tmax = np.nanmin(np.maximum(t0, t1))
        if not tmax > max(tmin, 0.0):
            return None
        step = 0.5 * min(self.spacing_mm_zyx)
        ts = np.arange(max(tmin, 0.0), tmax, step)
        pts = origin + ts[:, None] * direction
        idx = np.clip(np.rint(pts / np.asarray(self.spacing_mm_zyx)[::-1])[:, ::-1], 0, shape - 1).astype(int)
        d = self.dose_gy[idx[:, 0], idx[:, 1], idx[:, 2]]
        hit = np.flatnonzero(d >= self.surface_level_gy)
        if hit.size == 0:
            return None
        return self.mm_to_zyx(pts[hit[0]])

    def _plane_point(self, pos) -> np.ndarray | None:
        d = self._drag
        origin, direction = self.mouse_ray(pos)
        denom = float(direction @ d["normal"])
        if abs(denom) < 1e-9:
            return None
        t = float((d["start_mm"] - origin) @ d["normal"]) / denom
        return origin + t * direction

    # ------------------------------------------------------------------ events
    def _on_press(self, event) -> None:
        if self.tool != "drag_isodose" or event.button != 1:
            return
        start = self.pick_surface(event.pos)
        if start is None:
            self.message.emit(f"Press on the {self.surface_level_gy:.3g} Gy isodose surface to drag it")
            return
        self.view.camera.interactive = False
        start_mm = self.zyx_to_mm(start)
        _, normal = self.mouse_ray(event.pos)
        self._drag = {"start_mm": start_mm, "normal": normal, "current_mm": start_mm}
        self._draw_preview()
        self.surface_drag_started.emit(tuple(float(v) for v in start))

    def _on_move(self, event) -> None:
        if self._drag is None:
            return
        p = self._plane_point(event.pos)
        if p is None:
            return
        self._drag["current_mm"] = p
        self._draw_preview()
        self.surface_drag_moved.emit(tuple(float(v) for v in self.mm_to_zyx(p)))

    def _on_release(self, event) -> None:
        if self._drag is None or event.button != 1:
            return
        p = self._plane_point(event.pos)
        if p is not None:
            self._drag["current_mm"] = p
        end = self.mm_to_zyx(self._drag["current_mm"])
        self._end_drag(cancel=False)
        self.surface_drag_finished.emit(tuple(float(v) for v in end))

    def _end_drag(self, cancel: bool) -> None:
        self._drag = None
        self.view.camera.interactive = True
        if cancel:
            self.clear_drag_preview()
            self.surface_drag_cancelled.emit()

    def _draw_preview(self) -> None:
        d = self._drag
        a, b = d["start_mm"], d["current_mm"]
        self._drag_line.set_data(pos=np.array([a, b], np.float32))
        self._drag_line.visible = True
        mesh = self.surface_mesh
        if mesh is not None and not mesh.empty:
            v = mesh.vertices_mm_xyz.astype(np.float64)
            w = np.clip(1.0 - np.linalg.norm(v - a, axis=1) / _PREVIEW_RADIUS_MM, 0.0, 1.0) ** 2
            self._show_mesh(mesh, (v + w[:, None] * (b - a)).astype(np.float32))
        self.canvas.update()
