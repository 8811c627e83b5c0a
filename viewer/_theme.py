"""A dark Fusion theme: imaging views read best on a dark surround."""

from __future__ import annotations

from PyQt6 import QtGui, QtWidgets

__all__ = ["apply_theme"]

_STYLE = """
QMainWindow, QDialog { background: #181b20; }
QToolBar { background: #1e2228; border: none; border-bottom: 1px solid #2b3139; spacing: 4px; padding: 2px 4px; }
QToolBar QLabel { color: #aeb7c2; padding: 0 2px 0 6px; }
QToolButton { color: #d7dde4; padding: 3px 7px; border-radius: 3px; }
QToolButton:checked { background: #2f6fb5; color: white; }
QToolButton:hover:!checked { background: #2b323b; }
QLabel#viewHeader { background: #1e2228; color: #c9d1d9; padding: 3px 8px; font-weight: 600; }
QWidget#viewHeaderBar { background: #1e2228; }
QWidget#viewHeaderBar QLabel { background: transparent; color: #aeb7c2; padding: 3px 0; }
QLabel#viewHeader { border: none; }
QDockWidget { color: #c9d1d9; }
QDockWidget::title { background: #1e2228; padding: 4px 8px; border-bottom: 1px solid #2b3139; }
QListWidget, QTableWidget { background: #12151a; color: #d7dde4; border: none; alternate-background-color: #161a20; }
QListWidget::item { padding: 2px 4px; }
QListWidget::item:selected, QTableWidget::item:selected { background: #2f6fb5; color: white; }
QHeaderView::section { background: #1e2228; color: #aeb7c2; border: none; padding: 3px 6px; }
QStatusBar { background: #1e2228; color: #c9d1d9; border-top: 1px solid #2b3139; }
QStatusBar QLabel { padding: 0 8px; }
QSplitter::handle { background: #2b3139; }
"""


def apply_theme(app: QtWidgets.QApplication) -> None:
    app.setStyle("Fusion")
    pal = QtGui.QPalette()
    c = QtGui.QColor
    role = QtGui.QPalette.ColorRole
    for r, col in ((role.Window, "#181b20"), (role.WindowText, "#d7dde4"), (role.Base, "#12151a"),
                   (role.AlternateBase, "#1a1e24"), (role.ToolTipBase, "#2b323b"), (role.ToolTipText, "#e6edf3"),
                   (role.Text, "#d7dde4"), (role.Button, "#262b32"), (role.ButtonText, "#d7dde4"),
                   (role.BrightText, "#ff6b6b"), (role.Highlight, "#2f6fb5"), (role.HighlightedText, "#ffffff"),
                   (role.PlaceholderText, "#77808a"), (role.Link, "#58a6ff")):
        pal.setColor(r, c(col))
    pal.setColor(QtGui.QPalette.ColorGroup.Disabled, role.Text, c("#6b737c"))
    pal.setColor(QtGui.QPalette.ColorGroup.Disabled, role.ButtonText, c("#6b737c"))
    pal.setColor(QtGui.QPalette.ColorGroup.Disabled, role.WindowText, c("#6b737c"))
    app.setPalette(pal)
    app.setStyleSheet(_STYLE)
