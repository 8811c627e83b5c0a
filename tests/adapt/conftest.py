"""Fixtures of the adaptive replanning tests: one approved plan on the coarse horseshoe,
made once per session (5 beams optimised for examples/adapt/horseshoe_protocol.toml, then
two shaping requests), saved as an `ids plan --out` folder (session/ + protocol.toml)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from bench_adapt import make_approved  # noqa: E402  (the approved plan is the benchmark's)


@pytest.fixture(scope="session")
def approved_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("approved")
    make_approved(out, "coarse", 5, max_iterations=100, tail_rounds=1)
    return out


@pytest.fixture(scope="session")
def approved(approved_dir):
    from ids_engine.adapt import load_approved_plan

    return load_approved_plan(approved_dir)
