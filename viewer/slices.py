"""Axial, coronal and sagittal slice views (vispy SceneCanvas in a Qt widget).

A :class:`SliceView` renders host arrays it is given (CT, structure masks, the newest final
dose cube or a drag preview's slice, pins) and turns mouse and key input into Qt signals in voxel coordinates. It never
calls the engine: the main window turns its signals into requests for the worker.

Coordinates: a slice is a 2D array of the (z, y, x) volume with ``axis`` fixed ("z" axial:
rows j, columns i; "y" coronal: rows k, columns i; "x" sagittal: rows k, columns j), the
same (row, column) convention as :class:`ids_engine.dmr.MoveIsodoseLine`. The scene is in
millimetres from the centre of voxel 0: scene (X, Y) = (column * column spacing,
row * row spacing). Axial views have anterior up, coronal and sagittal superior up; the
patient's left is on the viewer's right. Letters at the view's edges (A/P, R/L, H/F, DICOM
patient coordinates) are derived from the scene transform, so they follow what is drawn.

Slices and voxels are named 0-based in (z, y, x) order, as scripts give ``index_zyx``:
the axial view's header says "slice z=21".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PyQt6 import QtCore, QtGui, QtWidgets
from vispy import scene
from vispy.scene.cameras import PanZoomCamera
from vispy.util import keys as vkeys
from vispy.visuals.transforms import STTransform

from ._backend import use_qt
from ._contours import asterisk_segments, downhill_ticks, hot_spot_rc, isoline_segments, label_anchor, nearest_on_segments
from ._style import NORMAL_LINE_WIDTH_PX, ORIENTATION, IsodoseDisplay, IsodoseLevel, compose_slice_rgba

__all__ = ["AXES", "PointMark", "SliceView", "patient_point_marks", "point_marks", "rc_to_zyx", "take_slice",
           "zyx_to_rc"]

AXES = {"z": "Axial", "y": "Coronal", "x": "Sagittal"}
_ROW_COL = {"z": (1, 2), "y": (0, 2), "x": (0, 1)}  # which (z, y, x) axes are rows, columns

TOOLS = ("navigate", "set_dose", "drag_isodose", "erase", "pin")
_CURSORS = {
    "navigate": QtCore.Qt.CursorShape.CrossCursor,
    "set_dose": QtCore.Qt.CursorShape.PointingHandCursor,
    "drag_isodose": QtCore.Qt.CursorShape.OpenHandCursor,
    "erase": QtCore.Qt.CursorShape.CrossCursor,
    "pin": QtCore.Qt.CursorShape.CrossCursor,
}
# Drag preview: contour points within this distance (mm) of the grab point follow the mouse.
_PREVIEW_RADIUS_MM = 18.0
_PREVIEW_CORE_MM = 4.0
# How close (mm, plus a few screen pixels) a press must be to the selected isodose to grab it.
_GRAB_TOLERANCE_MM = 4.0
_GRAB_TOLERANCE_PX = 6.0
# Isodose labels keep at least this far apart (screen pixels).
_LABEL_SEPARATION_PX = 40.0
# Downhill ticks on the isodose lines: length and spacing along the line (screen pixels).
_TICK_LENGTH_PX = 5.0
_TICK_SPACING_PX = 22.0
# The hot spot's asterisk: radius (screen pixels) and colour.
_HOT_RADIUS_PX = 7.0
HOT_SPOT_COLOUR = (1.0, 1.0, 1.0)
# Points of interest: a cross with its label and doses.
POINT_COLOUR = (1.0, 0.95, 0.55, 1.0)
_POINT_RADIUS_PX = 5.0


@dataclass(frozen=True)
class PointMark:
    """A point of interest drawn on the slices: its label, position (z, y, x voxel units) and
    the lines written under the label (its dose, a measured dose with an "m")."""

    label: str
    zyx: tuple[float, float, float]
    lines: tuple[str, ...] = ()


def point_marks(labels, positions_mm_xyz, grid, dose_gy=None, measured_gy=None) -> tuple[PointMark, ...]:
    """Marks for points given in patient mm: the computed dose below each label, the measured
    one below that with an "m" appended (seed 001, "Display Point Dose", "Compare to
    Measured"); a dose of None (or nan) is left out. Points outside the grid are left out."""
    idx = grid.world_to_index(np.asarray(positions_mm_xyz, np.float64).reshape(-1, 3))
    inside = grid.contains(np.asarray(positions_mm_xyz, np.float64).reshape(-1, 3))
    out = []
    for k, lab in enumerate(labels):
        if not inside[k]:
            continue
        lines = []
        for value, suffix in ((None if dose_gy is None else dose_gy[k], " Gy"),
                              (None if measured_gy is None else measured_gy[k], " Gy m")):
            if value is not None and np.isfinite(value):
                lines.append(f"{float(value):.2f}{suffix}")
        out.append(PointMark(str(lab), tuple(float(v) for v in idx[k]), tuple(lines)))
    return tuple(out)


def patient_point_marks(patient, dose_gy: np.ndarray, measured: dict | None = None) -> tuple[PointMark, ...]:
    """Marks for the patient's points with their dose read from a displayed dose cube
    ((z, y, x) Gy, trilinear between voxel centres: a display value; the engine's reference
    point dose is :func:`ids_engine.evaluation.point_doses`). ``measured``: {label: Gy},
    matched by label lower-cased without spaces."""
    from scipy import ndimage

    from ids_engine.evaluation import normalise_label

    pts = patient.points
    if not pts:
        return ()
    xyz = np.array([p.position_mm_xyz for p in pts], np.float64)
    idx = patient.grid.world_to_index(xyz)
    dose = ndimage.map_coordinates(np.asarray(dose_gy, np.float32), idx.T, order=1, mode="nearest")
    m = {normalise_label(k): v for k, v in (measured or {}).items()}
    meas = [m.get(normalise_label(p.label)) for p in pts]
    return point_marks([p.label for p in pts], xyz, patient.grid, dose,
                       [np.nan if v is None else v for v in meas])


def take_slice(volume: np.ndarray, axis: str, index: int) -> np.ndarray:
    """The 2D slice of a (z, y, x) volume with ``axis`` fixed at ``index``."""
    return {"z": lambda: volume[index], "y": lambda: volume[:, index, :], "x": lambda: volume[:, :, index]}[axis]()


def rc_to_zyx(axis: str, slice_index: float, rc) -> tuple[float, float, float]:
    """(row, column) on a slice to a (z, y, x) voxel position."""
    out = [0.0, 0.0, 0.0]
    out["zyx".index(axis)] = float(slice_index)
    r_ax, c_ax = _ROW_COL[axis]
    out[r_ax], out[c_ax] = float(rc[0]), float(rc[1])
    return tuple(out)


def zyx_to_rc(axis: str, zyx) -> tuple[float, float]:
    r_ax, c_ax = _ROW_COL[axis]
    return float(zyx[r_ax]), float(zyx[c_ax])


def _circle(centre_xy, radius: float, n: int = 64) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n)
    return np.stack([centre_xy[0] + radius * np.cos(t), centre_xy[1] + radius * np.sin(t)], -1)


def _drag_weight(dist_mm: np.ndarray) -> np.ndarray:
    """How far a contour point at ``dist_mm`` from the grab point follows a drag: fully near the
    grab point (so the line passes through the mouse), then a smooth fall-off to zero."""
    t = np.clip((dist_mm - _PREVIEW_CORE_MM) / (_PREVIEW_RADIUS_MM - _PREVIEW_CORE_MM), 0.0, 1.0)
    return 0.5 * (1.0 + np.cos(np.pi * t))


def _has(modifiers, key) -> bool:
    return any(m == key for m in modifiers)


class SliceView(QtWidgets.QFrame):
    """One slice plane: CT with window/level, dose wash, structure contours, labelled isodose
    lines, crosshair, pins, tool feedback (selected voxel, brush, isodose drag preview).

    Signals (positions in voxel units, (z, y, x) order):
    hovered(object) position or None; slice_changed(str axis, int index);
    crosshair_moved(object); voxel_picked(object) integer index (set-dose tool);
    brush_clicked(str tool, object) centre (erase and pin tools);
    drag_started(str axis, int slice, object start_rc); drag_moved(object rc);
    drag_finished(object rc); drag_cancelled(); window_changed(float window, float level);
    dose_scrolled(int steps) (shift + wheel with the set-dose tool); message(str).
    """

    hovered = QtCore.pyqtSignal(object)
    slice_changed = QtCore.pyqtSignal(str, int)
    crosshair_moved = QtCore.pyqtSignal(object)
    voxel_picked = QtCore.pyqtSignal(object)
    brush_clicked = QtCore.pyqtSignal(str, object)
    drag_started = QtCore.pyqtSignal(str, int, object)
    drag_moved = QtCore.pyqtSignal(object)
    drag_finished = QtCore.pyqtSignal(object)
    drag_cancelled = QtCore.pyqtSignal()
    window_changed = QtCore.pyqtSignal(float, float)
    dose_scrolled = QtCore.pyqtSignal(int)
    message = QtCore.pyqtSignal(str)

    def __init__(self, axis: str, parent=None) -> None:
        use_qt()
        super().__init__(parent)
        if axis not in AXES:
            raise ValueError(f"SliceView axis must be one of {tuple(AXES)}, got {axis!r}")
        self.axis = axis
        self.setObjectName(f"slice-{AXES[axis].lower()}")
        self.setFrameShape(QtWidgets.QFrame.Shape.NoFrame)
        self.header = QtWidgets.QLabel(AXES[axis])
        self.header.setObjectName("viewHeader")
        # The header's text (slice, plan and plan ID) changes with every snapshot: it must not
        # move the layout (a longer text would widen the view and resize the canvas).
        self.header.setSizePolicy(QtWidgets.QSizePolicy.Policy.Ignored, QtWidgets.QSizePolicy.Policy.Preferred)
        self.canvas = scene.SceneCanvas(keys=None, show=False, bgcolor="#0b0d10", size=(320, 320))
        self.canvas.native.setMinimumSize(160, 160)
        self.canvas.native.setFocusPolicy(QtCore.Qt.FocusPolicy.StrongFocus)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(0)
        lay.addWidget(self.header)
        lay.addWidget(self.canvas.native, 1)

        self.view = self.canvas.central_widget.add_view()
        self.view.camera = PanZoomCamera(aspect=1, flip=(False, axis == "z"), interactive=False)
        vs = self.view.scene
        self._image = scene.visuals.Image(np.zeros((2, 2, 4), np.uint8), parent=vs, interpolation="nearest")
        self._structures = scene.visuals.Line(parent=vs, connect="segments", width=2.2)
        self._pins = scene.visuals.Line(parent=vs, connect="segments", width=1.5, color=(1, 1, 1, 0.9))
        self._isodoses = scene.visuals.Line(parent=vs, connect="segments", width=NORMAL_LINE_WIDTH_PX)
        self._ticks = scene.visuals.Line(parent=vs, connect="segments", width=1.0)
        self._selected_iso = scene.visuals.Line(parent=vs, connect="segments", width=3.0)
        # Lines drawn wider than normal (IsodoseDisplay styles): one visual per width, made on demand.
        self._wide_isodoses: dict[float, scene.visuals.Line] = {}
        self._hot = scene.visuals.Line(parent=vs, connect="segments", width=2.0, color=(*HOT_SPOT_COLOUR, 1.0))
        self._hot_label = scene.visuals.Text(parent=vs, font_size=8, anchor_x="left", anchor_y="top",
                                             face="DejaVu Sans", bold=True, color=(*HOT_SPOT_COLOUR, 1.0))
        self._points = scene.visuals.Line(parent=vs, connect="segments", width=1.6, color=POINT_COLOUR)
        self._point_labels = scene.visuals.Text(parent=vs, font_size=7, anchor_x="left", anchor_y="top",
                                                face="DejaVu Sans", color=POINT_COLOUR)
        self._label_halo = scene.visuals.Text(parent=vs, font_size=8, anchor_x="left", anchor_y="bottom",
                                              face="DejaVu Sans", bold=True, color=(0.0, 0.0, 0.0, 0.75))
        self._labels = scene.visuals.Text(parent=vs, font_size=8, anchor_x="left", anchor_y="bottom",
                                          face="DejaVu Sans", bold=True)
        self._crosshair = scene.visuals.Line(parent=vs, connect="segments", width=1, color=(1.0, 0.92, 0.3, 0.45))
        self._marker = scene.visuals.Line(parent=vs, connect="strip", width=2, color=(0.2, 1.0, 1.0, 1.0))
        self._brush = scene.visuals.Line(parent=vs, connect="strip", width=1.5, color=(1, 1, 1, 0.8))
        self._preview = scene.visuals.Line(parent=vs, connect="segments", width=2.6, color=(1, 1, 1, 1))
        self._drag_arrow = scene.visuals.Line(parent=vs, connect="segments", width=2, color=(1, 1, 1, 0.85))
        # Orientation letters in canvas pixels (parent: the canvas scene, not the camera's).
        self._orient = scene.visuals.Text(parent=self.canvas.scene, font_size=11, bold=True, face="DejaVu Sans",
                                          color=(1.0, 0.92, 0.3, 0.95), anchor_x="center", anchor_y="center")
        self._orient.order = 100
        self._orient.set_gl_state("translucent", depth_test=False)
        self._orient.visible = False
        self.orientation: dict[str, str] = {}  # side (left, right, top, bottom) -> letter
        # A 2D overlay stack: no depth test, drawn in this order.
        stack = (self._image, self._structures, self._pins, self._isodoses, self._ticks, self._selected_iso,
                 self._crosshair, self._hot, self._hot_label, self._points, self._point_labels, self._label_halo,
                 self._labels, self._marker,
                 self._brush, self._preview, self._drag_arrow)
        for k, v in enumerate(stack):
            v.order = k
            v.set_gl_state("translucent", depth_test=False)
        self._overlays_visible(False)

        # State (host arrays owned by the window; this view only reads them).
        self.ct_hu: np.ndarray | None = None
        self.grid = None
        self.spacing_mm_zyx = (1.0, 1.0, 1.0)
        self.structures: list[tuple[str, tuple, np.ndarray]] = []
        self.dose_gy: np.ndarray | None = None  # the newest final dose cube
        # A drag preview's dose on one slice: (slice index, (rows, columns) Gy), or None. Shown
        # instead of the cube's slice while the view displays that slice.
        self.preview: tuple[int, np.ndarray] | None = None
        self.reference_gy: np.ndarray | None = None
        self.dose_mode = "plan"  # "plan" or "difference" (plan - reference)
        self.pins_mask: np.ndarray | None = None
        self.prescription_gy = 1.0
        self.plan_tag = ""  # which plan the frame shows, with its plan ID (seed 001), in the header
        self.levels: tuple[IsodoseLevel, ...] = ()
        self.display = IsodoseDisplay()  # line styles, tint, ticks, hot spot, normalisation
        self.hot_spot: tuple[tuple[int, int], float] | None = None  # ((row, col), Gy) of the frame shown
        self.points: tuple[PointMark, ...] = ()  # drawn on the slice they lie in
        self.selected_level_gy: float | None = None
        self.label_unit = "Gy"
        self.window_hu, self.level_hu = 400.0, 40.0
        self.wash_alpha = 0.45
        self.slice_index = 0
        self.crosshair_zyx = (0.0, 0.0, 0.0)
        self.marker_zyx: tuple[int, int, int] | None = None
        self.tool = "navigate"
        self.brush_radius_mm = 10.0
        self._structure_cache: dict[int, tuple | None] = {}  # slice -> (positions, colours)
        self._iso_segments: dict[float, np.ndarray] = {}
        self._drag: dict | None = None
        self._press: dict | None = None
        self._hover_rc: tuple[float, float] | None = None

        ev = self.canvas.events
        ev.mouse_press.connect(self._on_press)
        ev.mouse_move.connect(self._on_move)
        ev.mouse_release.connect(self._on_release)
        ev.mouse_wheel.connect(self._on_wheel)
        ev.key_press.connect(self._on_key)
        ev.resize.connect(self._on_resize)
        self.canvas.native.installEventFilter(self)
        self.set_tool("navigate")

    # ------------------------------------------------------------------ geometry
    @property
    def n_slices(self) -> int:
        return 0 if self.ct_hu is None else self.ct_hu.shape["zyx".index(self.axis)]

    @property
    def spacing_rc(self) -> tuple[float, float]:
        r_ax, c_ax = _ROW_COL[self.axis]
        return self.spacing_mm_zyx[r_ax], self.spacing_mm_zyx[c_ax]

    def rc_to_scene(self, rc) -> np.ndarray:
        """(…, 2) (row, column) to scene (X, Y) mm."""
        sr, sc = self.spacing_rc
        rc = np.asarray(rc, np.float64)
        return np.stack([rc[..., 1] * sc, rc[..., 0] * sr], -1)

    def scene_to_rc(self, xy) -> np.ndarray:
        sr, sc = self.spacing_rc
        xy = np.asarray(xy, np.float64)
        return np.stack([xy[..., 1] / sr, xy[..., 0] / sc], -1)

    def canvas_to_rc(self, pos) -> np.ndarray:
        """Canvas pixel (logical) to (row, column)."""
        tr = self.canvas.scene.node_transform(self.view.scene)
        return self.scene_to_rc(tr.map(np.asarray(pos, np.float64)[:2])[:2])

    def rc_to_canvas(self, rc) -> np.ndarray:
        """(row, column) to canvas pixel (logical), e.g. to aim a test click."""
        tr = self.canvas.scene.node_transform(self.view.scene)
        return tr.imap(self.rc_to_scene(rc))[:2]

    def zyx_to_canvas(self, zyx) -> np.ndarray:
        return self.rc_to_canvas(zyx_to_rc(self.axis, zyx))

    def _mm_per_pixel(self) -> float:
        a = self.canvas_to_rc((0.0, 0.0)) * self.spacing_rc
        b = self.canvas_to_rc((1.0, 0.0)) * self.spacing_rc
        return float(np.linalg.norm(b - a))

    def _inside(self, rc) -> bool:
        if self.ct_hu is None:
            return False
        shape = self.ct_hu.shape
        r_ax, c_ax = _ROW_COL[self.axis]
        return -0.5 <= rc[0] < shape[r_ax] - 0.5 and -0.5 <= rc[1] < shape[c_ax] - 0.5

    def _rc_to_index(self, rc) -> tuple[int, int, int]:
        return tuple(int(round(v)) for v in rc_to_zyx(self.axis, self.slice_index, rc))

    # ------------------------------------------------------------------ inputs
    def set_case(self, ct_hu: np.ndarray, grid, structures, prescription_gy: float) -> None:
        """A new patient: CT (z, y, x) HU on ``grid`` (:class:`ids_engine.model.Grid`),
        [(name, rgb, mask)] contours, prescription (Gy)."""
        self.ct_hu = ct_hu
        self.grid = grid
        self.spacing_mm_zyx = tuple(float(v) for v in grid.spacing_mm_zyx)
        self.structures = list(structures)
        self.prescription_gy = float(prescription_gy)
        self.dose_gy = None
        self.preview = None
        self.reference_gy = None
        self.dose_mode = "plan"
        self.pins_mask = None
        self.marker_zyx = None
        self._hover_rc = None
        self._structure_cache.clear()
        self.slice_index = self.n_slices // 2
        shape = ct_hu.shape
        self.crosshair_zyx = tuple((n - 1) / 2.0 for n in shape)
        self._image.transform = STTransform(scale=(self.spacing_rc[1], self.spacing_rc[0]),
                                            translate=(-self.spacing_rc[1] / 2.0, -self.spacing_rc[0] / 2.0))
        self._overlays_visible(True)
        self.reset_zoom()
        self.refresh()

    def reset_zoom(self) -> None:
        if self.ct_hu is None:
            return
        r_ax, c_ax = _ROW_COL[self.axis]
        sr, sc = self.spacing_rc
        w = self.ct_hu.shape[c_ax] * sc
        h = self.ct_hu.shape[r_ax] * sr
        pad = 0.02 * max(w, h)
        self.view.camera.set_range(x=(-sc / 2 - pad, w - sc / 2 + pad), y=(-sr / 2 - pad, h - sr / 2 + pad), margin=0)
        self._refresh_isodoses()
        self._refresh_orientation()

    def set_dose(self, dose_gy: np.ndarray | None, pins_mask: np.ndarray | None = None) -> None:
        """A final dose cube (z, y, x) Gy; it replaces any drag preview."""
        self.dose_gy = dose_gy
        self.preview = None
        self.pins_mask = pins_mask
        self._refresh_image()
        self._refresh_isodoses()
        self._refresh_pins()

    def set_preview(self, dose_slice_gy: np.ndarray, index: int, pins_mask: np.ndarray | None = None) -> bool:
        """A drag preview's dose on slice ``index`` of this view's axis ((rows, columns) Gy, as
        :func:`take_slice` cuts it). Shown if the view displays that slice; otherwise the view
        keeps its last image. Returns whether it is shown."""
        if self.ct_hu is None or int(index) != self.slice_index:
            return False
        self.preview = (int(index), dose_slice_gy)
        self.pins_mask = pins_mask
        self._refresh_image()
        self._refresh_isodoses()
        self._refresh_pins()
        return True

    def dose_slice(self) -> np.ndarray | None:
        """The plan's dose on the displayed slice (Gy): a drag preview's if it is of this
        slice, else the newest final cube's; None before the first dose."""
        if self.preview is not None and self.preview[0] == self.slice_index:
            return self.preview[1]
        if self.dose_gy is None:
            return None
        return take_slice(self.dose_gy, self.axis, self.slice_index)

    def set_reference(self, reference_gy: np.ndarray | None) -> None:
        """A reference dose (z, y, x) Gy on the CT grid to compare with, or None."""
        self.reference_gy = reference_gy
        if reference_gy is None:
            self.dose_mode = "plan"
        self._refresh_image()

    def set_dose_mode(self, mode: str) -> None:
        """What the wash shows: "plan" (the plan's dose) or "difference" (plan - reference)."""
        if mode not in ("plan", "difference"):
            raise ValueError(f"dose mode must be 'plan' or 'difference', got {mode!r}")
        if mode == "difference" and self.reference_gy is None:
            raise ValueError("no reference dose to show the difference to")
        self.dose_mode = mode
        self._refresh_image()

    def set_prescription(self, prescription_gy: float) -> None:
        """The dose 100 % means (the wash, the tint level, % labels): the session's
        prescription, or a displayed forward plan's normalisation point dose."""
        if not prescription_gy > 0:
            raise ValueError(f"SliceView.set_prescription: must be positive, got {prescription_gy!r}")
        self.prescription_gy = float(prescription_gy)
        self._refresh_image()
        self._refresh_isodoses()

    def set_plan_tag(self, text: str) -> None:
        """Name the plan this frame shows (with its plan ID) in the header."""
        self.plan_tag = str(text)
        if self.ct_hu is not None:
            self._refresh_header()

    def set_levels(self, levels, selected_gy: float | None, label_unit: str) -> None:
        self.levels = tuple(levels)
        self.selected_level_gy = selected_gy
        self.label_unit = label_unit
        self._refresh_isodoses()

    def set_isodose_display(self, display: IsodoseDisplay) -> None:
        """How the isodose lines are drawn: per-line colour and width, the tinted level, downhill
        ticks, the hot spot, % of the normalisation point (seed 001's 2d isodose control)."""
        self.display = display
        self._refresh_image()
        self._refresh_isodoses()

    def set_window(self, window_hu: float, level_hu: float) -> None:
        self.window_hu, self.level_hu = float(window_hu), float(level_hu)
        self._refresh_image()

    def set_wash_alpha(self, alpha: float) -> None:
        self.wash_alpha = float(alpha)
        self._refresh_image()

    def set_slice(self, index: int, emit: bool = False) -> None:
        if self.ct_hu is None:
            return
        index = int(np.clip(index, 0, self.n_slices - 1))
        if index == self.slice_index:
            return
        if self._drag is not None:
            self._cancel_drag()
        self.slice_index = index
        self.refresh()
        if emit:
            self.slice_changed.emit(self.axis, index)

    def set_crosshair(self, zyx) -> None:
        self.crosshair_zyx = tuple(float(v) for v in zyx)
        self._refresh_crosshair()

    def set_marker(self, zyx) -> None:
        self.marker_zyx = None if zyx is None else tuple(int(v) for v in zyx)
        self._refresh_marker()

    def set_tool(self, tool: str) -> None:
        if tool not in TOOLS:
            raise ValueError(f"unknown tool {tool!r}")
        if self._drag is not None:
            self._cancel_drag()
        self.tool = tool
        self.canvas.native.setCursor(QtGui.QCursor(_CURSORS[tool]))
        self._refresh_brush()

    def set_brush_radius(self, radius_mm: float) -> None:
        self.brush_radius_mm = float(radius_mm)
        self._refresh_brush()

    def hide_brush(self) -> None:
        """Forget the hover position (the mouse is in another view): no brush ring here."""
        self._hover_rc = None
        self._refresh_brush()

    @property
    def brush_visible(self) -> bool:
        return bool(self._brush.visible)

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 (Qt name)
        if obj is self.canvas.native and event.type() == QtCore.QEvent.Type.Leave and self._drag is None:
            self.hide_brush()
            self.hovered.emit(None)
        return super().eventFilter(obj, event)

    def clear_drag_preview(self) -> None:
        if self._drag is None:
            self._preview.visible = False
            self._drag_arrow.visible = False
            self.canvas.update()

    @property
    def dragging(self) -> bool:
        return self._drag is not None

    # ------------------------------------------------------------------ drawing
    def _overlays_visible(self, on: bool) -> None:
        for v in (self._image, self._structures, self._isodoses, self._selected_iso, self._labels, self._label_halo,
                  self._crosshair):
            v.visible = on
        for v in (self._pins, self._marker, self._brush, self._preview, self._drag_arrow, self._ticks, self._hot,
                  self._hot_label, self._points, self._point_labels, *self._wide_isodoses.values()):
            v.visible = False

    def refresh(self) -> None:
        """Redraw everything for the current slice."""
        if self.ct_hu is None:
            return
        self._refresh_header()
        self._refresh_image()
        self._refresh_structures()
        self._refresh_isodoses()
        self._refresh_pins()
        self._refresh_crosshair()
        self._refresh_marker()
        self._refresh_brush()
        self._refresh_points()

    def set_points(self, points) -> None:
        """Points of interest to draw (:class:`PointMark`, e.g. from :func:`point_marks`); each
        shows on the slice it lies in (nearest slice), with its label and dose lines."""
        self.points = tuple(points)
        self._refresh_points()

    def shown_points(self) -> tuple[PointMark, ...]:
        """The points drawn on the current slice."""
        k = "zyx".index(self.axis)
        return tuple(p for p in self.points if int(round(p.zyx[k])) == self.slice_index)

    def _refresh_points(self) -> None:
        shown = self.shown_points() if self.ct_hu is not None else ()
        if not shown:
            self._points.visible = self._point_labels.visible = False
            self.canvas.update()
            return
        px = self._pixel_mm()
        xy = np.array([self.rc_to_scene(np.asarray(zyx_to_rc(self.axis, p.zyx))) for p in shown])
        r = _POINT_RADIUS_PX * px
        cross = np.concatenate([np.stack([xy - (r, 0), xy + (r, 0)], 1), np.stack([xy - (0, r), xy + (0, r)], 1)])
        self._points.set_data(pos=cross.reshape(-1, 2).astype(np.float32))
        self._point_labels.text = ["\n".join((p.label, *p.lines)) for p in shown]
        self._point_labels.pos = (xy + (r, r)).astype(np.float32)
        self._points.visible = self._point_labels.visible = True
        self.canvas.update()

    def _refresh_header(self) -> None:
        mm = self.grid.axis_mm(self.axis)[self.slice_index]
        a = self.axis
        # The plan first: a narrow view clips the header's end, never the plan ID.
        tag = f"{self.plan_tag}    ·    " if self.plan_tag else ""
        text = f"{tag}{AXES[a]}    slice {a}={self.slice_index} (0–{self.n_slices - 1})    {a} = {mm:.1f} mm"
        self.header.setText(text)
        self.header.setToolTip(text)

    def _on_resize(self, _event=None) -> None:
        self._refresh_isodoses()  # label spacing is in screen pixels
        self._refresh_orientation()

    def _refresh_orientation(self) -> None:
        """Letters for the patient directions at the four edges, read off the scene transform
        (where a step along the row and the column index goes on screen)."""
        if self.ct_hu is None:
            self._orient.visible = False
            return
        r_ax, c_ax = ("zyx"[k] for k in _ROW_COL[self.axis])
        p0, p_row, p_col = (self.rc_to_canvas(rc) for rc in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0)))
        letters = {}
        for name, step in ((r_ax, p_row - p0), (c_ax, p_col - p0)):
            neg, pos = ORIENTATION[name]
            if abs(step[0]) >= abs(step[1]):  # this index runs across the screen
                letters["right"], letters["left"] = (pos, neg) if step[0] > 0 else (neg, pos)
            else:  # canvas y grows downwards
                letters["bottom"], letters["top"] = (pos, neg) if step[1] > 0 else (neg, pos)
        w, h = self.canvas.size
        where = {"left": (12.0, h / 2.0), "right": (w - 12.0, h / 2.0), "top": (w / 2.0, 12.0),
                 "bottom": (w / 2.0, h - 12.0)}
        sides = [s for s in ("left", "right", "top", "bottom") if s in letters]
        self.orientation = {s: letters[s] for s in sides}
        self._orient.text = [letters[s] for s in sides]
        self._orient.pos = np.array([where[s] for s in sides], np.float32)
        self._orient.visible = True
        self.canvas.update()

    def displayed_slice(self) -> np.ndarray | None:
        """What the wash shows on the current slice (Gy): the plan's dose, or plan minus
        reference in the difference mode; None before the first dose."""
        dose = self.dose_slice()
        if dose is None or self.ct_hu is None:
            return None
        if self.dose_mode == "difference" and self.reference_gy is not None:
            return dose - take_slice(self.reference_gy, self.axis, self.slice_index)
        return dose

    def _refresh_image(self) -> None:
        if self.ct_hu is None:
            return
        ct = take_slice(self.ct_hu, self.axis, self.slice_index)
        disp = self.display
        tint = None
        if disp.tint_pct is not None:
            tint = (self.prescription_gy * disp.tint_pct / 100.0, disp.tint_colour, disp.tint_alpha)
        self._image.set_data(compose_slice_rgba(ct, self.window_hu, self.level_hu, self.displayed_slice(),
                                                self.prescription_gy, self.wash_alpha,
                                                difference=self.dose_mode == "difference", tint=tint))
        self.canvas.update()

    def _refresh_structures(self) -> None:
        if self.ct_hu is None:
            return
        if self.slice_index in self._structure_cache:
            segs = self._structure_cache[self.slice_index]
        else:
            pos, col = [], []
            for _, rgb, mask in self.structures:
                s = isoline_segments(take_slice(mask, self.axis, self.slice_index).astype(np.float32), 0.5)
                if len(s):
                    pos.append(self.rc_to_scene(s.reshape(-1, 2)))
                    col.append(np.tile(np.r_[rgb, 1.0], (len(s) * 2, 1)))
            segs = (np.concatenate(pos), np.concatenate(col)) if pos else None
            self._structure_cache[self.slice_index] = segs
        self._set_segments(self._structures, segs)

    def _set_segments(self, visual, data) -> None:
        if data is None or len(data[0]) == 0:
            visual.visible = False
        else:
            visual.set_data(pos=np.asarray(data[0], np.float32), color=np.asarray(data[1], np.float32))
            visual.visible = True
        self.canvas.update()

    def _refresh_isodoses(self) -> None:
        self._iso_segments.clear()
        d = self.dose_slice()
        if d is None or self.ct_hu is None:
            for v in (self._isodoses, self._selected_iso, self._ticks, *self._wide_isodoses.values()):
                self._set_segments(v, None)
            self._labels.visible = self._label_halo.visible = False
            self._refresh_hot_spot(None)
            return
        disp = self.display
        by_width: dict[float, tuple[list, list]] = {}
        sel_pos, sel_col, tick_pos, tick_col = [], [], [], []
        texts, tpos, tcol = [], [], []
        # Labels of nested lines fan out around the high-dose region, one direction per level.
        hot = np.argwhere(d >= 0.5 * d.max()) if d.max() > 0 else np.zeros((0, 2))
        centre = hot.mean(axis=0) if len(hot) else None
        avoid: list[np.ndarray] = []
        px = self._pixel_mm()
        min_sep_mm = _LABEL_SEPARATION_PX * px
        for k, lev in enumerate(self.levels):
            s = isoline_segments(d, lev.gy)
            self._iso_segments[lev.gy] = s
            if not len(s):
                continue
            colour, width = disp.style(lev)
            rgba = np.r_[colour, 1.0]
            xy = self.rc_to_scene(s.reshape(-1, 2))
            if self.selected_level_gy is not None and abs(lev.gy - self.selected_level_gy) < 1e-6:
                sel_pos.append(xy)
                sel_col.append(np.tile(rgba, (len(xy), 1)))
            else:
                pos, col = by_width.setdefault(width, ([], []))
                pos.append(xy)
                col.append(np.tile(rgba, (len(xy), 1)))
            if disp.ticks:
                t = downhill_ticks(s, d, _TICK_LENGTH_PX * px, _TICK_SPACING_PX * px, self.spacing_rc)
                if len(t):
                    tick_pos.append(self.rc_to_scene(t.reshape(-1, 2)))
                    tick_col.append(np.tile(rgba, (2 * len(t), 1)))
            theta = np.radians(-150.0 + 40.0 * k)
            anchor = label_anchor(s, (np.sin(theta), np.cos(theta)), centre, avoid, min_sep_mm, self.spacing_rc)
            avoid.append(anchor)
            texts.append(lev.label(self.label_unit, disp.normalisation_gy))
            tpos.append(self.rc_to_scene(anchor))
            tcol.append(rgba)
        normal = by_width.pop(NORMAL_LINE_WIDTH_PX, None)
        self._set_segments(self._isodoses, (np.concatenate(normal[0]), np.concatenate(normal[1])) if normal else None)
        for width, visual in self._wide_isodoses.items():
            if width not in by_width:
                self._set_segments(visual, None)
        for width, (pos, col) in by_width.items():
            self._set_segments(self._wide_line(width), (np.concatenate(pos), np.concatenate(col)))
        self._set_segments(self._ticks, (np.concatenate(tick_pos), np.concatenate(tick_col)) if tick_pos else None)
        self._set_segments(self._selected_iso, (np.concatenate(sel_pos), np.concatenate(sel_col)) if sel_pos else None)
        if texts:
            self._labels.text = texts
            self._labels.pos = np.asarray(tpos, np.float32)
            self._labels.color = np.asarray(tcol, np.float32)
            # A dark halo (the text drawn four times, one pixel off each way) keeps the
            # labels legible on the colour wash.
            offsets = np.array([[px, 0.0], [-px, 0.0], [0.0, px], [0.0, -px]])
            self._label_halo.text = [t for t in texts for _ in offsets]
            self._label_halo.pos = (np.asarray(tpos)[:, None, :] + offsets[None]).reshape(-1, 2).astype(np.float32)
            self._labels.visible = self._label_halo.visible = True
        else:
            self._labels.visible = self._label_halo.visible = False
        self._refresh_hot_spot(d)

    def _pixel_mm(self) -> float:
        """mm per screen pixel; before the canvas has its size (a window not yet exposed) the
        transform is degenerate, and a quarter voxel stands in."""
        with np.errstate(all="ignore"):
            px = self._mm_per_pixel()
        return px if np.isfinite(px) and px > 0 else 0.25 * min(self.spacing_rc)

    def _wide_line(self, width: float):
        """The line visual for isodoses drawn ``width`` pixels wide (made on first use)."""
        v = self._wide_isodoses.get(width)
        if v is None:
            v = scene.visuals.Line(parent=self.view.scene, connect="segments", width=float(width))
            v.order = self._isodoses.order
            v.set_gl_state("translucent", depth_test=False)
            self._wide_isodoses[width] = v
        return v

    def _refresh_hot_spot(self, dose_slice) -> None:
        """Mark the frame's hottest point with an asterisk and its dose (seed 001)."""
        found = None if dose_slice is None or self.dose_mode == "difference" else hot_spot_rc(dose_slice)
        self.hot_spot = found
        if found is None or not self.display.hot_spot:
            self._hot.visible = self._hot_label.visible = False
            self.canvas.update()
            return
        rc, gy = found
        px = self._pixel_mm()
        xy = self.rc_to_scene(np.asarray(rc, np.float64))
        self._hot.set_data(pos=asterisk_segments(xy, _HOT_RADIUS_PX * px).reshape(-1, 2).astype(np.float32))
        norm = self.display.normalisation_gy or self.prescription_gy
        self._hot_label.text = f"{100.0 * gy / norm:.1f}%" if self.label_unit == "%" else f"{gy:.2f} Gy"
        self._hot_label.pos = (xy + np.array([_HOT_RADIUS_PX * px, _HOT_RADIUS_PX * px])).astype(np.float32)
        self._hot.visible = self._hot_label.visible = True
        self.canvas.update()

    def hot_spot_canvas(self) -> np.ndarray | None:
        """Canvas pixel of the hot spot marked on this frame, or None (for tests and tools)."""
        return None if self.hot_spot is None else self.rc_to_canvas(self.hot_spot[0])

    def _refresh_pins(self) -> None:
        if self.pins_mask is None or self.ct_hu is None:
            self._pins.visible = False
            self.canvas.update()
            return
        s = isoline_segments(take_slice(self.pins_mask, self.axis, self.slice_index).astype(np.float32), 0.5)
        data = None
        if len(s):
            data = (self.rc_to_scene(s.reshape(-1, 2)), np.tile((1.0, 1.0, 1.0, 0.9), (len(s) * 2, 1)))
        self._set_segments(self._pins, data)

    def _refresh_crosshair(self) -> None:
        if self.ct_hu is None:
            return
        r_ax, c_ax = _ROW_COL[self.axis]
        nr, nc = self.ct_hu.shape[r_ax], self.ct_hu.shape[c_ax]
        r, c = zyx_to_rc(self.axis, self.crosshair_zyx)
        rc = np.array([[r, -0.5], [r, nc - 0.5], [-0.5, c], [nr - 0.5, c]])
        self._crosshair.set_data(pos=self.rc_to_scene(rc).astype(np.float32))
        self.canvas.update()

    def _refresh_marker(self) -> None:
        m = self.marker_zyx
        if m is None or self.ct_hu is None or int(m["zyx".index(self.axis)]) != self.slice_index:
            self._marker.visible = False
            self.canvas.update()
            return
        r, c = zyx_to_rc(self.axis, m)
        h = 0.9
        square = np.array([[r - h, c - h], [r - h, c + h], [r + h, c + h], [r + h, c - h], [r - h, c - h]])
        self._marker.set_data(pos=self.rc_to_scene(square).astype(np.float32))
        self._marker.visible = True
        self.canvas.update()

    def _refresh_brush(self) -> None:
        if self.tool not in ("erase", "pin") or self._hover_rc is None or self.ct_hu is None:
            self._brush.visible = False
        else:
            colour = (1.0, 0.55, 0.2, 0.95) if self.tool == "erase" else (1.0, 1.0, 1.0, 0.95)
            self._brush.set_data(pos=_circle(self.rc_to_scene(self._hover_rc), self.brush_radius_mm).astype(np.float32),
                                 color=colour)
            self._brush.visible = True
        self.canvas.update()

    # ------------------------------------------------------------------ isodose drag
    def _selected_segments(self) -> np.ndarray:
        if self.selected_level_gy is None:
            return np.zeros((0, 2, 2))
        return self.isodose_segments(self.selected_level_gy)

    def isodose_segments(self, level_gy: float) -> np.ndarray:
        """Segments (n, 2, 2) of (row, column) of the ``level_gy`` isodose on the current slice."""
        for gy, s in self._iso_segments.items():
            if abs(gy - level_gy) < 1e-6:
                return s
        return np.zeros((0, 2, 2))

    def grab_point(self, rc) -> np.ndarray | None:
        """The point of the selected isodose line a press at ``rc`` grabs, or None."""
        point, dist_mm = nearest_on_segments(self._selected_segments(), rc, self.spacing_rc)
        tol = _GRAB_TOLERANCE_MM + _GRAB_TOLERANCE_PX * self._mm_per_pixel()
        return point if dist_mm <= tol else None

    def _start_drag(self, start_rc: np.ndarray) -> None:
        segs = self._selected_segments()
        self._drag = {"start": np.asarray(start_rc, float), "segments": segs, "current": np.asarray(start_rc, float)}
        self.canvas.native.setCursor(QtGui.QCursor(QtCore.Qt.CursorShape.ClosedHandCursor))
        self._draw_drag_preview()
        self.drag_started.emit(self.axis, self.slice_index, tuple(float(v) for v in start_rc))

    def _draw_drag_preview(self) -> None:
        d = self._drag
        start_xy = self.rc_to_scene(d["start"])
        cur_xy = self.rc_to_scene(d["current"])
        delta = cur_xy - start_xy
        segs = d["segments"]
        if len(segs):
            xy = self.rc_to_scene(segs.reshape(-1, 2))
            dist = np.linalg.norm(xy - start_xy, axis=1)
            w = _drag_weight(dist)
            near = (w.reshape(-1, 2) > 0).any(axis=1)
            moved = (xy + w[:, None] * delta).reshape(-1, 2, 2)[near].reshape(-1, 2)
            if len(moved):
                colour = (1.0, 1.0, 1.0, 1.0)
                for lev in self.levels:
                    if self.selected_level_gy is not None and abs(lev.gy - self.selected_level_gy) < 1e-6:
                        colour = (*lev.colour, 1.0)
                self._preview.set_data(pos=moved.astype(np.float32), color=colour)
                self._preview.visible = True
        self._drag_arrow.set_data(pos=np.array([start_xy, cur_xy], np.float32))
        self._drag_arrow.visible = True
        self.canvas.update()

    def _cancel_drag(self) -> None:
        self._drag = None
        self._press = None
        self.canvas.native.setCursor(QtGui.QCursor(_CURSORS[self.tool]))
        self.clear_drag_preview()
        self.drag_cancelled.emit()

    # ------------------------------------------------------------------ events
    def _on_press(self, event) -> None:
        if self.ct_hu is None:
            return
        rc = self.canvas_to_rc(event.pos)
        self._press = {"pos": np.asarray(event.pos, float), "button": event.button,
                       "window": (self.window_hu, self.level_hu)}
        if event.button != 1 or not self._inside(rc):
            return
        if self.tool == "navigate":
            self._move_crosshair(rc)
        elif self.tool == "set_dose":
            self.voxel_picked.emit(self._rc_to_index(rc))
        elif self.tool in ("erase", "pin"):
            self.brush_clicked.emit(self.tool, rc_to_zyx(self.axis, self.slice_index, rc))
        elif self.tool == "drag_isodose":
            start = self.grab_point(rc)
            if start is None:
                lev = self.selected_level_gy
                self.message.emit(f"Press on the {lev:.3g} Gy isodose line to drag it" if lev else
                                  "Choose an isodose level to drag")
                return
            self._start_drag(start)

    def _move_crosshair(self, rc) -> None:
        zyx = rc_to_zyx(self.axis, self.slice_index, rc)
        self.set_crosshair(zyx)
        self.crosshair_moved.emit(zyx)

    def _on_move(self, event) -> None:
        if self.ct_hu is None:
            return
        rc = self.canvas_to_rc(event.pos)
        inside = self._inside(rc)
        self._hover_rc = tuple(rc) if inside else None
        self.hovered.emit(rc_to_zyx(self.axis, self.slice_index, rc) if inside else None)
        if self._drag is not None:
            self._drag["current"] = rc
            self._draw_drag_preview()
            self.drag_moved.emit(tuple(float(v) for v in rc))
            return
        self._refresh_brush()
        press = self._press
        if press is None:
            return
        moved = np.asarray(event.pos, float) - press["pos"]
        if press["button"] == 1 and self.tool == "navigate" and inside:
            self._move_crosshair(rc)
        elif press["button"] == 2:  # right drag: window (horizontal) and level (vertical)
            w0, l0 = press["window"]
            w = max(1.0, w0 + 4.0 * moved[0])
            lvl = l0 - 4.0 * moved[1]
            self.window_changed.emit(w, lvl)
        elif press["button"] == 3:  # middle drag: pan
            last = press.get("last", press["pos"])
            a = self.canvas.scene.node_transform(self.view.scene).map(last)[:2]
            b = self.canvas.scene.node_transform(self.view.scene).map(np.asarray(event.pos, float))[:2]
            self.view.camera.pan(*(a - b))
            press["last"] = np.asarray(event.pos, float)

    def _on_release(self, event) -> None:
        if self._drag is not None and event.button == 1:
            rc = self.canvas_to_rc(event.pos)
            self._drag["current"] = rc
            self._draw_drag_preview()
            self._drag = None
            self.canvas.native.setCursor(QtGui.QCursor(_CURSORS[self.tool]))
            self.drag_finished.emit(tuple(float(v) for v in rc))
        self._press = None

    def _on_wheel(self, event) -> None:
        if self.ct_hu is None:
            return
        dy = event.delta[1] if event.delta[1] else event.delta[0]
        if not dy:
            return
        step = 1 if dy > 0 else -1
        mods = event.modifiers
        if _has(mods, vkeys.CONTROL):
            centre = self.canvas.scene.node_transform(self.view.scene).map(event.pos)[:2]
            self.view.camera.zoom(0.85 if step > 0 else 1.0 / 0.85, center=centre)
            self._refresh_isodoses()
        elif _has(mods, vkeys.SHIFT) and self.tool == "set_dose":
            self.dose_scrolled.emit(step)
        elif self._drag is None:
            self.set_slice(self.slice_index + step, emit=True)
        event.handled = True

    def _on_key(self, event) -> None:
        name = event.key.name if event.key is not None else ""
        if name in ("PageUp", "Up"):
            self.set_slice(self.slice_index + 1, emit=True)
        elif name in ("PageDown", "Down"):
            self.set_slice(self.slice_index - 1, emit=True)
        elif name == "Escape" and self._drag is not None:
            self._cancel_drag()
        elif name == "Home":
            self.reset_zoom()
