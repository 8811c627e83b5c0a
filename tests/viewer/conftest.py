"""Viewer test set-up: a display for the window tests, and the coarse horseshoe session.

The window tests need OpenGL, which Qt's ``offscreen`` platform does not provide to vispy
(it fails inside vispy's framebuffer handling), so they need a real X display (Xvfb in CI:
``xvfb-run -a -s "-screen 0 1280x1024x24" python -m pytest tests/viewer``) and skip
without one. The worker tests draw nothing: without a display they run on the offscreen
platform.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

HAS_DISPLAY = bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
NO_DISPLAY_REASON = ("no X display (run the viewer tests under xvfb-run; Qt's offscreen platform has no OpenGL "
                     "for vispy)")

if not HAS_DISPLAY:
    # Qt aborts the process when it cannot reach a display; signals and threads need none.
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture(autouse=True, scope="module")
def _delete_closed_widgets():
    """After each test module, delete the widgets its fixtures closed with ``deleteLater``.

    ``processEvents`` does not run deferred deletions, so a module's windows (with their
    vispy canvases) used to be destroyed inside the next module's event loop, while events
    were still queued for them: a segmentation fault in vispy's canvas ``event`` was seen
    once in three full runs. Deleting them here, between modules, leaves nothing half
    destroyed for the next module's events."""
    yield
    try:
        from PyQt6 import QtCore, QtWidgets
    except ImportError:
        return
    app = QtWidgets.QApplication.instance()
    if app is None:
        return
    import gc

    for _ in range(3):
        QtCore.QCoreApplication.sendPostedEvents(None, QtCore.QEvent.Type.DeferredDelete.value)
        app.processEvents()
    gc.collect()


class _GlyphMemo:
    """Glyphs rendered once per test process, not once per text visual.

    vispy gives every text visual its own font manager, so each window (made afresh by most
    window tests) loads every glyph of its labels from FreeType and computes its signed
    distance field on the CPU again: about half of the seconds a window takes to show its
    first frame under software OpenGL. Both are pure functions of the font, the size and the
    character (the bitmaps) and of the padded bitmap (the distance field), so this keeps their
    results and gives each visual the same arrays vispy would compute: the atlases, and so the
    rendered pixels, are the same bit for bit. Each visual's atlas is still filled and uploaded
    as before; the kerning is computed by vispy's own code. :meth:`install` checks the stored
    glyph against vispy's own for a sample character and does nothing if they differ (another
    vispy version).
    """

    def __init__(self, text_module, freetype_module) -> None:
        self.text = text_module
        self.freetype = freetype_module
        self.real_load_glyph = text_module._load_glyph
        self.real_render = text_module.SDFRendererCPU.render_to_texture
        self.glyphs: dict = {}
        self.fields: dict = {}

    def load_glyph(self, font: dict, char: str, glyphs: dict) -> None:
        """vispy's ``_load_glyph``: the glyph's bitmap from the store, then its kerning."""
        key = (font["face"], font["bold"], font["italic"], font["size"], char)
        if key not in self.glyphs:
            alone: dict = {}
            self.real_load_glyph(font, char, alone)
            g = alone[char]
            self.glyphs[key] = (g["bitmap"], g["offset"], g["advance"])
        bitmap, offset, advance = self.glyphs[key]
        face = self.freetype._load_font(font["face"], font["bold"], font["italic"])
        face.set_char_size(font["size"] * 64)
        glyph = dict(char=char, offset=offset, bitmap=bitmap.copy(), advance=advance, kerning={})
        glyphs[char] = glyph
        for other_char, other_glyph in glyphs.items():
            glyph["kerning"][other_char] = face.get_kerning(other_char, char).x / 64.0
            other_glyph["kerning"][char] = face.get_kerning(char, other_char).x / 64.0

    def render_to_texture(self, renderer, data, texture, offset, size) -> None:
        """vispy's ``SDFRendererCPU.render_to_texture``: the distance field from the store."""
        key = (data.shape, data.dtype.str, tuple(size), hashlib.sha1(np.ascontiguousarray(data).tobytes()).digest())
        field = self.fields.get(key)
        if field is None:
            field = np.zeros((size[1], size[0], 3), np.uint8)
            self.real_render(renderer, data, field, (0, 0), size)
            self.fields[key] = field
        texture[offset[1]:offset[1] + size[1], offset[0]:offset[0] + size[0], :] = field

    def same_as_vispy(self) -> bool:
        """Whether :meth:`load_glyph` gives vispy's glyphs, kerning included."""
        font = {"face": "OpenSans", "bold": False, "italic": False, "size": 64}
        ours: dict = {}
        theirs: dict = {}
        for char in "AV":
            self.load_glyph(font, char, ours)
            self.real_load_glyph(font, char, theirs)
        return all(ours[c].keys() == theirs[c].keys() and np.array_equal(ours[c]["bitmap"], theirs[c]["bitmap"])
                   and all(ours[c][k] == theirs[c][k] for k in ("offset", "advance", "kerning")) for c in "AV")

    def install(self, monkeypatch) -> None:
        if not self.same_as_vispy():
            return
        memo = self
        monkeypatch.setattr(self.text, "_load_glyph", self.load_glyph)
        monkeypatch.setattr(self.text.SDFRendererCPU, "render_to_texture",
                            lambda renderer, *args: memo.render_to_texture(renderer, *args))


@pytest.fixture(autouse=True, scope="session")
def _glyphs_rendered_once():
    """The viewer tests' text visuals share rendered glyphs (:class:`_GlyphMemo`)."""
    try:
        from vispy.util.fonts import _freetype
        from vispy.visuals.text import text
    except (ImportError, NotImplementedError):  # no vispy; vispy's FreeType fonts are for Linux and Windows
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        _GlyphMemo(text, _freetype).install(mp)
        yield


def require_viewer_packages() -> None:
    """Skip the calling test module when the viewer's packages are not installed."""
    pytest.importorskip("PyQt6", reason="the viewer tests need PyQt6 (pip install ids-engine[viewer])")
    pytest.importorskip("vispy", reason="the viewer tests need vispy (pip install ids-engine[viewer])")
    pytest.importorskip("pytestqt", reason="the viewer tests need pytest-qt")


def build_coarse_session():
    from ids_engine.session import Session

    return Session.from_phantom("horseshoe", "coarse")


def rewind(session) -> None:
    """Take every request back (tests share one session per module)."""
    while session.journal:
        session.undo()


def oar_rim_voxel(session) -> tuple[int, int, int]:
    """The most anterior OAR voxel on the OAR's central column (the paper's voxel m at the OAR rim)."""
    import numpy as np

    oar = session.patient.structure("OAR").mask
    c = np.argwhere(oar).mean(axis=0).round().astype(int)
    j = int(np.flatnonzero(oar[c[0], :, c[2]]).min())
    return (int(c[0]), j, int(c[2]))


def conflicting_requests(session):
    """A pin around the OAR rim voxel m, then a voxel 2 voxels (8 mm) anterior of m, just outside
    the pin, set to 45 % of the prescription: recovery cannot keep both (a pin conflict and the
    request's own voxel short of what was asked, on the coarse horseshoe)."""
    from ids_engine.dmr import Pin, SetVoxelDose

    m = oar_rim_voxel(session)
    near = (m[0], m[1] - 2, m[2])
    return Pin("rim", m, 6.0), SetVoxelDose(near, 0.45 * session.prescription_gy)


def wait_until(app, condition, timeout_s: float = 60.0) -> None:
    """Process Qt events until ``condition()`` holds (fails after ``timeout_s``)."""
    import time

    t0 = time.perf_counter()
    while not condition():
        assert time.perf_counter() - t0 < timeout_s, "timed out"
        app.processEvents()
        time.sleep(0.01)


def open_forward_dialog(qapp, patient):
    """The forward-planning dialog on a bare window (it needs only the window's session:
    patient, engine (machine), prescription, case); yields it shown, closes it after."""
    from types import SimpleNamespace

    from ids_engine.viewer.forward_dialog import ForwardPlanningDialog

    window = SimpleNamespace(session=SimpleNamespace(patient=patient, engine=None, prescription_gy=2.0,
                                                     case={"phantom": "horseshoe", "resolution": "coarse"}))
    d = ForwardPlanningDialog(window)
    d.show()
    yield d
    d.close()
    d.deleteLater()
    qapp.processEvents()
