"""Subnormal floats are flushed to zero inside the compiled epoch, and only there."""
import numpy as np
import pytest

TINY = np.finfo(np.float32).tiny


def test_flush_and_restore_on_this_thread():
    from numba import njit
    from fastmlp.kernels.fpenv import flush_subnormals, restore_fp_state

    @njit
    def halve_flushed(a, out):
        state = flush_subnormals()
        out[0] = a[0] * a[1]
        restore_fp_state(state)
        return state

    a = np.array([2e-38, 0.5], np.float32)   # the product, 1e-38, is subnormal
    out = np.full(1, np.nan, np.float32)
    state = halve_flushed(a, out)
    if state < 0:
        pytest.skip("no MXCSR on this architecture: nothing is flushed")
    assert out[0] == 0
    # The thread's previous state is back: NumPy on this thread keeps subnormals.
    assert np.multiply(a[0], a[1]) != 0


def _subnormal(a):
    return (a != 0) & (np.abs(a) < TINY)


def test_adam_moment_decays_to_zero_not_to_subnormals():
    """A pixel that is nonzero in one sample only (and no L2 term): Adam's first moment of its
    weights is kicked once, then decays by beta_1 for 849 steps, to about 1e-40:
    subnormal in NumPy's arithmetic, exactly zero in the compiled epoch (where
    subnormal arithmetic would take the slow path every step)."""
    pytest.importorskip("sklearn")
    from fastmlp import MLPClassifier
    rng = np.random.default_rng(0)
    n = 850
    X = np.zeros((n, 3), np.float32)
    X[:, :2] = rng.random((n, 2))
    X[0, 2] = 1.0
    y = (X[:, 0] > X[:, 1]).astype(int)
    moments = {}
    for backend in ("numpy", "numba"):
        clf = MLPClassifier(hidden_layer_sizes=(8,), alpha=0.0, batch_size=1, shuffle=False, max_iter=1,
                            random_state=0, backend=backend, threads=1)
        with pytest.warns(Warning):   # one epoch does not converge
            clf.fit(X, y)
        moments[backend] = clf._optimizer.state["mW"][0][2]
    decayed = _subnormal(moments["numpy"])      # units whose delta was 0 stay at 0
    assert decayed.sum() >= 4                   # the test can fail
    assert not _subnormal(moments["numba"]).any()
    assert (moments["numba"][decayed] == 0).all()
    # The worker threads' state was restored: NumPy here still makes subnormals.
    assert np.multiply(np.float32(2e-38), np.float32(0.5)) != 0
