import numpy as np
import pytest

from ids_engine.deliver import Aperture, aperture_fluence
from ids_engine.model import MLC, FluenceGrid, default_6mv, default_mlc


def test_default_mlc_geometry():
    m = default_mlc()
    assert m.n_pairs == 60
    b = m.leaf_boundaries_mm()
    assert b[0] == -200 and b[-1] == 200 and b[30] == 0
    assert np.allclose(np.diff(b)[10:50], 5.0)
    assert default_6mv().mlc == m


def test_open_square_fluence_area_and_edges():
    m = default_mlc()
    g = FluenceGrid.centred((40, 40), 1.0)
    ap = Aperture(np.full(60, -10.0), np.full(60, 10.0), (-10, 10), (-10, 10))
    f = aperture_fluence(ap, m, g)
    assert f.sum() == pytest.approx(400.0)  # 20 x 20 mm open, cells of 1 mm^2
    assert f.max() == pytest.approx(1.0)
    # Cell centred on the edge at u = -10 is half open.
    assert f[20, 10] == pytest.approx(0.5)


def test_closed_leaves_transmit_inside_the_jaws_only():
    m = MLC(transmission=0.02)
    g = FluenceGrid.centred((40, 40), 1.0)
    ap = Aperture(np.zeros(60), np.zeros(60), (-10, 10), (-5, 5))
    f = aperture_fluence(ap, m, g)
    assert f.sum() == pytest.approx(0.02 * 20 * 10)


def test_bad_apertures_name_the_field():
    with pytest.raises(ValueError, match="leaf pair 3"):
        x1 = np.zeros(5); x2 = np.ones(5); x1[3] = 2
        Aperture(x1, x2, (-1, 1), (-1, 1))
    with pytest.raises(ValueError, match="jaw_y_mm"):
        Aperture(np.zeros(2), np.ones(2), (-1, 1), (1, -1))
    with pytest.raises(ValueError, match="transmission"):
        MLC(transmission=1.5)
