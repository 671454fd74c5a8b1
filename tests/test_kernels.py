"""Every compiled kernel beside a plain NumPy twin, on many random cases: odd sizes,
batch sizes 1, 7 and 100, every activation, both dtypes. float64 must agree to
~1e-12 relative, float32 to ~1e-5."""
import functools
import itertools

import numpy as np
import pytest

from fastmlp import activations, losses
from fastmlp._numba_backend import to_csr
from fastmlp.kernels import dense, vmath

SIZES = [(1, 3), (3, 17), (17, 1), (785, 33), (64, 10)]
BATCHES = [1, 7, 100]
DTYPES = [np.float64, np.float32]
TOL = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=1e-5, atol=1e-5)}
ELEMENTWISE = ["linear", "sigmoid", "tanh", "relu"]


def rand(rng, shape, dtype, scale=1.0):
    return (rng.normal(size=shape) * scale).astype(dtype)


def sparse_input(rng, shape, dtype):
    X = rng.random(shape).astype(dtype)
    X[rng.random(shape) < 0.8] = 0     # MNIST-like: most inputs exactly zero
    return X


def shuffled_sparse_batch(rng, B, n_in, dtype, spare=5):
    """X (B + spare sparse rows), a shuffled batch of B of its rows (int64), and X's
    CSR arrays (indptr, indices, values)."""
    X = sparse_input(rng, (B + spare, n_in), dtype)
    rows = rng.permutation(B + spare)[:B].astype(np.int64)
    return (X, rows) + tuple(to_csr(X))


def test_kernel_codes_match_the_api_names():
    # The kernels switch on small integers that fastmlp's name tables define a
    # second time (the kernels cannot import the API); a mismatch would silently
    # train a different activation, loss or optimiser.
    from fastmlp import optimizers
    from fastmlp.kernels import epoch
    for name, code in activations.CODES.items():
        assert getattr(dense, name.upper()) == code, name
    for name, code in losses.CODES.items():
        assert getattr(dense, name.upper()) == code, name
    for name in ("SGD", "MOMENTUM", "NESTEROV", "ADAM"):
        assert getattr(epoch, name) == getattr(optimizers, name), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", activations.NAMES)
def test_dense_forward(dtype, act):
    rng = np.random.default_rng(activations.CODES[act])
    for (n_in, n_out), B in itertools.product(SIZES, BATCHES):
        if act == "softmax" and n_out == 1:
            continue
        X, W, b = rand(rng, (B, n_in), dtype), rand(rng, (n_in, n_out), dtype, 1 / np.sqrt(n_in)), rand(rng, n_out, dtype)
        out = np.full((B, n_out), np.nan, dtype=dtype)
        dense.dense_forward(X, W, b, activations.CODES[act], out)
        twin = activations.FORWARD[act](X @ W + b)
        assert out.dtype == dtype
        np.testing.assert_allclose(out, twin, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_csr_matmul_rows(dtype):
    rng = np.random.default_rng(7)
    # SIZES, and first layers narrow enough for combine_narrow_row's two chains.
    for (n_in, n_out), B in itertools.product(SIZES + [(30, 8), (29, 16), (31, 24), (33, 32)],
                                              BATCHES):
        X, rows, indptr, indices, values = shuffled_sparse_batch(rng, B, n_in, dtype)
        W = rand(rng, (n_in, n_out), dtype)
        out = np.full((B, n_out), np.nan, dtype=dtype)
        dense.csr_matmul_rows(indptr, 1, 0, indices, values, rows, W, out, 0, B, False)
        np.testing.assert_allclose(out, X[rows] @ W, **TOL[dtype])
        # acc: added to what out holds (the dense columns' product, in the epoch).
        base = rand(rng, (B, n_out), dtype)
        out[:] = base
        dense.csr_matmul_rows(indptr, 1, 0, indices, values, rows, W, out, 0, B, True)
        np.testing.assert_allclose(out, base + X[rows] @ W, **TOL[dtype])
        # Each row cut at columns into parts (a first layer split between chunks
        # by input columns): part c is the product of those columns alone.
        for parts in (2, 3):
            cuts = np.array([0] + sorted(rng.integers(0, n_in + 1, parts - 1)) + [n_in])
            cut_ptr = _column_cuts(indptr, indices, cuts)
            for c in range(parts):
                out[:] = np.nan
                dense.csr_matmul_rows(cut_ptr, parts, c, indices, values, rows, W, out, 0, B,
                                      False)
                a, e = cuts[c], cuts[c + 1]
                np.testing.assert_allclose(out, X[rows][:, a:e] @ W[a:e], **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_csr_matmul_csc_rows(dtype):
    """csr_matmul_csc_rows: csr_matmul_rows' product to the bit, and the CSC of the
    same nonzeros in weight_grad_csc's slots (NumPy's twin: each column's rows in
    order), whole-row widths (fused into the product's loop) and others, whole rows
    and parts of rows cut at columns; workspaces dirty on purpose, and nothing past
    the chunk's columns written."""
    rng = np.random.default_rng(17)
    for (n_in, n_out), B in itertools.product(SIZES + [(50, 100), (30, 129), (20, 65), (40, 97)],
                                              BATCHES):
        X, rows, indptr, indices, values = shuffled_sparse_batch(rng, B, n_in, dtype)
        W = rand(rng, (n_in, n_out), dtype)
        r0, r1 = B // 3, B
        R = r1 - r0
        cuts = np.array([0] + sorted(rng.integers(0, n_in + 1, 2)) + [n_in])
        cut_ptr = _column_cuts(indptr, indices, cuts)
        for ptr, parts, c, a, e in [(indptr, 1, 0, 0, n_in)] + [
                (cut_ptr, 3, c, cuts[c], cuts[c + 1]) for c in range(3)]:
            for acc in (False, True):
                want = rand(rng, (B, n_out), dtype)
                got = want.copy()
                dense.csr_matmul_rows(ptr, parts, c, indices, values, rows, W, want, r0, r1, acc)
                cptr = np.full(n_in + 2, 7, np.int64)
                crow = np.full(R * n_in, 3, np.int32)
                cval = np.full(R * n_in, np.nan, dtype)
                dense.csr_matmul_csc_rows(ptr, parts, c, indices, values, rows, W, got, r0, r1,
                                          acc, a, e, cptr, crow, cval)
                assert got.tobytes() == want.tobytes()
                assert (cptr[:a] == 7).all() and (cptr[e:] == 7).all()
                for k in range(a, e):
                    entries = [(r, X[rows[r], k]) for r in range(r0, r1) if X[rows[r], k] != 0]
                    slots = slice((k - a) * R, (k - a) * R + cptr[k])
                    assert list(zip(crow[slots], cval[slots])) == entries


def _column_cuts(indptr, indices, cuts):
    """dense.csr_column_cuts, checked against a NumPy twin: each row's nonzeros cut
    at the columns cuts[1..-2]."""
    parts, n = len(cuts) - 1, len(indptr) - 1
    out = np.full(n * parts + 1, -1, np.int64)
    dense.csr_column_cuts(indptr, indices, np.asarray(cuts, np.int64), out)
    twin = [indptr[i] + np.searchsorted(indices[indptr[i]:indptr[i + 1]], cuts[c])
            for i in range(n) for c in range(parts)] + [indptr[n]]
    np.testing.assert_array_equal(out, twin)
    return out


def test_csr_column_cuts_edges():
    """Cuts at the first and past the last column, equal cuts (an empty part), and
    empty rows."""
    X = np.array([[0, 1, 0, 2], [0, 0, 0, 0], [3, 0, 0, 4], [5, 6, 7, 8]], np.float64)
    indptr, indices, _ = to_csr(X)
    for cuts in ([0, 0, 4], [0, 4, 4], [0, 2, 2, 4], [0, 1, 2, 3, 4], [0, 4]):
        _column_cuts(indptr, indices, cuts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ELEMENTWISE + ["softmax"])
def test_dense_backward(dtype, act):
    rng = np.random.default_rng(11 + activations.CODES[act])
    for (n_in, n_out), B in itertools.product(SIZES, BATCHES):
        if act == "softmax" and n_out == 1:
            continue
        A_prev = rand(rng, (B, n_in), dtype)
        W = rand(rng, (n_in, n_out), dtype)
        A = activations.FORWARD[act](rand(rng, (B, n_out), dtype))
        dA = rand(rng, (B, n_out), dtype)
        delta = activations.vjp(act, A, dA)
        dW, db = np.empty_like(W), np.empty(n_out, dtype)
        dA_prev = np.empty_like(A_prev)
        work = dA.copy()
        dense.dense_backward(work, A, activations.CODES[act], A_prev, W, dW, db, dA_prev, True)
        np.testing.assert_allclose(work, delta, **TOL[dtype])
        np.testing.assert_allclose(dW, A_prev.T @ delta / B, **TOL[dtype])
        np.testing.assert_allclose(db, delta.sum(axis=0) / B, **TOL[dtype])
        np.testing.assert_allclose(dA_prev, delta @ W.T, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act_prev", ELEMENTWISE)
def test_backprop_rows_applies_previous_derivative(dtype, act_prev):
    rng = np.random.default_rng(5)
    for (n_in, n_out), B in itertools.product(SIZES, BATCHES):
        D, W = rand(rng, (B, n_out), dtype), rand(rng, (n_in, n_out), dtype)
        A_prev = activations.FORWARD[act_prev](rand(rng, (B, n_in), dtype))
        out = np.empty((B, n_in), dtype)
        r0, r1 = B // 3, B            # a chunk of rows, as a thread would own
        dense.backprop_rows(D, W, A_prev, activations.CODES[act_prev], out, r0, r1)
        twin = (D @ W.T) * activations.derivative(act_prev, A_prev)
        np.testing.assert_allclose(out[r0:r1], twin[r0:r1], **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_backprop_through_a_transposed_copy(dtype):
    # The epoch's back-propagation through a narrow W (backprop_transposed): W^T
    # copied into a scratch array (the chunk's partial gradient of W), then D W^T by
    # matmul_rows, against NumPy and against backprop_rows (BLAS there).
    rng = np.random.default_rng(6)
    taken = 0
    for (n_in, n_out), B in itertools.product(SIZES + [(100, 10), (64, 32), (16, 10)],
                                              BATCHES + [24]):
        D, W = rand(rng, (B, n_out), dtype), rand(rng, (n_in, n_out), dtype)
        r0, r1 = B // 3, B
        if not dense.backprop_transposed(W, r1 - r0):
            continue
        taken += 1
        WT = np.full(n_in * n_out, np.nan, dtype).reshape(n_out, n_in)
        dense.transpose_into(W, WT)
        np.testing.assert_array_equal(WT, W.T)
        got = np.full((B, n_in), np.nan, dtype)
        dense.matmul_rows(D, WT, got, r0, r1)
        np.testing.assert_allclose(got[r0:r1], (D @ W.T)[r0:r1], **TOL[dtype])
        assert np.isnan(got[:r0]).all()
        ref = np.empty((B, n_in), dtype)
        dense.backprop_rows(D, W, D, dense.LINEAR, ref, r0, r1)
        np.testing.assert_allclose(got[r0:r1], ref[r0:r1], **TOL[dtype])
    # Where the tiles exist, the narrow layers take this way.
    assert taken > 0 or not dense.TILES


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ELEMENTWISE)
def test_derivative_sums_rows(dtype, act):
    # The epoch's one pass over a hidden layer's delta: the activation's derivative
    # and the bias gradient, against NumPy, and to the bit against the two passes
    # it replaced (backprop_rows' derivative, then column_sums_rows).
    rng = np.random.default_rng(11)
    code = activations.CODES[act]
    for (n_in, n_out), B in itertools.product(SIZES, BATCHES):
        A = activations.FORWARD[act](rand(rng, (B, n_out), dtype))
        D = rand(rng, (B, n_out), dtype)
        r0, r1 = B // 3, B
        got, db = D.copy(), np.full(n_out, np.nan, dtype)
        dense.derivative_sums_rows(code, A, got, db, r0, r1)
        twin = D * activations.derivative(act, A)
        np.testing.assert_allclose(got[r0:r1], twin[r0:r1], **TOL[dtype])
        np.testing.assert_array_equal(got[:r0], D[:r0])          # other rows untouched
        np.testing.assert_allclose(db, twin[r0:r1].sum(axis=0), **TOL[dtype])
        W = np.eye(n_out, dtype=dtype)                            # D W^T = D
        two, db2 = np.empty_like(D), np.empty(n_out, dtype)
        dense.backprop_rows(D, W, A, code, two, r0, r1)
        dense.column_sums_rows(two, db2, r0, r1)
        np.testing.assert_array_equal(got[r0:r1], two[r0:r1])
        np.testing.assert_array_equal(db, db2)


def test_empty_bias_gradient_is_not_written():
    # An empty db asks the weight gradient kernels for no column sums (the epoch
    # has them already); the weight gradient is the same.
    rng = np.random.default_rng(12)
    A, D = rand(rng, (9, 17), np.float64), rand(rng, (9, 5), np.float64)
    dW, dW2 = np.zeros((17, 5)), np.zeros((17, 5))
    backing = np.full(6, 7.0)
    dense.weight_grad_rows(A, D, dW, backing[:0], 2, 9)
    dense.weight_grad_rows(A, D, dW2, np.zeros(5), 2, 9)
    np.testing.assert_array_equal(dW, dW2)
    np.testing.assert_array_equal(backing, 7.0)
    dense.column_sums_rows(D, backing[:0], 0, 9)
    np.testing.assert_array_equal(backing, 7.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_act,loss", [("softmax", "cross_entropy"), ("sigmoid", "cross_entropy"),
                                          ("softmax", "squared_error"), ("sigmoid", "squared_error"),
                                          ("tanh", "squared_error"), ("relu", "squared_error"),
                                          ("linear", "squared_error")])
def test_output_delta_rows(dtype, out_act, loss):
    rng = np.random.default_rng(3)
    for n_out, B in itertools.product([1, 2, 10], BATCHES):
        if out_act == "softmax" and n_out == 1:
            continue
        A = activations.FORWARD[out_act](rand(rng, (B, n_out), dtype, 2.0))
        if loss == "cross_entropy" and out_act == "sigmoid":
            Y = (rng.random((B, n_out)) < 0.5).astype(dtype)
        else:
            Y = np.eye(n_out, dtype=dtype)[rng.integers(0, n_out, B)]
        D = np.empty_like(A)
        f = np.finfo(dtype)
        total, correct = dense.output_delta_rows(losses.CODES[loss], activations.CODES[out_act], A, Y, D,
                                                 dtype(f.tiny), dtype(1) - dtype(f.epsneg), 0, B)
        np.testing.assert_allclose(D, losses.output_delta(loss, out_act, A, Y), **TOL[dtype])
        assert total == pytest.approx(losses.per_sample(loss, out_act, A, Y).sum(), rel=TOL[dtype]["rtol"] * 10)
        if n_out == 1:
            assert correct == np.count_nonzero((A[:, 0] >= 0.5) == (Y[:, 0] >= 0.5))
        else:
            assert correct == np.count_nonzero(A.argmax(1) == Y.argmax(1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cross_entropy_delta_odd_targets(dtype):
    """output_delta_rows' shortcuts for softmax + cross-entropy (one logarithm for a
    target with one nonzero, argmaxes by selects) against the plain loops they
    replaced, to the bit: one-hot rows, soft labels, all-zero rows, a lone
    negative or NaN target, ties and NaN in the outputs."""
    from numba import njit

    @njit(error_model="numpy")
    def plain(A, Y, D, tiny):
        total, correct = 0.0, 0
        for r in range(A.shape[0]):
            row_loss = A.dtype.type(0)
            for j in range(A.shape[1]):
                D[r, j] = A[r, j] - Y[r, j]
                if Y[r, j] != 0:
                    row_loss -= Y[r, j] * np.log(max(A[r, j], tiny))
            total += row_loss
            ia, iy = 0, 0
            for j in range(1, A.shape[1]):
                if A[r, j] > A[r, ia]:
                    ia = j
                if Y[r, j] > Y[r, iy]:
                    iy = j
            correct += ia == iy
        return total, correct
    rng = np.random.default_rng(17)
    A = activations.FORWARD["softmax"](rand(rng, (40, 7), dtype, 2.0))
    Y = np.eye(7, dtype=dtype)[rng.integers(0, 7, 40)]
    Y[1] = rng.dirichlet(np.ones(7))                  # soft labels
    Y[2] = 0                                          # no target
    Y[3] = 0
    Y[3, 4] = -0.5                                    # a lone negative one
    Y[4, 2] = np.nan
    A[5] = A[5, 0]                                    # ties: the first wins
    A[6, 3] = np.nan
    A[7, 0] = np.nan
    tiny = dtype(np.finfo(dtype).tiny)
    D, D_plain = np.empty_like(A), np.empty_like(A)
    got = dense.output_delta_rows(losses.CODES["cross_entropy"], activations.CODES["softmax"], A,
                                  Y, D, tiny, dtype(1), 0, 40)
    want = plain(A, Y, D_plain, tiny)
    assert np.isnan(got[0]) and np.isnan(want[0])
    assert got[1] == want[1]
    np.testing.assert_array_equal(D, D_plain)
    ok = ~np.isnan(Y).any(1) & ~np.isnan(A).any(1)
    got = dense.output_delta_rows(losses.CODES["cross_entropy"], activations.CODES["softmax"],
                                  A[ok], Y[ok], D[:ok.sum()], tiny, dtype(1), 0, int(ok.sum()))
    assert got == plain(A[ok], Y[ok], D_plain[:ok.sum()], tiny)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_update(dtype):
    rng = np.random.default_rng(0)
    W, b = rand(rng, (17, 5), dtype), rand(rng, 5, dtype)
    dW, db = rand(rng, (17, 5), dtype), rand(rng, 5, dtype)
    eW, eb = W - dtype(0.3) * dW, b - dtype(0.3) * db
    dense.sgd_update(W, b, dW, db, dtype(0.3))
    np.testing.assert_allclose(W, eW, **TOL[dtype])
    np.testing.assert_allclose(b, eb, **TOL[dtype])


def test_float32_math_stays_float32():
    # A float64 constant anywhere would make these float64; the kernels must not.
    A = np.zeros((2, 3), np.float32)
    dense.dense_forward(np.ones((2, 4), np.float32), np.ones((4, 3), np.float32),
                        np.zeros(3, np.float32), activations.CODES["sigmoid"], A)
    for name in ("bias_activate_rows", "backprop_rows", "output_delta_rows", "csr_matmul_rows"):
        for sig in getattr(dense, name).signatures:
            assert "float64" not in str(sig[:3]) or "float32" not in str(sig)


def test_vectorised_math_accuracy():
    from numba import njit

    @njit
    def run(x, out, which):
        for i in range(x.shape[0]):
            if which == 0:
                out[i] = vmath.exp32(x[i])
            elif which == 1:
                out[i] = vmath.sigmoid(x[i])
            else:
                out[i] = vmath.tanh(x[i])

    x = np.concatenate([np.linspace(-87, 88, 100001), np.linspace(-1, 1, 10001),
                        [1e-30, -1e-30, 0.0, 3e-8]]).astype(np.float32)
    x64 = x.astype(np.float64)
    out = np.empty_like(x)
    for which, twin in enumerate([np.exp(x64), 1 / (1 + np.exp(-x64)), np.tanh(x64)]):
        run(x, out, which)
        big = np.abs(twin) > 1e-30
        rel = np.abs(out[big] - twin[big]) / np.abs(twin[big])
        assert rel.max() < 2e-7, (which, rel.max())
    # Saturation without overflow or NaN.
    ext = np.array([-1000, -100, 100, 1000], np.float32)
    run(ext, out[:4], 1)
    np.testing.assert_array_equal(out[:4], [0, 0, 1, 1])
    run(ext, out[:4], 2)
    np.testing.assert_array_equal(out[:4], [-1, -1, 1, 1])


def _scatter_weight_grad(indptr, indices, values, rows, r0, r1, D, dW):
    """The sparse weight gradient the plain way: each nonzero added into its row of
    dW, in row order (the order weight_grad_scatter promises)."""
    from numba import njit

    @njit(fastmath={"contract"})
    def scatter(indptr, indices, values, rows, r0, r1, D, dW):
        seen = np.zeros(dW.shape[0], np.bool_)
        for r in range(r0, r1):
            for p in range(indptr[rows[r]], indptr[rows[r] + 1]):
                k, x = indices[p], values[p]
                for j in range(dW.shape[1]):
                    dW[k, j] = dW[k, j] + x * D[r, j] if seen[k] else x * D[r, j]
                seen[k] = True
    scatter(indptr, indices, values, rows, r0, r1, D, dW)


@pytest.mark.parametrize("way", ["weight_grad_scatter", "weight_grad_csc"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_grad_sparse(dtype, way):
    from fastmlp.kernels import epoch
    rng = np.random.default_rng(13)
    # Widths on both sides of the crossover (epoch.sparse_grad_uses_csc), and past
    # the last whole vector.
    sizes = SIZES + [(50, 100), (30, 129), (20, 65)]
    for (n_in, n_out), B in itertools.product(sizes, BATCHES):
        X, rows, indptr, indices, values = shuffled_sparse_batch(rng, B, n_in, dtype, spare=9)
        D = rand(rng, (B, n_out), dtype)
        dW = np.full((n_in, n_out), np.nan, dtype)
        db = np.empty(n_out, dtype)
        touched = np.ones(n_in, np.bool_)             # stale flags from an earlier batch
        r0, r1 = B // 4, B
        # Workspaces dirty on purpose: the kernel must not depend on their contents.
        cptr = np.full(n_in, 7, np.int64)
        crow = np.full((r1 - r0) * n_in, 3, np.int32)
        cval = np.full((r1 - r0) * n_in, np.nan, dtype)
        W = rand(rng, (n_in, n_out), dtype)

        def grad(ptr, parts, c, k0, k1, dW, touched):
            if way == "weight_grad_scatter":
                epoch.weight_grad_scatter(ptr, parts, c, k0, k1, indices, values, rows, r0, r1, D,
                                          dW, db, touched)
            else:
                # The CSC sorted by the forward product, as in the epoch.
                out = rand(rng, (B, n_out), dtype)
                dense.csr_matmul_csc_rows(ptr, parts, c, indices, values, rows, W, out, r0, r1,
                                          False, k0, k1, cptr, crow, cval)
                epoch.weight_grad_csc(k0, k1, r0, r1, D, dW, db, touched, cptr, crow, cval)
        grad(indptr, 1, 0, 0, n_in, dW, touched)
        Xb = X[rows[r0:r1]]
        np.testing.assert_array_equal(touched, (Xb != 0).any(axis=0))
        assert np.isnan(dW[~touched]).all()     # untouched rows are not written
        np.testing.assert_allclose(dW[touched], (Xb.T @ D[r0:r1])[touched], **TOL[dtype])
        np.testing.assert_allclose(db, D[r0:r1].sum(axis=0), **TOL[dtype])
        ref = np.full_like(dW, np.nan)
        _scatter_weight_grad(indptr, indices, values, rows, r0, r1, D, ref)
        np.testing.assert_array_equal(dW[touched], ref[touched])   # same sums, same order
        # Part c of rows cut at columns (a first layer split between chunks by input
        # columns): only rows a..e-1 of dW and of touched are written, the same sums.
        cuts = np.array([0] + sorted(rng.integers(0, n_in + 1, 2)) + [n_in])
        cut_ptr = _column_cuts(indptr, indices, cuts)
        for c in range(3):
            a, e = cuts[c], cuts[c + 1]
            part = np.full_like(dW, np.nan)
            seen = np.ones(n_in, np.bool_)
            cptr[:] = 7
            crow[:] = 3
            grad(cut_ptr, 3, c, a, e, part, seen)
            np.testing.assert_array_equal(seen[a:e], touched[a:e])
            assert seen[:a].all() and seen[e:].all()
            assert np.isnan(part[:a]).all() and np.isnan(part[e:]).all()
            mine = np.zeros(n_in, np.bool_)
            mine[a:e] = touched[a:e]
            np.testing.assert_array_equal(part[mine], ref[mine])


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_scatter_row_tiles(dtype, index_dtype):
    """Every output width (64/32/8-lane tiles and the columns past them) against a
    plain scalar loop: rows seen before are added to, the others overwritten, rows
    not indexed left alone."""
    from numba import njit
    from fastmlp.kernels.simd import sparse_scatter_row

    @njit(fastmath={"contract"})
    def scalar(dW, touched, D, r, idx, val, q0, q1):
        for q in range(q0, q1):
            k = idx[q]
            for j in range(D.shape[1]):
                dW[k, j] = (dW[k, j] if touched[k] else dW.dtype.type(0)) + val[q] * D[r, j]
    rng = np.random.default_rng(22)
    for n_out in list(range(1, 70)) + [100, 129, 512]:
        D = rand(rng, (5, n_out), dtype)
        idx = rng.permutation(40)[:23].astype(index_dtype)
        val = rand(rng, 23, dtype)
        touched = rng.random(40) < 0.5
        for q0, q1 in ((0, 23), (5, 6), (7, 7)):
            dW = rand(rng, (40, n_out), dtype)
            dW[~touched] = np.nan                        # never read where not touched
            ref = dW.copy()
            sparse_scatter_row(dW, touched, D, 3, idx, val, q0, q1)
            scalar(ref, touched, D, 3, idx, val, q0, q1)
            np.testing.assert_array_equal(dW, ref)
            hit = np.zeros(40, bool)
            hit[idx[q0:q1]] = True
            assert not np.isnan(dW[hit]).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_to_csr_equals_scipy(dtype):
    import scipy.sparse
    from fastmlp._numba_backend import to_csr
    rng = np.random.default_rng(5)
    for shape in [(1, 1), (7, 3), (100, 785), (3, 17)]:
        X = rng.normal(size=shape).astype(dtype)
        X[rng.random(shape) < 0.7] = 0
        X[0] = 0                                   # an empty row
        indptr, indices, values = to_csr(X)
        ref = scipy.sparse.csr_matrix(X)
        np.testing.assert_array_equal(indptr, ref.indptr)
        np.testing.assert_array_equal(indices, ref.indices)
        np.testing.assert_array_equal(values, ref.data)
        assert values.dtype == dtype and indices.dtype == np.int32


def assert_split_equals_numpy(X, perm, n_dense, split, tail_sorted):
    """split_csr's (Xd, indptr, indices, values) for X, perm and n_dense against fancy
    indexing and SciPy's CSR: the matrix always, the arrays themselves where the
    CSR's columns are listed in ascending order (tail_sorted)."""
    import scipy.sparse
    Xd, indptr, indices, values = split
    Xp = X[:, perm]
    assert Xd.shape == (X.shape[0], n_dense) and Xd.flags.c_contiguous
    np.testing.assert_array_equal(Xd, Xp[:, :n_dense])
    rest = Xp.copy()
    rest[:, :n_dense] = 0
    ref = scipy.sparse.csr_matrix(rest)
    np.testing.assert_array_equal(indptr, ref.indptr)
    ours = scipy.sparse.csr_matrix((values, indices, indptr), shape=X.shape)
    np.testing.assert_array_equal(ours.toarray(), rest)
    assert (values != 0).all()
    if tail_sorted:
        np.testing.assert_array_equal(indices, ref.indices)
        np.testing.assert_array_equal(values, ref.data)
    assert values.dtype == X.dtype and indices.dtype == np.int32


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_csr_equals_numpy(dtype):
    """The columns in perm's order, the first n_dense dense, the rest a CSR whose
    indices are positions in perm: against fancy indexing and SciPy's CSR. A row's
    indices come in X's column order, which is ascending where perm lists the CSR's
    columns in ascending order (as dense_columns does): then the arrays equal
    SciPy's; otherwise the matrix does."""
    from fastmlp._numba_backend import split_csr
    rng = np.random.default_rng(17)
    for shape in [(1, 1), (7, 17), (100, 785), (33, 3)]:
        X = rng.normal(size=shape).astype(dtype)
        X[rng.random(shape) < 0.7] = 0
        X[0] = 0                                   # an empty row
        for n_dense in sorted({0, 1, shape[1] // 2, shape[1]}):
            shuffled = rng.permutation(shape[1])
            tail_sorted = np.concatenate([shuffled[:n_dense], np.sort(shuffled[n_dense:])])
            # (as dense_columns orders them: the dense columns in runs of adjacent ones)
            both_sorted = np.concatenate([np.sort(shuffled[:n_dense]), np.sort(shuffled[n_dense:])])
            for perm in (shuffled, tail_sorted, both_sorted):
                assert_split_equals_numpy(X, perm, n_dense, split_csr(X, perm, n_dense),
                                          perm is not shuffled)


def test_split_csr_on_huge_pages_equals_numpy():
    """Arrays of at least HUGE_PAGE_BYTES come from _empty's own pages (asked for 2
    MB pages): writable, C-contiguous, and the same split as NumPy's twin gives."""
    from fastmlp._numba_backend import HUGE_PAGE_BYTES, _empty, split_csr

    def own_pages(a):
        # np.frombuffer over _empty's mapping, possibly under views of it
        while isinstance(a.base, np.ndarray):
            a = a.base
        return isinstance(a.base, memoryview)
    small, big = _empty(10, np.int32), _empty(HUGE_PAGE_BYTES // 4 + 3, np.float32)
    assert not own_pages(small) and own_pages(big)
    for a, n, dt in ((small, 10, np.int32), (big, HUGE_PAGE_BYTES // 4 + 3, np.float32)):
        assert a.shape == (n,) and a.dtype == dt and a.flags.writeable and a.flags.c_contiguous
    rng = np.random.default_rng(23)
    X = rng.normal(size=(3000, 785)).astype(np.float32)
    X[rng.random(X.shape) < 0.6] = 0
    perm = np.concatenate([np.arange(200, 500), np.arange(200), np.arange(500, 785)])
    split = split_csr(X, perm, 300)
    Xd, _, indices, values = split
    for a in (Xd, indices, values):
        assert a.nbytes >= HUGE_PAGE_BYTES and own_pages(a)
        assert a.flags.writeable and a.flags.c_contiguous
    assert_split_equals_numpy(X, perm, 300, split, True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_split_csr_keeps_levels_exactly(dtype):
    """With levels d, the dense columns as uint8 levels c with c / d == the value in
    X's type (and the CSR as without levels); any value that is not one (NaN, inf,
    -0.0, a negative, past 255 levels, between levels) gives the float split
    instead."""
    from fastmlp._numba_backend import split_csr
    rng = np.random.default_rng(19)
    for d, sort in ((255, False), (1, False), (255, True)):
        X = (rng.integers(0, 256, (50, 40)) * (rng.random((50, 40)) < 0.5)).astype(dtype)
        X /= dtype(d)
        perm = rng.permutation(40)
        if sort:   # the dense columns in runs of adjacent ones, as dense_columns gives
            perm = np.r_[np.sort(perm[:25]), np.sort(perm[25:])]
        plain = split_csr(X, perm, 25)
        Xd, *csr = split_csr(X, perm, 25, d)
        assert Xd.dtype == np.uint8 and Xd.flags.c_contiguous
        np.testing.assert_array_equal(Xd, np.rint(X[:, perm[:25]] * d))
        assert (Xd.astype(dtype) / dtype(d)).tobytes() == plain[0].tobytes()
        for a, b in zip(csr, plain[1:]):
            np.testing.assert_array_equal(a, b)
        for bad in (np.nan, np.inf, -0.0, -1 / d, 256 / d, 0.5 / d):
            Y = X.copy()
            Y[rng.integers(50), perm[rng.integers(25)]] = bad
            got = split_csr(Y, perm, 25, d)
            assert got[0].dtype == dtype, bad
            for a, b in zip(got, split_csr(Y, perm, 25)):
                np.testing.assert_array_equal(a, b)
            # Only the dense columns need be levels: the CSR keeps X's values.
            if bad == bad:
                Y = X.copy()
                Y[rng.integers(50), perm[25 + rng.integers(15)]] = bad
                Yd, *csr = split_csr(Y, perm, 25, d)
                assert Yd.dtype == np.uint8, bad
                np.testing.assert_array_equal(Yd, Xd)
                for a, b in zip(csr, split_csr(Y, perm, 25)[1:]):
                    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_split_csr_reorders_dense_columns_of_any_width(dtype):
    """Dense columns listed by perm in any order (the Engine's groups) come out in
    that order: filled ascending, then each row reordered in place (by byte
    permutes for levels up to 256 columns, else one by one), at widths around the
    permutes' 64-byte blocks and past 256, levels or not; and in ascending order
    as they are."""
    from fastmlp._numba_backend import split_csr
    rng = np.random.default_rng(23)
    for n_dense in (1, 2, 63, 64, 65, 128, 200, 255, 256, 257, 300):
        m = n_dense + 20
        X = (rng.integers(0, 256, (40, m)) * (rng.random((40, m)) < 0.6)).astype(dtype)
        X /= dtype(255)
        for order in ("shuffled", "ascending"):
            dense_cols = rng.choice(m, n_dense, replace=False)
            if order == "ascending":
                dense_cols = np.sort(dense_cols)
            rest = np.setdiff1d(np.arange(m), dense_cols)
            perm = np.r_[dense_cols, rest]
            for levels in (None, 255):
                Xd, indptr, indices, values = split_csr(X, perm, n_dense, levels)
                want = X[:, dense_cols]
                if levels is not None:
                    assert Xd.dtype == np.uint8
                    want = np.rint(want * 255)
                np.testing.assert_array_equal(Xd, want, err_msg=str((n_dense, order, levels)))
                assert indptr[-1] == np.count_nonzero(X[:, rest])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_put_runs_equals_numpy(dtype):
    """put_runs (vector blocks where they fit, else put_dense one by one) against a
    NumPy twin: every dense value (its 8-bit level, 0 where none; or the value) and
    whether all of the row's are exact, over runs of every length, values that are
    levels and values that are not (in the runs, and just past their ends, which a
    block reads and must not count)."""
    from fastmlp._numba_backend import column_runs
    from fastmlp.kernels.dense import put_runs
    rng = np.random.default_rng(31)
    for d in (255, 1):
        for trial in range(40):
            m = int(rng.integers(1, 70))
            n_dense = int(rng.integers(1, m + 1))
            cols = rng.choice(m, n_dense, replace=False)
            if trial % 2:
                cols = np.sort(cols)
            X = (rng.integers(0, 256, (3, m)) / d).astype(dtype)
            for bad in (np.nan, -0.0, 0.5 / d, 300 / d, -1 / d):
                if rng.random() < 0.3:
                    X[rng.integers(3), rng.integers(m)] = bad
            runs = column_runs(cols)
            np.testing.assert_array_equal(np.concatenate([np.arange(s, s + n) for s, n, _ in runs]),
                                          cols)
            for kind in (np.uint8, dtype):
                dense = np.full((3, n_dense), 7, dtype=kind)
                for i in range(3):
                    ok = put_runs(dense, X, i, runs, dtype(d))
                    x = X[i, cols]
                    if kind is np.uint8:
                        y = x * dtype(d) + dtype(0.5)
                        fits = (y >= 0) & (y < 256) & ~np.signbit(x)
                        c = np.where(fits, np.nan_to_num(y), 0).astype(np.int32)
                        np.testing.assert_array_equal(dense[i], c.astype(np.uint8))
                        exact = fits & (c.astype(dtype) / dtype(d) == x)
                        assert ok == bool(exact.all())
                    else:
                        assert ok
                        assert dense[i].tobytes() == x.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_split_finds_nan_and_infinity_as_it_counts(dtype):
    """csr_rows' counting pass marks rows holding a NaN or an infinity: with
    check_finite, split_csr, to_csr and check_finite_input refuse them (whichever
    column, dense or CSR, and whatever the row's other values); without, the split
    is the one NumPy's twin gives (NaN and infinities are nonzeros)."""
    from fastmlp._numba_backend import (NonFiniteInput, check_finite_input, split_csr,
                                        to_csr)
    rng = np.random.default_rng(29)
    X = (rng.random((60, 37)) * (rng.random((60, 37)) < 0.4)).astype(dtype)
    perm = rng.permutation(37)
    split_csr(X, perm, 12, check_finite=True)
    to_csr(X, check_finite=True)
    check_finite_input(X)
    for bad in (np.nan, np.inf, -np.inf):
        for col in (perm[3], perm[30]):             # a dense column, a CSR one
            Y = X.copy()
            Y[rng.integers(60), col] = bad
            for refuse in (lambda: split_csr(Y, perm, 12, check_finite=True),
                           lambda: to_csr(Y, check_finite=True),
                           lambda: check_finite_input(Y)):
                with pytest.raises(NonFiniteInput, match="NaN or infinity"):
                    refuse()
            indptr, indices, values = to_csr(Y)
            r, c = np.nonzero(Y)
            np.testing.assert_array_equal(indptr, np.r_[0, np.cumsum(np.bincount(r,
                                                                         minlength=60))])
            np.testing.assert_array_equal(indices, c)
            np.testing.assert_array_equal(values, Y[r, c])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_levels_of(dtype):
    """The divisor an input's sampled rows are 8-bit levels of, else None."""
    from fastmlp._numba_backend import levels_of
    rng = np.random.default_rng(23)
    c = rng.integers(0, 256, (300, 30))
    assert levels_of(c.astype(dtype) / dtype(255)) == 255
    assert levels_of((c / 255).astype(dtype)) == 255
    assert levels_of(c.astype(dtype)) == 1
    assert levels_of(rng.random((300, 30)).astype(dtype)) is None
    assert levels_of(c.astype(dtype) / dtype(256)) is None
    assert levels_of(c.astype(np.int64)) is None


def test_dense_columns_are_those_nonzero_often_enough():
    from fastmlp._numba_backend import (DENSE_COLUMN_DENSITY, dense_columns,
                                        sample_step, sampled_column_counts)
    rng = np.random.default_rng(3)
    X = rng.normal(size=(200, 50))
    X[rng.random(X.shape) < rng.random(50)] = 0   # each column its own density
    counts, rows = sampled_column_counts(X)
    assert rows == 200
    np.testing.assert_array_equal(counts, np.count_nonzero(X, axis=0))
    perm, n_dense = dense_columns(counts, rows)
    often = (X != 0).mean(axis=0) >= DENSE_COLUMN_DENSITY
    assert 0 < n_dense < 50
    np.testing.assert_array_equal(perm[:n_dense], np.flatnonzero(often))
    np.testing.assert_array_equal(perm[n_dense:], np.flatnonzero(~often))
    # A large input is judged by evenly spaced rows, the same ones every time.
    big = np.repeat(X, 100, axis=0)
    sample = big[::sample_step(big)]
    assert 4096 <= len(sample) < 8192
    np.testing.assert_array_equal(sample, big[::len(big) // len(sample)][:len(sample)])
    counts, rows = sampled_column_counts(big)
    assert rows == len(sample)
    np.testing.assert_array_equal(dense_columns(counts, rows)[0], perm)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_column_nonzeros_equals_numpy(dtype):
    rng = np.random.default_rng(4)
    for n, m, step in [(1, 1, 1), (7, 3, 2), (100, 17, 3), (1000, 784, 7), (5, 9, 10)]:
        X = rng.normal(size=(n, m)).astype(dtype)
        X[rng.random(X.shape) < 0.6] = 0
        X[rng.random(X.shape) < 0.05] = np.nan     # nonzero, as count_nonzero says
        counts = np.full(m, 5, dtype=np.int64)
        dense.column_nonzeros(X, step, counts)
        np.testing.assert_array_equal(counts, 5 + np.count_nonzero(X[::step], axis=0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_hot_labels_equals_numpy(dtype):
    """one_hot_labels says yes exactly where every row holds a single 1 and zeros
    (NumPy's twin below), and then gives each row's column of its 1."""
    rng = np.random.default_rng(6)

    def twin(Y):
        return bool(((Y == 1).sum(axis=1) == 1).all() and ((Y != 0).sum(axis=1) == 1).all())
    spoilers = [None, (0.5,), (2.0,), (-1.0,), (np.nan,), (np.inf,), (1.0,), "zero_row"]
    for n, m in [(1, 2), (7, 3), (200, 10), (1000, 17)]:
        for spoil in spoilers:
            y = rng.integers(0, m, n)
            Y = np.eye(m, dtype=dtype)[y]
            if rng.random() < 0.5:
                Y[Y == 0] = -0.0                   # -0 is a zero too
            i, j = rng.integers(0, n), rng.integers(0, m)
            if spoil == "zero_row":
                Y[i] = 0
            elif spoil is not None:
                # A second 1 where j is not the row's class, a 1 replaced otherwise.
                Y[i, j] = spoil[0]
            labels = np.full(n, -7, dtype=np.int32)
            ok = dense.one_hot_labels(Y, labels)
            assert ok == twin(Y), (n, m, spoil)
            if ok:
                np.testing.assert_array_equal(labels, np.argmax(Y, axis=1))
            # The plain ones are one-hot; the rest spoil exactly one row.
            if spoil is None:
                assert ok
            elif spoil not in ((1.0,),) or j != y[i]:
                assert not ok


@functools.lru_cache(maxsize=None)
def _scalar_combine_kernel():
    from numba import njit

    @njit(fastmath={"contract"})
    def scalar(out, i, idx, val, q0, q1, M, add):
        for j in range(M.shape[1]):
            acc = out[i, j] if add else out.dtype.type(0)
            for q in range(q0, q1):
                acc = acc + val[q] * M[idx[q], j]
            out[i, j] = acc
    return scalar


def _scalar_combine(out, i, idx, val, q0, q1, M, add=False):
    """out[i] = sum over q of val[q] * M[idx[q]] (out[i] + that sum where add),
    column by column, one fused multiply-add per term in q order: the sums every
    combine kernel must equal."""
    _scalar_combine_kernel()(out, i, idx, val, q0, q1, M, add)


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_combine_row_tiles(dtype, index_dtype):
    """Every output width (full 64/32/8-lane tiles, the overlapping last tile, and
    rows narrower than one vector) against a NumPy twin and a plain scalar loop,
    written or added to the row's values (acc: the overlapping last tile must not
    add its columns twice)."""
    from fastmlp.kernels.simd import sparse_combine_row
    rng = np.random.default_rng(21)
    for n_out in list(range(1, 70)) + [100, 129, 512]:
        M = rand(rng, (40, n_out), dtype)
        idx = rng.integers(0, 40, 23).astype(index_dtype)
        val = rand(rng, 23, dtype)
        base = rand(rng, n_out, dtype)
        for (q0, q1), acc in itertools.product(((0, 23), (5, 6), (7, 7)), (False, True)):
            out = np.full((3, n_out), np.nan, dtype)
            out[2] = base
            ref = out.copy()
            sparse_combine_row(out, 2, idx, val, q0, q1, M, acc)
            want = val[q0:q1] @ M[idx[q0:q1]] if q1 > q0 else np.zeros(n_out, dtype)
            np.testing.assert_allclose(out[2], want + base * acc, **TOL[dtype])
            assert np.isnan(out[:2]).all()                  # other rows untouched
            _scalar_combine(ref, 2, idx, val, q0, q1, M, acc)
            np.testing.assert_array_equal(out[2], ref[2])   # same fused multiply-adds, same order


def _check_whole_row_intrinsic(dtype, intrinsic, taken, twin, seed):
    """An intrinsic that sums whole rows of some widths (taken(n_out, lanes)),
    called directly from compiled code, for every width up to 18 vectors and even
    and odd counts of terms, written and added to the row's values (acc): rows it
    takes equal twin's to the bit (and NumPy's to tolerance), other rows of out and
    other widths are left alone."""
    from numba import njit
    from fastmlp.kernels.simd import VECTOR_BYTES

    @njit
    def call(out, i, idx, val, q0, q1, M, acc):
        intrinsic(out, i, idx, val, q0, q1, M, acc)
    lanes = VECTOR_BYTES // np.dtype(dtype).itemsize
    rng = np.random.default_rng(seed)
    for n_out in range(1, 16 * lanes + 9):
        M = rand(rng, (40, n_out), dtype)
        idx = rng.integers(0, 40, 23).astype(np.int32)
        val = rand(rng, 23, dtype)
        base = rand(rng, n_out, dtype)
        for (q0, q1), acc in itertools.product(((0, 23), (0, 22), (5, 6), (5, 7), (7, 7)),
                                               (False, True)):
            out = np.full((3, n_out), np.nan, dtype)
            out[1] = base
            ref = out.copy()
            call(out, 1, idx, val, q0, q1, M, acc)
            if not taken(n_out, lanes):
                assert np.isnan(out[[0, 2]]).all() and np.array_equal(out[1], base)
                continue
            assert np.isnan(out[[0, 2]]).all()
            want = val[q0:q1] @ M[idx[q0:q1]] if q1 > q0 else np.zeros(n_out, dtype)
            np.testing.assert_allclose(out[1], want + base * acc, **TOL[dtype])
            twin(ref, 1, idx, val, q0, q1, M, acc)
            np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_whole_row_every_width(dtype):
    """combine_whole_row (9 to 16 vectors), as weight_grad_csc calls it: the same
    bits as a plain scalar loop."""
    from numba import njit
    from fastmlp.kernels.simd import combine_whole_row, takes_whole_row

    @njit
    def takes(M):
        return takes_whole_row(M)
    for n_out, lanes in ((1, 8), (64, 8), (65, 8), (128, 8), (129, 8), (33, 4), (64, 4)):
        assert takes(np.zeros((1, n_out), np.float32 if lanes == 8 else np.float64)) == (
            8 * lanes < n_out <= 16 * lanes)
    _check_whole_row_intrinsic(dtype, combine_whole_row,
                               lambda n_out, lanes: 8 * lanes < n_out <= 16 * lanes,
                               _scalar_combine, 23)


@functools.lru_cache(maxsize=None)
def _scalar_combine2_kernel():
    from numba import njit

    @njit(fastmath={"contract"})
    def scalar(out, i, idx, val, q0, q1, M, add):
        for j in range(M.shape[1]):
            even = out[i, j] if add else out.dtype.type(0)
            odd = out.dtype.type(0)
            q = q0
            while q + 1 < q1:
                even = even + val[q] * M[idx[q], j]
                odd = odd + val[q + 1] * M[idx[q + 1], j]
                q += 2
            if q < q1:
                even = even + val[q] * M[idx[q], j]
            out[i, j] = even + odd
    return scalar


@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_narrow_row_every_width(dtype):
    """combine_narrow_row (1 to 4 vectors), as csr_matmul_rows calls it: the same
    bits as a scalar loop of two chains (the even terms, the odd terms, then their
    sum), which a one-chain loop does not give."""
    from numba import njit
    from fastmlp.kernels.simd import NARROW_ROW_VECTORS, combine_narrow_row, takes_narrow_row

    @njit
    def takes(M):
        return takes_narrow_row(M)
    for n_out, lanes in ((7, 8), (8, 8), (32, 8), (33, 8), (3, 4), (4, 4), (16, 4), (17, 4)):
        assert takes(np.zeros((1, n_out), np.float32 if lanes == 8 else np.float64)) == (
            lanes <= n_out <= NARROW_ROW_VECTORS * lanes)
    _check_whole_row_intrinsic(dtype, combine_narrow_row,
                               lambda n_out, lanes: lanes <= n_out <= NARROW_ROW_VECTORS * lanes,
                               _scalar_combine2_kernel(), 29)
    # The two orders differ: the bit comparison above can tell them apart.
    rng = np.random.default_rng(31)
    M = rand(rng, (40, 32), dtype)
    idx = rng.integers(0, 40, 23).astype(np.int32)
    val = rand(rng, 23, dtype)
    one, two = np.zeros((1, 32), dtype), np.zeros((1, 32), dtype)
    _scalar_combine(one, 0, idx, val, 0, 23, M)
    _scalar_combine2_kernel()(two, 0, idx, val, 0, 23, M, False)
    assert not np.array_equal(one, two)


def test_sparse_combine_row_refuses_strided_arrays():
    from numba.core.errors import TypingError
    from fastmlp.kernels.simd import sparse_combine_row
    M = np.ones((8, 16), np.float32)
    with pytest.raises(TypingError, match="C-contiguous"):
        sparse_combine_row(np.zeros((2, 8), np.float32), 0, np.zeros(2, np.int32),
                           np.ones(2, np.float32), 0, 2, M[:, ::2], False)
