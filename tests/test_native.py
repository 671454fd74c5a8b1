"""fastmlp.kernels.native: kernels called through their addresses from a parallel
loop (pack_call, call_packed) or directly (call_at), against the same arithmetic in
NumPy; the signature guard; errors."""
import numpy as np
import pytest
from numba import njit, prange

import fastmlp
from fastmlp.kernels import native
from fastmlp.kernels.native import call_at, call_packed, pack_call


@njit(no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _axpy_row(t, a, X, Y):
    # Row t of Y = a * X + Y, with a scalar and arrays of several layouts in the
    # packed block.
    for j in range(X.shape[1]):
        Y[t, j] += a * X[t, j]


@njit(no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _fail_on(t, bad, out):
    if t == bad:
        raise ValueError("kernel error")
    out[t] = t


@njit(parallel=True)
def _run_axpy(addr, key, a, X, Y, called):
    tramp, block = pack_call(addr, key, (a, X, Y))
    if tramp == 0:
        return False
    for t in prange(X.shape[0]):
        called[t] = call_packed(tramp, block, t)
    return True


@njit(parallel=True)
def _run_fail(addr, key, bad, out, called):
    tramp, block = pack_call(addr, key, (bad, out))
    for t in prange(out.shape[0]):
        called[t] = call_packed(tramp, block, t)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_packed_calls_match_numpy(dtype):
    rng = np.random.default_rng(7)
    for rows, cols in [(1, 1), (3, 17), (100, 7)]:
        X = rng.normal(size=(rows, cols)).astype(dtype)
        Y = rng.normal(size=(rows, cols)).astype(dtype)
        a = dtype(rng.normal())
        expected = a * X + Y
        addr, key = native.address(_axpy_row, (np.int64(0), a, X, Y))
        called = np.zeros(rows, dtype=np.bool_)
        assert _run_axpy(addr, key, a, X, Y, called)
        assert called.all()
        np.testing.assert_array_equal(Y, expected)


def test_a_wrong_key_packs_nothing_and_calls_nothing():
    X = np.ones((4, 3))
    Y = np.zeros((4, 3))
    addr, key = native.address(_axpy_row, (np.int64(0), 2.0, X, Y))
    called = np.zeros(4, dtype=np.bool_)
    assert not _run_axpy(addr, key + 1, 2.0, X, Y, called)
    assert not called.any() and not Y.any()


def test_keys_name_the_argument_types():
    import numba
    f32 = native.signature_key([numba.typeof(np.zeros((2, 2), np.float32))])
    f64 = native.signature_key([numba.typeof(np.zeros((2, 2), np.float64))])
    F = native.signature_key([numba.typeof(np.zeros((2, 2), np.float64, order="F"))])
    assert len({f32, f64, F}) == 3
    assert f64 == native.signature_key([numba.typeof(np.ones((5, 1)))])


def test_a_kernel_error_is_reported_per_chunk():
    out = np.zeros(4, dtype=np.int64)
    addr, key = native.address(_fail_on, (np.int64(0), np.int64(2), out))
    called = np.ones(4, dtype=np.bool_)
    _run_fail(addr, key, 2, out, called)
    np.testing.assert_array_equal(called, [True, True, False, True])
    np.testing.assert_array_equal(out, [0, 1, 0, 3])


def _fit_with_wrong_keys(monkeypatch, wrong, match, optimizer="sgd"):
    """One epoch with native.address giving the kernels for which wrong(dispatcher)
    holds a key that matches no argument types: it must raise RuntimeError
    matching match, with every weight unchanged."""
    model = fastmlp.MLP([5, 4, 3], ["tanh", "softmax"], seed=0)
    before = [W.copy() for W in model.weights]
    real = native.address
    monkeypatch.setattr(native, "address", lambda d, args: (
        (real(d, args)[0], 12345) if wrong(d) else real(d, args)))
    X = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
    trainer = fastmlp.Trainer(model, "cross_entropy", lr=0.1, batch_size=4, seed=0,
                              optimizer=optimizer)
    with pytest.raises(RuntimeError, match=match):
        trainer.fit(X, np.arange(8) % 3, epochs=1)
    for W, W0 in zip(model.weights, before):
        np.testing.assert_array_equal(W, W0)


def test_engine_refuses_kernels_compiled_for_other_types(monkeypatch):
    # If the Engine's argument lists and train_epoch's packing ever disagree, the
    # epoch stops before any batch with a clear error instead of running code
    # that reads the wrong layout.
    _fit_with_wrong_keys(monkeypatch, lambda d: True, "compiled for")


def test_address_is_remembered_per_argument_types():
    X = np.ones((3, 4), np.float64)
    first = native.address(_axpy_row, (np.int64(0), 2.0, X, X.copy()))
    assert native.address(_axpy_row, (np.int64(1), 3.0, X + 1, X.copy())) == first
    # Another dtype or layout is another compiled kernel, with another key.
    other = native.address(_axpy_row, (np.int64(0), 2.0, X.astype(np.float32),
                                       X.astype(np.float32)))
    strided = native.address(_axpy_row, (np.int64(0), 2.0, X[:, ::2], X.copy()[:, ::2]))
    assert len({first[1], other[1], strided[1]}) == 3
    assert len({first[0], other[0], strided[0]}) == 3


@njit
def _scale_row(X, i, a):
    for j in range(X.shape[1]):
        X[i, j] *= a


@njit
def _call_scale(fn, X, i, a):
    return call_at(fn, (X, i, a))


@njit
def _raise_if(flag):
    if flag:
        raise ValueError("kernel error")


@njit
def _call_raise(fn, flag):
    return call_at(fn, (flag,))


def test_call_at_calls_the_kernel_for_its_types_only():
    X = np.arange(6.0).reshape(2, 3)
    fn = np.array(native.address(_scale_row, (X, np.int64(1), 2.0)), dtype=np.int64)
    assert _call_scale(fn, X, 1, 2.0)
    np.testing.assert_array_equal(X, [[0, 1, 2], [6, 8, 10]])
    wrong = fn.copy()
    wrong[1] += 1
    assert not _call_scale(wrong, X, 1, 2.0)
    # float32 rows are other types than the kernel was compiled for: not called.
    X32 = X.astype(np.float32)
    assert not _call_scale(fn, X32, 1, 2.0)
    np.testing.assert_array_equal(X, [[0, 1, 2], [6, 8, 10]])
    np.testing.assert_array_equal(X32, X)


def test_call_at_reports_a_kernel_error():
    fn = np.array(native.address(_raise_if, (True,)), dtype=np.int64)
    assert _call_raise(fn, False)
    assert not _call_raise(fn, True)


def test_engine_stops_when_a_chunk_kernel_has_other_types(monkeypatch):
    # chunk_forward_backward calls its kernels through call_at: one whose key does
    # not match stops the epoch in its first batch, before any weight changes.
    from fastmlp.kernels import dense
    _fit_with_wrong_keys(monkeypatch, lambda d: d is dense.matmul_rows, "per-chunk kernel")


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_engine_stops_when_the_optimizer_kernel_has_other_types(monkeypatch, optimizer):
    # update_share calls optimizer_row through call_at (plain SGD never does): a
    # key that does not match stops the epoch at its first update, weights unchanged.
    from fastmlp.kernels import epoch
    _fit_with_wrong_keys(monkeypatch, lambda d: d is epoch.optimizer_row, "per-chunk kernel",
                         optimizer)
