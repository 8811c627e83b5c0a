"""The device-cost counting backend counts what CuPy would launch, sync and copy, and refuses
what CuPy refuses."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ids_engine import backend
from ids_engine._devicecost import DeviceArray, counting, devicecost as dc, register_raw_kernel


def test_ufuncs_reductions_and_creation_are_one_launch_each():
    a = dc.arange(12, dtype=dc.float32).reshape(3, 4)
    with counting() as c:
        b = a * 2 + 1  # two elementwise kernels
        s = b.sum()  # one reduction, result stays on the device
        z = dc.zeros((5,), dc.float32)
        e = dc.empty((5,), dc.float32)  # allocation only
        v = a[1:, ::2]  # a view: nothing runs
    assert (c.launches, c.syncs, c.h2d, c.d2h) == (4, 0, 0, 0)
    assert isinstance(s, DeviceArray) and s.shape == ()
    assert isinstance(v, DeviceArray) and isinstance(z, DeviceArray) and isinstance(e, DeviceArray)
    np.testing.assert_array_equal(b.get(), np.arange(12, dtype=np.float32).reshape(3, 4) * 2 + 1)


def test_host_reads_are_syncs_and_transfers():
    a = dc.arange(10, dtype=dc.int64)
    with counting() as c:
        x = float(a.sum())
        n = int(a[3])
        host = dc.asnumpy(a)
        ok = bool((a > 4).any())
    assert (x, n, ok) == (45.0, 3, True)
    assert isinstance(host, np.ndarray) and not isinstance(host, DeviceArray)
    assert c.syncs == 4 and c.d2h == 4 and c.d2h_bytes == 8 + 8 + 80 + 1


def test_host_to_device_copies_are_counted():
    h = np.ones((4, 4), np.float32)
    with counting() as c:
        d = dc.asarray(h)
        same = dc.asarray(d)  # already on the device: no copy
        d[np.array([0, 2])] = 5.0  # a host index array travels to the device
    assert same is d
    assert c.h2d == 2 and c.h2d_bytes == h.nbytes + 16
    assert c.launches == 1  # one scatter kernel


def test_host_to_device_copies_never_alias_host_memory():
    """A device array made from a host array is a copy (as on a GPU): writes to either side do
    not show in the other, so a host mirror the engine forgets to update is caught."""
    for make in (dc.asarray, dc.array, dc.ascontiguousarray):
        h = np.zeros(4, np.float32)
        d = make(h)
        d += 1.0
        h[0] = 5.0
        np.testing.assert_array_equal(h, [5, 0, 0, 0])
        np.testing.assert_array_equal(d.get(), [1, 1, 1, 1])


def test_sparse_coo_to_csc_on_the_device():
    from scipy import sparse

    csp = dc.cupyx.scipy.sparse
    vals = dc.asarray(np.array([1.0, 2.0, 3.0, 4.0], np.float32))
    rows = dc.asarray(np.array([0, 2, 0, 1], np.int32))
    cols = dc.asarray(np.array([1, 0, 1, 2], np.int32))  # (0, 1) twice: summed
    with counting() as c:
        m = csp.coo_matrix((vals, (rows, cols)), shape=(3, 3)).tocsc()
    assert c.launches == 10 and c.syncs == 1 and c.d2h == 0
    assert m.shape == (3, 3) and m.nnz == 3 and m.dtype == np.float32
    assert all(isinstance(a, DeviceArray) for a in (m.data, m.indices, m.indptr))
    want = np.array([[0, 4, 0], [0, 0, 4], [2, 0, 0]], np.float32)
    with counting() as c:
        y = m @ dc.asarray(np.array([1.0, 10.0, 100.0], np.float32))
        h = m.get()
    assert c.launches == 1 and c.syncs == 1
    assert isinstance(y, DeviceArray) and isinstance(h, sparse.csc_matrix)
    np.testing.assert_array_equal(h.toarray(), want)
    np.testing.assert_array_equal(y.get(), want @ [1, 10, 100])
    with pytest.raises(TypeError, match="host operand"):
        m @ np.ones(3, np.float32)
    with pytest.raises(TypeError, match="device arrays"):
        csp.coo_matrix((np.ones(2, np.float32), (rows[:2], cols[:2])), shape=(3, 3))


def test_data_dependent_sizes_sync():
    a = dc.asarray(np.array([0, 3, 0, 5]))
    with counting() as c:
        nz = dc.flatnonzero(a)
        picked = a[a > 0]
        k, j = dc.unravel_index(dc.asarray(np.array([5])), (2, 3))
    assert c.syncs == 1 + 1 + 2  # CuPy's unravel_index syncs twice
    np.testing.assert_array_equal(nz.get(), [1, 3])
    np.testing.assert_array_equal(picked.get(), [3, 5])
    assert (int(k[0]), int(j[0])) == (1, 2)


def test_what_cupy_refuses_raises():
    d = dc.zeros((3, 3), dc.float32)
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(d)
    with pytest.raises(TypeError, match="Implicit conversion"):
        ndimage.binary_dilation(d)
    with pytest.raises(TypeError, match="host NumPy array"):
        d + np.ones((3, 3), np.float32)
    with pytest.raises(TypeError, match="host NumPy array"):
        dc.where(d > 0, np.ones((3, 3)), d)
    with pytest.raises(TypeError, match="no implementation found"):
        np.lib.stride_tricks.sliding_window_view(d, 2)


def test_numpy_functions_dispatch_to_the_device_as_in_cupy():
    a = dc.arange(4, dtype=dc.float32)
    with counting() as c:
        b = np.concatenate([a, a])  # NumPy's function on device arrays runs CuPy's
        m = np.maximum(a, 2.0)
    assert isinstance(b, DeviceArray) and isinstance(m, DeviceArray)
    assert c.launches == 2 and c.syncs == 0


def test_in_place_operators_keep_the_array():
    a = dc.zeros(4, dc.float32)
    b = a
    with counting() as c:
        a += 1.0
        dc.add.at(a, dc.asarray(np.array([0, 0, 1])), 1.0)
    assert a is b
    np.testing.assert_array_equal(a.get(), [3, 2, 1, 1])
    assert c.launches == 2 and c.h2d == 1


def test_raw_kernels_run_their_registered_twin_and_check_arguments():
    def twin(grid, block, args):
        out, x, n = args
        out[:n] += 2 * x[:n]

    register_raw_kernel("twice", twin)
    fn = dc.RawModule(code='extern "C" __global__ void twice(float* out, const float* x, int n) {}').get_function("twice")
    out, x = dc.zeros(3, dc.float32), dc.ones(3, dc.float32)
    with counting() as c:
        fn((1,), (32,), (out, x, np.int32(3)))
    assert c.launches == 1
    np.testing.assert_array_equal(out.get(), [2, 2, 2])
    with pytest.raises(TypeError, match="sized NumPy scalars"):
        fn((1,), (32,), (out, x, 3))
    with pytest.raises(TypeError, match="host NumPy array"):
        fn((1,), (32,), (out, np.ones(3, np.float32), np.int32(3)))
    with pytest.raises(RuntimeError, match="defines no function"):
        dc.RawModule(code="").get_function("twice")


def test_counts_name_the_call_site():
    a = dc.ones(8, dc.float32)
    with counting() as c:
        for _ in range(3):
            a = a * 2
    (site, n), = c.top("launches")
    assert n == 3 and site.startswith("tests/test_devicecost.py:") and site.endswith("test_counts_name_the_call_site")


def test_the_backend_switch(monkeypatch):
    monkeypatch.setenv("IDS_BACKEND", "devicecost")
    backend.reset_backend()
    try:
        assert backend.xp() is dc and backend.backend_name() == "devicecost"
        d = backend.to_device(np.arange(3))
        assert backend.array_module(d) is dc and backend.is_counting(backend.array_module(d))
        with counting() as c:
            backend.synchronize()
            h = backend.asnumpy(d)
        assert c.syncs == 2 and isinstance(h, np.ndarray)
    finally:
        backend.reset_backend()


def test_the_ledger_splits_host_work_from_device_work():
    import time

    from ids_engine._devicecost import GpuCostModel

    a = dc.ones((400, 400), dc.float32)
    with counting() as c:
        time.sleep(0.05)  # host work: not inside any device operation
        for _ in range(5):
            a = dc.sqrt(a * 1.0001 + 0.5)  # device work, timed as such
        host_copy = a.get()  # a read: device work and a sync
    assert host_copy.shape == (400, 400)
    assert c.wall_s >= 0.05 and c.device_s > 0
    assert c.host_s == pytest.approx(c.wall_s - c.device_s)
    assert 0.05 <= c.host_s < c.wall_s
    with counting() as inner_outer:
        dc.cumsum(dc.ones(1000, dc.float32))  # a device op calling others is timed once
    assert inner_outer.device_s <= inner_outer.wall_s
    # The model: host + launches x launch cost + syncs x sync cost + bytes / bandwidth.
    m = GpuCostModel(launch_us=10.0, sync_us=20.0, h2d_gb_s=1.0, d2h_gb_s=2.0)
    est = m.estimate_ms(c)
    assert est["launch_ms"] == pytest.approx(c.launches * 0.01)
    assert est["sync_ms"] == pytest.approx(c.syncs * 0.02)
    assert est["transfer_ms"] == pytest.approx(1e3 * (c.h2d_bytes / 1e9 + c.d2h_bytes / 2e9))
    assert est["host_ms"] == pytest.approx(1e3 * c.host_s)
    assert est["total_ms"] == pytest.approx(sum(est[k] for k in ("host_ms", "launch_ms", "sync_ms", "transfer_ms")))
    assert c.gpu_estimate_ms(m) == est
