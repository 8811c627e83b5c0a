"""The isodose control (seed 001, "2d Isodose Control" and "3d Isodose Control").

A small dialog for the main window's slice views: add a level typed in Gy or in % of the
normalisation point, delete one, give a line its own colour and width (pixels; 0 is the
normal width), tint one level's region in one of the six colours, turn the downhill ticks and
the hot-spot mark on or off, and set the dose that 100 % means (the normalisation point's;
the prescription by default; a forward plan shown in the window brings its own normalisation
point's dose). The 3D view shows one isodose surface, the level chosen here
("Show in 3D"); its solid/wire/off mode and transparency sit on the 3D view's own header.

It changes the window only through what the window offers its menus: ``levels`` and
``set_isodose_levels(text)``, the level selector ``level_box``, ``slice_views`` and their
:meth:`SliceView.set_isodose_display`. It never calls the engine.
"""

from __future__ import annotations

from dataclasses import replace

from PyQt6 import QtCore, QtWidgets

from ._style import TINT_COLOURS, IsodoseDisplay, format_levels

__all__ = ["IsodoseControl"]

_TABLE = "table colour"


class IsodoseControl(QtWidgets.QDialog):
    """The isodose control for a :class:`ids_engine.viewer.app.MainWindow`.

    ``display`` is the :class:`IsodoseDisplay` pushed to every slice view on each change.
    """

    changed = QtCore.pyqtSignal(object)  # the new IsodoseDisplay

    def __init__(self, window, parent=None) -> None:
        super().__init__(parent or window)
        self.setWindowTitle("Isodose control")
        self.setObjectName("isodose-control")
        self.window_ = window
        views = list(window.slice_views.values())
        self.display: IsodoseDisplay = views[0].display if views else IsodoseDisplay()

        self.value_edit = QtWidgets.QLineEdit()
        self.value_edit.setPlaceholderText("e.g. 57 or 95")
        self.value_unit = QtWidgets.QComboBox()
        self.value_unit.addItems(["Gy", "%"])
        self.add_button = QtWidgets.QPushButton("Add")
        self.levels_list = QtWidgets.QListWidget()
        self.width_spin = QtWidgets.QSpinBox()
        self.width_spin.setRange(0, 12)
        self.width_spin.setSuffix(" px")
        self.width_spin.setToolTip("Line width in pixels; 0 is the normal width")
        self.colour_box = QtWidgets.QComboBox()
        self.colour_box.addItems([_TABLE, *TINT_COLOURS])
        self.delete_button = QtWidgets.QPushButton("Delete level")
        self.show3d_button = QtWidgets.QPushButton("Show in 3D")
        self.show3d_button.setToolTip("The 3D view's isodose surface (one at a time) takes this level")
        self.tint_check = QtWidgets.QCheckBox("Tint this level's region")
        self.tint_colour = QtWidgets.QComboBox()
        self.tint_colour.addItems(list(TINT_COLOURS))
        self.ticks_check = QtWidgets.QCheckBox("Tick marks on the downhill side")
        self.ticks_check.setChecked(self.display.ticks)
        self.hot_check = QtWidgets.QCheckBox("Mark the hot spot of each frame")
        self.hot_check.setChecked(self.display.hot_spot)
        self.norm_check = QtWidgets.QCheckBox("100 % is")
        self.norm_spin = QtWidgets.QDoubleSpinBox()
        self.norm_spin.setRange(0.001, 10000.0)
        self.norm_spin.setDecimals(3)
        self.norm_spin.setSuffix(" Gy")
        self.norm_check.setToolTip("The normalisation point's dose; unchecked: the prescription")
        rx = self._prescription_gy()
        self.norm_check.setChecked(self.display.normalisation_gy is not None)
        self.norm_spin.setValue(self.display.normalisation_gy or rx)
        self.reference = QtWidgets.QLabel("")
        self.reference.setObjectName("isodoseReference")
        self.reference.setWordWrap(True)
        self.message = QtWidgets.QLabel("")
        self.message.setObjectName("isodoseMessage")

        form = QtWidgets.QGridLayout(self)
        row = QtWidgets.QHBoxLayout()
        row.addWidget(QtWidgets.QLabel("Level"))
        row.addWidget(self.value_edit, 1)
        row.addWidget(self.value_unit)
        row.addWidget(self.add_button)
        form.addLayout(row, 0, 0, 1, 2)
        form.addWidget(self.levels_list, 1, 0, 6, 1)
        form.addWidget(QtWidgets.QLabel("Width"), 1, 1)
        form.addWidget(self.width_spin, 2, 1)
        form.addWidget(self.colour_box, 3, 1)
        form.addWidget(self.delete_button, 4, 1)
        form.addWidget(self.show3d_button, 5, 1)
        tint = QtWidgets.QHBoxLayout()
        tint.addWidget(self.tint_check)
        tint.addWidget(self.tint_colour)
        form.addLayout(tint, 7, 0, 1, 2)
        form.addWidget(self.ticks_check, 8, 0, 1, 2)
        form.addWidget(self.hot_check, 9, 0, 1, 2)
        norm = QtWidgets.QHBoxLayout()
        norm.addWidget(self.norm_check)
        norm.addWidget(self.norm_spin)
        form.addLayout(norm, 10, 0, 1, 2)
        form.addWidget(self.reference, 11, 0, 1, 2)
        form.addWidget(self.message, 12, 0, 1, 2)

        self.add_button.clicked.connect(self._on_add)
        self.value_edit.returnPressed.connect(self._on_add)
        self.delete_button.clicked.connect(self._on_delete)
        self.show3d_button.clicked.connect(self._on_show3d)
        self.levels_list.currentRowChanged.connect(self._on_row)
        self.width_spin.valueChanged.connect(lambda _v: self._on_style())
        self.colour_box.currentTextChanged.connect(lambda _t: self._on_style())
        self.tint_check.toggled.connect(lambda _on: self._on_tint())
        self.tint_colour.currentTextChanged.connect(lambda _t: self._on_tint())
        self.ticks_check.toggled.connect(lambda on: self._apply(replace(self.display, ticks=bool(on))))
        self.hot_check.toggled.connect(lambda on: self._apply(replace(self.display, hot_spot=bool(on))))
        self.norm_check.toggled.connect(lambda _on: self._on_norm())
        self.norm_spin.valueChanged.connect(lambda _v: self._on_norm())
        self._updating = False
        self.refresh()

    # ------------------------------------------------------------------ helpers
    def _prescription_gy(self) -> float:
        """The dose the window's levels are % of: the session's prescription, or the shown
        forward plan's normalisation point dose."""
        s = getattr(self.window_, "session", None)
        if s is None:
            return 1.0
        return float(getattr(self.window_, "display_rx_gy", None) or s.prescription_gy)

    def _normalisation_gy(self) -> float:
        return self.display.normalisation_gy or self._prescription_gy()

    @property
    def levels(self):
        return tuple(self.window_.levels)

    def current_level(self):
        k = self.levels_list.currentRow()
        return self.levels[k] if 0 <= k < len(self.levels) else None

    def refresh(self) -> None:
        """List the window's levels (after the window changed them)."""
        shown = getattr(self.window_, "shown_plan", None)
        rx = self._prescription_gy()
        if shown is not None:
            self.reference.setText(f"Levels are % of {rx:.4g} Gy: the normalisation point of {shown.label}")
        else:
            self.reference.setText(f"Levels are % of {rx:.4g} Gy: the shaping session's prescription")
        keep = self.current_level()
        self._updating = True
        self.levels_list.clear()
        norm = self._normalisation_gy()
        for lev in self.levels:
            extra = []
            if any(s[0] == round(lev.pct, 4) for s in self.display.styles):
                extra.append("styled")
            if self.display.tinted(lev):
                extra.append("tinted")
            text = f"{lev.gy:.3g} Gy   {100.0 * lev.gy / norm:.4g} %" + (f"   ({', '.join(extra)})" if extra else "")
            self.levels_list.addItem(text)
        self._updating = False
        if self.levels:
            k = 0
            if keep is not None:
                k = min(range(len(self.levels)), key=lambda i: abs(self.levels[i].gy - keep.gy))
            self.levels_list.setCurrentRow(k)
        self._on_row(self.levels_list.currentRow())

    def _apply(self, display: IsodoseDisplay) -> None:
        self.display = display
        for v in self.window_.slice_views.values():
            v.set_isodose_display(display)
        self.changed.emit(display)

    # ------------------------------------------------------------------ actions
    def add_level(self, value: float, unit: str) -> bool:
        """Add a level given in Gy or in % of the normalisation point; False with a message if not."""
        rx = self._prescription_gy()
        gy = float(value) if unit == "Gy" else float(value) / 100.0 * self._normalisation_gy()
        if not gy > 0:
            self.message.setText(f"⚠ {value:g} {unit}: a level must be positive")
            return False
        pcts = sorted({round(lev.pct, 6) for lev in self.levels} | {round(100.0 * gy / rx, 6)})
        if not self.window_.set_isodose_levels(format_levels(pcts)):
            self.message.setText(f"⚠ {value:g} {unit} not added (see the status bar)")
            return False
        self.message.setText(f"Added {gy:.3g} Gy")
        self.refresh()
        self.select_gy(gy)
        return True

    def select_gy(self, gy: float) -> None:
        k = min(range(len(self.levels)), key=lambda i: abs(self.levels[i].gy - gy)) if self.levels else -1
        self.levels_list.setCurrentRow(k)

    def delete_level(self) -> bool:
        lev = self.current_level()
        if lev is None:
            return False
        rest = [lev2.pct for lev2 in self.levels if lev2 is not lev]
        if not rest:
            self.message.setText("⚠ Keep at least one isodose level")
            return False
        display = self.display
        if display.tinted(lev):
            display = replace(display, tint_pct=None)
        display = replace(display, styles=tuple(s for s in display.styles if s[0] != round(lev.pct, 4)))
        self._apply(display)
        self.window_.set_isodose_levels(format_levels(rest))
        self.refresh()
        return True

    def _on_add(self) -> None:
        text = self.value_edit.text().strip()
        try:
            value = float(text)
        except ValueError:
            self.message.setText(f"⚠ {text!r} is not a number")
            return
        if self.add_level(value, self.value_unit.currentText()):
            self.value_edit.clear()

    def _on_delete(self) -> None:
        self.delete_level()

    def _on_show3d(self) -> None:
        """Make the current level the one the 3D surface shows (the window's selected level)."""
        lev = self.current_level()
        box = getattr(self.window_, "level_box", None)
        if lev is None or box is None:
            return
        for i in range(box.count()):
            if box.itemData(i) is not None and abs(float(box.itemData(i)) - lev.gy) < 1e-9:
                box.setCurrentIndex(i)
                self.message.setText(f"3D surface: {lev.gy:.3g} Gy")
                return

    def _on_row(self, k: int) -> None:
        lev = self.levels[k] if 0 <= k < len(self.levels) else None
        self._updating = True
        try:
            if lev is None:
                return
            colour, width = None, 0.0
            for pct, rgb, w in self.display.styles:
                if pct == round(lev.pct, 4):
                    colour, width = rgb, w
            self.width_spin.setValue(int(round(width)))
            name = next((n for n, c in TINT_COLOURS.items() if colour is not None and tuple(c) == tuple(colour)), _TABLE)
            self.colour_box.setCurrentText(name)
            self.tint_check.setChecked(self.display.tinted(lev))
        finally:
            self._updating = False

    def _on_style(self) -> None:
        lev = self.current_level()
        if self._updating or lev is None:
            return
        name = self.colour_box.currentText()
        colour = None if name == _TABLE else TINT_COLOURS[name]
        self._apply(self.display.with_style(lev.pct, colour, float(self.width_spin.value())))

    def _on_tint(self) -> None:
        lev = self.current_level()
        if self._updating or lev is None:
            return
        colour = TINT_COLOURS[self.tint_colour.currentText()]
        if self.tint_check.isChecked():
            self._apply(replace(self.display, tint_pct=lev.pct, tint_colour=colour))
        elif self.display.tinted(lev):
            self._apply(replace(self.display, tint_pct=None, tint_colour=colour))
        else:
            self._apply(replace(self.display, tint_colour=colour))

    def _on_norm(self) -> None:
        gy = float(self.norm_spin.value()) if self.norm_check.isChecked() else None
        self._apply(replace(self.display, normalisation_gy=gy))
        self.refresh()
