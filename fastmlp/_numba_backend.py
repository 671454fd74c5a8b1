"""The numba backend: owns the workspaces and calls fastmlp.kernels."""
import contextlib
import mmap

import numpy as np

from . import activations, losses
from .kernels import dense, epoch, native, sync

# Below this fraction of nonzeros (in the rows sample_step picks) the first layer
# reads the input as CSR.
SPARSE_DENSITY = 0.5


def _codes(model):
    return np.array([activations.CODES[a] for a in model.activations], dtype=np.int64)


def _clip_bounds(dtype):
    f = np.finfo(dtype)
    return dtype.type(f.tiny), dtype.type(1) - dtype.type(f.epsneg)


def _contiguous_params(model):
    # The kernels update the model's own arrays in place.
    model.weights = [np.ascontiguousarray(W, dtype=model.dtype) for W in model.weights]
    model.biases = [np.ascontiguousarray(b, dtype=model.dtype) for b in model.biases]


@contextlib.contextmanager
def num_threads(threads):
    """Run with `threads` numba threads, restoring the previous count afterwards."""
    import numba
    if threads is None:
        yield numba.get_num_threads()
        return
    limit = numba.config.NUMBA_NUM_THREADS
    if threads > limit:
        raise ValueError(f"threads: at most {limit} (NUMBA_NUM_THREADS, the size of numba's "
                         f"thread pool, fixed at start-up), got {threads}")
    before = numba.get_num_threads()
    numba.set_num_threads(int(threads))
    try:
        yield int(threads)
    finally:
        numba.set_num_threads(before)


_NO_INDICES = np.zeros(0, dtype=np.int32)
def _no_order(kind):
    """csr_rows' order for dense columns that stay ascending, of the type the
    split's fill passes for a dense array of type kind (see split_csr), so that
    every pass over the rows shares one compiled csr_rows (a parallel function:
    each more cost a cold start 2.4 s)."""
    return np.zeros(0, dtype=np.uint8 if dense.HAS_VBMI and kind == np.uint8 else np.int64)

# Arrays at least this large that the split writes once (a fit's fresh copy of the
# training set's CSR and dense columns) are asked for 2 MB pages where the OS has
# them (Linux's transparent huge pages in madvise mode): each 4 KB page's first
# write is a fault. Splitting MNIST's training set (27.6 MB of them) made 1,775
# minor faults against 786 (the rest are smaller arrays'), and took 18.6-19.8 ms
# against 15.0-17.5 (medians of 5).
HUGE_PAGE_BYTES = 2 << 20


def _empty(n, dtype):
    """np.empty(n, dtype), on 2 MB pages where the OS gives them (see
    HUGE_PAGE_BYTES); its memory is freed with the array."""
    dtype = np.dtype(dtype)
    size = n * dtype.itemsize
    if size < HUGE_PAGE_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(n, dtype=dtype)
    pages = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        pages.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass    # not offered: 4 KB pages, as np.empty's
    return np.frombuffer(pages, dtype=dtype, count=n)


class NonFiniteInput(ValueError):
    """The training input holds a NaN or an infinity (Engine.prepare with
    check_finite)."""


def column_runs(cols):
    """The runs (s, n, w) of adjacent columns in cols (int64, (n_runs, 3)): cols[w:w+n]
    == s, s+1, ..., s+n-1, each run as long as it goes; what csr_rows takes to fill
    the dense array (fastmlp.kernels.dense.put_runs)."""
    cols = np.asarray(cols, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, np.diff(cols) != 1]) if len(cols) else \
        np.zeros(0, dtype=np.int64)
    lengths = np.diff(np.r_[starts, len(cols)])
    return np.ascontiguousarray(np.stack([cols[starts], lengths, starts], axis=1)
                                .astype(np.int64).reshape(-1, 3))


def to_csr(X, check_finite=False):
    """CSR arrays (indptr int64, indices int32, values) of a dense 2-D array: two
    compiled passes over the rows (count, fill), 5-10x faster than np.nonzero."""
    return split_csr(X, np.arange(X.shape[1], dtype=np.int64), 0, check_finite=check_finite)[1:]


def split_csr(X, perm, n_dense, levels=None, check_finite=False):
    """(dense, indptr, indices, values): X's columns in the order perm, the first
    n_dense of them as a dense C-contiguous array (n, n_dense), the rest as CSR
    arrays whose column indices are positions in perm, in X's column order within
    a row (ascending where perm lists those columns ascending, as dense_columns
    does). Two compiled passes over the rows (count, fill). With levels (a divisor
    d) the dense array is uint8, each value's 8-bit level c with c / d == the value
    exactly (see levels_of), unless some value of those columns is not one: then a
    third pass fills it with the values, in X's dtype. With check_finite, raises NonFiniteInput
    where X holds a NaN or an infinity (found by the counting pass, which reads
    every value anyway; NaN counts as a nonzero otherwise)."""
    X = np.ascontiguousarray(X)
    perm = np.asarray(perm, dtype=np.int64)
    where = np.empty(X.shape[1], dtype=np.int32)
    where[perm] = np.arange(X.shape[1])
    n_dense = int(n_dense)
    # The dense columns are put in ascending order, by runs of adjacent columns,
    # then, where perm lists them in another order, each row is reordered in place
    # (csr_rows' order): a perm whose runs are short (the dense columns' groups,
    # Engine.prepare) filled MNIST's rows by runs of one or two columns in 40 ms
    # against 17.
    ascending = np.sort(perm[:n_dense])
    runs = column_runs(ascending)
    order = np.searchsorted(ascending, perm[:n_dense])
    if np.array_equal(order, np.arange(n_dense)):
        order = order[:0]
    d = X.dtype.type(1 if levels is None else levels)
    kind = X.dtype if levels is None else np.uint8
    counts = _counted_rows(X, where, runs, kind, d, check_finite)
    indptr = np.zeros(X.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = _empty(indptr[-1], np.int32)
    values = _empty(indptr[-1], X.dtype)
    Xd = _empty(X.shape[0] * n_dense, kind).reshape(X.shape[0], n_dense)
    dense.csr_rows(X, where, runs, counts, indptr, indices, values, Xd, d, True,
                   *_reorder(order, kind))
    if levels is not None and counts.any():
        Xd = _empty(X.shape[0] * n_dense, X.dtype).reshape(X.shape[0], n_dense)
        dense.csr_rows(X, where, runs, counts, indptr, indices, values, Xd, d, True,
                       *_reorder(order, X.dtype))
    return Xd, indptr, indices, values


def _reorder(order, kind):
    """csr_rows' (order, scratch) for a dense array of type kind whose rows go from
    ascending order to order (empty: they stay): for 8-bit levels, 256 columns or
    fewer, where the CPU has AVX-512 VBMI, order as a uint8 table padded to a
    multiple of 64 for the byte permutes (dense.reorder_row) and no scratch; else
    order itself and a scratch row for each thread numba may run."""
    import numba
    none = np.zeros((0, 0), dtype=kind)
    n = len(order)
    if n == 0:
        return _no_order(kind), none
    if dense.HAS_VBMI and kind == np.uint8 and n <= 256:
        table = np.zeros(-(-n // 64) * 64, dtype=np.uint8)
        table[:n] = order
        return table, none
    return order, np.empty((numba.config.NUMBA_NUM_THREADS, n), dtype=kind)


def _counted_rows(X, where, runs, kind, d, check_finite):
    """csr_rows' counting pass (a dense array of type kind, divisor d): each row's
    nonzeros in the CSR's columns. A row that holds a NaN or an infinity (which
    the pass marks -1 - c) raises NonFiniteInput with check_finite, else counts
    its c."""
    counts = np.empty(X.shape[0], dtype=np.int64)
    dense.csr_rows(X, where, runs, counts, counts, _NO_INDICES, np.zeros(0, dtype=X.dtype),
                   np.zeros((0, 0), dtype=kind), d, False, _no_order(kind),
                   np.zeros((0, 0), dtype=kind))
    bad = counts < 0
    if bad.any():
        if check_finite:
            raise NonFiniteInput("X: contains NaN or infinity")
        counts[bad] = -1 - counts[bad]
    return counts


def check_finite_input(X):
    """Raise NonFiniteInput where X (2-D, C-contiguous, float) holds a NaN or an
    infinity: csr_rows' counting pass with every column dense (it counts nothing
    then), parallel, without the boolean array np.isfinite would make."""
    m = X.shape[1]
    _counted_rows(X, np.arange(m, dtype=np.int32), column_runs(np.arange(m)), X.dtype,
                  X.dtype.type(1), True)


# Divisors d tried, in order, for inputs whose values are all 8-bit levels c / d:
# images scaled to [0, 1] by 255, and raw 0-255 intensities (none: never levels).
LEVEL_DIVISORS = (255, 1)
# levels_of looks at every LEVEL_SAMPLE_STEP-th row of the density sample (MNIST:
# 512 rows, 0.3 ms; split_csr checks every value of the dense columns anyway).
LEVEL_SAMPLE_STEP = 8


def levels_of(X):
    """A divisor d from LEVEL_DIVISORS such that every value of X's sampled rows
    (every LEVEL_SAMPLE_STEP-th of sample_step's) is c / d, c an integer 0..255,
    computed in X's float type; else None. The split then keeps the dense columns
    as those uint8 levels, a quarter of the bytes that every epoch reads (MNIST as
    X / 255: its 228 dense columns, 14 MB instead of 55, which fits in L3), and the
    epoch turns each gathered level back into the exact same value."""
    if X.dtype not in (np.float32, np.float64):
        return None
    # split_csr's own compiled fill (every column dense) checks the sample: no
    # function of its own to compile (0.3 s of a cold start).
    sample = np.ascontiguousarray(X[::sample_step(X) * LEVEL_SAMPLE_STEP])
    n, m = sample.shape
    bad = np.empty(n, dtype=np.int64)
    for d in LEVEL_DIVISORS:
        dense.csr_rows(sample, np.arange(m, dtype=np.int32), column_runs(np.arange(m)), bad,
                       np.zeros(n + 1, dtype=np.int64), _NO_INDICES, np.zeros(0, dtype=X.dtype),
                       np.empty((n, m), dtype=np.uint8), X.dtype.type(d), True,
                       _no_order(np.uint8),
                       np.zeros((0, 0), dtype=np.uint8))
        if not bad.any():
            return d
    return None


# The most rows between two chunks' rows of the batch-row workspaces (see
# Engine._allocate): a chunk's share up to this many, so that a large batch's
# workspaces do not double (MNIST's estimator batches of 200 on 2 threads: 100).
MAX_CHUNK_GAP = 128

# A sparse input's columns nonzero in at least this fraction of rows (MNIST's
# middle, about 230 of 784 pixels covering 81% of its nonzeros) go through the
# first layer's dense products; the rest through the CSR kernels. 30% against
# 40%, 50% and 20% measured in whole epochs (README, Speed, "A fifth session").
DENSE_COLUMN_DENSITY = 0.3
# Fewer dense columns than this are left in the CSR.
MIN_DENSE_COLUMNS = 16
# At least this many rows (evenly spaced) are sampled to decide whether an input
# is sparse and which of its columns are dense.
DENSITY_SAMPLE_ROWS = 4096


def sample_step(X):
    """k = max(1, len(X) // DENSITY_SAMPLE_ROWS): every k-th row is sampled, the same
    rows every time."""
    return max(1, X.shape[0] // DENSITY_SAMPLE_ROWS)


def sampled_column_counts(X):
    """(counts, rows): how many of X's sampled rows are nonzero in each column, and
    how many rows were sampled. One compiled pass over the rows in place: NumPy's
    count_nonzero over the strided sample took 6 ms of MNIST's prepare, and the
    per-column count 3.5 ms more."""
    counts = np.zeros(X.shape[1], dtype=np.int64)
    step = sample_step(X)
    dense.column_nonzeros(X, step, counts)
    return counts, -(-X.shape[0] // step)


def dense_columns(counts, rows, density=DENSE_COLUMN_DENSITY):
    """perm, n_dense from the nonzeros per column of `rows` rows: the columns
    nonzero in at least `density` of them, ascending, then the other columns,
    ascending; n_dense is how many of the first kind there are."""
    dense_col = counts >= density * rows
    perm = np.concatenate([np.flatnonzero(dense_col), np.flatnonzero(~dense_col)])
    return perm.astype(np.int64), int(dense_col.sum())


# The dense columns' groups (grouped_columns) are chosen from every
# GROUP_SAMPLE_STEP-th row of the density sample (MNIST: 1,072 rows, 0.7 ms).
GROUP_SAMPLE_STEP = 4


# Whether a sparse input's first layer is split between the threads by input
# columns (each thread owns its rows of W_1, and its optimiser moments) rather
# than by batch rows, for the optimisers that keep moments (momentum, Nesterov,
# Adam): see fastmlp.kernels.epoch.chunk_partial_forward and the README, Speed
# (for SGD, with or without L2, it measured about 3% slower in quiet minutes).
SPLIT_FEATURES = True


def dense_column_cuts(n_dense, T):
    """Chunk t's share of the n_dense dense columns: t * n_dense // T onwards."""
    return np.array([t * n_dense // T for t in range(T + 1)], dtype=np.int64)


def grouped_columns(X, cols, starts):
    """The dense columns cols (ascending) reordered into groups of four that are
    often zero together (dense.column_groups on every GROUP_SAMPLE_STEP-th row of
    the density sample), group after group, within each run starts[s] ..
    starts[s + 1] - 1 of them (each chunk's own, for a first layer split by input
    columns): the products that skip each row's all-zero groups take four
    adjacent columns at a time (fastmlp.kernels.gemm.group_rows). A run's smaller
    groups go last."""
    step = sample_step(X) * GROUP_SAMPLE_STEP
    bits = np.empty((len(cols), -(-(-(-X.shape[0] // step)) // 64)), dtype=np.uint64)
    dense.sample_bits(X, cols, step, bits)
    firsts = dense.group_starts(starts)
    members = np.empty((firsts[-1], 4), dtype=np.int64)
    sizes = np.empty(firsts[-1], dtype=np.int64)
    dense.column_groups(bits, starts, members, sizes)
    order = []
    for s in range(len(starts) - 1):
        groups = range(firsts[s], firsts[s + 1])
        for j in sorted(groups, key=lambda j: sizes[j] < 4):
            order.extend(starts[s] + members[j, :sizes[j]])
    return cols[np.array(order, dtype=np.int64)]


def feature_cuts(counts, n_dense, T):
    """cuts (T + 1, 2) for a first layer split by input columns between T chunks:
    chunk t owns the dense columns cuts[t, 0] .. cuts[t + 1, 0] - 1 (an equal share
    of the n_dense) and the CSR columns cuts[t, 1] .. cuts[t + 1, 1] - 1, whose
    nonzeros (counts: per column, in W_1's row order, from the sampled rows) are
    shared as evenly as whole columns allow."""
    n_in = len(counts)
    cuts = np.empty((T + 1, 2), dtype=np.int64)
    cuts[:, 0] = dense_column_cuts(n_dense, T)
    csum = np.cumsum(counts[n_dense:])
    total = csum[-1] if len(csum) else 0
    for t in range(T + 1):
        cuts[t, 1] = n_dense + int(np.searchsorted(csum, t * total / T, side="left"))
    cuts[0, 1], cuts[T, 1] = n_dense, n_in
    cuts[:, 1] = np.maximum.accumulate(np.minimum(cuts[:, 1], n_in))
    return cuts


def splits_columns(model):
    """Whether a sparse first layer of this model takes its dense columns through
    the dense products: where those are compiled tiles (a first layer at least
    one vector wide)."""
    return dense.TILES and model.layer_sizes[1] * np.dtype(model.dtype).itemsize >= \
        dense.FWD_MIN_BYTES


def _same(a, b):
    """Whether a and b are the same objects (tuples: element by element; numbers
    and flags: equal)."""
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, (bool, int, np.integer)):
        return type(a) is type(b) and a == b
    return a is b


_BLAS = []


def _blas_controller():
    """One threadpoolctl controller for the process, made after SciPy's BLAS is
    loaded: it knows the libraries loaded then, SciPy's BLAS (the one the compiled
    epoch calls) among them. threadpool_limits looks for them again on every call
    (0.6-2.9 ms a fit; a controller's limit, 0.02)."""
    if not _BLAS:
        import scipy.linalg.cython_blas  # noqa: F401
        from threadpoolctl import ThreadpoolController
        _BLAS.append(ThreadpoolController())
    return _BLAS[0]


class Engine:
    """Trains a model with the compiled epoch; workspaces are allocated once per
    (model, batch size, thread count) and reused across chunks and epochs."""

    def __init__(self, model, loss, batch_size, threads, optimizer=None):
        from .optimizers import Optimizer
        self.model, self.loss, self.batch_size, self.threads = model, loss, batch_size, threads
        self.optimizer = optimizer if optimizer is not None else Optimizer("sgd")
        self._ws_key = None
        # W_1's moments left in the workspaces by train_batches(keep_moments=True):
        # (the optimiser's array, its workspace), until release().
        self._kept = []
        # (the arguments, fns, ofn, kernels) of the last run (see _train_batches).
        self._kernels_for = None

    @contextlib.contextmanager
    def threads_context(self):
        # BLAS runs single-threaded inside the compiled epoch: each numba thread
        # calls it on its own rows, and nested thread pools would oversubscribe.
        # np.dot in compiled code calls SciPy's BLAS, a different library from
        # NumPy's; threadpoolctl only limits libraries already loaded, so load it
        # first (unlimited, 2 BLAS threads under each of 2 numba threads ran 60x
        # slower: 6k against 390k samples/s).
        with num_threads(self.threads), _blas_controller().limit(limits=1, user_api="blas"):
            yield

    def prepare(self, X, Y, check_finite=False):
        """Take the training set (X, Y) for the next runs of batches: a sparse X is
        split (the CSR, and its often-nonzero columns as a dense array), and the
        workspaces allocated where the shapes changed. With check_finite, raises
        NonFiniteInput where X holds a NaN or an infinity (a sparse X's split finds
        them as it counts its nonzeros, at no cost: scikit-learn's own check of
        MNIST's training set took 7.7 ms, a 12th of an epoch)."""
        import numba
        # Kept moments go back in the current row order before it can change.
        self.release()
        m = self.model
        _contiguous_params(m)
        # One-hot targets (a classifier's) are kept as each row's class: a batch's
        # targets are rows from all over Y, and MNIST's labels take 240 KB where
        # its one-hot rows take 2.4 MB (a cache miss each, about a tenth of a
        # thread's epoch outside the first layer's products: see the README, Speed).
        self.Y = Y
        if Y.ndim == 2 and Y.shape[1] == m.layer_sizes[-1] > 1:
            labels = np.empty(Y.shape[0], dtype=np.int32)
            if dense.one_hot_labels(Y, labels):
                self.Y = labels
        X = np.ascontiguousarray(X)
        # The divisor of the dense columns' 8-bit levels, where the split keeps them so.
        self.levels = m.dtype.type(1)
        # Both choices (CSR or not, which columns are dense) are made from evenly
        # spaced rows: counting the nonzeros of every row took 45 ms of 150 for
        # MNIST (np.count_nonzero over all of it 0.1 s).
        counts, rows = sampled_column_counts(X)
        T = numba.get_num_threads()
        self.sparse = bool(counts.sum() < SPARSE_DENSITY * rows * X.shape[1])
        # W_1's rows in the order of the split input's columns (None: as they are).
        self.perm = None
        if self.sparse:
            perm, n_dense = dense_columns(counts, rows) if splits_columns(m) else (None, 0)
            if n_dense >= MIN_DENSE_COLUMNS:
                if dense.uses_groups(m.weights[0]):
                    # The dense columns in groups that are often zero together.
                    perm = perm.copy()
                    perm[:n_dense] = grouped_columns(X, perm[:n_dense],
                                                     self._dense_cuts(n_dense, T))
                self.perm = perm
                levels = levels_of(X)
                self.X, self.indptr, self.indices, self.values = split_csr(
                    X, perm, n_dense, levels, check_finite)
                self.levels = m.dtype.type(levels if self.X.dtype == np.uint8 else 1)
            else:
                self.indptr, self.indices, self.values = to_csr(X, check_finite)
                self.X = np.zeros((1, 0), dtype=m.dtype)
        else:
            if check_finite:
                check_finite_input(X)
            self.X = X
            self.indptr = np.zeros(1, dtype=np.int64)
            self.indices = np.zeros(0, dtype=np.int32)
            self.values = np.zeros(0, dtype=m.dtype)
        # The sampled nonzeros of each column in W_1's row order, to share the
        # columns between chunks (see _cut_columns).
        self._column_counts = None
        if self.sparse:
            self._column_counts = counts[self.perm] if self.perm is not None else counts
        key = (T, tuple(m.layer_sizes), m.dtype, self.sparse, self.n_dense,
               self.splits_features(T), self._uses_groups())
        if key != self._ws_key:
            self._allocate(T)
            self._ws_key = key
        else:
            self._cut_columns(T)
            self._group_masks(T)

    def _group_masks(self, T):
        """groups for the kernels: which groups of the dense columns (each chunk's
        own, where the first layer is split by them) each row has a nonzero in, for
        the products that skip the others, and their workspaces (see _allocate);
        None where they are not used."""
        self.groups = None
        if self._uses_groups():
            starts = self._dense_cuts(self.n_dense, T)
            masks = np.empty((self.X.shape[0], -(-dense.group_starts(starts)[-1] // 64)),
                             dtype=np.uint64)
            dense.group_masks(self.X, starts, masks)
            self.groups = (masks,) + self._group_ws

    def _uses_groups(self):
        """Whether the dense columns' products skip each row's all-zero groups of
        columns (fastmlp.kernels.gemm.group_rows; dense.uses_groups)."""
        return self.n_dense > 0 and dense.uses_groups(self.model.weights[0])

    def _dense_cuts(self, n_dense, T):
        """Where each of T chunks' own run of the n_dense dense columns starts, and
        the last ends (feature_cuts' dense cuts): all of them one run unless the
        first layer is split by input columns."""
        if self.splits_features(T):
            return dense_column_cuts(n_dense, T)
        return np.array([0, n_dense], dtype=np.int64)

    def splits_features(self, T):
        """Whether the first layer is split between T chunks by input columns (see
        SPLIT_FEATURES)."""
        return (self.sparse and T >= 2 and SPLIT_FEATURES
                and self.optimizer.code != epoch.SGD)

    def _cut_columns(self, T):
        """For a first layer split by input columns between T chunks (else both
        None): cuts, which chunk owns which columns (feature_cuts), and cut_ptr,
        each row's nonzeros cut at those columns
        (fastmlp.kernels.dense.csr_column_cuts)."""
        self.cuts = self.cut_ptr = None
        if self.splits_features(T):
            self.cuts = feature_cuts(self._column_counts, self.n_dense, T)
            self.cut_ptr = np.empty((len(self.indptr) - 1) * T + 1, dtype=np.int64)
            dense.csr_column_cuts(self.indptr, self.indices,
                                  np.ascontiguousarray(self.cuts[:, 1]), self.cut_ptr)

    def _allocate(self, T):
        self._cut_columns(T)
        m, B = self.model, self.batch_size
        dt, sizes = m.dtype, m.layer_sizes
        n_in = sizes[0]
        # The dense batch is gathered for a dense input, and a sparse one's dense
        # columns; the rest is read as CSR.
        split = self.cuts is not None
        # With the batch split by rows, chunk t's rows of the batch-row workspaces
        # (A0, Yb, As, Ds) start gap * t rows further on (epoch.chunk_forward_backward
        # takes views from there), so that no chunk's rows lie next to another's.
        # Next to each other, the second chunk's gather of the dense columns took
        # 6.3-6.9 million cycles a thread and epoch (18-20 in the VM's slow state)
        # against 4.6-4.8 for the first's, whichever thread ran it, though either
        # half alone took the same (probably the first chunk's reads running on
        # into the lines the second then writes). Apart, both took 3.9-5.6, the
        # threads finished the forward and backward together and the batch loop
        # took 133-138 against 136-145 (10-epoch MNIST estimator fits, plain SGD,
        # 2 threads; README, Speed: "An eighth session"). The same weights.
        gap = min(-(-B // T), MAX_CHUNK_GAP) if T > 1 and not split else 0
        R = B + (T - 1) * gap
        if split:
            # Each chunk's own dense columns, for the whole batch (a row each).
            widest = int(np.diff(self.cuts[:, 0]).max())
            self.A0 = np.zeros((T, max(1, B * widest)), dtype=dt)
        elif self.sparse:
            self.A0 = np.zeros((R if self.n_dense else 1, self.n_dense), dtype=dt)
        else:
            self.A0 = np.zeros((R, n_in), dtype=dt)
        # W_1 and its moments, rows in the order perm, while the epoch runs.
        self.permuted = [np.zeros((n_in, sizes[1]), dtype=dt) for _ in range(3)] \
            if self.n_dense else []
        self.Yb = np.zeros((R, sizes[-1]), dtype=dt)
        self.As = tuple(np.zeros((R, n), dtype=dt) for n in sizes[1:])
        self.Ds = tuple(np.zeros((R, n), dtype=dt) for n in sizes[1:])
        self.dWs = tuple(np.zeros((T, a, b), dtype=dt) for a, b in zip(sizes[:-1], sizes[1:]))
        self.dbs = tuple(np.zeros((T, b), dtype=dt) for b in sizes[1:])
        # Which rows of W_1 each chunk's sparse weight gradient wrote.
        self.touched = np.zeros((T, n_in), dtype=np.bool_)
        # Each chunk's rows sorted by pixel for that weight gradient (a count and a
        # run of rows-per-chunk slots for each pixel), where it sums from one
        # (epoch.weight_grad_csc): the widths sparse_grad_uses_csc names. None
        # otherwise, which compiles the epoch without the CSC.
        if self.sparse and epoch.sparse_grad_uses_csc(sizes[1]):
            # (split by input columns, each chunk sorts the whole batch's rows)
            rows = B if split else -(-B // T)
            self.cptr = np.zeros((T, n_in), dtype=np.int64)
            self.crow = np.zeros((T, rows * n_in), dtype=np.int32)
            self.cval = np.zeros((T, rows * n_in), dtype=dt)
        else:
            self.cptr = self.crow = self.cval = None
        self.loss_parts = np.zeros(T, dtype=np.float64)
        self.sq_parts = np.zeros(T, dtype=np.float64)
        self.correct_parts = np.zeros(T, dtype=np.int64)
        # Each chunk's partial first-layer products (Ps[t]), where the layer is
        # split by columns.
        self.Ps = np.zeros((T, B, sizes[1]), dtype=dt) if split else None
        # Each chunk's lists of its batch rows with a nonzero in each group of the
        # dense columns (gemm.group_lists: room for 16 more, and the rows' masks).
        self._group_ws = None
        if self._uses_groups():
            rows = (B if split else -(-B // T)) + 16
            groups = np.diff(dense.group_starts(self._dense_cuts(self.n_dense, T)))
            words = -(-int(groups.sum()) // 64)
            self._group_ws = (np.zeros((T, int(groups.max()), rows), dtype=np.int32),
                              np.zeros((T, int(groups.max())), dtype=np.int64),
                              np.zeros((T, words, rows), dtype=np.uint64))
        self._group_masks(T)
        self.called = np.zeros((4, T), dtype=np.bool_)   # each chunk's kernels
        self.ctl = np.zeros(sync.CTL_SIZE, dtype=np.int64)    # their barriers' counters
        # The batch's start and size (set each batch), and the chunks' gap.
        self.batch = np.array([0, 0, gap], dtype=np.int64)
        self.scalars = np.zeros(9, dtype=dt)
        self.tiny, self.top = _clip_bounds(dt)
        self.codes = _codes(m)
        self.loss_code = losses.CODES[self.loss]

    @property
    def n_dense(self):
        """How many of a sparse input's columns the first layer reads as dense."""
        return self.X.shape[1] if self.sparse else 0

    def _optimizer_args(self):
        m, opt = self.model, self.optimizer
        s = opt.ensure_state(m.weights, m.biases)
        hyper = np.array([opt.momentum, opt.beta_1, opt.beta_2, opt.epsilon, opt.alpha])
        # Moments an optimiser does not use are never touched; the parameters (or the
        # first moments) stand in for them, with the right shapes.
        Ms = tuple(s.get("mW", m.weights))
        mbs = tuple(s.get("mb", m.biases))
        Vs = tuple(s.get("vW", Ms))
        vbs = tuple(s.get("vb", mbs))
        return opt.code, hyper, s["step"], Ms, Vs, mbs, vbs

    def train_batches(self, order, bs, b0, b1, lr, stop=None, keep_moments=False):
        """Train batches b0..b1-1 of order (see fastmlp.kernels.epoch.train_epoch).
        With keep_moments, W_1's optimiser moments stay in the Engine's workspaces
        after a run that returns, for the next run to continue from as they are,
        until release() puts them back: the caller calls it before anything else
        reads them (the estimator, in a finally around its epochs). W_1 itself is
        always put back."""
        m = self.model
        opt, hyper, step, Ms, Vs, mbs, vbs = self._optimizer_args()
        Ws = tuple(m.weights)
        if self.perm is None:
            return self._train_batches(order, bs, b0, b1, lr, stop, Ws, opt, hyper, step, Ms, Vs,
                                       mbs, vbs)
        # The kernels see W_1 and its moments with their rows in the order of the
        # split input's columns (perm), in workspaces (W_1's, then each moment's);
        # they are put back in place however the run ends, except kept moments. An
        # array standing in for an unused moment is W_1 itself (or the first
        # moment), and shares its workspace.
        W1, M1, V1 = Ws[0], Ms[0], Vs[0]
        kept = []
        for orig, buf in self._kept:
            if ((orig is M1 and buf is self.permuted[1]) or
                    (orig is V1 and buf is self.permuted[2])):
                kept.append((orig, buf))
            else:
                orig[self.perm] = buf    # kept by a run this one does not continue
        self._kept = []
        moved = []

        def permuted(a, buf):
            for orig, b in moved:
                if orig is a:
                    return b
            if not any(orig is a and b is buf for orig, b in kept):
                np.take(a, self.perm, axis=0, out=buf)
            moved.append((a, buf))
            return buf
        Ws = (permuted(W1, self.permuted[0]),) + Ws[1:]
        Ms = (permuted(M1, self.permuted[1]),) + tuple(Ms[1:])
        Vs = (permuted(V1, self.permuted[2]),) + tuple(Vs[1:])
        returned = False
        try:
            result = self._train_batches(order, bs, b0, b1, lr, stop, Ws, opt, hyper, step, Ms,
                                         Vs, mbs, vbs)
            returned = True
            return result
        finally:
            for orig, buf in moved:
                if keep_moments and returned and buf is not self.permuted[0]:
                    self._kept.append((orig, buf))
                else:
                    orig[self.perm] = buf

    def release(self):
        """Put W_1's moments kept by train_batches(keep_moments=True) back in their
        arrays, in the input's column order."""
        kept, self._kept = self._kept, []
        for orig, buf in kept:
            orig[self.perm] = buf

    def _train_batches(self, order, bs, b0, b1, lr, stop, Ws, opt, hyper, step, Ms, Vs, mbs,
                       vbs):
        if stop is None:
            stop = np.zeros(1, dtype=np.int64)
        bs_ = tuple(self.model.biases)
        order = np.ascontiguousarray(order, dtype=np.int64)
        plain = opt == epoch.SGD and self.optimizer.alpha == 0
        # The kernels' addresses depend only on the types of their arguments: a run
        # with the same arrays as the run before (every epoch of a fit) takes the
        # same ones, without working out their types again (0.2 ms an epoch).
        key = (Ws, bs_, Ms, Vs, mbs, vbs, opt, plain, order.flags.writeable, self._ws_key,
               self.X, self.levels, self.indptr, self.Y, self.cptr, self.Ps, self.cuts,
               self.groups)
        if self._kernels_for is not None and _same(self._kernels_for[0], key):
            fns, ofn, kernels = self._kernels_for[1:]
        else:
            fns, ofn, kernels = self._kernels(Ws, bs_, order, opt, plain, Ms, Vs, mbs, vbs)
            self._kernels_for = (key, fns, ofn, kernels)
        fb_args = self._fb_args(Ws, bs_, order, fns)
        up_extra = (self.scalars, Ms, Vs, mbs, vbs, self.sq_parts, ofn)
        total, correct, bad, done = epoch.train_epoch(
            fb_args, up_extra, kernels, bs, b0, b1, float(lr), np.int64(opt), hyper, step, stop,
            self.called, self.ctl)
        if bad == epoch.WRONG_SIGNATURE:
            raise RuntimeError("fastmlp internal error: train_epoch packs arguments of other "
                               "types than the per-chunk kernels were compiled for")
        if bad == epoch.KERNEL_FAILED:
            raise RuntimeError("fastmlp internal error: a per-chunk kernel reported an error "
                               "(or one of the kernels it calls was compiled for other "
                               "argument types)")
        return float(total), int(correct), int(bad), int(done)

    def _fb_args(self, Ws, bs_, order, fns):
        """chunk_forward_backward's arguments after the chunk number (and the other
        per-chunk kernels')."""
        return (Ws, bs_, self.codes, self.loss_code, self.X, self.levels, self.sparse,
                self.indptr, self.indices, self.values, self.Y, order, self.batch, self.A0,
                self.Yb, self.As, self.Ds, self.dWs, self.dbs, self.touched, self.cptr,
                self.crow, self.cval, self.tiny, self.top, self.loss_parts,
                self.correct_parts, fns, self.Ps, self.cut_ptr, self.cuts, self.groups)

    def _kernels(self, Ws, bs_, order, opt, plain, Ms, Vs, mbs, vbs):
        """(fns, ofn, kernels) for train_epoch: the per-chunk kernels' addresses,
        each compiled (or loaded from numba's cache) on its own for exactly these
        argument types, which train_epoch calls through them."""
        # The arguments of the two per-chunk kernels after the chunk number.
        fns = epoch.chunk_kernels(Ws, bs_, self.codes, self.sparse, self.indptr, self.indices,
                                  self.values, order, self.As, self.Ds, self.dWs, self.dbs,
                                  self.touched, self.cptr, self.crow, self.cval, self.X,
                                  self.groups)
        fb_args = self._fb_args(Ws, bs_, order, fns)
        # train_epoch builds update_share's arguments from fb_args and these, in this
        # order (each array passed once: unboxing each costs its compile time).
        # Plain SGD without L2 updates by update_share's own short path: no
        # optimizer_row (ofn None), and none of the other optimisers' code compiled.
        # SGD with L2 on a sparse input, the batch split between two chunks, updates
        # W_1 by sgd_touched_rows (compiled only for that).
        touched_rows = (opt == epoch.SGD and self.sparse and self.cuts is None
                        and self.called.shape[1] == 2)
        ofn = None if plain else epoch.optimizer_kernel(self.scalars, touched_rows)
        up_extra = (self.scalars, Ms, Vs, mbs, vbs, self.sq_parts, ofn)
        up_args = (Ws, bs_, self.dWs, self.dbs, self.sparse, self.touched, np.int64(opt),
                   self.scalars, Ms, Vs, mbs, vbs, self.sq_parts, ofn, self.cuts)
        chunk = (np.int64(0),) + fb_args
        split = ((native.address(epoch.chunk_partial_forward, chunk)
                  + native.address(epoch.chunk_layer1_grad, chunk))
                 if self.cuts is not None else (0, -1, 0, -1))
        kernels = np.array(native.address(epoch.chunk_forward_backward, chunk)
                           + native.address(epoch.update_share, (np.int64(0),) + up_args)
                           + epoch.batches_kernel(fb_args, up_extra, self.called) + split,
                           dtype=np.int64)
        return fns, ofn, kernels


def forward(model, X):
    """All activations [X, A_1, ..., A_L] through the fused dense_forward kernel."""
    codes = _codes(model)
    As = [X]
    for W, b, c in zip(model.weights, model.biases, codes):
        out = np.empty((X.shape[0], W.shape[1]), dtype=model.dtype)
        dense.dense_forward(As[-1], np.ascontiguousarray(W), np.ascontiguousarray(b), c, out)
        As.append(out)
    return As


def gradients(model, X, Y, loss):
    """Mean-over-batch [(dW, db), ...] through dense_forward / dense_backward."""
    return loss_and_gradients(model, X, Y, loss)[1]


def loss_and_gradients(model, X, Y, loss):
    """(summed per-sample loss, mean-over-batch [(dW, db), ...]) from one forward and
    one backward pass."""
    codes = _codes(model)
    As = forward(model, X)
    L = len(model.weights)
    tiny, top = _clip_bounds(model.dtype)
    dA = np.empty_like(As[-1])
    total, _ = dense.output_delta_rows(losses.CODES[loss], codes[-1], As[-1], Y, dA, tiny, top,
                                       0, len(X))
    grads = [None] * L
    for l in range(L - 1, -1, -1):
        W = np.ascontiguousarray(model.weights[l])
        dW, db = np.empty_like(W), np.empty(W.shape[1], dtype=model.dtype)
        dA_prev = np.empty_like(As[l])
        # The output delta already includes the output activation's Jacobian.
        act = activations.CODES["linear"] if l == L - 1 else codes[l]
        dense.dense_backward(dA, As[l + 1], act, As[l], W, dW, db, dA_prev, l > 0)
        grads[l] = (dW, db)
        dA = dA_prev
    return float(total), grads
