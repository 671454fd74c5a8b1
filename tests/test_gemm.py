"""The register-tiled products (kernels/gemm.py) and the per-layer choice between
them and BLAS (dense.py), each beside a plain NumPy twin on random cases:
odd sizes around every tile and vector boundary, both dtypes.

The error allowed is relative to sum |a||b| (the size of the terms), which is what
a change of summation order can move: float64 to 1e-12, float32 to 1e-5."""
import numpy as np
import pytest

from fastmlp.kernels import dense, gemm

DTYPES = [np.float64, np.float32]
TOL = {np.float64: 1e-12, np.float32: 1e-5}
# Rows: under, at and over the tile heights (2, 4, 6, 8); inner sizes 1, odd, 785.
ROWS = [1, 3, 7, 17, 64]
INNER = [1, 3, 17, 785]
# Output widths around one vector (4 or 8 float64, 8 or 16 float32), two and four
# vectors, and MNIST's 10 classes: the last vector overlaps the one before. With
# AVX-512, 17, 33 and 100 (float32) and 9, 10 and 17 (float64) end in a full vector
# and a quarter-width one (gemm.NARROW_TAILS); 11 and 23 just past that.
WIDTHS = [8, 9, 10, 11, 16, 17, 23, 31, 33, 64, 65, 100]

tiles = pytest.mark.skipif(not gemm.HAS_TILES, reason="the CPU has no AVX2/FMA or AVX-512")


def rand(rng, shape, dtype):
    return rng.normal(size=shape).astype(dtype)


def assert_product_close(got, a, b, dtype):
    exact = a.astype(np.float64) @ b.astype(np.float64)
    scale = np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64))
    err = np.abs(got.astype(np.float64) - exact)
    assert np.all(err <= TOL[dtype] * (scale + 1e-300)), float(np.max(err / (scale + 1e-300)))


def cases(rng, dtype):
    lanes = gemm.VECTOR_BYTES // np.dtype(dtype).itemsize
    for M in ROWS:
        for K in INNER:
            for N in WIDTHS:
                if N >= lanes:
                    yield M, K, N


@tiles
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_rows_equals_numpy_and_leaves_other_rows(dtype):
    rng = np.random.default_rng(1)
    for M, K, N in cases(rng, dtype):
        X, W = rand(rng, (M + 2, K), dtype), rand(rng, (K, N), dtype)
        out = np.full((M + 2, N), 7, dtype)
        gemm.gemm_rows(X, W, out, 1, M + 1)
        assert_product_close(out[1:M + 1], X[1:M + 1], W, dtype)
        assert np.all(out[0] == 7) and np.all(out[M + 1] == 7), (M, K, N)


@tiles
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_tn_equals_numpy(dtype):
    rng = np.random.default_rng(2)
    for M, K, N in cases(rng, dtype):
        X, D = rand(rng, (M + 3, K), dtype), rand(rng, (M + 3, N), dtype)
        dW = np.full((K, N), np.nan, dtype)     # every number must be written
        gemm.gemm_tn(X, D, dW, 2, M + 2)
        assert_product_close(dW, X[2:M + 2].T, D[2:M + 2], dtype)


@tiles
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_nt_equals_numpy_at_any_width(dtype):
    rng = np.random.default_rng(3)
    for M in ROWS:
        for n_in in [1, 3, 4, 5, 17, 64]:
            for J in [1, 3, 7, 8, 10, 17, 33, 130]:
                D, W = rand(rng, (M + 1, J), dtype), rand(rng, (n_in, J), dtype)
                out = np.full((M + 1, n_in), 7, dtype)
                gemm.gemm_nt(D, W, out, 0, M)
                assert_product_close(out[:M], D[:M], W.T, dtype)
                assert np.all(out[M] == 7), (M, n_in, J)


@tiles
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_products_do_not_depend_on_the_split(dtype):
    # Threads each take a share of the rows: a row's bits must not depend on which
    # share, or on where in a tile, it fell.
    rng = np.random.default_rng(4)
    X, W = rand(rng, (37, 129), dtype), rand(rng, (129, 75), dtype)
    whole_f, whole_b = np.zeros((37, 75), dtype), np.zeros((37, 129), dtype)
    gemm.gemm_rows(X, W, whole_f, 0, 37)
    gemm.gemm_nt(whole_f, W, whole_b, 0, 37)
    for cut in [1, 5, 13, 30]:
        f, b = np.zeros_like(whole_f), np.zeros_like(whole_b)
        for r0, r1 in [(0, cut), (cut, 37)]:
            gemm.gemm_rows(X, W, f, r0, r1)
            gemm.gemm_nt(whole_f, W, b, r0, r1)
        assert f.tobytes() == whole_f.tobytes() and b.tobytes() == whole_b.tobytes(), cut


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_in,n_out", [(3, 1), (17, 10), (100, 16), (33, 100), (64, 257),
                                        (130, 512)])
@pytest.mark.parametrize("view", ["contiguous", "column_slice", "strided"])
@pytest.mark.filterwarnings("ignore::numba.NumbaPerformanceWarning")  # np.dot on views, on purpose
def test_layer_products_equal_numpy(dtype, n_in, n_out, view):
    # Whichever code the widths and layouts select on this CPU (tiles or BLAS), the
    # layer's three products agree with NumPy. Inputs that are column slices of
    # wider arrays have rows of adjacent numbers with a longer stride (tiles read
    # them in place); strided views do not (they go to BLAS). Outputs are
    # contiguous, as numba's np.dot requires of its out argument.
    rng = np.random.default_rng(5)
    B, r0, r1 = 23, 4, 21

    def make(shape):
        wide = rand(rng, (shape[0], 2 * shape[1] + 1), dtype)
        if view == "contiguous":
            return np.ascontiguousarray(wide[:, :shape[1]])
        return wide[:, 1:shape[1] + 1] if view == "column_slice" else wide[:, 1::2][:, :shape[1]]

    X, W, D = make((B, n_in)), make((n_in, n_out)), make((B, n_out))
    fwd, back = np.zeros((B, n_out), dtype), np.zeros((B, n_in), dtype)
    dW = np.full((n_in, n_out), np.nan, dtype)
    db = np.zeros(n_out, dtype)
    dense.matmul_rows(X, W, fwd, r0, r1)
    dense.backprop_rows(D, W, X, dense.LINEAR, back, r0, r1)
    dense.weight_grad_rows(X, D, dW, db, r0, r1)
    assert_product_close(fwd[r0:r1], X[r0:r1], W, dtype)
    assert_product_close(back[r0:r1], D[r0:r1], W.T, dtype)
    assert_product_close(dW, X[r0:r1].T, D[r0:r1], dtype)
    assert not fwd[:r0].any() and not fwd[r1:].any() and not back[r1:].any()


def group_masks_twin(X, starts):
    """NumPy twin of dense.group_masks: each run's columns GROUP at a time."""
    bits = []
    for k0, k1 in zip(starts[:-1], starts[1:]):
        for c in range(k0, k1, gemm.GROUP):
            bits.append((X[:, c:min(k1, c + gemm.GROUP)] != 0).any(axis=1))
    masks = np.zeros((X.shape[0], max(1, -(-len(bits) // 64))), dtype=np.uint64)
    for j, b in enumerate(bits):
        masks[b, j // 64] |= np.uint64(1) << np.uint64(j % 64)
    return masks, len(bits)


@pytest.mark.parametrize("kind", [np.uint8, np.float32, np.float64])
def test_group_masks_equal_numpy(kind):
    """Each row's bit per group of columns, groups counted within each run (a
    chunk's own columns), numbered on across runs and words; NaN counts as
    nonzero."""
    rng = np.random.default_rng(11)
    for K, starts in [(1, [0, 1]), (4, [0, 4]), (7, [0, 7]), (230, [0, 230]),
                      (230, [0, 115, 230]), (300, [0, 66, 66, 133, 300]), (9, [0, 2, 9])]:
        X = (rng.random((50, K)) * 255).astype(kind)
        X[rng.random(X.shape) < 0.6] = 0
        X[:5] = 0                                   # rows with no nonzero at all
        if kind != np.uint8:
            X[7, K - 1] = np.nan
            X[8, :] = 0
            X[8, K // 2] = -0.0 if K > 1 else 0     # -0.0 is zero
        starts = np.array(starts, dtype=np.int64)
        want, n_groups = group_masks_twin(X, starts)
        assert dense.group_starts(starts)[-1] == n_groups
        got = np.full_like(want, 12345)
        dense.group_masks(X, starts, got)
        np.testing.assert_array_equal(got, want, err_msg=str((K, list(starts))))
        if kind != np.uint8:
            assert got[7, (n_groups - 1) // 64] >> np.uint64((n_groups - 1) % 64) & np.uint64(1)


@pytest.mark.parametrize("n_words", [1, 2])
def test_group_lists_equal_numpy(n_words):
    """Each group's batch rows (ascending) whose input row has the group's bit,
    from group g0 on: rows in any order, a chunk's share r0..r1, lists of every
    length up to past 16 (the compressed blocks)."""
    rng = np.random.default_rng(12)
    n_in = 300
    masks = rng.integers(0, 2 ** 63, size=(n_in, n_words), dtype=np.uint64)
    masks[rng.random(masks.shape) < 0.3] = 0
    masks[:, 0] |= np.uint64(1)                     # group 0: every row
    for B, r0, r1, g0, ng in [(1, 0, 1, 0, 3), (40, 0, 40, 0, 64 * n_words),
                              (100, 50, 100, 5, 40), (37, 3, 36, 60, 4 + 60 * (n_words - 1)),
                              (17, 0, 17, 63, 1)]:
        rows = rng.permutation(n_in)[:B]
        lists = np.full((ng, r1 - r0 + 16), -1, dtype=np.int32)
        counts = np.full(ng, -1, dtype=np.int64)
        local = np.zeros((n_words, r1 - r0 + 16), dtype=np.uint64)
        gemm.group_lists(masks, rows, r0, r1, lists, counts, local, g0)
        for j in range(ng):
            g = g0 + j
            bit = (masks[rows[r0:r1], g // 64] >> np.uint64(g % 64)) & np.uint64(1)
            want = np.arange(r0, r1)[bit != 0]
            assert counts[j] == len(want), (B, g)
            np.testing.assert_array_equal(lists[j, :counts[j]], want)


def group_inputs(rng, M, K, dtype):
    """Rows with all-zero groups of columns, whole zero rows, and dense ones."""
    X = rand(rng, (M, K), dtype)
    X[rng.random((M, K)) < 0.5] = 0
    for r in range(M):
        if rng.random() < 0.4:
            c = gemm.GROUP * rng.integers(0, -(-K // gemm.GROUP))
            X[r, c:c + gemm.GROUP] = 0
    X[M // 2] = 0
    return X


@tiles
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_products_equal_tiles_bit_for_bit(dtype):
    """group_rows and group_tn, which skip the rows whose group of columns is all
    zero, give the same bits as gemm_rows and gemm_tn (every width's panels, and
    inner sizes that end in a partial group), agree with NumPy, and leave the rows
    outside r0..r1 alone."""
    rng = np.random.default_rng(13)
    lanes = gemm.VECTOR_BYTES // np.dtype(dtype).itemsize
    for M in [1, 7, 17, 64]:
        for K in [1, 3, 4, 5, 17, 64, 229]:
            for N in WIDTHS + [130, 200]:
                if N < lanes:
                    continue
                X = group_inputs(rng, M + 3, K, dtype)
                W, D = rand(rng, (K, N), dtype), rand(rng, (M + 3, N), dtype)
                starts = np.array([0, K], dtype=np.int64)
                masks, ng = group_masks_twin(X, starts)
                r0, r1 = 1, M + 1
                lists = np.zeros((ng, M + 16), dtype=np.int32)
                counts = np.zeros(ng, dtype=np.int64)
                local = np.zeros((masks.shape[1], M + 16), dtype=np.uint64)
                gemm.group_lists(masks, np.arange(M + 3), r0, r1, lists, counts, local, 0)
                want, got = np.full((M + 3, N), 7, dtype), np.full((M + 3, N), 7, dtype)
                gemm.gemm_rows(X, W, want, r0, r1)
                gemm.group_rows(X, W, got, r0, r1, lists, counts)
                assert got.tobytes() == want.tobytes(), (M, K, N)
                assert_product_close(got[r0:r1], X[r0:r1], W, dtype)
                want, got = np.full((K, N), np.nan, dtype), np.full((K, N), np.nan, dtype)
                gemm.gemm_tn(X, D, want, r0, r1)
                gemm.group_tn(X, D, got, lists, counts)
                assert got.tobytes() == want.tobytes(), (M, K, N)
                assert_product_close(got, X[r0:r1].T, D[r0:r1], dtype)


def test_column_groups_partition_each_run_and_find_planted_groups():
    """column_groups puts every column of each run in exactly one group of 1..GROUP
    (ascending, padded with the last; groups by first column), as many groups as
    group_starts counts; and where columns are zero together in sets of GROUP
    interleaved within reach (columns c, c + 5, c + 10, c + 15), it finds the sets.
    sample_bits, which it reads, against NumPy."""
    rng = np.random.default_rng(14)
    n_rows = 640
    K = 80
    Z = np.zeros((n_rows, K), dtype=bool)
    for b in range(K // 20):
        for i in range(5):
            on = rng.random(n_rows) < 0.5
            for m in range(4):
                Z[:, 20 * b + i + 5 * m] = on & (rng.random(n_rows) < 0.9)
    X = np.zeros((n_rows, K + 7))
    where = rng.permutation(K + 7)[:K]            # the columns, anywhere in X
    X[:, where] = Z * rng.random(Z.shape)
    for step in (1, 3):
        bits = np.empty((K, -(-(-(-n_rows // step)) // 64)), dtype=np.uint64)
        dense.sample_bits(X, where, step, bits)
        for k in range(K):
            got = np.unpackbits(bits[k].view(np.uint8), bitorder="little")
            want = X[::step, where[k]] != 0
            np.testing.assert_array_equal(got[:len(want)].astype(bool), want)
            assert not got[len(want):].any()
    bits = np.empty((K, -(-n_rows // 64)), dtype=np.uint64)
    dense.sample_bits(X, where, 1, bits)
    for starts in ([0, K], [0, 40, K], [0, 20, 20, 80]):
        starts = np.array(starts, dtype=np.int64)
        firsts = dense.group_starts(starts)
        cols = np.full((firsts[-1], 4), -1, dtype=np.int64)
        sizes = np.full(firsts[-1], -1, dtype=np.int64)
        dense.column_groups(bits, starts, cols, sizes)
        found = set()
        for s, (k0, k1) in enumerate(zip(starts[:-1], starts[1:])):
            seen = []
            for j in range(firsts[s], firsts[s + 1]):
                g = cols[j, :sizes[j]]
                assert 1 <= sizes[j] <= gemm.GROUP and np.all(np.diff(g) > 0)
                assert np.all(cols[j, sizes[j]:] == g[-1])
                seen += list(g)
                found.add(tuple(k0 + g))
            assert sorted(seen) == list(range(k1 - k0))
            assert np.all(np.diff(cols[firsts[s]:firsts[s + 1], 0]) > 0)
        for b in range(K // 20):
            for i in range(5):
                planted = tuple(20 * b + i + 5 * m for m in range(4))
                assert planted in found, (list(starts), planted)


def test_grouped_columns_put_each_group_together_in_its_run():
    """Engine's order of the dense columns: a permutation of them that keeps each
    chunk's run its own, the planted groups four adjacent columns from each run's
    start, and smaller groups last."""
    from fastmlp._numba_backend import grouped_columns
    rng = np.random.default_rng(15)
    n_rows, K = 4096, 42
    X = np.zeros((n_rows, 60))
    cols = np.sort(rng.choice(60, K, replace=False))
    sets = [list(range(i, 40, 10)) for i in range(10)]     # 10 interleaved sets of 4
    for st in sets:
        on = rng.random(n_rows) < 0.5
        for c in st:
            X[:, cols[c]] = on * rng.random(n_rows)
    X[:, cols[40:]] = rng.random((n_rows, 2)) < 0.9      # two columns left over
    for starts in ([0, K], [0, 20, K]):
        starts = np.array(starts, dtype=np.int64)
        got = grouped_columns(X, cols, starts)
        assert sorted(got) == list(cols)
        for k0, k1 in zip(starts[:-1], starts[1:]):
            run = got[k0:k1]
            assert sorted(run) == list(cols[k0:k1])
            inside = [st for st in sets if k0 <= st[0] and st[-1] < k1]
            quads = {tuple(sorted(run[q:q + 4])) for q in range(0, (k1 - k0) // 4 * 4, 4)}
            for st in inside:
                assert tuple(cols[st]) in quads, (list(starts), st)
