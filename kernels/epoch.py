"""A whole training epoch (or a run of its batches) in one compiled call.

One parallel region for the whole run (run_chunks calling chunk_batches); each of
the n_chunks chunks (one per thread) goes through the batches, and per batch does
two things, each followed by a barrier (kernels/sync.py) where the chunks wait for
each other:
1. forward, the output delta and the backward deltas for its own rows of the
   batch, writing its own partial gradient sums into dWs[l][t]; weights are only
   read here, so every delta is computed before any weight changes;
2. for its contiguous share of all weight rows, W -= lr/B * (partial_0 +
   partial_1 + ...), summed in chunk order.
No two threads ever write the same number, so for a given n_chunks (thread
count) the result is bit for bit the same on every run.

(Each step used to be a parallel region of its own, two forks and joins of the
thread pool a batch: seed002's epochs were 3-6% slower, measured alternately in
one process on 2 threads; seed000's and the estimator's no different within the
noise.)

A sparse input's first layer, trained with an optimiser that keeps moments
(momentum, Nesterov, Adam), on two or more chunks, is split between the chunks
by input columns instead (chunk_partial_forward): each chunk owns a share of
W_1's rows (and of their moments), multiplies the whole batch by them (a partial
product; barrier), then, for its own batch rows as above, adds the chunks'
partial products and does the rest of the forward and backward (barrier), then
computes the whole batch's gradient of its own rows of W_1 (chunk_layer1_grad)
and updates them, and its share of the other rows (update_share; barrier). W_1,
its moments and its gradient never leave their chunk's core; what crosses is
each chunk's partial product and delta rows (B x n_1 numbers, not n_in x n_1).

Numba copies a called function's code into the caller's module and optimises
and compiles it again there. To keep a cold start short, the two per-chunk
kernels are compiled on their own and called through their addresses
(fastmlp.kernels.native's pack_call), and chunk_forward_backward calls the layer
kernels the same way (call_at; chunk_kernels finds their addresses), and so is
chunk_batches, from run_chunks, a parallel function of its own, so that
train_epoch is not one (numba's parallel passes over train_epoch and its loop
bodies cost a cold start about 1 s more).

Parameters and workspaces are tuples of arrays, one per layer: Ws[l] (n_in,
n_out), bs[l] (n_out,), As[l] and Ds[l] (batch + (n_chunks - 1) * gap, n_out: chunk
t's rows gap * t further on, batch[2] = gap), dWs[l] (n_chunks, n_in, n_out),
dbs[l] (n_chunks, n_out). Nothing is allocated inside the batch loop.

Dense matrix products go, chunk by chunk, through register tiles (gemm.py) or BLAS
(np.dot into views of each chunk's rows), as dense.py chooses by width and CPU;
the caller limits BLAS to one thread, since the chunks already use every core. With a
sparse input (MNIST is ~81% zeros) the first layer's forward product reads the data
as CSR (indptr, indices, values), and its weight gradient adds each nonzero
pixel's contribution into its row of dW (weight_grad_scatter), or, for the layer
widths where that was measured slower (sparse_grad_uses_csc), sums each row of dW
from the chunk's nonzeros sorted by pixel, which the forward product sorted as it
read them (csr_matmul_csc_rows, then weight_grad_csc); only nonzero
pixels cost anything, and rows of W_1 whose pixel is zero in the whole batch are
not touched (their gradient is exactly zero). The caller picks one of the two by
the type of the CSC workspaces (None for the scatter), so that only that one is
compiled.

A sparse input's columns that are nonzero in many rows (MNIST's middle pixels:
about 230 of 784 nonzero in at least 30% of images, 81% of all nonzeros) are better
multiplied densely: the caller (fastmlp/_numba_backend.py) splits them off into a
dense array X of n_dense columns, with W_1's rows (and its moments) reordered for
the run so that theirs come first; each chunk gathers its rows of X into A0 and
multiplies them by W_1[:n_dense] with the dense products (register tiles: each
row of W_1 read feeds six batch rows, where the CSR kernels read a row of W_1 from
L2 for every nonzero), and only the other nonzeros go through the CSR. The zeros
the dense columns hold cost arithmetic but add nothing. Whole epochs on 2
threads, paired with the CSR alone (median ratios, 10 pairs in each order):
seed000 0.88 and 0.96, seed002 0.93 and 0.99, wide 0.87 and 0.87, the
scikit-learn-default network 0.87 and 0.94 (Adam), 0.87 and 0.82 (SGD); 30%
against 40%, 50% and 20% as the threshold: 2-7% faster for seed000 and the
estimator's network, no different for seed002.

Where the tiles would take them (dense.uses_groups), those dense products skip
zeros a group of four adjacent columns at a time (gemm.group_rows and
gemm.group_tn; the Engine orders the dense columns in groups that are often zero
together, dense.column_groups: MNIST's are all zero in 31% of the rows): each
chunk lists, once a batch, its rows with a nonzero in each group (from masks the
Engine computes once a fit, dense.group_masks), and both products run over each
group's listed rows only. The same sums in the same order as the tiles': the
same bits.

The per-chunk kernels run with subnormal floats flushed to zero (kernels/fpenv.py):
decaying optimiser moments otherwise reach the slow subnormal path.
"""
import numpy as np
from numba import njit, prange

from .fpenv import flush_subnormals, restore_fp_state
from . import gemm, native
from .native import call_at, call_packed, pack_call
from .sync import ALL, ALONE, STOP, barrier, check_in
from .simd import (combine_whole_row, prefetch_range, sparse_combine_row, sparse_scatter_row,
                   takes_whole_row)
from .dense import (LINEAR, PRANGE_ONLY, RELU, backprop_rows, backprop_transposed,
                    bias_activate_rows, column_sums_rows, csr_matmul_csc_rows, csr_matmul_rows,
                    decoded, derivative_sums_rows, matmul_rows, output_delta_rows,
                    transpose_into, weight_grad_rows)


# Widest layer whose sparse weight gradient scatters (weight_grad_scatter); wider
# ones sum a per-chunk CSC (weight_grad_csc). One MNIST epoch of first-layer weight
# gradients after the forward products, one thread, AMD EPYC (Zen 5), seconds,
# scatter against CSC, by units (rows per chunk):
#   16 (32) 0.025 / 0.044, 32 (16) 0.026 / 0.054, 32 (32) 0.024 / 0.043,
#   48 (50) 0.043 / 0.049, 64 (50) 0.037 / 0.044, 64 (100) 0.034 / 0.044,
#   96 (100) 0.052 / 0.049, 100 (100) 0.089 / 0.054, 128 (100) 0.062 / 0.063
# (100 units then left 4 columns past the last 8-lane vector, added one by one).
# Measured again on Zen 3 (AVX2) after the scatter lost its mispredicted branch and
# its scalar tail (kernels/simd.py), weight gradients only, batch chunks of 100,
# 10 interleaved runs, best and median, scatter against CSC:
#   64 0.104/0.131 against 0.130/0.161 (scatter faster 10 of 10 times),
#   100 0.151/0.170 against 0.156/0.172 (3 of 10), 128 0.154/0.194 against
#   0.191/0.227 (10 of 10), 160 0.178/0.228 against 0.185/0.219 (6 of 10),
#   192 0.232/0.279 against 0.219/0.252 (4 of 10).
# And on Zen 4 (AVX-512 CPU, 8-lane vectors here too), one thread, gradients plus
# the first read of each chunk's CSR rows, best of 7, scatter against CSC: 96
# 0.102/0.096, 100 0.110/0.100, 112 0.101/0.098, 120 0.115/0.113, 128 0.135/0.132;
# in whole estimator epochs (784-100-10, Adam and SGD with L2, two A/B sets of 6
# and 4 alternating processes, best of each): 2 threads, CSC faster in every
# pairing by rank (Adam 0.085-0.113 against 0.097-0.122 s, SGD 0.077-0.103 against
# 0.081-0.111 s); 1 thread, the scatter 1-5% ahead. Hence the CSC from 97 units,
# except 128 (two whole tiles of 8 vectors, no tail pass), where the scatter won
# 10 of 10 on Zen 3 and tied on Zen 5 and Zen 4.
SCATTER_MAX_UNITS = 96


def sparse_grad_uses_csc(n_units):
    """Whether a sparse first layer of n_units sums its weight gradient from a
    per-chunk CSC (weight_grad_csc) instead of scattering (weight_grad_scatter)."""
    return n_units > SCATTER_MAX_UNITS and n_units != 128


@njit(cache=True, error_model="numpy")
def weight_grad_scatter(indptr, parts, c, k0, k1, indices, values, rows, r0, r1, D, dW, db,
                        touched):
    """First-layer weight gradient for a sparse input, touching only nonzero pixels.

    dW[k] = sum of x D[r] over the nonzeros x = X[rows[r], k], in ascending r
    (deterministic), for every pixel k nonzero in some row r0..r1-1, where a row's
    nonzeros are its part c (columns k0..k1-1) as csr_matmul_rows reads it
    (parts = 1, c = 0, k0 = 0, k1 = n_in: all of them); other rows of dW are not
    written: touched[k] = False (k0 <= k < k1) says so, and their gradient is
    exactly zero. db = column sums of D.

    Each nonzero is added into its row of dW, row after row; D[r] stays in vector
    registers while its row's nonzeros are added (kernels/simd.py's
    sparse_scatter_row), and a row of dW seen for the first time is written, not
    added to. weight_grad_csc gives the same bits another way."""
    for k in range(k0, k1):
        touched[k] = False
    for r in range(r0, r1):
        q = rows[r] * parts + c
        p0, p1 = indptr[q], indptr[q + 1]
        sparse_scatter_row(dW, touched, D, r, indices, values, p0, p1)
        for p in range(p0, p1):
            touched[indices[p]] = True
    column_sums_rows(D, db, r0, r1)


@njit(cache=True, error_model="numpy")
def weight_grad_csc(k0, k1, r0, r1, D, dW, db, touched, cptr, crow, cval):
    """weight_grad_scatter's gradient (the same bits) from the chunk's rows sorted by
    pixel, so that each dW[k] is summed in vector registers from the rows of D,
    which stay in L1, and written once. The forward product sorted them as it read
    them (fastmlp.kernels.dense.csr_matmul_csc_rows, for the same rows r0..r1-1 and
    columns k0..k1-1): column k's entries are in slots (k - k0) * R .. (k - k0) * R +
    cptr[k] - 1 of crow (the batch row) and cval (R = r1 - r0 rows: a column has at
    most one entry a row), in row order. For wide layers this beats reading and
    writing dW's row for every nonzero (the scatter): one MNIST epoch of
    first-layer forward products and weight gradients, one thread, batch chunks of
    100, on an Intel Xeon (2 MiB L2): 0.142 against 0.171 s (100 units).

    Fixed slots per column, rather than a counting sort's packed runs, need no
    counting pass and no prefix sum: 100 MNIST rows (3,050 nonzeros) after their
    forward product, 100 units, one thread, Zen 4: 21.7-22.6 against 25.4-26.0 us
    (sorted here then, in a pass of its own; sorted in the forward product, 300
    such batches took 25.4 against 30.0 million cycles, product and gradient).
    """
    R = r1 - r0
    # Each pixel's run is short (about B/5 rows): calling sparse_combine_row for
    # each cost more than the one-pass rows gain, so the intrinsic is called here
    # (0.052-0.055 -> 0.049 s an epoch at 100 units, one thread, Zen 5).
    whole = takes_whole_row(D)
    # False, but not a literal (which would type the calls with Literal[bool] and
    # compile another sparse_combine_row).
    acc = R < 0
    for k in range(k0, k1):
        n = cptr[k]
        touched[k] = n > 0
        if n > 0:
            # start and end are int64 (R is): a bare literal would have typed the
            # call with Literal[int] and compiled a second sparse_combine_row.
            start = (k - k0) * R
            if whole:
                combine_whole_row(dW, k, crow, cval, start, start + n, D, acc)
            else:
                sparse_combine_row(dW, k, crow, cval, start, start + n, D, acc)
    column_sums_rows(D, db, r0, r1)


# chunk_forward_backward's kernels, each called through its (address, signature key)
# in a row of fns (fastmlp.kernels.native.call_at; chunk_kernels fills them): linked
# in, their code was compiled again inside chunk_forward_backward, whose module
# then held 19,000 LLVM instructions.
(CSR_MATMUL, MATMUL, BIAS_ACTIVATE, BACKPROP, WEIGHT_GRAD, SPARSE_GRAD, DERIVATIVE_SUMS,
 CSR_MATMUL_CSC, GROUP_LISTS, GROUP_MATMUL, GROUP_GRAD) = range(11)


@njit(error_model="numpy", inline="always")
def _own(a, g):
    """Rows g.. of a batch-row workspace: a chunk's view, batch row r at row r."""
    return a[g:]


# Called only through its address from train_epoch: no wrappers for Python or C.
@njit(cache=True, error_model="numpy", no_cpython_wrapper=True, no_cfunc_wrapper=True)
def chunk_forward_backward(t, Ws, bs, acts, loss, X, levels, sparse, indptr, indices, values, Y,
                           order, batch, A0, Yb, As, Ds, dWs, dbs, touched, cptr, crow, cval,
                           tiny, top, loss_parts, correct_parts, fns, Ps, cut_ptr, cuts, groups):
    """Forward and backward for chunk t of the batch of rows order[start:start+nb],
    (start, nb) = batch: its rows r0..r1-1, one of loss_parts.shape[0] equal
    shares. Writes the chunk's summed loss and number correct into loss_parts[t]
    and correct_parts[t]. cptr, crow and cval are each chunk's CSC workspaces
    for weight_grad_csc, or all three None where weight_grad_scatter takes the
    first layer. X is a dense input, or a sparse input's dense columns (none:
    shape (1, 0)), gathered into A0 batch row by batch row: as they are, or where
    X is uint8 (8-bit levels, see fastmlp/_numba_backend.levels_of), each level
    divided by levels, which gives back the input's values exactly. Y holds the
    targets, a row each (copied into Yb batch row by batch row), or, for one-hot
    targets, each row's class (int32, 1-D), from which Yb's rows are written.

    With the first layer split by input columns (Ps, cut_ptr and cuts not None: see
    chunk_partial_forward), its products are the chunks' partial sums Ps[c],
    added here in chunk order, and its weight gradient is left to
    chunk_layer1_grad; this writes its bias gradient's partial sums."""
    start, nb = batch[0], batch[1]
    n_chunks = loss_parts.shape[0]
    # The batch-row workspaces (A0, Yb, As, Ds) hold chunk t's rows batch[2] * t rows
    # further on (see Engine._allocate): views of them from there, so that batch row
    # r is row r of each view.
    g = batch[2] * t
    A0, Yb = _own(A0, g), _own(Yb, g)
    r0 = t * nb // n_chunks
    r1 = (t + 1) * nb // n_chunks
    rows = order[start:]
    L = len(Ws)
    n_out = Yb.shape[1]
    one, zero = np.int64(1), np.int64(0)
    if Y.ndim == 1:
        # One-hot targets, kept as each row's class (see Engine.prepare): the
        # batch's rows of Yb are written from them, the same numbers.
        z, o = Yb.dtype.type(0), Yb.dtype.type(1)
        for r in range(r0, r1):
            for j in range(n_out):
                Yb[r, j] = z
            Yb[r, Y[rows[r]]] = o
    else:
        for r in range(r0, r1):
            src = rows[r]
            for j in range(n_out):
                Yb[r, j] = Y[src, j]
    ok = True
    # Whether the first layer's bias and activation are left to BIAS_ACTIVATE.
    activate = True
    S0 = _own(As[0], g)     # the first layer's products, then activations
    if Ps is not None:
        S = S0
        # A ReLU first layer's bias and activation go into the pass that adds the
        # last chunk's partial sums: the same sums in the same order as
        # BIAS_ACTIVATE's pass of its own, which cost more (100 rows of 100 units,
        # two chunks, one thread: 4,100 against 5,500 cycles).
        relu = acts[0] == RELU
        b = bs[0]
        z = b.dtype.type(0)
        for r in range(r0, r1):
            for j in range(S.shape[1]):
                S[r, j] = Ps[0, r, j]
            for c in range(1, n_chunks - 1 if relu else n_chunks):
                for j in range(S.shape[1]):
                    S[r, j] += Ps[c, r, j]
            if relu:
                for j in range(S.shape[1]):
                    x = (S[r, j] + Ps[n_chunks - 1, r, j]) + b[j]
                    S[r, j] = z if x < z else x
        activate = not relu
        n_dense = 0
    else:
        # A sparse input's first n_dense columns (in W_1's row order) are dense: X
        # holds them, and they go through the dense products (see above). X's
        # columns (a dense input's all, a sparse input's dense ones, or none) are
        # gathered by one loop for both kinds of input: compiled once (with 8-bit
        # levels, a vectorised division), not once for each.
        n_dense = X.shape[1] if sparse else 0
        _gather_rows(X, rows, r0, r1, 0, X.shape[1], A0, levels)
        if sparse:
            # The dense columns' product first, then the CSR's nonzeros added to it
            # (a product of their own, then added, cost a 100-unit first layer
            # B x 100 numbers more to write and read: see the README, Speed).
            if n_dense > 0 and groups is not None:
                # The dense columns' product skipping each row's all-zero groups
                # of columns (gemm.group_rows; the same bits), listed here for the
                # weight gradient too.
                masks, lists, counts, local = groups
                ok &= call_at(fns[GROUP_LISTS], (masks, rows, r0, r1, lists[t], counts[t],
                                                 local[t], zero))
                ok &= call_at(fns[GROUP_MATMUL], (A0, Ws[0][:n_dense], S0, r0, r1, lists[t],
                                                  counts[t]))
            elif n_dense > 0:
                ok &= call_at(fns[MATMUL], (A0, Ws[0][:n_dense], S0, r0, r1))
            if cptr is None:
                ok &= call_at(fns[CSR_MATMUL], (indptr, one, zero, indices, values, rows,
                                                Ws[0], S0, r0, r1, n_dense > 0))
            else:
                # The weight gradient's CSC sorted as the product reads the nonzeros.
                ok &= call_at(fns[CSR_MATMUL_CSC], (
                    indptr, one, zero, indices, values, rows, Ws[0], S0, r0, r1,
                    n_dense > 0, zero, np.int64(Ws[0].shape[0]), cptr[t], crow[t], cval[t]))
        else:
            ok &= call_at(fns[MATMUL], (A0, Ws[0], S0, r0, r1))
    if activate:
        ok &= call_at(fns[BIAS_ACTIVATE], (acts[0], bs[0], S0, r0, r1))
    for l in range(1, L):
        A = _own(As[l], g)
        ok &= call_at(fns[MATMUL], (_own(As[l - 1], g), Ws[l], A, r0, r1))
        ok &= call_at(fns[BIAS_ACTIVATE], (acts[l], bs[l], A, r0, r1))
    total, correct = output_delta_rows(loss, acts[L - 1], _own(As[L - 1], g), Yb,
                                       _own(Ds[L - 1], g), tiny, top, r0, r1)
    # Each hidden layer's delta gets its activation's derivative and its bias
    # gradient in one pass (derivative_sums_rows), after D W^T (BACKPROP with
    # LINEAR), and the weight gradient kernels write no bias gradient there (an
    # empty db): a pass of the column sums over it less (100 rows of 100 ReLU
    # units, one thread: 3,700-3,900 against 6,200 cycles). The output layer's
    # bias gradient is its own.
    linear = np.int64(LINEAR)
    no_sums = dbs[0][t][:0]
    for l in range(L - 1, 0, -1):
        W = Ws[l]
        A_prev, D, D_prev = _own(As[l - 1], g), _own(Ds[l], g), _own(Ds[l - 1], g)
        if backprop_transposed(W, r1 - r0):
            # W_l^T goes into the chunk's partial gradient of W_l, written only
            # after this, and D W^T through MATMUL's tiles (see backprop_transposed).
            WT = dWs[l][t].reshape((W.shape[1], W.shape[0]))
            transpose_into(W, WT)
            ok &= call_at(fns[MATMUL], (D, WT, D_prev, r0, r1))
        else:
            ok &= call_at(fns[BACKPROP], (D, W, A_prev, linear, D_prev, r0, r1))
        db = dbs[l][t] if l == L - 1 else no_sums
        ok &= call_at(fns[WEIGHT_GRAD], (A_prev, D, dWs[l][t], db, r0, r1))
        ok &= call_at(fns[DERIVATIVE_SUMS], (acts[l - 1], A_prev, D_prev, dbs[l - 1][t], r0,
                                             r1))
    # The first layer's bias gradient, unless a layer above wrote it.
    db0 = dbs[0][t] if L == 1 else no_sums
    D0 = _own(Ds[0], g)
    if Ps is not None:
        if L == 1:
            column_sums_rows(D0, db0, r0, r1)
    elif sparse:
        # cptr is None for layers the scatter takes: numba then drops the other
        # branch before typing it, so a process compiles only the way it uses
        # (seed000, empty cache, alternating processes: 36.0, 36.2, 33.3 s to the
        # end of a first epoch with both compiled, 34.5, 28.5, 34.2 s without).
        # Where the dense columns' gradient follows, it writes the bias gradient
        # (the same sums) and the sparse one none.
        db = no_sums if n_dense > 0 else db0
        n_in = np.int64(Ws[0].shape[0])
        if cptr is None:
            ok &= call_at(fns[SPARSE_GRAD], (indptr, one, zero, zero, n_in, indices, values,
                                             rows, r0, r1, D0, dWs[0][t], db, touched[t]))
        else:
            # Summed from the CSC the forward product sorted.
            ok &= call_at(fns[SPARSE_GRAD], (zero, n_in, r0, r1, D0, dWs[0][t], db,
                                             touched[t], cptr[t], crow[t], cval[t]))
        if n_dense > 0:
            # The CSR has no nonzeros in these rows of dW (nor touched them).
            if groups is not None:
                # From the rows the forward listed (gemm.group_tn; the same bits as
                # WEIGHT_GRAD's, and its bias gradient's).
                ok &= call_at(fns[GROUP_GRAD], (A0, D0, dWs[0][t][:n_dense], groups[1][t],
                                                groups[2][t]))
                column_sums_rows(D0, db0, r0, r1)
            else:
                ok &= call_at(fns[WEIGHT_GRAD], (A0, D0, dWs[0][t][:n_dense], db0, r0, r1))
            for k in range(n_dense):
                touched[t, k] = True
    else:
        ok &= call_at(fns[WEIGHT_GRAD], (A0, D0, dWs[0][t], db0, r0, r1))
    if not ok:
        raise RuntimeError("chunk_forward_backward: a kernel in fns was compiled for other "
                           "argument types, or failed")
    loss_parts[t] = total
    correct_parts[t] = correct


# The gathers of the dense columns ask for the row GATHER_AHEAD rows ahead: a
# shuffled batch's rows lie anywhere in X (MNIST's levels: 14 MB). Split by input
# columns, 10-epoch Adam fits, a thread's gather an epoch: 4.6-5.6 million cycles
# against 9.7-12.5 without (4 ahead: 6.2-6.7).
PREFETCH = True
GATHER_AHEAD = 8


@njit(error_model="numpy", inline="always")
def _gather_rows(X, rows, r0, r1, d0, d1, A, levels):
    """A[r, :d1 - d0] = X[rows[r], d0:d1] for r in r0..r1-1, each value as the
    parameters' float (dense.decoded: a uint8 level divided by levels). Through
    row views: indexing X[src, d0 + k] and A[r, k] directly, the loop did not
    vectorise (200 MNIST rows, 114 columns of levels: 30-39 against 6 us)."""
    if d1 > d0:
        for r in range(r0, r1):
            if PREFETCH and r + GATHER_AHEAD < r1:
                prefetch_range(X[rows[r + GATHER_AHEAD]], d0, d1)
            x, a = X[rows[r], d0:d1], A[r]
            for k in range(d1 - d0):
                a[k] = decoded(x[k], levels)


@njit(error_model="numpy", inline="always")
def _own_groups(cuts, t):
    """(number of its first group, groups) of chunk t's own dense columns: each
    chunk's run of them numbered on from the chunk before's (dense.group_starts)."""
    G = gemm.GROUP
    g0 = 0
    for c in range(t):
        g0 += (cuts[c + 1, 0] - cuts[c, 0] + G - 1) // G
    return np.int64(g0), (cuts[t + 1, 0] - cuts[t, 0] + G - 1) // G


@njit(error_model="numpy", inline="always")
def _dense_part(A0, t, d0, d1, B):
    """Chunk t's gathered dense columns d0..d1-1 (of a split first layer): a (B, d1 -
    d0) C-contiguous view of its row of A0."""
    return A0[t, :B * (d1 - d0)].reshape((B, d1 - d0))


# Called only through its address from train_epoch, like chunk_forward_backward.
@njit(cache=True, error_model="numpy", no_cpython_wrapper=True, no_cfunc_wrapper=True)
def chunk_partial_forward(t, Ws, bs, acts, loss, X, levels, sparse, indptr, indices, values, Y,
                          order, batch, A0, Yb, As, Ds, dWs, dbs, touched, cptr, crow, cval,
                          tiny, top, loss_parts, correct_parts, fns, Ps, cut_ptr, cuts, groups):
    """With the first layer split by input columns (a sparse input on two or more
    chunks): chunk t's partial product of the whole batch, over its own columns
    (W_1's rows) only, Ps[t] = X[:, own] W_1[own]. Chunk t owns the dense
    columns cuts[t, 0] .. cuts[t + 1, 0] - 1 (gathered into its row of A0, and
    multiplied by the dense products) and the CSR columns cuts[t, 1] ..
    cuts[t + 1, 1] - 1 (part t of each row of cut_ptr: csr_column_cuts).
    chunk_forward_backward adds the chunks' sums, chunk_layer1_grad computes the
    gradient of each chunk's own rows of W_1 from the whole batch's delta, and
    update_share updates them: W_1's rows never leave their chunk's core, where
    splitting the batch's rows moved W_1 and the partial gradients between the
    cores every batch (see the README, Speed)."""
    start, nb = batch[0], batch[1]
    rows = order[start:]
    parts = np.int64(cuts.shape[0] - 1)
    B = As[0].shape[0]
    d0, d1 = cuts[t, 0], cuts[t + 1, 0]
    P = Ps[t]
    zero = np.int64(0)
    ok = True
    if d1 > d0:
        A = _dense_part(A0, t, d0, d1, B)
        _gather_rows(X, rows, zero, nb, d0, d1, A, levels)
        if groups is not None:
            # Skipping the rows' all-zero groups of the chunk's own dense columns
            # (see chunk_forward_backward), listed for chunk_layer1_grad too.
            masks, lists, counts, local = groups
            g0, ng = _own_groups(cuts, t)
            ok &= call_at(fns[GROUP_LISTS], (masks, rows, zero, nb, lists[t], counts[t][:ng],
                                             local[t], g0))
            ok &= call_at(fns[GROUP_MATMUL], (A, Ws[0][d0:d1], P, zero, nb, lists[t],
                                              counts[t][:ng]))
        else:
            ok &= call_at(fns[MATMUL], (A, Ws[0][d0:d1], P, zero, nb))
    # The CSR's nonzeros added to the dense columns' product, as in
    # chunk_forward_backward.
    if cptr is None:
        ok &= call_at(fns[CSR_MATMUL], (cut_ptr, parts, t, indices, values, rows, Ws[0], P,
                                        zero, nb, d1 > d0))
    else:
        # chunk_layer1_grad's CSC (its columns, the whole batch) sorted on the way.
        ok &= call_at(fns[CSR_MATMUL_CSC], (cut_ptr, parts, t, indices, values, rows, Ws[0], P,
                                            zero, nb, d1 > d0, cuts[t, 1], cuts[t + 1, 1],
                                            cptr[t], crow[t], cval[t]))
    if not ok:
        raise RuntimeError("chunk_partial_forward: a kernel in fns was compiled for other "
                           "argument types, or failed")


# Called only through its address from train_epoch, like chunk_forward_backward.
@njit(cache=True, error_model="numpy", no_cpython_wrapper=True, no_cfunc_wrapper=True)
def chunk_layer1_grad(t, Ws, bs, acts, loss, X, levels, sparse, indptr, indices, values, Y,
                      order, batch, A0, Yb, As, Ds, dWs, dbs, touched, cptr, crow, cval,
                      tiny, top, loss_parts, correct_parts, fns, Ps, cut_ptr, cuts, groups):
    """With the first layer split by input columns (see chunk_partial_forward): the
    whole batch's weight gradient of chunk t's own rows of W_1, into those rows of
    dWs[0][0] (each chunk writes its own), and touched[0] for its CSR rows."""
    start, nb = batch[0], batch[1]
    rows = order[start:]
    parts = np.int64(cuts.shape[0] - 1)
    B = As[0].shape[0]
    d0, d1 = cuts[t, 0], cuts[t + 1, 0]
    zero = np.int64(0)
    # The gradient kernels write no column sums (an empty db): the bias's
    # partial sums are chunk_forward_backward's, and summing the whole batch's
    # delta twice more cost each chunk about 8,000 cycles a batch.
    no_sums = Ps[t, 0, :0]
    dW = dWs[0][0]
    k0, k1 = cuts[t, 1], cuts[t + 1, 1]
    if cptr is None:
        ok = call_at(fns[SPARSE_GRAD], (cut_ptr, parts, t, k0, k1, indices, values, rows, zero,
                                        nb, Ds[0], dW, no_sums, touched[0]))
    else:
        # Summed from the CSC chunk_partial_forward sorted.
        ok = call_at(fns[SPARSE_GRAD], (k0, k1, zero, nb, Ds[0], dW, no_sums, touched[0],
                                        cptr[t], crow[t], cval[t]))
    if d1 > d0:
        A = _dense_part(A0, t, d0, d1, B)
        if groups is not None:
            ng = _own_groups(cuts, t)[1]
            ok &= call_at(fns[GROUP_GRAD], (A, Ds[0], dW[d0:d1], groups[1][t],
                                            groups[2][t][:ng]))
        else:
            ok &= call_at(fns[WEIGHT_GRAD], (A, Ds[0], dW[d0:d1], no_sums, zero, nb))
        for k in range(d0, d1):
            touched[0, k] = True
    if not ok:
        raise RuntimeError("chunk_layer1_grad: a kernel in fns was compiled for other "
                           "argument types, or failed")


def chunk_kernels(Ws, bs, acts, sparse, indptr, indices, values, order, As, Ds, dWs, dbs,
                  touched, cptr, crow, cval, X=None, groups=None):
    """fns for chunk_forward_backward (called from Python with the same arrays): each
    row the (address, signature key) of its kernel, compiled (or loaded from
    numba's cache) for the argument types chunk_forward_backward passes it; the
    rows of kernels a sparse or dense input does not use are (0, -1), as are
    CSR_MATMUL's where the CSC takes the sparse gradient (CSR_MATMUL_CSC's
    otherwise). A dense input's gathered batch A0 has the type of As[0], so MATMUL
    and WEIGHT_GRAD serve it too."""
    i, act = np.int64(0), np.int64(acts[0])
    fns = np.zeros((11, 2), dtype=np.int64)
    fns[:, 1] = -1

    def put(row, kernel, *args):
        fns[row] = native.address(kernel, args)
    put(MATMUL, matmul_rows, As[0], Ws[0], As[0], i, i)
    put(BIAS_ACTIVATE, bias_activate_rows, act, bs[0], As[0], i, i)
    put(BACKPROP, backprop_rows, Ds[0], Ws[0], As[0], act, Ds[0], i, i)
    put(WEIGHT_GRAD, weight_grad_rows, As[0], Ds[0], dWs[0][0], dbs[0][0], i, i)
    put(DERIVATIVE_SUMS, derivative_sums_rows, act, As[0], Ds[0], dbs[0][0], i, i)
    if sparse:
        rows = order[0:]
        if cptr is None:
            put(CSR_MATMUL, csr_matmul_rows, indptr, i, i, indices, values, rows, Ws[0], As[0], i,
                i, False)
            put(SPARSE_GRAD, weight_grad_scatter, indptr, i, i, i, i, indices, values, rows, i, i,
                Ds[0], dWs[0][0], dbs[0][0], touched[0])
        else:
            # The product sorts the CSC the gradient sums from (csr_matmul_csc_rows); the
            # plain product is not compiled.
            put(CSR_MATMUL_CSC, csr_matmul_csc_rows, indptr, i, i, indices, values, rows, Ws[0],
                As[0], i, i, False, i, i, cptr[0], crow[0], cval[0])
            put(SPARSE_GRAD, weight_grad_csc, i, i, i, i, Ds[0], dWs[0][0], dbs[0][0], touched[0],
                cptr[0], crow[0], cval[0])
    if groups is not None:
        # The dense columns' zero-skipping products (chunk_forward_backward's
        # types: X's floats as gathered into As[0]'s dtype, a batch's rows).
        masks, lists, counts, local = groups
        n_dense = np.int64(X.shape[1])
        A0 = np.zeros((1, X.shape[1]), dtype=As[0].dtype)
        put(GROUP_LISTS, gemm.group_lists, masks, order[0:], i, i, lists[0], counts[0], local[0],
            i)
        put(GROUP_MATMUL, gemm.group_rows, A0, Ws[0][:n_dense], As[0], i, i, lists[0],
            counts[0])
        put(GROUP_GRAD, gemm.group_tn, A0, Ds[0], dWs[0][0][:n_dense], lists[0], counts[0])
    return fns


SGD, MOMENTUM, NESTEROV, ADAM = 0, 1, 2, 3  # fastmlp.optimizers' codes


@njit(error_model="numpy", inline="always")
def _summed(g, g2, j, two):
    return g[j] + g2[j] if two else g[j]


@njit(error_model="numpy", inline="always")
def _sgd_step(x, g, inv_n, decay, lr):
    """SGD's new value of a parameter x from its gradient summed over the batch, g:
    the mean gradient plus the L2 term is g * inv_n + decay * x."""
    return x - lr * (g * inv_n + decay * x)


# reassoc lets LLVM vectorise the sum of squares (in an order fixed at compile
# time, so runs stay bit-identical); without it that sum is a serial chain of
# scalar adds. Summed here rather than in a pass of its own over p before the
# update: 39,200 weights, Adam, one thread, data in L2, 13.5 against 17.3 us.
@njit(cache=True, error_model="numpy", fastmath={"reassoc"})
def optimizer_row(p, g, g2, m, v, opt, inv_n, decay, lr, mu, b1, b2, c1, c2, eps, two, sq):
    """Update the parameters p (a bias, or a run of weight rows seen as one flat
    vector) in place from their gradient summed over the batch, g + g2 if two (the
    two chunks' sums, added here rather than in a pass of their own), else g; the
    step is fastmlp.optimizers.Optimizer.step for them: the mean gradient plus the
    L2 term is that sum * inv_n + decay * p, m and v are their moments (velocity for
    momentum), c1 = 1 - b1 and c2 = 1 - b2. When decay > 0, adds the sum of p^2
    before the update (float64: the L2 term of the loss) into sq[0]."""
    n = p.shape[0]
    s = 0.0
    if opt == SGD:
        for j in range(n):
            x = p[j]
            s += np.float64(x) * np.float64(x)
            p[j] = _sgd_step(x, _summed(g, g2, j, two), inv_n, decay, lr)
    elif opt == MOMENTUM:
        for j in range(n):
            x = p[j]
            s += np.float64(x) * np.float64(x)
            grad = _summed(g, g2, j, two) * inv_n + decay * x
            m[j] = mu * m[j] - lr * grad
            p[j] = x + m[j]
    elif opt == NESTEROV:
        for j in range(n):
            x = p[j]
            s += np.float64(x) * np.float64(x)
            grad = _summed(g, g2, j, two) * inv_n + decay * x
            m[j] = mu * m[j] - lr * grad
            p[j] = x + (mu * m[j] - lr * grad)
    else:
        for j in range(n):
            x = p[j]
            s += np.float64(x) * np.float64(x)
            grad = _summed(g, g2, j, two) * inv_n + decay * x
            m[j] = b1 * m[j] + c1 * grad
            v[j] = b2 * v[j] + c2 * (grad * grad)
            p[j] = x - lr * m[j] / (np.sqrt(v[j]) + eps)
    if decay > 0:
        sq[0] += s


# reassoc: as in optimizer_row (the sum of squares vectorised).
@njit(cache=True, error_model="numpy", fastmath={"reassoc"})
def sgd_touched_rows(W, G0, G1, t0, t1, k0, k1, inv_n, decay, lr, sq):
    """optimizer_row's SGD step (the same weights, bit for bit) for the rows k0..k1-1
    of a sparse input's W (2-D) from two chunks' gradients G0 and G1, where a row
    chunk c's sparse gradient did not touch (t0[k] or t1[k] False) holds another
    batch's numbers and counts as zeros: it is neither zeroed nor read. With L2
    every weight moves every batch, and the zeroing wrote each untouched row of
    the other chunk's gradient, a line from the other core's cache, and read it
    back (MNIST, 100 rows a chunk: about 280 of W_1's 784 rows untouched by each
    chunk). Adds the rows' sum of p^2 before the update (float64) into sq[0] when
    decay > 0."""
    n = W.shape[1]
    z = W.dtype.type(0)
    s = 0.0
    for k in range(k0, k1):
        a, b = t0[k], t1[k]
        # The same sums as zeroed rows gave: g + 0 and 0 + g, not g alone (for g
        # = -0 the sum is +0).
        if a and b:
            for j in range(n):
                x = W[k, j]
                s += np.float64(x) * np.float64(x)
                W[k, j] = _sgd_step(x, G0[k, j] + G1[k, j], inv_n, decay, lr)
        elif a:
            for j in range(n):
                x = W[k, j]
                s += np.float64(x) * np.float64(x)
                W[k, j] = _sgd_step(x, G0[k, j] + z, inv_n, decay, lr)
        elif b:
            for j in range(n):
                x = W[k, j]
                s += np.float64(x) * np.float64(x)
                W[k, j] = _sgd_step(x, z + G1[k, j], inv_n, decay, lr)
        else:
            for j in range(n):
                x = W[k, j]
                s += np.float64(x) * np.float64(x)
                W[k, j] = _sgd_step(x, z + z, inv_n, decay, lr)
    if decay > 0:
        sq[0] += s


def optimizer_kernel(scalars, touched_rows=False):
    """(address, signature key) of optimizer_row for update_share (1-D parameter and
    moment arrays and scalars of scalars' dtype: update_share's step scalars, and
    a float64 sq), then those of sgd_touched_rows (2-D W and gradients, compiled
    only where touched_rows: plain SGD with L2 on a sparse input, the batch split
    between two chunks; else 0 and -1, which call_at never calls)."""
    x = scalars[0]
    row = native.address(optimizer_row, (scalars,) * 5 + (np.int64(0),) + (x,) * 9
                         + (True, np.zeros(1)))
    rows = (0, -1)
    if touched_rows:
        W = scalars[:1].reshape(1, 1)
        t = np.zeros(1, dtype=np.bool_)
        rows = native.address(sgd_touched_rows, (W, W, W, t, t, np.int64(0), np.int64(0), x, x,
                                                 x, np.zeros(1)))
    return np.array(row + rows, dtype=np.int64)


@njit(cache=True, error_model="numpy")
def all_touched(touched, k):
    """Whether every chunk's sparse weight gradient wrote row k."""
    for c in range(touched.shape[0]):
        if not touched[c, k]:
            return False
    return True


@njit(cache=True, error_model="numpy")
def add_into(a, b):
    """a += b (1-D)."""
    for j in range(a.shape[0]):
        a[j] += b[j]


# Called only through its address from train_epoch, like chunk_forward_backward.
@njit(cache=True, error_model="numpy", no_cpython_wrapper=True, no_cfunc_wrapper=True)
def update_share(t, Ws, bs, dWs, dbs, sparse, touched, opt, scalars, Ms, Vs, mbs, vbs, sq_parts,
                 ofn, cuts):
    """Apply the summed partial gradients to chunk t's share (one of
    sq_parts.shape[0]) of all weight rows (every layer's W rows, then its bias as
    one more row): the rows whose first parameter is in the chunk's equal share of
    all parameters. Writes the share's sum of squared weights before the update into
    sq_parts[t] when decay > 0 (the L2 term of the loss). scalars holds
    (1/B, alpha/B, lr, momentum, beta_1, beta_2, 1 - beta_1, 1 - beta_2, epsilon)
    in the parameters' dtype; optimizer_row says how they are used. ofn holds
    optimizer_row's (address, signature key) for 1-D arrays and scalars of that dtype,
    then sgd_touched_rows' (optimizer_kernel): called through them, their loops are
    not compiled again inside this function (0.4 s of a cold start each of
    optimizer_row's two call sites). ofn is None
    for plain SGD without L2 (the caller knows): numba then drops every other
    optimiser's branches (each `if ofn is None`) before compiling, and compiles
    neither them nor optimizer_row for a process that only trains with plain SGD.

    With the first layer split by input columns (cuts not None: see
    chunk_partial_forward), chunk t first updates its own rows of W_1 (cuts[t, 0] ..
    cuts[t + 1, 0] - 1 and cuts[t, 1] .. cuts[t + 1, 1] - 1) from their whole
    gradient in dWs[0][0] (chunk_layer1_grad's), and the shares are of all other
    rows (b_1's and every later layer's).

    Plain SGD without L2 takes the short path W -= (lr / B) * sum, and with a
    sparse input skips rows of W_1 no chunk touched (their gradient is zero);
    every other optimiser updates every row (velocities decay, L2 shrinks). For
    one or two chunks that short path over W_1 has a loop of its own (the same
    sums), which LLVM vectorises: paired epochs on 2 threads, seed002 0.925 and
    0.80 (median ratios, two orders of 12 pairs), seed000 0.86 and 0.92 (16 pairs);
    one thread, seed002 0.91-1.03. SGD with L2 on a sparse input and two chunks
    updates W_1 through sgd_touched_rows (ofn[2:]), which reads only the gradient
    rows each chunk wrote."""
    inv_n, decay, lr, mu, b1, b2, c1, c2, eps = (scalars[0], scalars[1], scalars[2], scalars[3],
                                                 scalars[4], scalars[5], scalars[6], scalars[7],
                                                 scalars[8])
    n_chunks = sq_parts.shape[0]
    L = len(Ws)
    zero = decay - decay  # biases have no L2 term; a literal 0 would be int64
    lr_b = lr * inv_n
    # The optimiser calls add their rows' sums of squares into it.
    sq_parts[t] = 0.0
    sq = sq_parts[t:t + 1]
    ok = True
    own0 = False
    if cuts is not None:
        own0 = True
        W1 = Ws[0]
        G1 = dWs[0][0]
        n1 = W1.shape[1]
        W1f, G1f = W1.reshape(W1.size), G1.reshape(G1.size)
        for part in range(2):
            a, e = cuts[t, part], cuts[t + 1, part]
            if ofn is None:
                for k in range(a, e):
                    if touched[0, k]:
                        for j in range(n1):
                            W1[k, j] -= lr_b * G1[k, j]
            elif e > a:
                # A row no nonzero reached holds another batch's numbers.
                for k in range(a, e):
                    if not touched[0, k]:
                        for j in range(n1):
                            G1[k, j] = zero
                ok &= call_at(ofn, (W1f[a * n1:e * n1], G1f[a * n1:e * n1],
                                    G1f[a * n1:e * n1],
                                    Ms[0].reshape(G1.size)[a * n1:e * n1],
                                    Vs[0].reshape(G1.size)[a * n1:e * n1], opt, inv_n,
                                    decay, lr, mu, b1, b2, c1, c2, eps, False, sq))
    # Shares of equal numbers of parameters, not rows: rows are as wide as their
    # layer (the estimator's W_2 rows hold 10, W_1's 100).
    total = 0
    for l in range(L):
        total += ((0 if own0 and l == 0 else Ws[l].shape[0]) + 1) * Ws[l].shape[1]
    lo = t * total // n_chunks
    hi = (t + 1) * total // n_chunks
    base = 0
    for l in range(L):
        W = Ws[l]
        dW = dWs[l]
        n_in, n_out = W.shape
        # Layer 0's weight rows are no one's share where each chunk updated its own.
        off = n_in if own0 and l == 0 else 0
        rows = n_in + 1 - off
        # The rows whose first parameter is in lo..hi-1.
        k0 = min(max(-((base - lo) // n_out), 0), rows) + off
        k1 = min(max(-((base - hi) // n_out), 0), rows) + off
        kw1 = min(k1, n_in)
        if ofn is None and l == 0 and sparse and n_chunks <= 2:
            # The general loop below for the commonest case, the same sums: with
            # the chunks' gradients as views made once, each row's loop vectorises
            # (the general one took about twice as long: seed002's W_1, one chunk,
            # 4.0-6.8 against 1.8-2.9 microseconds a batch).
            G0 = dW[0]
            G1 = dW[n_chunks - 1]
            for k in range(k0, kw1):
                t1 = n_chunks == 2 and touched[1, k]
                if touched[0, k]:
                    if t1:
                        for j in range(n_out):
                            W[k, j] -= lr_b * (G0[k, j] + G1[k, j])
                    else:
                        for j in range(n_out):
                            W[k, j] -= lr_b * G0[k, j]
                elif t1:
                    for j in range(n_out):
                        W[k, j] -= lr_b * G1[k, j]
            kw1 = k0        # done: the general loop below has no rows left
        size = n_in * n_out
        Wf = W.reshape(size)
        two = False
        if ofn is not None:
            two = n_chunks == 2
        if two and l == 0 and sparse and opt == SGD:
            # SGD with L2: its own loop over the share's rows of W_1, each chunk's
            # untouched rows neither zeroed nor read (sgd_touched_rows).
            if kw1 > k0:
                ok &= call_at(ofn[2:], (W, dW[0], dW[1], touched[0], touched[1], k0, kw1,
                                        inv_n, decay, lr, sq))
            kw1 = k0
        elif two and l == 0 and sparse:
            # The optimiser adds the two chunks' gradients as it reads them (a pass
            # over dW[0] less; paired estimator epochs, 2 threads: SGD+L2 0.976 and
            # 0.93, Adam+L2 1.00-1.01 and 0.96-1.00; the same weights); a row a chunk
            # did not touch holds another batch's numbers, so it is zeroed first.
            for k in range(k0, kw1):
                for c in range(2):
                    if not touched[c, k]:
                        for j in range(n_out):
                            dW[c, k, j] = zero
        k = kw1 if two else k0
        while k < kw1:
            # A run of rows every chunk wrote (all of a dense input's W_1 and of the
            # hidden layers' W; the split input's dense columns) is summed into
            # dW[0] by one long loop per chunk (one a row cost an Adam+L2 estimator
            # epoch about 6%); the same sums, in chunk order.
            e = k
            while e < kw1 and (not (l == 0 and sparse) or all_touched(touched, e)):
                e += 1
            if e > k:
                a, z = k * n_out, e * n_out
                G = dW[0].reshape(size)
                for c in range(1, n_chunks):
                    add_into(G[a:z], dW[c].reshape(size)[a:z])
                if ofn is None:
                    for j in range(a, z):
                        Wf[j] -= lr_b * G[j]
                k = e
                continue
            # Only chunks that touched row k wrote it; the rest are zero.
            first = -1
            for c in range(n_chunks):
                if touched[c, k]:
                    if first < 0:
                        first = c
                    else:
                        for j in range(n_out):
                            dW[first, k, j] += dW[c, k, j]
            if ofn is None:
                if first >= 0:
                    for j in range(n_out):
                        W[k, j] -= lr_b * dW[first, k, j]
            elif first != 0:
                # The optimiser below reads the summed gradient from dW[0].
                for j in range(n_out):
                    dW[0, k, j] = dW[first, k, j] if first > 0 else zero
            k += 1
        if ofn is not None and kw1 > k0:
            # The share's rows are contiguous: one long loop vectorises better than
            # one call per row of n_out. Moments an optimiser does not use are
            # never read or written.
            a = k0 * n_out
            e = kw1 * n_out
            ok &= call_at(ofn, (Wf[a:e], dW[0].reshape(size)[a:e],
                                dW[n_chunks - 1].reshape(size)[a:e], Ms[l].reshape(size)[a:e],
                                Vs[l].reshape(size)[a:e], opt, inv_n, decay, lr, mu, b1, b2, c1,
                                c2, eps, two, sq))
        if k0 <= n_in < k1:  # the share includes the bias row
            db = dbs[l]
            b = bs[l]
            for c in range(1, n_chunks):
                for j in range(n_out):
                    db[0, j] += db[c, j]
            if ofn is None:
                for j in range(n_out):
                    b[j] -= lr_b * db[0, j]
            else:
                ok &= call_at(ofn, (b, db[0], db[0], mbs[l], vbs[l], opt, inv_n, zero, lr, mu, b1,
                                    b2, c1, c2, eps, False, sq))
        base += rows * n_out
    if not ok:
        raise RuntimeError("update_share: optimizer_row's ofn was compiled for other "
                           "argument types")


KERNEL_FAILED, WRONG_SIGNATURE = -3, -2  # train_epoch's `bad` when a packed call fails


# chunk_batches' results: out[TOTAL], out[CORRECT], out[BAD], out[DONE].
TOTAL, CORRECT, BAD, DONE = range(4)


@njit(error_model="numpy", inline="always")
def _set_up_batch(b, n, batch_size, lr, opt, hyper, step, batch, scalars):
    """Batch b's bounds into batch and its step scalars (the parameters' dtype,
    rounded once from float64: a float64 scalar would promote the float32 update
    to float64) into scalars; Adam's step counter is not moved here."""
    start = b * batch_size
    nb = min(start + batch_size, n) - start
    batch[0] = start
    batch[1] = nb
    lr_t = lr
    if opt == ADAM:
        k = step[0] + 1
        lr_t = lr * np.sqrt(1.0 - hyper[2] ** k) / (1.0 - hyper[1] ** k)
    scalars[0] = 1.0 / nb
    scalars[1] = hyper[4] / nb
    scalars[2] = lr_t
    scalars[3] = hyper[0]
    scalars[4] = hyper[1]
    scalars[5] = hyper[2]
    scalars[6] = 1.0 - hyper[1]
    scalars[7] = 1.0 - hyper[2]
    scalars[8] = hyper[3]


@njit(error_model="numpy", inline="always")
def _run(tramp, block, k, lo, hi, called):
    """The packed kernel for chunks lo..hi-1 (their statuses into called[k]), with
    subnormals flushed."""
    fp = flush_subnormals()
    for c in range(lo, hi):
        called[k, c] = call_packed(tramp, block, c)
    restore_fp_state(fp)


# Rows of called: each chunk's status from each of its kernels.
CALLED_FB, CALLED_UP, CALLED_PARTIAL, CALLED_GRAD = range(4)


# Called only through its address (from run_chunks), like the kernels it calls:
# compiled inside the parallel loop, it cost cold starts 0.3-8 s more (three).
@njit(cache=True, error_model="numpy", nogil=True, no_cpython_wrapper=True,
      no_cfunc_wrapper=True)
def chunk_batches(t, fb_tramp, fb_block, up_tramp, up_block, pf_tramp, pf_block, g_tramp,
                  g_block, ctl, n, batch_size, b0, b1, lr, opt, hyper, step, interrupt, batch,
                  scalars, loss_parts, correct_parts, sq_parts, called, out):
    """Chunk t's part of train_epoch: batches b0..b1-1, every step of each, with
    subnormals flushed inside the kernels. The chunks that do chunk 0's work (the
    leader) set up each batch and keep the totals, in the caller's floating-point
    state; every chunk reads the same loss_parts and called after a barrier, so all
    of them stop at the same batch. called[k, c] says whether chunk c's kernel k
    (CALLED_*) returned normally: a row each, so that no chunk writes a cell
    another may still be reading (a failed update read as a failed forward would
    stop one chunk and leave the others waiting).

    Each batch: the leader sets it up; barrier; forward; barrier; every chunk reads
    the losses and statuses; update; barrier (the next batch's forward reads the
    weights). With the first layer split by input columns (pf_tramp not 0: see
    chunk_partial_forward), the forward is two steps with a barrier between them
    (chunk_partial_forward, then chunk_forward_backward), and the update starts
    with chunk_layer1_grad (g_tramp).
    """
    n_chunks = called.shape[1]
    mode = check_in(ctl, n_chunks)
    if mode == ALONE:
        return
    lo, hi, workers = t, t + 1, n_chunks
    if mode == ALL:
        lo, hi, workers = 0, n_chunks, 1
    leader = lo == 0
    split = pf_tramp != 0
    total = 0.0
    correct = 0
    gen = 0
    for b in range(b0, b1):
        if leader:
            if interrupt[0] != 0:
                ctl[STOP] = 1
                out[DONE] = b
            else:
                _set_up_batch(b, n, batch_size, lr, opt, hyper, step, batch, scalars)
        gen = barrier(ctl, workers, gen)
        if ctl[STOP] != 0:
            break
        if split:
            _run(pf_tramp, pf_block, CALLED_PARTIAL, lo, hi, called)
            gen = barrier(ctl, workers, gen)
        _run(fb_tramp, fb_block, CALLED_FB, lo, hi, called)
        gen = barrier(ctl, workers, gen)
        failed = False
        batch_loss = 0.0
        batch_correct = 0
        for c in range(n_chunks):
            failed |= not called[CALLED_FB, c]
            if split:
                failed |= not called[CALLED_PARTIAL, c]
            batch_loss += loss_parts[c]
            batch_correct += correct_parts[c]
        if failed or not np.isfinite(batch_loss):
            # A batch whose loss is NaN or infinite is not applied.
            if leader:
                out[BAD] = KERNEL_FAILED if failed else b
                out[DONE] = b
            break
        if split:
            _run(g_tramp, g_block, CALLED_GRAD, lo, hi, called)
        _run(up_tramp, up_block, CALLED_UP, lo, hi, called)
        gen = barrier(ctl, workers, gen)
        for c in range(n_chunks):
            failed |= not called[CALLED_UP, c]
            if split:
                failed |= not called[CALLED_GRAD, c]
        if failed:
            if leader:
                out[BAD] = KERNEL_FAILED
                out[DONE] = b
            break
        if leader:
            if opt == ADAM:
                step[0] += 1
            total += batch_loss
            correct += batch_correct
            if hyper[4] > 0:
                sq = 0.0
                for c in range(n_chunks):
                    sq += sq_parts[c]
                total += 0.5 * hyper[4] * sq
    if leader:
        out[TOTAL] = total
        out[CORRECT] = correct


@njit(cache=True, error_model="numpy", nogil=True, parallel=PRANGE_ONLY)
def run_chunks(tramp, block, ran):
    """The packed call (tramp, block) for every chunk t, in parallel; ran[t] =
    whether chunk t's call returned normally."""
    for t in prange(ran.shape[0]):
        ran[t] = call_packed(tramp, block, t)


def batches_kernel(forward_args, update_extra, called):
    """chunk_batches' (address, signature key) for the arrays train_epoch passes it
    (the types of the forward and update workspaces it reads: see train_epoch)."""
    fa = forward_args
    i, x = np.int64(0), np.float64(0)
    ints = np.zeros(1, dtype=np.int64)
    return native.address(chunk_batches, (
        i, i, i, i, i, i, i, i, i, ints, i, i, i, i, x, i, np.zeros(1), ints, ints, fa[FB_BATCH],
        update_extra[0], fa[FB_LOSS_PARTS], fa[FB_CORRECT_PARTS], update_extra[5], called,
        np.zeros(1)))


# Where chunk_forward_backward's arguments after t (forward_args) hold the arrays
# that train_epoch and update_share use too.
FB_WS, FB_BS, FB_SPARSE, FB_ORDER, FB_BATCH = 0, 1, 6, 11, 12
FB_DWS, FB_DBS, FB_TOUCHED, FB_LOSS_PARTS, FB_CORRECT_PARTS = 17, 18, 19, 25, 26
FB_CUTS = 30


@njit(cache=True, error_model="numpy", nogil=True)
def train_epoch(forward_args, update_extra, kernels, batch_size, b0, b1, lr, opt, hyper, step,
                interrupt, called, ctl):
    """Train batches b0..b1-1 of an epoch; batch b is rows
    order[b*batch_size:(b+1)*batch_size] (the last may be partial).

    forward_args are chunk_forward_backward's arguments after the chunk number;
    update_share's are built here from them and update_extra = (scalars, Ms, Vs,
    mbs, vbs, sq_parts, ofn) as (Ws, bs, dWs, dbs, sparse, touched, opt, scalars,
    Ms, Vs, mbs, vbs, sq_parts, ofn), so that no array reaches this function twice
    (numba's wrapper unboxes every array it is passed, about 10 ms of a cold start
    each; a register_jitable builder shared with the Engine cost 0.6 s more).
    kernels holds the (address, signature key) of both kernels, compiled for
    exactly those argument types (fastmlp.kernels.native.address), of
    chunk_batches (batches_kernel), which runs them batch after batch, and of
    chunk_partial_forward and chunk_layer1_grad (compiled for forward_args too)
    where the first layer is split by input columns (else (0, -1) each). Of the
    arrays in those tuples, train_epoch writes order's batch bounds into batch
    (int64, 2: start and size) and the step's scalars (the parameters' dtype, 9),
    and reads the loss_parts, correct_parts and sq_parts (one per chunk) that the
    kernels fill;
    called (bool, (4, n_chunks)) and ctl (int64, CTL_SIZE: the chunks' barrier
    counters, zeroed here) are workspaces. ctl is the caller's, not allocated here:
    numba frees a local array after its last use in the function, and its last use
    here would be packing it, before the chunks run (pack_call's block holds no
    reference). Allocated here, it was freed memory by the time the chunks counted
    in it, and a reuse of that memory during the epoch could hang every chunk at a
    barrier (all three threads waiting, twice in about 1,100 runs with 3 or 4
    threads on 2 cores) or crash.

    opt is the optimiser's code; hyper holds (momentum, beta_1, beta_2, epsilon,
    alpha) as float64; step[0] counts Adam's steps across calls. The summed loss
    includes the L2 term alpha/2 * sum W^2 per batch, as scikit-learn reports it.

    Returns (summed loss, number correct, bad, done): loss and accuracy from each
    batch's forward pass before its update; bad is the first batch whose loss is NaN
    or infinite (its update is not applied and the call stops there), else -1, or
    WRONG_SIGNATURE / KERNEL_FAILED when a kernel could not be called / reported an
    error; done is the number of the first batch not trained: b1, or less when
    interrupt[0] was set (by Ctrl-C; checked before each batch; nogil lets the
    watcher thread run). The kernels of a batch that failed or gave a NaN loss may
    have run for some chunks: the caller stops training there.
    """
    fa = forward_args
    order = fa[FB_ORDER]
    loss_parts, correct_parts = fa[FB_LOSS_PARTS], fa[FB_CORRECT_PARTS]
    scalars, sq_parts = update_extra[0], update_extra[5]
    # The Engine builds this tuple too, to compile update_share for it; a different
    # order is caught by the signature key (WRONG_SIGNATURE).
    update_args = (fa[FB_WS], fa[FB_BS], fa[FB_DWS], fa[FB_DBS], fa[FB_SPARSE], fa[FB_TOUCHED],
                   opt, scalars, update_extra[1], update_extra[2], update_extra[3],
                   update_extra[4], sq_parts, update_extra[6], fa[FB_CUTS])
    n = order.shape[0]
    # The kernels' long argument lists are packed once; the parallel region passes
    # only the packed blocks and the chunk number (see fastmlp.kernels.native).
    fb = pack_call(kernels[0], kernels[1], forward_args)
    up = pack_call(kernels[2], kernels[3], update_args)
    # The first layer split by input columns: its two kernels (else addresses 0).
    pf = pack_call(kernels[6], kernels[7], forward_args)
    g = pack_call(kernels[8], kernels[9], forward_args)
    for i in range(ctl.shape[0]):
        ctl[i] = 0
    # Read after the chunks have run (below), so numba keeps it until then.
    out = np.zeros(4)
    out[BAD] = -1
    out[DONE] = b1
    cb = pack_call(kernels[4], kernels[5], (
        fb[0], fb[1], up[0], up[1], pf[0], pf[1], g[0], g[1], ctl, n, batch_size, b0, b1, lr,
        opt, hyper, step, interrupt, fa[FB_BATCH], scalars, loss_parts, correct_parts, sq_parts,
        called, out))
    split_missing = kernels[6] != 0 and (pf[0] == 0 or g[0] == 0)
    if fb[0] == 0 or up[0] == 0 or cb[0] == 0 or split_missing:
        return 0.0, 0, WRONG_SIGNATURE, b0
    ran = np.zeros(called.shape[1], dtype=np.bool_)
    run_chunks(cb[0], cb[1], ran)
    for t in range(ran.shape[0]):
        if not ran[t]:
            return out[TOTAL], np.int64(out[CORRECT]), KERNEL_FAILED, np.int64(out[DONE])
    return out[TOTAL], np.int64(out[CORRECT]), np.int64(out[BAD]), np.int64(out[DONE])

