"""Fixtures shared by the DMR tests."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import ids_engine.session as session_module
from ids_engine.dmr._resolve import ResolveContext


@pytest.fixture
def ring_as_found(monkeypatch):
    """Requests resolved with the beside-guard ring as it was when the side-effect repair
    tests' drags were found (no inner ring: ``ResolveContext.guard_ring_in_max_mm`` = inf).
    The inner ring changes a surface drag's guards, and with them which repair stage is the
    one that takes its far rise under the line; line drags are unchanged by it."""
    monkeypatch.setattr(session_module, "ResolveContext", functools.partial(ResolveContext, guard_ring_in_max_mm=np.inf))
