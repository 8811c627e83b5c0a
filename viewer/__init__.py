"""The desktop viewer (vispy + PyQt6), installed as ``ids_engine.viewer``."""

__all__: list[str] = []
