"""Dense-layer kernels: each a small function over flat, preallocated, row-major,
batch-first arrays, written into output arguments (llm.c's CPU style).

X is (B, n_in), W is (n_in, n_out), b is (n_out,), S = X W + b, A = f(S).
The `*_rows(..., r0, r1)` helpers work on rows r0..r1-1 only, so that a parallel
caller can give each thread its own rows; nothing here is parallel by itself.

Constants are made with `x.dtype.type(...)`: a bare 0.0 or 1.0 would promote
float32 arithmetic to float64.
"""
import math

import numpy as np
from numba import get_thread_id, njit, prange, types
from numba.extending import overload

from . import gemm
from .simd import (BLOCK, combine_narrow_row, combine_whole_row_csc, compress_row,
                   permute_bytes, popcount, prefetch, prefetch_csr_part, put_block,
                   quad_nonzeros, sparse_combine_row, takes_narrow_row, takes_whole_row)
from .vmath import exp, sigmoid, tanh

LINEAR, SIGMOID, TANH, RELU, SOFTMAX = 0, 1, 2, 3, 4
SQUARED_ERROR, CROSS_ENTROPY = 0, 1

@njit(error_model="numpy", inline="always")
def _prefetch_ahead(indptr, parts, c, indices, values, rows, r, r1):
    """Before row r of a CSR product: the next row's nonzeros, and the row after
    next's offsets (see csr_matmul_rows)."""
    if r + 2 < r1:
        prefetch(indptr, rows[r + 2] * parts + c)
    if r + 1 < r1:
        q = rows[r + 1] * parts + c
        prefetch_csr_part(indices, values, indptr[q], indptr[q + 1])


@njit(cache=True, error_model="numpy")
def csr_matmul_rows(indptr, parts, c, indices, values, rows, W, out, r0, r1, acc):
    """out[r] = x W (out[r] += x W where acc) for rows r0..r1-1, where x is part c of
    row rows[r] of a CSR matrix (indptr, indices, values) whose rows are each cut
    into `parts` runs of nonzeros: row i's part c is indptr[i * parts + c] ..
    indptr[i * parts + c + 1] - 1 (parts = 1: a plain CSR; see csr_column_cuts).
    Only nonzero inputs cost anything. The next row's nonzeros are prefetched while
    this one is combined (one MNIST epoch of 100-unit products in shuffled order,
    one thread: 0.060 against 0.072 s), and the row after next's offsets in indptr,
    which prefetching the next row's nonzeros reads: a shuffled row's offsets are a
    cache miss, and reading them there stalled (perf: 11% of a seed002 epoch's
    compiled time).

    Rows of one to four vectors (8-32 float32 units) sum in two chains per vector
    (combine_narrow_row; not the same bits as one chain): one MNIST epoch of
    products, one thread, Zen 4, best of 9, one chain against two: 16 units 0.0243
    against 0.0172 s, 24 units 0.0285 against 0.0159, 32 units 0.0261 against
    0.0251."""
    narrow = takes_narrow_row(W)
    for r in range(r0, r1):
        _prefetch_ahead(indptr, parts, c, indices, values, rows, r, r1)
        q = rows[r] * parts + c
        if narrow:
            combine_narrow_row(out, r, indices, values, indptr[q], indptr[q + 1], W, acc)
        else:
            sparse_combine_row(out, r, indices, values, indptr[q], indptr[q + 1], W, acc)


@njit(cache=True, error_model="numpy")
def csr_matmul_csc_rows(indptr, parts, c, indices, values, rows, W, out, r0, r1, acc, k0, k1,
                        cptr, crow, cval):
    """csr_matmul_rows' product (the same bits), and the same nonzeros sorted by
    column into the CSC that fastmlp.kernels.epoch.weight_grad_csc sums the weight
    gradient from (its fixed slots: column k's entries at (k - k0) * R + 0 ..
    cptr[k] - 1 of crow (the batch row) and cval, R = r1 - r0, in row order; every
    nonzero's column in k0..k1-1), so that the gradient needs no pass over the
    nonzeros of its own to sort them. Rows of combine_whole_row's widths write the
    CSC inside the product's loop over the nonzeros, where it waits on W's rows
    (MNIST's 100-unit first layer, 300 batches of 100 rows, one thread: the sort
    took 7.5 million cycles an epoch in a pass of its own); other widths in a loop
    after each row's product, which is csr_matmul_rows' own."""
    R = r1 - r0
    for k in range(k0, k1):
        cptr[k] = 0
    whole = takes_whole_row(W)
    narrow = takes_narrow_row(W)
    for r in range(r0, r1):
        _prefetch_ahead(indptr, parts, c, indices, values, rows, r, r1)
        q = rows[r] * parts + c
        p0, p1 = indptr[q], indptr[q + 1]
        if whole:
            combine_whole_row_csc(out, r, indices, values, p0, p1, W, acc, k0, R, cptr, crow,
                                  cval)
        else:
            if narrow:
                combine_narrow_row(out, r, indices, values, p0, p1, W, acc)
            else:
                sparse_combine_row(out, r, indices, values, p0, p1, W, acc)
            for p in range(p0, p1):
                k = indices[p]
                s = (k - k0) * R + cptr[k]
                crow[s] = r
                cval[s] = values[p]
                cptr[k] += 1


@njit(cache=True, error_model="numpy")
def csr_column_cuts(indptr, indices, cuts, out):
    """Cut each row of a CSR matrix (column indices ascending within a row) at the
    columns cuts[1..parts-1] (ascending; parts = len(cuts) - 1): out[i * parts + c]
    is the position of row i's first nonzero in a column >= cuts[c] (c = 0: the
    row's start), and out[n * parts] = indptr[n], so that part c of row i (its
    columns cuts[c] .. cuts[c + 1] - 1) is out[i * parts + c] .. out[i * parts + c + 1]
    - 1, as csr_matmul_rows reads it. out holds n * parts + 1."""
    n = indptr.shape[0] - 1
    parts = cuts.shape[0] - 1
    for i in range(n):
        p0, p1 = indptr[i], indptr[i + 1]
        out[i * parts] = p0
        for c in range(1, parts):
            lo, hi = p0, p1
            while lo < hi:      # first p in lo..hi with indices[p] >= cuts[c]
                mid = (lo + hi) // 2
                if indices[mid] < cuts[c]:
                    lo = mid + 1
                else:
                    hi = mid
            out[i * parts + c] = lo
            p0 = lo
    out[n * parts] = indptr[n]


# The three products of a layer, chunk by chunk: compiled tiles (gemm.py) or BLAS,
# chosen per call by the widths below. Each thread multiplies its own rows (16 to
# 100 of a batch, the batch split between threads), single-threaded BLAS, where
# BLAS's packing and dispatch cost as much as the arithmetic for narrow layers.
# Measured by `python -m bench.crossover` (one thread, microseconds per call, tiles
# / OpenBLAS 0.3.30, interleaved, best of 9):
#   Zen 3 (AVX2, OpenBLAS's Haswell kernels), float32, two runs on a noisy machine:
#     (rows, n_in, n_out)  X W        X^T D      D W^T
#     (16, 32, 16)         0.4/1.1    0.3/1.2    1.4/1.2
#     (50, 64, 32)         3.0/5.6    2.7/6.1    9.2/5.9
#     (100, 100, 10)       9.2/6.3    5.8/9.3    33.1/6.4     (4.9/4.8 4.7/7.6 19/5.4)
#     (50, 100, 100)       18.0/22.4  14.2/20.6  37.5/22.9
#     (64, 512, 128)       171/158    152/145    202/160      (114/162 146/148 187/159)
#     (64, 512, 256)       253/291    300/244    261/295      (329/324 404/280 340/333)
#     (64, 512, 512)       495/562    645/481    517/561      (680/641 814/537 638/640)
#   For the 512x512 layer the two runs disagree on X W and D W^T; whole wide epochs
#   (784-512-512-10, 2 threads, interleaved processes, best of 5) took 1.690 s with
#   these choices and 1.829 s with BLAS for every product.
#   Zen 3, float64 (`--dtype float64`): the tiles win up to 50x100x100 (X W 24.7/32.3)
#     and lose from 65,536 weights up, by up to 2.3x (64x512x512: 1727/1183,
#     2286/1445, 1096/1044; 64x784x512 X W 4054/1766), where each step of a tile
#     reads only 8 numbers of a W row kilobytes from the last.
#   Zen 5 (AVX-512), 64x512x512: the tiles reached 230-240 GFLOP/s for X W and X^T D
#     and 190-196 for D W^T, OpenBLAS 85-110 (Haswell kernels, as this machine's
#     environment selects) or 166-169 (OPENBLAS_CORETYPE=SkylakeX); D W^T with
#     J = 100 or less lost (50x100x100: 15.5 against 12.8; J = 10: 27 against 2.6).
# Hence: X W by tiles from 64 bytes of output row up (a lone 10-wide float32 row
# is two overlapping 8-lane vectors with AVX2, which loses); X^T D by tiles from one
# vector up, except AVX2's large weight matrices (n_in x n_out >= 128 x 512), where
# OpenBLAS was faster in both runs; D W^T by tiles only for long
# rows of W (the dot products' horizontal sums are paid per output number); and
# no float64 product with W of 128 x 512 numbers or more (measured on AVX2 only;
# BLAS, the known path, on AVX-512 too until measured there).
# The choice depends on the CPU and the widths alone (and on the layouts, which are
# the same for every chunk), so every chunk of a layer takes the same path and the
# bits do not depend on how rows are split between threads.
FWD_MIN_BYTES = 64
TN_MAX_WEIGHTS = 1 << 62 if gemm.HAS_AVX512 else 128 * 512
F64_MAX_WEIGHTS = 128 * 512
NT_MIN_BYTES = 512 if gemm.HAS_AVX512 else 1024
TILES = gemm.HAS_TILES
HAS_VBMI = gemm.HAS_VBMI


@njit(cache=True, error_model="numpy")
def tiles_fit(A, B, C):
    """Whether the tiles can read and write these arrays (rows of adjacent numbers)."""
    return TILES and gemm.unit_rows(A) and gemm.unit_rows(B) and gemm.unit_rows(C)


@njit(cache=True, error_model="numpy")
def small_enough(W):
    """Whether W is small enough for the tiles in its dtype (see above)."""
    return W.itemsize == 4 or W.size < F64_MAX_WEIGHTS


@njit(cache=True, error_model="numpy")
def matmul_rows(X, W, out, r0, r1):
    """out[r0:r1] = X[r0:r1] W, by tiles or BLAS (see above)."""
    if r1 <= r0:
        return
    if W.shape[1] * W.itemsize >= FWD_MIN_BYTES and small_enough(W) and tiles_fit(X, W, out):
        gemm.gemm_rows(X, W, out, r0, r1)
    else:
        np.dot(X[r0:r1], W, out[r0:r1])


@njit(cache=True, error_model="numpy")
def bias_activate_rows(act, b, A, r0, r1):
    """A = f(A + b) in place for rows r0..r1-1, in the stable forms of seed 002: the
    epilogue of the matrix product, run while the rows are still in cache."""
    one = A.dtype.type(1)
    zero = A.dtype.type(0)
    n = A.shape[1]
    if act == SIGMOID:
        for r in range(r0, r1):
            for j in range(n):
                A[r, j] = sigmoid(A[r, j] + b[j])
    elif act == TANH:
        for r in range(r0, r1):
            for j in range(n):
                A[r, j] = tanh(A[r, j] + b[j])
    elif act == RELU:
        for r in range(r0, r1):
            for j in range(n):
                # A select, not `if s < 0: A = 0`: a conditional store becomes an AVX2
                # masked store, which is microcoded and slow on AMD cores. NaN
                # compares false, so it passes through and divergence stays visible.
                s = A[r, j] + b[j]
                A[r, j] = zero if s < zero else s
    elif act == SOFTMAX:
        for r in range(r0, r1):
            m = A[r, 0] + b[0]
            for j in range(n):
                s = A[r, j] + b[j]
                A[r, j] = s
                m = s if s > m else m
            for j in range(n):
                A[r, j] = A[r, j] - m
        # One pass of exponentials over the chunk's rows, which are adjacent: over
        # each row alone (10 outputs) the loop did not vectorise.
        flat = A[r0:r1].reshape((r1 - r0) * n)
        for i in range(flat.shape[0]):
            flat[i] = exp(flat[i])
        for r in range(r0, r1):
            total = zero
            for j in range(n):
                total += A[r, j]
            inv = one / total
            for j in range(n):
                A[r, j] = A[r, j] * inv
    else:
        for r in range(r0, r1):
            for j in range(n):
                A[r, j] += b[j]


@njit(cache=True, error_model="numpy")
def derivative(act, a, one, zero):
    """f'(S) from A = f(S) for the elementwise activations (one, zero in A's dtype)."""
    if act == SIGMOID:
        return a * (one - a)
    if act == TANH:
        return one - a * a
    if act == RELU:
        return one if a > zero else zero
    return one


@njit(cache=True, error_model="numpy")
def activation_vjp_rows(act, A, G, r0, r1):
    """G = J_f^T G in place (dL/dA to dL/dS): G * f'(A) elementwise; for softmax,
    A * (G - sum(G * A)) per row."""
    n = A.shape[1]
    one = A.dtype.type(1)
    zero = A.dtype.type(0)
    if act == SOFTMAX:
        for r in range(r0, r1):
            dot = zero
            for j in range(n):
                dot += G[r, j] * A[r, j]
            for j in range(n):
                G[r, j] = A[r, j] * (G[r, j] - dot)
    elif act != LINEAR:
        for r in range(r0, r1):
            for j in range(n):
                G[r, j] = G[r, j] * derivative(act, A[r, j], one, zero)


@njit(cache=True, error_model="numpy")
def derivative_sums_rows(act, A, D, db, r0, r1):
    """D[r] *= f'(A[r]) for rows r0..r1-1 (backprop_rows' step after D W^T; f' is 1
    for LINEAR), and db = the column sums of D[r0:r1] after it (column_sums_rows'
    sums), in one pass over D: a layer's delta and its bias gradient."""
    one = D.dtype.type(1)
    zero = D.dtype.type(0)
    n = D.shape[1]
    for j in range(n):
        db[j] = zero
    for r in range(r0, r1):
        for j in range(n):
            d = D[r, j] * derivative(act, A[r, j], one, zero)
            D[r, j] = d
            db[j] += d


@njit(cache=True, error_model="numpy")
def backprop_rows(D, W, A_prev, act_prev, D_prev, r0, r1):
    """D_prev[r] = (D[r] W^T) * f'(A_prev[r]) for rows r0..r1-1: the previous
    layer's delta, read from W before W is updated. act_prev = LINEAR gives plain
    D W^T (dL/dA_prev)."""
    if r1 > r0:
        if (W.shape[1] * W.itemsize >= NT_MIN_BYTES and small_enough(W)
                and tiles_fit(D, W, D_prev)):
            gemm.gemm_nt(D, W, D_prev, r0, r1)
        else:
            np.dot(D[r0:r1], W.T, D_prev[r0:r1])
    if act_prev != LINEAR:
        activation_vjp_rows(act_prev, A_prev, D_prev, r0, r1)


# Back-propagation through a transposed copy of W (backprop_transposed): at most
# this many bytes in a row of W, and at least this many rows in the chunk.
TRANSPOSED_MAX_BYTES = 128
TRANSPOSED_MIN_ROWS = 16


@njit(cache=True, error_model="numpy")
def backprop_transposed(W, rows):
    """Whether to back-propagate `rows` rows through W as D W^T = matmul_rows(D, W^T)
    with the register tiles, over a copy of W^T (transpose_into), rather than by
    backprop_rows (which calls BLAS for rows of W this narrow). The copy costs
    n_in x n_out scattered stores a call, so only narrow W and enough rows pay.
    One thread, best of 3x2000 calls, BLAS against the copy and the tiles,
    thousands of cycles, (rows, n_in, n_out): (100, 100, 10) 8.6 / 7.0, (50, 64, 32)
    7.8 / 6.4, (50, 32, 16) 2.4 / 1.6, (16, 784, 10) 19.0 / 15.1, (16, 16, 10) 0.61 /
    0.34, (100, 100, 30) 20.2 / 17.9, (16, 512, 16) 17.8 / 18.5, the same bits in
    each; slower: (8, 256, 32) 14.1 / 16.4, (4, 64, 32) 1.0 / 2.0, (50, 256, 64) 38 /
    77, (100, 100, 100) 57 / 57. In 10-epoch estimator fits the back-propagation
    through W_2 took 2.3-2.6 against 3.8-3.9 million cycles a thread and epoch (the
    copy not counted). The epoch calls its own matmul_rows for it: compiled inside
    backprop_rows, the tiles' code cost a cold start 0.7-0.9 s."""
    return (TILES and W.shape[1] * W.itemsize <= TRANSPOSED_MAX_BYTES
            and rows >= TRANSPOSED_MIN_ROWS and W.shape[0] * W.itemsize >= FWD_MIN_BYTES
            and small_enough(W))


@njit(cache=True, error_model="numpy")
def transpose_into(W, WT):
    """WT = W^T (WT of shape (W.shape[1], W.shape[0]))."""
    for k in range(W.shape[0]):
        for j in range(W.shape[1]):
            WT[j, k] = W[k, j]


@njit(cache=True, error_model="numpy")
def weight_grad_rows(A_prev, D, dW, db, r0, r1):
    """dW = A_prev[r0:r1]^T D[r0:r1] and db = column sums of D[r0:r1] (sums, not
    means), overwriting dW and db (none where db is empty)."""
    if r1 > r0:
        if (D.shape[1] >= gemm.lanes_of(D) and dW.size < TN_MAX_WEIGHTS and small_enough(dW)
                and tiles_fit(A_prev, D, dW)):
            gemm.gemm_tn(A_prev, D, dW, r0, r1)
        else:
            np.dot(A_prev[r0:r1].T, D[r0:r1], dW)
    else:
        zero = D.dtype.type(0)
        for k in range(dW.shape[0]):
            for j in range(dW.shape[1]):
                dW[k, j] = zero
    column_sums_rows(D, db, r0, r1)


@njit(cache=True, error_model="numpy")
def column_sums_rows(D, db, r0, r1):
    """db = column sums of D[r0:r1] (the bias gradient, a sum, not a mean), in
    ascending row order; nothing where db is empty (a caller that has them already)."""
    if db.shape[0] == 0:
        return
    zero = D.dtype.type(0)
    for j in range(D.shape[1]):
        db[j] = zero
    for r in range(r0, r1):
        for j in range(D.shape[1]):
            db[j] += D[r, j]


@njit(cache=True, error_model="numpy")
def output_delta_rows(loss, act, A, Y, D, tiny, top, r0, r1):
    """Output delta D = dC/dS_L (times B) for rows r0..r1-1; returns the summed
    per-sample loss (float64) and the number of correct rows.

    cross_entropy: A - Y (softmax + categorical CE, or sigmoid + binary CE).
    squared_error: J^T (A - Y). tiny and top clip probabilities inside the logs,
    as fastmlp.losses does.

    Branches on the data cost more than the arithmetic here: a row's one-hot
    target put a mispredicted branch at a random column, and each argmax step
    one more. So each row's argmaxes keep the best value so far and move by
    selects, and a softmax row whose target has one nonzero (found by counting,
    a branch that one-hot targets always take) takes its one logarithm there; the
    same sums and answers either way. 300 batches of 100 MNIST-like rows, one
    thread: 2.9 against 5.3 us a batch."""
    n = A.shape[1]
    half = A.dtype.type(0.5)
    one = A.dtype.type(1)
    zero = A.dtype.type(0)
    total = 0.0
    correct = 0
    for r in range(r0, r1):
        # The first largest output and target (a row of one has both at 0).
        ia = 0
        iy = 0
        am = A[r, 0]
        ym = Y[r, 0]
        for j in range(1, n):
            a = A[r, j]
            y = Y[r, j]
            up = a > am
            ia = j if up else ia
            am = a if up else am
            up = y > ym
            iy = j if up else iy
            ym = y if up else ym
        row_loss = zero
        if loss == CROSS_ENTROPY:
            if act == SOFTMAX:
                nonzero = 0
                for j in range(n):
                    y = Y[r, j]
                    D[r, j] = A[r, j] - y
                    nonzero += y != zero
                if nonzero == 1:
                    # The only nonzero target is the largest, unless it is negative;
                    # then it is the first nonzero one.
                    k = iy
                    if Y[r, k] == zero:
                        for j in range(n):
                            if Y[r, j] != zero:
                                k = j
                                break
                    row_loss -= Y[r, k] * np.log(max(A[r, k], tiny))
                elif nonzero > 1:
                    for j in range(n):
                        y = Y[r, j]
                        if y != zero:
                            row_loss -= y * np.log(max(A[r, j], tiny))
            else:
                for j in range(n):
                    a = A[r, j]
                    y = Y[r, j]
                    D[r, j] = a - y
                    p = min(max(a, tiny), top)
                    row_loss -= y * np.log(p) + (one - y) * np.log1p(-p)
        else:
            for j in range(n):
                d = A[r, j] - Y[r, j]
                D[r, j] = d
                row_loss += half * d * d
        total += row_loss
        if n == 1:
            if (A[r, 0] >= half) == (Y[r, 0] >= half):
                correct += 1
        else:
            correct += ia == iy
    if loss == SQUARED_ERROR:
        activation_vjp_rows(act, A, D, r0, r1)
    return total, correct


@njit(cache=True, error_model="numpy")
def dense_forward(X, W, b, act, out):
    """out = f(X W + b): the product (tiles or BLAS), bias and activation fused into one
    pass over the result."""
    B = X.shape[0]
    matmul_rows(X, W, out, 0, B)
    bias_activate_rows(act, b, out, 0, B)


@njit(cache=True, error_model="numpy")
def dense_backward(dA, A, act, A_prev, W, dW, db, dA_prev, need_prev):
    """Backward through one dense layer for the mean-over-batch cost.

    dA is dL/dA of this layer (B, n_out), overwritten by delta = J_f^T dA (dA * f'(A)
    for elementwise f). Writes dW = A_prev^T delta / B, db = row-sum of delta / B
    and, if need_prev (not the input layer), dA_prev = delta W^T, computed from W
    as given (before any update).
    """
    B = A.shape[0]
    activation_vjp_rows(act, A, dA, 0, B)
    weight_grad_rows(A_prev, dA, dW, db, 0, B)
    inv_b = dW.dtype.type(1.0 / B)
    n_in, n_out = dW.shape
    for k in range(n_in):
        for j in range(n_out):
            dW[k, j] *= inv_b
    for j in range(n_out):
        db[j] *= inv_b
    if need_prev:
        backprop_rows(dA, W, A_prev, LINEAR, dA_prev, 0, B)


@njit(cache=True, error_model="numpy")
def sgd_update(W, b, dW, db, lr):
    """W -= lr dW and b -= lr db in place (lr in the parameters' dtype)."""
    n_in, n_out = W.shape
    for k in range(n_in):
        for j in range(n_out):
            W[k, j] -= lr * dW[k, j]
    for j in range(n_out):
        b[j] -= lr * db[j]


@njit(cache=True, error_model="numpy")
def column_nonzeros(X, step, counts):
    """counts[j] += the number of rows 0, step, 2*step, ... of X nonzero in column j
    (NaN counts as nonzero, as in np.count_nonzero)."""
    for i in range(0, X.shape[0], step):
        for j in range(X.shape[1]):
            counts[j] += X[i, j] != 0


@njit(cache=True, error_model="numpy")
def one_hot_labels(Y, labels):
    """Whether every row of Y is one-hot (a single 1, every other value 0), and
    labels[i] = the column of row i's 1 (meaningless where the answer is no).
    Branch-free, so that each row's loop vectorises: MNIST's 60,000 rows in 0.3 ms
    (1.1 with a loop that stopped at the first row that was not)."""
    one, zero = Y.dtype.type(1), Y.dtype.type(0)
    ok = True
    for i in range(Y.shape[0]):
        ones = 0
        nonzeros = 0
        k = 0
        for j in range(Y.shape[1]):
            y = Y[i, j]
            ones += y == one
            nonzeros += y != zero
            k += j * (y == one)
        ok &= (ones == 1) & (nonzeros == 1)
        labels[i] = k
    return ok


# Parallel only where a loop says prange: an array expression parallelised behind
# our back would change bits with the thread count.
PRANGE_ONLY = {"prange": True, "numpy": False, "reduction": False, "setitem": False,
               "stencil": False, "fusion": False, "comprehension": False, "inplace_binop": False}


def decoded(x, d):
    """One value of a dense input (or of a sparse input's dense columns) as the
    parameters' float: where it is an 8-bit level (uint8), level / d (d the
    parameters' float type); else x itself. Compiled code only."""
    raise NotImplementedError("decoded is for compiled code")


def put_dense(dense, i, w, x, d):
    """dense[i, w] = x, or where dense holds 8-bit levels (uint8), x's level: the
    integer c nearest x * d (0 where that is not in 0..255, or x is NaN or -0.0);
    returns whether that is exact, c / d == x in x's float type (-0.0 is not: it
    would come back as +0.0), always True for a float dense. Compiled code only."""
    raise NotImplementedError("put_dense is for compiled code")


def csr_part(X, i, where, n_dense, indices, values, q0, q1):
    """indices[q0:], values[q0:] = where[j], X[i, j] for the columns j of row i with
    where[j] >= n_dense and X[i, j] != 0 (NaN included), in column order, at most
    q1 - q0 of them. Compiled code only."""
    raise NotImplementedError("csr_part is for compiled code")


def _float_of(t):
    return np.float32 if t == types.float32 else np.float64


@overload(csr_part)
def _csr_part(X, i, where, n_dense, indices, values, q0, q1):
    if (gemm.HAS_AVX512 and X.dtype == types.float32 and X.layout == "C"
            and where.dtype == types.int32 and indices.dtype == types.int32):
        def packed(X, i, where, n_dense, indices, values, q0, q1):
            compress_row(X, i, where, n_dense, indices, values, q0, q1)
        return packed

    def one_by_one(X, i, where, n_dense, indices, values, q0, q1):
        q = q0
        for j in range(X.shape[1]):
            w = where[j]
            if w >= n_dense and q < q1:
                # Written whether zero or not, kept only by moving q: a branch on
                # each element's zeroness is mispredicted about as often as MNIST
                # has edges (0.040 against 0.052 s for MNIST's training set, 2
                # threads). q stops at the row's end, so rows stay their own.
                x = X[i, j]
                indices[q] = w
                values[q] = x
                q += 1 if x != 0 else 0
    return one_by_one


@overload(decoded)
def _decoded(x, d):
    if x == types.uint8:
        cast = _float_of(d)
        return lambda x, d: cast(x) / d
    return lambda x, d: x


def _level_in(cast):
    """level(x, d) for floats of type cast: (c, ok), the integer c nearest x * d (0
    where that is not in 0..255, or x is NaN or -0.0, which fail ok) and whether c
    is in range and c / d == x."""
    @njit(error_model="numpy")
    def level(x, d):
        y = x * d + cast(0.5)
        ok = (y >= 0) & (y < 256) & (math.copysign(cast(1), x) > 0)
        c = np.int32(y) if ok else np.int32(0)
        return c, ok & (cast(c) / d == x)
    return level


_LEVEL = {np.float32: _level_in(np.float32), np.float64: _level_in(np.float64)}


@overload(put_dense)
def _put_dense(dense, i, w, x, d):
    if dense.dtype == types.uint8:
        level = _LEVEL[_float_of(x)]

        def put_level(dense, i, w, x, d):
            c, exact = level(x, d)
            dense[i, w] = np.uint8(c)
            return exact
        return put_level

    def put_value(dense, i, w, x, d):
        dense[i, w] = x
        return True
    return put_value


def reorder_row(dense, i, order, scratch):
    """dense[i, p] = dense[i, order[p]] for every p, all read before any is written:
    by AVX-512 VBMI byte permutes for 8-bit levels (simd.permute_bytes; order as
    uint8, padded to a multiple of 64), else through scratch's row for the thread
    (scratch: a row per numba.get_thread_id, of dense's type; order int64).
    Compiled code only."""
    raise NotImplementedError("reorder_row is for compiled code")


@overload(reorder_row)
def _reorder_row(dense, i, order, scratch):
    if gemm.HAS_VBMI and dense.dtype == types.uint8 and order.dtype == types.uint8:
        def permuted(dense, i, order, scratch):
            permute_bytes(dense, i, order)
        return permuted

    def through_scratch(dense, i, order, scratch):
        tmp = scratch[get_thread_id()]
        row = dense[i]
        for p in range(row.shape[0]):
            tmp[p] = row[p]
        for p in range(row.shape[0]):
            row[p] = tmp[order[p]]
    return through_scratch


@njit(error_model="numpy", inline="always")
def runs_width(runs):
    """How many columns the runs (see put_runs) put in the dense array."""
    n = 0
    for r in range(runs.shape[0]):
        n += runs[r, 1]
    return n


@njit(error_model="numpy", inline="always")
def put_runs(dense, X, i, runs, d):
    """dense's row i from X's row i by runs, each (s, n, w): X[i, s:s+n] to dense[i,
    w:w+n] (put_dense's levels or values), the runs' w ascending and one after
    another; returns whether every value put is exact (put_dense). Whole blocks
    (put_block) wherever both BLOCK-wide slices fit in their rows: a block's
    columns past its run's end get whatever X holds there, and the next runs then
    overwrite them (their exactness is not counted)."""
    n_cols, n_dense = X.shape[1], dense.shape[1]
    ok = True
    for r in range(runs.shape[0]):
        s, n, w = runs[r, 0], runs[r, 1], runs[r, 2]
        q = 0
        while q < n:
            if s + q + BLOCK <= n_cols and w + q + BLOCK <= n_dense:
                ok &= put_block(X, i, s + q, dense, w + q, d, n - q)
                q += BLOCK
            else:
                ok &= put_dense(dense, i, w + q, X[i, s + q], d)
                q += 1
    return ok


@njit(cache=True, error_model="numpy", parallel=PRANGE_ONLY)
def csr_rows(X, where, runs, counts, indptr, indices, values, dense, d, fill, order, scratch):
    """One pass over X's rows, each thread owning its rows, with X's column c put at
    position where[c] (a permutation of the columns, int32): the first n_dense
    positions go to the dense array dense (n, n_dense), by runs (s, n, w) of
    adjacent columns (X's columns s..s+n-1 to positions w..w+n-1, the runs' n
    summing to n_dense: see put_runs), the rest to a CSR whose column indices are
    those positions. fill False: counts[i] = c, the number of nonzeros of row i in
    the CSR's columns (NaN counts as one), or -1 - c where the row holds a NaN or
    an infinity, which this pass over every value finds for free (nothing else is
    touched). fill True: dense's rows, and the CSR's indices and values at
    indptr's offsets, in X's column order (ascending where where ascends over the
    CSR's columns). A uint8 dense gets each value's 8-bit level (put_dense, with
    d), and counts[i] = 1 where some value of row i's dense columns is not one,
    else 0; a float dense, the values and counts[i] = 0.

    Both passes read each row front to back, where, not its inverse (a gather of
    the row through the permutation cost MNIST's training set, 2 threads, 34 ms
    counting and 55 filling, against 6 and 32 ms). The dense columns go by runs in
    vector blocks (put_block: MNIST's 228 dense columns are 20 runs; the fill took
    8.6-9.2 ms against 13.2-14.5 for a loop over the columns one by one after a
    check of every value of the row), and the CSR's entries are packed 16 columns
    at a time (csr_part, AVX-512: 12 ms against 19 for a loop over every column
    deciding dense or CSR).
    Both passes are one function because each parallel function costs a cold
    start about 0.5 s of numba's parallel passes, whatever its body.

    The runs put the dense columns in ascending order; where order is not empty,
    each dense row is then reordered, dense[i, p] = (its ascending row)[order[p]]
    (reorder_row, with scratch)."""
    n_cols = X.shape[1]
    n_dense = runs_width(runs)
    for i in prange(X.shape[0]):
        if not fill:
            # Branch-free, so that LLVM vectorises it. x - x is 0 for every
            # finite x, NaN for NaN and the infinities.
            c = 0
            non_finite = 0
            for j in range(n_cols):
                x = X[i, j]
                c += (x != 0) & (where[j] >= n_dense)
                non_finite += (x - x) != 0
            counts[i] = c if non_finite == 0 else -1 - c
            continue
        # The CSR's pass first: it reads the whole row front to back, and the
        # dense columns' runs then find it in L1 (the other way round, the fill
        # took 11.2-13 ms against 8.6-9.2).
        csr_part(X, i, where, n_dense, indices, values, indptr[i], indptr[i + 1])
        counts[i] = 0 if put_runs(dense, X, i, runs, d) else 1
        if order.shape[0] > 0:
            # The row, still in L1, moved into its final order.
            reorder_row(dense, i, order, scratch)


# The zero-skipping products over a sparse input's dense columns (gemm.group_rows,
# gemm.group_tn) take a layer from this many bytes of output row, where the tiles
# would take it (FWD_MIN_BYTES and up, within small_enough).
GROUP_MIN_BYTES = 256


def uses_groups(W):
    """Whether a first layer W's products over a sparse input's dense columns skip
    their zero groups (gemm.GROUP): the tiles' CPUs, rows of GROUP_MIN_BYTES or
    more."""
    return TILES and W.shape[1] * W.itemsize >= GROUP_MIN_BYTES and (
        W.itemsize == 4 or W.size < F64_MAX_WEIGHTS)


@njit(cache=True, error_model="numpy")
def sample_bits(X, cols, step, bits):
    """bits[k, s // 64] bit s % 64 = whether row s * step of X is nonzero in column
    cols[k] (NaN counts), for the sampled rows 0, step, 2 * step, ...; the other
    bits 0."""
    for k in range(bits.shape[0]):
        for w in range(bits.shape[1]):
            bits[k, w] = np.uint64(0)
    s = 0
    for i in range(0, X.shape[0], step):
        x = X[i]
        sh = np.uint64(s % 64)
        w = s // 64
        for k in range(cols.shape[0]):
            bits[k, w] |= np.uint64(x[cols[k]] != 0) << sh
        s += 1


# Partners are looked for among the next PAIR_WINDOW units (columns in W_1's row
# order, which keeps the input's: an image's neighbouring pixels are near).
PAIR_WINDOW = 32


@njit(cache=True, error_model="numpy")
def _pair_unions(bits, union):
    """union[a * PAIR_WINDOW + d - 1] = the number of sampled rows where unit a or
    unit a + d is nonzero (rows of bits), for d = 1..PAIR_WINDOW within the units;
    the largest int64 elsewhere."""
    n = bits.shape[0]
    W = PAIR_WINDOW
    for q in range(union.shape[0]):
        union[q] = np.iinfo(np.int64).max
    for a in range(n):
        for d in range(1, min(W, n - 1 - a) + 1):
            c = 0
            for w in range(bits.shape[1]):
                c += popcount(bits[a, w] | bits[a + d, w])
            union[a * W + d - 1] = c


@njit(cache=True, error_model="numpy")
def _matched(union, order, n, out):
    """Greedy matching: the candidate pairs in order (positions in union, see
    _pair_unions), each taken where both units are still free, then the units left
    paired in order (the last alone if n is odd: -1 as its partner) into out;
    returns how many pairs, (n + 1) // 2."""
    W = PAIR_WINDOW
    free = np.ones(n, dtype=np.bool_)
    k = 0
    for o in order:
        if union[o] == np.iinfo(np.int64).max:
            break
        a = o // W
        b = a + o % W + 1
        if free[a] and free[b]:
            free[a] = False
            free[b] = False
            out[k, 0], out[k, 1] = a, b
            k += 1
    last = -1
    for a in range(n):
        if free[a]:
            if last < 0:
                last = a
            else:
                out[k, 0], out[k, 1] = last, a
                k += 1
                last = -1
    if last >= 0:
        out[k, 0], out[k, 1] = last, -1
        k += 1
    return k


def _pair_up(bits):
    """Units (rows of bits: the sampled rows where each is nonzero) matched into
    pairs at most PAIR_WINDOW apart, those whose union is nonzero in the fewest
    rows first (ties: the lower units first), then the units left, in order:
    ((n + 1) // 2, 2) int64, a lone last unit's partner -1; pairs in the order of
    their first units."""
    n = bits.shape[0]
    union = np.empty(n * PAIR_WINDOW, dtype=np.int64)
    _pair_unions(bits, union)
    pairs = np.empty((n, 2), dtype=np.int64)
    k = _matched(union, np.argsort(union, kind="stable"), n, pairs)
    pairs = pairs[:k]
    return pairs[np.argsort(pairs[:, 0], kind="stable")]


def column_groups(bits, starts, cols, sizes):
    """Groups of gemm.GROUP (4) columns that are zero together often, within each
    run of columns starts[s] .. starts[s + 1] - 1: the columns paired by _pair_up on
    their sampled rows (bits: sample_bits), then the pairs paired the same way on
    their unions. Group j (numbered run after run) is cols[j, :sizes[j]], column
    numbers from its run's start, ascending, the rest of the row its last column
    again; groups in the order of their first columns. Returns how many groups.
    NumPy around two compiled loops (a compiled whole, with its sorts, cost a cold
    start 6.5 s)."""
    j = 0
    for s in range(len(starts) - 1):
        k0, k1 = int(starts[s]), int(starts[s + 1])
        if k1 == k0:
            continue
        run = bits[k0:k1]
        pairs = _pair_up(run)
        second = pairs[:, 1] >= 0
        pbits = run[pairs[:, 0]].copy()
        pbits[second] |= run[pairs[second, 1]]
        quads = _pair_up(pbits)
        groups = []
        for a, b in quads:
            members = [c for p in (a, b) if p >= 0 for c in pairs[p] if c >= 0]
            groups.append(sorted(members))
        groups.sort(key=lambda g: g[0])
        for g in groups:
            cols[j, :] = g + [g[-1]] * (4 - len(g))
            sizes[j] = len(g)
            j += 1
    return j


def group_starts(starts):
    """The number of each run's first group, for runs of a sparse input's dense
    columns starting at starts (ascending, the last the end of the last run): a
    run's groups are its columns GROUP at a time from its start (the last may be
    fewer), numbered on from the run before's."""
    G = gemm.GROUP
    out = np.zeros(len(starts), dtype=np.int64)
    for s in range(1, len(starts)):
        out[s] = out[s - 1] + -(-(int(starts[s]) - int(starts[s - 1])) // G)
    return out


def group_bits(X, i, k, k1):
    """Bit q (q < 16) set where any of X[i, k + GROUP * q ..] (GROUP columns, or
    those before k1) is nonzero (NaN counts): 8-bit levels by one vector compare
    (simd.quad_nonzeros), else one by one. Compiled code only."""
    raise NotImplementedError("group_bits is for compiled code")


@overload(group_bits)
def _group_bits(X, i, k, k1):
    if gemm.HAS_AVX512 and X.dtype == types.uint8 and X.layout == "C":
        return lambda X, i, k, k1: quad_nonzeros(X, i, k, k1 - k)

    def one_by_one(X, i, k, k1):
        G = gemm.GROUP
        bits = np.uint64(0)
        for q in range(16):
            nz = False
            for c in range(k + G * q, min(k1, k + G * q + G)):
                nz |= X[i, c] != 0
            bits |= np.uint64(nz) << np.uint64(q)
        return bits
    return one_by_one


@njit(cache=True, error_model="numpy")
def group_masks(X, starts, masks):
    """masks[i, j // 64] bit j % 64 = whether group j of row i of X holds a nonzero
    (NaN included), for every row i, the groups of each run of columns starts[s] ..
    starts[s + 1] - 1 numbered as group_starts numbers them (chunks that own runs of
    the columns: each chunk's groups its own); the other bits 0. One thread (MNIST's
    levels: 0.8 ms; in parallel 0.43, for a cold start 0.6 s longer)."""
    G = gemm.GROUP
    for i in range(X.shape[0]):
        for w in range(masks.shape[1]):
            masks[i, w] = np.uint64(0)
        j = 0
        for s in range(len(starts) - 1):
            k0, k1 = starts[s], starts[s + 1]
            for k in range(k0, k1, 16 * G):
                # Up to 16 groups' bits at once, from bit j on.
                bits = group_bits(X, i, k, k1)
                h = np.uint64(j % 64)
                masks[i, j // 64] |= bits << h
                if h > 48 and (j // 64 + 1) < masks.shape[1]:
                    masks[i, j // 64 + 1] |= bits >> (np.uint64(64) - h)
                j += min(16, (k1 - k + G - 1) // G)
