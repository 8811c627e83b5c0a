"""Fixtures for the registration tests: coarse phantoms and variants with known transforms."""

from __future__ import annotations

import pytest

from ids_engine.phantoms import horseshoe
from ids_engine.registration import make_variant


@pytest.fixture(scope="session")
def hs():
    """The coarse horseshoe (81 x 57 x 43 voxels of 3.9 x 3.9 x 4 mm)."""
    return horseshoe("coarse")


@pytest.fixture(scope="session")
def moved(hs):
    """Shifted by (3, -2, 1.5) mm and rotated by (1, -2, 4) degrees about x, y, z; 4 markers."""
    return make_variant(hs, shift_mm_xyz=(3.0, -2.0, 1.5), rotation_deg_xyz=(1.0, -2.0, 4.0), seed=3)


@pytest.fixture(scope="session")
def deformed(hs):
    """Shifted by (2, 1, 0) mm, rotated 2 degrees about z, OAR grown 4 mm, target shrunk 4 mm."""
    return make_variant(hs, shift_mm_xyz=(2.0, 1.0, 0.0), rotation_deg_xyz=(0.0, 0.0, 2.0),
                        oar_grow_mm=4.0, target_shrink_mm=4.0, seed=5)
