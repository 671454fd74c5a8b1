"""Dense matrix products with the output tile held in vector registers.

The three products of a dense layer, over rows r0..r1-1 of the batch:
  gemm_rows  out[r] = X[r] W                 (forward)
  gemm_tn    dW = X[r0:r1]^T D[r0:r1]         (weight gradient)
  gemm_nt    out[r] = D[r] W^T               (the previous layer's delta)
The first two are one micro-kernel, gemm_tile: an mr x nv-vector tile of the output
is held in mr * nv vector accumulators while the loop runs over the inner
dimension, each step loading nv vectors of a row of the right operand and
broadcasting mr numbers of the left one, which is read through strides (so X W
and X^T D are the same code). With AVX-512 a row's last columns may take a
narrower vector beside a full one (NARROW_TAILS). gemm_nt sums along W's rows:
dot_tile holds mr x 4 accumulators, then halves each to one number in a fixed
order.

Vectors are 64 bytes where the CPU has AVX-512 (32 registers: 6 x 4 tiles) and 32
bytes with AVX2 and FMA (16 registers: 6 x 2); HAS_TILES is false elsewhere and
BLAS does everything. Why not always BLAS: each thread multiplies its own chunk of
rows (16 to 100), and for such shapes BLAS's packing and dispatch cost as much as
the arithmetic on narrow layers (Zen 3, one thread: 50x64 by 64x32 in 3.0 against
5.6 microseconds), and OpenBLAS may not know a new CPU (on Zen 5 it ran its AVX2
kernels at 85-110 GFLOP/s on 64x512x512, or 166-169 with OPENBLAS_CORETYPE=SkylakeX,
against 230-240 for these tiles). kernels/dense.py chooses per product from
measured crossovers (`python -m bench.crossover`).

Every output number is a sum in a fixed order (fused multiply-adds along the
inner dimension; for gemm_nt, per lane, then halved, then the tail), so results
are the same bits on every run and for every split of the rows between threads.
"""
import contextlib

import numpy as np

from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, config
from numba.core.errors import TypingError
from numba.extending import intrinsic

from . import simd


def _host_features():
    """The CPU features numba compiles for (the host's unless NUMBA_CPU_FEATURES
    names others)."""
    return (config.CPU_FEATURES or llvm_binding.get_host_cpu_features().flatten()).split(",")


_FEATURES = _host_features()
HAS_AVX512 = "+avx512f" in _FEATURES
HAS_AVX2 = "+avx2" in _FEATURES and "+fma" in _FEATURES
# AVX-512 VBMI's byte permutes (dense.reorder_row)
HAS_VBMI = HAS_AVX512 and "+avx512vbmi" in _FEATURES
# Tiles are used where the CPU has fused multiply-add vectors of 32 (AVX2, 16
# registers) or 64 bytes (AVX-512, 32 registers); elsewhere BLAS does everything.
HAS_TILES = HAS_AVX512 or HAS_AVX2
VECTOR_BYTES = 64 if HAS_AVX512 else 32

# Tile shapes, chosen so that the accumulators and the operands loaded per step fit
# in the registers: the wide gemm tile is WIDE_ROWS x WIDE_VECTORS vectors (6 x 4 =
# 24 accumulators of 32 registers; 6 x 2 = 12 of 16 with AVX2), the narrow one
# TILE1_ROWS x 1, the dot tile DOT_ROWS x 4. The switch in each intrinsic compiles
# a loop for every other row count up to these (_row_variants: each variant costs
# compile time, not speed).
WIDE_VECTORS = 4 if HAS_AVX512 else 2
WIDE_ROWS, TILE1_ROWS = 6, 8
DOT_ROWS = 4 if HAS_AVX512 else 2


class _Vectors(simd._Vectors):
    """simd's vector helpers at this CPU's width (VECTOR_BYTES), with loads and
    stores at any offset and a horizontal sum."""

    def __init__(self, context, builder, dtype, vector_bytes=VECTOR_BYTES):
        super().__init__(context, builder, dtype, vector_bytes)

    def c(self, n):
        return ir.Constant(self.intp, n)

    def load(self, base, offset):
        b = self.builder
        return b.load(b.bitcast(b.gep(base, [offset]), self.vty.as_pointer()), align=self.align)

    def store(self, value, base, offset):
        b = self.builder
        b.store(value, b.bitcast(b.gep(base, [offset]), self.vty.as_pointer()), align=self.align)

    def hsum(self, v):
        """The sum of v's lanes by halving: (lanes 0..n/2-1) + (n/2..n-1), again and
        again, a fixed order."""
        b = self.builder
        i32 = ir.IntType(32)
        n = self.lanes
        while n > 1:
            h = n // 2
            lo = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, h), list(range(h))))
            hi = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, h), list(range(h, n))))
            v = b.fadd(lo, hi)
            n = h
        return b.extract_element(v, ir.Constant(i32, 0))


def _check(fname, C, A, B):
    # Any layout types (a caller may hold non-contiguous views and check at run
    # time, with unit_rows, before calling); the tiles read rows through strides[0]
    # and assume the numbers within a row are adjacent.
    simd._check_arrays(fname, (("C", C, 2), ("A", A, 2), ("B", B, 2)), ("C", "A", "B"),
                       contiguous=False)


def _row_stride(builder, vec, arr):
    """Numbers from one row to the next (strides[0] / itemsize)."""
    return builder.sdiv(cgutils.unpack_tuple(builder, arr.strides)[0], vec.c(vec.align))


def _row_variants(max_rows):
    """The row counts a tile's loop is compiled for: every other one up to max_rows
    (2, 4, 6 for 6; 2, 4, 6, 8 for 8), so that a tile of mr rows runs the loop for at
    most one row more (rows past mr read row mr - 1 again and are not stored; each
    row's sums are its own, so the bits are the same). One loop for every row count
    (1 to max_rows) cost a cold start 1.3-2.8 s more (seed000, alternating processes:
    19.2, 16.8, 19.7 s against 17.8, 15.5, 16.9); whole epochs on 2 threads, paired,
    were no different (seed000 1.04 and 0.99, seed002 0.92 and 0.94, wide 1.01 and
    1.01, the estimator's network 0.93-1.09)."""
    return tuple(range(max_rows % 2 or 2, max_rows + 1, 2))


def _switch_rows(builder, vec, mr, variants, name, emit):
    """emit(rows) for the smallest of variants (ascending) that is at least mr, at run
    time; nothing for mr < 1 or above the largest."""
    b = builder
    sel = vec.c(variants[-1])
    for v in reversed(variants[:-1]):
        sel = b.select(b.icmp_signed("<=", mr, vec.c(v)), vec.c(v), sel)
    outside = b.or_(b.icmp_signed("<", mr, vec.c(1)), b.icmp_signed(">", mr, vec.c(variants[-1])))
    sel = b.select(outside, vec.c(0), sel)
    simd._switch(b, vec.intp, sel, variants, name, emit)


def _clamped_row(builder, vec, i, mr):
    """Row i of a tile compiled for more rows than the mr it runs: rows from mr on
    read row mr - 1 again (in bounds; their results are not stored)."""
    if i == 0:
        return vec.c(0)
    b = builder
    return b.select(b.icmp_signed("<", vec.c(i), mr), vec.c(i), b.sub(mr, vec.c(1)))


def _if_row(builder, vec, i, mr):
    """A block that runs only when row i of the tile is one of its mr rows."""
    if i == 0:
        return contextlib.nullcontext()
    return builder.if_then(builder.icmp_signed("<", vec.c(i), mr))


def _panel_vectors(context, builder, signature, nv, last_bytes, j0, jl):
    """(vec, vecs, cols) for a panel of nv vectors of C's dtype (the first
    argument's): the full-width vectors, each vector's width (the last last_bytes)
    and first column (from j0, the last at jl)."""
    dtype = signature.args[0].dtype
    vec = _Vectors(context, builder, dtype)
    vecs = [vec] * (nv - 1) + [_Vectors(context, builder, dtype, last_bytes)]
    cols = [builder.add(j0, vec.c(v * vec.lanes)) for v in range(nv - 1)] + [jl]
    return vec, vecs, cols


def _gemm_tile_intrinsic(nv, max_rows, last_bytes=VECTOR_BYTES):
    @intrinsic
    def gemm_tile(typingctx, C, A, B, mr, i0, j0, jl, a0, ais, aks, b0, K):
        """C[i0+i, cols] = sum over k < K of A.flat[a0 + i*ais + k*aks] * B[b0+k, cols]
        for i < mr (1..max_rows), cols nv vectors from j0, the last starting at jl
        (it may overlap the one before: those columns get the same bits) and
        last_bytes wide."""
        _check("gemm_tile", C, A, B)
        sig = types.none(C, A, B, mr, i0, j0, jl, a0, ais, aks, b0, K)

        def codegen(context, builder, signature, args):
            c_, a_, b_ = (context.make_array(signature.args[n])(context, builder, args[n])
                          for n in range(3))
            mr_, i0_, j0_, jl_, a0_, ais_, aks_, b0_, K_ = (
                context.cast(builder, args[n], signature.args[n], types.intp)
                for n in range(3, 12))
            vec, vecs, cols = _panel_vectors(context, builder, signature, nv, last_bytes, j0_,
                                             jl_)
            ldc = _row_stride(builder, vec, c_)
            ldb = _row_stride(builder, vec, b_)
            b = builder

            def emit(rows):
                accs = [[cgutils.alloca_once_value(b, w.zero) for w in vecs]
                        for _ in range(rows)]
                arow = [b.add(a0_, b.mul(_clamped_row(b, vec, i, mr_), ais_))
                        for i in range(rows)]
                with cgutils.for_range(b, K_) as loop:
                    k = loop.index
                    brow = b.mul(b.add(b0_, k), ldb)
                    bv = [w.load(b_.data, b.add(brow, cols[v])) for v, w in enumerate(vecs)]
                    koff = b.mul(k, aks_)
                    for i in range(rows):
                        x = vec.splat(b.load(b.gep(a_.data, [b.add(arow[i], koff)])))
                        for v, w in enumerate(vecs):
                            b.store(b.call(w.fma, [_narrowed(b, vec, x, w), bv[v],
                                                   b.load(accs[i][v])]), accs[i][v])
                for i in range(rows):
                    with _if_row(b, vec, i, mr_):
                        crow = b.mul(b.add(i0_, vec.c(i)), ldc)
                        for v, w in enumerate(vecs):
                            w.store(b.load(accs[i][v]), c_.data, b.add(crow, cols[v]))
            _switch_rows(b, vec, mr_, _row_variants(max_rows), f"gemm{nv}.{last_bytes}", emit)
            return context.get_dummy_value()
        return sig, codegen
    return gemm_tile


gemm_wide = _gemm_tile_intrinsic(WIDE_VECTORS, WIDE_ROWS)
gemm_tile1 = _gemm_tile_intrinsic(1, TILE1_ROWS)
# With AVX-512, a row's last columns, when they fit in a vector and a quarter of
# one, are one tile of a full vector and a 16-byte one beside it, which shares its
# broadcasts: 100 float32 columns are 6 vectors and a quarter, not 7. Zen 4 runs a
# 64-byte multiply-add as two 32-byte halves, so the narrow one costs less. A
# 100x228 by 228x100 product (the estimator's first layer, its dense columns, one
# thread, best of 5): X W 42.7-43.0 against 44.0 us, X^T D 43.1-43.5 against 44.4.
# A quarter-width one-vector tile on its own saved nothing (its eight broadcasts a
# step bound it, not its multiply-adds), nor did a 4 x 7-vector tile
# (70-82 us: too few registers). A half-width pair as well (a vector and a half)
# cost cold starts 1.4 s (seed000, 14.1-14.3 against 12.8 s), the quarter alone 0.5.
NARROW_TAILS = HAS_AVX512
gemm_pair_quarter = _gemm_tile_intrinsic(2, TILE1_ROWS, VECTOR_BYTES // 4)


def _dot_tile_intrinsic(nc):
    @intrinsic
    def dot_tile(typingctx, C, A, B, mr, i0, k0, J):
        """C[i0+i, k0+c] = sum over j < J of A[i0+i, j] * B[k0+c, j] for i < mr
        (1..DOT_ROWS) and c < nc: whole vectors of j by fused multiply-adds into
        lanes, the lanes halved to one number, then the last J % lanes one by one."""
        _check("dot_tile", C, A, B)
        sig = types.none(C, A, B, mr, i0, k0, J)

        def codegen(context, builder, signature, args):
            c_, a_, b_ = (context.make_array(signature.args[n])(context, builder, args[n])
                          for n in range(3))
            mr_, i0_, k0_, J_ = (context.cast(builder, args[n], signature.args[n], types.intp)
                                 for n in range(3, 7))
            vec = _Vectors(context, builder, signature.args[0].dtype)
            ldc = _row_stride(builder, vec, c_)
            lda = _row_stride(builder, vec, a_)
            ldb = _row_stride(builder, vec, b_)
            b = builder
            brow = [b.mul(b.add(k0_, vec.c(c)), ldb) for c in range(nc)]
            nvec = b.udiv(J_, vec.c(vec.lanes))
            jt = b.mul(nvec, vec.c(vec.lanes))

            def emit(rows):
                accs = [[cgutils.alloca_once_value(b, vec.zero) for _ in range(nc)]
                        for _ in range(rows)]
                arow = [b.mul(b.add(i0_, _clamped_row(b, vec, i, mr_)), lda)
                        for i in range(rows)]
                with cgutils.for_range(b, nvec) as loop:
                    j = b.mul(loop.index, vec.c(vec.lanes))
                    bv = [vec.load(b_.data, b.add(brow[c], j)) for c in range(nc)]
                    for i in range(rows):
                        av = vec.load(a_.data, b.add(arow[i], j))
                        for c in range(nc):
                            b.store(b.call(vec.fma, [av, bv[c], b.load(accs[i][c])]),
                                    accs[i][c])
                for i in range(rows):
                    with _if_row(b, vec, i, mr_):
                        crow = b.mul(b.add(i0_, vec.c(i)), ldc)
                        for c in range(nc):
                            s = cgutils.alloca_once_value(b, vec.hsum(b.load(accs[i][c])))
                            with cgutils.for_range_slice(b, jt, J_, vec.c(1)) as (j, _):
                                x = b.load(b.gep(a_.data, [b.add(arow[i], j)]))
                                y = b.load(b.gep(b_.data, [b.add(brow[c], j)]))
                                b.store(b.fadd(b.load(s), b.fmul(x, y)), s)
                            b.store(b.load(s),
                                    b.gep(c_.data, [b.add(crow, b.add(k0_, vec.c(c)))]))
            _switch_rows(b, vec, mr_, _row_variants(DOT_ROWS), f"dot{nc}", emit)
            return context.get_dummy_value()
        return sig, codegen
    return dot_tile


dot_tile4 = _dot_tile_intrinsic(4)
dot_tile1 = _dot_tile_intrinsic(1)


@njit(cache=True, error_model="numpy")
def lanes_of(a):
    return VECTOR_BYTES // a.itemsize


@njit(cache=True, error_model="numpy")
def unit_rows(a):
    """Whether a's rows are runs of adjacent numbers, one after another, as the
    tiles need (C-contiguous arrays and row slices of them)."""
    return a.strides[1] == a.itemsize and a.strides[0] >= a.shape[1] * a.itemsize


@njit(cache=True, error_model="numpy")
def gemm_panels(C, A, B, i_lo, i_hi, a_base, ais, aks, b0, K):
    """C[i, cols] = sum over k < K of A.flat[a_base + i*ais + k*aks] * B[b0+k, cols]
    for rows i_lo..i_hi-1 of C and all its columns (B at least one vector wide):
    wide tiles across the columns, then one-vector tiles, the last ending on the
    last column (a narrower vector where NARROW_TAILS and that is enough)."""
    N = B.shape[1]
    L = lanes_of(B)
    j0 = 0
    while j0 + WIDE_VECTORS * L <= N:
        for i0 in range(i_lo, i_hi, WIDE_ROWS):
            gemm_wide(C, A, B, min(WIDE_ROWS, i_hi - i0), i0, j0, j0 + (WIDE_VECTORS - 1) * L,
                      a_base + i0 * ais, ais, aks, b0, K)
        j0 += WIDE_VECTORS * L
    while j0 < N:
        left = N - j0
        if NARROW_TAILS and L < left <= L + L // 4:
            # The last two vectors' columns as one full vector and a quarter-width
            # one ending on the last column, one tile.
            for i0 in range(i_lo, i_hi, TILE1_ROWS):
                gemm_pair_quarter(C, A, B, min(TILE1_ROWS, i_hi - i0), i0, j0, N - L // 4,
                                  a_base + i0 * ais, ais, aks, b0, K)
            break
        j = min(j0, N - L)
        for i0 in range(i_lo, i_hi, TILE1_ROWS):
            gemm_tile1(C, A, B, min(TILE1_ROWS, i_hi - i0), i0, j, j, a_base + i0 * ais, ais,
                       aks, b0, K)
        j0 += L


@njit(cache=True, error_model="numpy")
def gemm_rows(X, W, out, r0, r1):
    """out[r] = X[r] W for rows r0..r1-1 (W at least one vector wide)."""
    xs = X.strides[0] // X.itemsize
    # np.int64 rather than bare 0 and 1: numba types a literal argument as
    # Literal[int], and the two callers' literals in different places compiled
    # gemm_panels twice (about 1 s of a cold start).
    one, zero = np.int64(1), np.int64(0)
    gemm_panels(out, X, W, r0, r1, zero, xs, one, zero, X.shape[1])


@njit(cache=True, error_model="numpy")
def gemm_tn(X, D, dW, r0, r1):
    """dW = X[r0:r1]^T D[r0:r1] (D at least one vector wide): dW[k] sums X[r, k] D[r]
    over r in ascending order."""
    xs = X.strides[0] // X.itemsize
    gemm_panels(dW, X, D, np.int64(0), X.shape[1], r0 * xs, np.int64(1), xs, r0, r1 - r0)


@njit(cache=True, error_model="numpy")
def gemm_nt(D, W, out, r0, r1):
    """out[r] = D[r] W^T for rows r0..r1-1: out[r, k] is the dot product of D[r] and
    W[k] (any widths)."""
    n_in, J = W.shape
    k_full = n_in - n_in % 4
    for k0 in range(0, k_full, 4):
        for i0 in range(r0, r1, DOT_ROWS):
            dot_tile4(out, D, W, min(DOT_ROWS, r1 - i0), i0, k0, J)
    for k in range(k_full, n_in):
        for i0 in range(r0, r1, DOT_ROWS):
            dot_tile1(out, D, W, min(DOT_ROWS, r1 - i0), i0, k, J)


# Zero-skipping products over a sparse input's dense columns. Those columns are
# nonzero in 30% of rows or more (MNIST's middle pixels, 52% on average), so a
# dense product spends about half its multiply-adds on zeros; but skipping a
# single zero costs a load of its own (README, Speed). GROUP adjacent columns
# (the Engine orders the dense columns so that each group's are often zero
# together: fastmlp.kernels.dense.column_groups) are all zero in 31% of MNIST's
# rows (26% for four neighbouring pixels in a row). The products below take the
# columns a group at a time and skip the rows where the whole group is zero,
# listed once per chunk and batch (group_lists): a skipped row's terms are
# x * w with x = 0, which add nothing (for finite weights), so every output is
# the same sum in the same order as gemm_rows' and gemm_tn's, the same bits.
# 100 MNIST rows by 228 columns by 100 units, one thread, X W and X^T D with the
# lists built: about 74 us against 90 for the tiles (groups of four pixels in a row;
# groups of two: the forward 48 against 37 us, the gradient 33 against 36).
GROUP = 4


def _group_intrinsic(kind, nv, last_bytes=VECTOR_BYTES):
    """group_acc (kind "acc", the forward) or group_tile (kind "tile", the weight
    gradient) for panels of nv vectors, the last last_bytes wide."""
    def doc_acc(C, A, B, lst, q0, q1, c0, g, j0, jl):
        """For each listed row r = lst[q], q in q0..q1-1: C[r, cols] += A[r, c0+i] *
        B[c0+i, cols] for i = 0..g-1 in order, one fused multiply-add each (g in
        1..GROUP), with cols nv vectors from j0, the last starting at jl and
        last_bytes wide. B's g rows stay in registers across the list; each row of
        C is loaded whole before any of it is stored, so a last vector that
        overlaps the one before writes the same bits twice."""

    def doc_tile(C, A, B, lst, q0, q1, c0, g, j0, jl):
        """C[c0+i, cols] = sum over the listed rows r = lst[q], q in q0..q1-1 (in
        that order), of A[r, c0+i] * B[r, cols], for i < g (1..GROUP): gemm_tile's
        sums of A^T B over the listed rows only, cols as in group_acc."""
    name = "group_" + kind

    def group(typingctx, C, A, B, lst, q0, q1, c0, g, j0, jl):
        _check(name, C, A, B)
        if not (isinstance(lst, types.Array) and lst.ndim == 1 and lst.dtype == types.int32
                and lst.layout == "C"):
            raise TypingError(f"{name}: lst must be a C-contiguous 1-D int32 array")
        sig = types.none(C, A, B, lst, q0, q1, c0, g, j0, jl)

        def codegen(context, builder, signature, args):
            c_, a_, b_ = (context.make_array(signature.args[n])(context, builder, args[n])
                          for n in range(3))
            l_ = context.make_array(signature.args[3])(context, builder, args[3])
            q0_, q1_, c0_, g_, j0_, jl_ = (
                context.cast(builder, args[n], signature.args[n], types.intp)
                for n in range(4, 10))
            vec, vecs, cols = _panel_vectors(context, builder, signature, nv, last_bytes, j0_,
                                             jl_)
            ldc = _row_stride(builder, vec, c_)
            lda = _row_stride(builder, vec, a_)
            ldb = _row_stride(builder, vec, b_)
            b = builder
            # The group's columns (rows past g read the last again, unused).
            ks = [b.add(c0_, _clamped_row(b, vec, i, g_)) for i in range(GROUP)]

            def fma(x, w, y, acc):
                b.store(b.call(w.fma, [_narrowed(b, vec, x, w), y, b.load(acc)]), acc)
            if kind == "acc":
                bv = [[w.load(b_.data, b.add(b.mul(ks[i], ldb), cols[v]))
                       for v, w in enumerate(vecs)] for i in range(GROUP)]
                with cgutils.for_range_slice(b, q0_, q1_, vec.c(1)) as (q, _):
                    r = b.sext(b.load(b.gep(l_.data, [q])), vec.intp)
                    crow, arow = b.mul(r, ldc), b.mul(r, lda)
                    accs = [cgutils.alloca_once_value(b, w.load(c_.data, b.add(crow, cols[v])))
                            for v, w in enumerate(vecs)]
                    for i in range(GROUP):
                        with _if_row(b, vec, i, g_):
                            x = vec.splat(b.load(b.gep(a_.data, [b.add(arow, ks[i])])))
                            for v, w in enumerate(vecs):
                                fma(x, w, bv[i][v], accs[v])
                    for v, w in enumerate(vecs):
                        w.store(b.load(accs[v]), c_.data, b.add(crow, cols[v]))
                return context.get_dummy_value()
            accs = [[cgutils.alloca_once_value(b, w.zero) for w in vecs] for _ in range(GROUP)]
            with cgutils.for_range_slice(b, q0_, q1_, vec.c(1)) as (q, _):
                r = b.sext(b.load(b.gep(l_.data, [q])), vec.intp)
                brow, arow = b.mul(r, ldb), b.mul(r, lda)
                bv = [w.load(b_.data, b.add(brow, cols[v])) for v, w in enumerate(vecs)]
                for i in range(GROUP):
                    x = vec.splat(b.load(b.gep(a_.data, [b.add(arow, ks[i])])))
                    for v, w in enumerate(vecs):
                        fma(x, w, bv[v], accs[i][v])
            for i in range(GROUP):
                with _if_row(b, vec, i, g_):
                    crow = b.mul(ks[i], ldc)
                    for v, w in enumerate(vecs):
                        w.store(b.load(accs[i][v]), c_.data, b.add(crow, cols[v]))
            return context.get_dummy_value()
        return sig, codegen
    group.__name__ = name
    group.__doc__ = (doc_acc if kind == "acc" else doc_tile).__doc__
    return intrinsic(group)


def _narrowed(builder, vec, x, w):
    """The first w.lanes of vec's splat x: a narrower register's view of the same
    broadcast, not a second one."""
    if w.lanes == vec.lanes:
        return x
    i32 = ir.IntType(32)
    return builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(i32, w.lanes),
                                                    list(range(w.lanes))))


# A row's columns in panels of whole vectors, each a pass over a group's listed
# rows: WIDE_VECTORS vectors at a time, then the rest (1..WIDE_VECTORS vectors,
# at least one whole one: a panel of WIDE_VECTORS - 1 comes first where the rest
# would be less), its last vector ending on the last column, a quarter-width one
# where NARROW_TAILS and the rest is that much past whole vectors, else a full
# one overlapping the one before (inside the panel: group_acc adds into C, and
# columns another panel already took would be added twice).
_QUARTER = VECTOR_BYTES // 4
group_acc1, group_acc2, group_acc3, group_acc4 = (
    _group_intrinsic("acc", nv) for nv in (1, 2, 3, 4))
group_tile1, group_tile2, group_tile3, group_tile4 = (
    _group_intrinsic("tile", nv) for nv in (1, 2, 3, 4))
if NARROW_TAILS:
    group_acc2q, group_acc3q, group_acc4q = (
        _group_intrinsic("acc", nv, _QUARTER) for nv in (2, 3, 4))
    group_tile2q, group_tile3q, group_tile4q = (
        _group_intrinsic("tile", nv, _QUARTER) for nv in (2, 3, 4))
else:
    group_acc2q, group_acc3q, group_acc4q = group_acc2, group_acc3, group_acc4
    group_tile2q, group_tile3q, group_tile4q = group_tile2, group_tile3, group_tile4


@njit(error_model="numpy", inline="always")
def _panel(N, L, j0):
    """The column panel of an N-wide row (N >= L, the lanes of a vector) that starts
    at j0: (vectors, the last vector's start, whether it is quarter-width, whether
    this is the last panel)."""
    left = N - j0
    if left > WIDE_VECTORS * L:
        nv = WIDE_VECTORS if left - WIDE_VECTORS * L >= L else WIDE_VECTORS - 1
        return nv, j0 + (nv - 1) * L, False, False
    quarter = NARROW_TAILS and left > L and 0 < left % L <= L // 4
    return (left + L - 1) // L, N - L // 4 if quarter else N - L, quarter, True


def _panel_call(one, two, three, four, two_q, three_q, four_q):
    """A function calling, for a panel of nv vectors (quarter: its last one
    quarter-width), the one of these intrinsics compiled for it."""
    @njit(error_model="numpy", inline="always")
    def call(nv, quarter, C, A, B, lst, n, c0, g, j0, jl):
        zero = np.int64(0)
        if quarter:
            if nv == 2:
                two_q(C, A, B, lst, zero, n, c0, g, j0, jl)
            elif nv == 3:
                three_q(C, A, B, lst, zero, n, c0, g, j0, jl)
            else:
                four_q(C, A, B, lst, zero, n, c0, g, j0, jl)
        elif nv == 1:
            one(C, A, B, lst, zero, n, c0, g, j0, jl)
        elif nv == 2:
            two(C, A, B, lst, zero, n, c0, g, j0, jl)
        elif nv == 3:
            three(C, A, B, lst, zero, n, c0, g, j0, jl)
        else:
            four(C, A, B, lst, zero, n, c0, g, j0, jl)
    return call


_group_acc = _panel_call(group_acc1, group_acc2, group_acc3, group_acc4, group_acc2q,
                         group_acc3q, group_acc4q)
_group_tile = _panel_call(group_tile1, group_tile2, group_tile3, group_tile4, group_tile2q,
                          group_tile3q, group_tile4q)


@njit(cache=True, error_model="numpy")
def group_rows(X, W, out, r0, r1, lists, counts):
    """out[r] = X[r] W for rows r0..r1-1 (W at least one vector wide), the same
    bits as gemm_rows, where lists[j, :counts[j]] are the rows r0..r1-1 in
    ascending order in which group j of X's columns (GROUP * j ..) has a nonzero
    (group_lists): the other rows' terms of that group are zeros and are skipped."""
    K, N = W.shape
    zero = out.dtype.type(0)
    for r in range(r0, r1):
        for j in range(N):
            out[r, j] = zero
    L = lanes_of(W)
    j0 = 0
    last = False
    while not last:
        nv, jl, quarter, last = _panel(N, L, j0)
        for j in range((K + GROUP - 1) // GROUP):
            c0 = j * GROUP
            _group_acc(nv, quarter, out, X, W, lists[j], counts[j], c0, min(GROUP, K - c0),
                       j0, jl)
        j0 += nv * L


@njit(cache=True, error_model="numpy")
def group_tn(X, D, dW, lists, counts):
    """dW = X[rows]^T D[rows] over the rows r0..r1-1 that lists and counts name (see
    group_rows; D at least one vector wide): the same bits as gemm_tn(X, D, dW, r0,
    r1), each group's rows of dW summing only the rows where the group has a
    nonzero."""
    K, N = dW.shape
    L = lanes_of(D)
    for j in range((K + GROUP - 1) // GROUP):
        c0 = j * GROUP
        j0 = 0
        last = False
        while not last:
            nv, jl, quarter, last = _panel(N, L, j0)
            _group_tile(nv, quarter, dW, X, D, lists[j], counts[j], c0, min(GROUP, K - c0),
                        j0, jl)
            j0 += nv * L


@intrinsic
def _listed_rows(typingctx, m, n, shift, base, lst):
    """lst[:k] = base + i for the i < n (ascending) where bit `shift` of m[i] is set;
    returns k. Sixteen at a time, packed by AVX-512's compress into a register and
    stored whole: m must hold n rounded up to 16 numbers, lst room for as many."""
    for name, a, dt in (("m", m, types.uint64), ("lst", lst, types.int32)):
        if not (isinstance(a, types.Array) and a.ndim == 1 and a.dtype == dt
                and a.layout == "C"):
            raise TypingError(f"_listed_rows: {name} must be a C-contiguous 1-D {dt} array")

    def codegen(context, builder, signature, args):
        b = builder
        m_ = context.make_array(signature.args[0])(context, builder, args[0])
        l_ = context.make_array(signature.args[4])(context, builder, args[4])
        intp = context.get_value_type(types.intp)
        n_, s_, base_ = (context.cast(builder, args[k], signature.args[k], types.intp)
                         for k in (1, 2, 3))
        i32, i64 = ir.IntType(32), ir.IntType(64)
        v8l, v16i, v16b = ir.VectorType(i64, 8), ir.VectorType(i32, 16), ir.VectorType(
            ir.IntType(1), 16)
        compress = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(v16i, [v16i, v16i, v16b]),
            "llvm.x86.avx512.mask.compress.v16i32")
        ctpop = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(ir.IntType(16), [ir.IntType(16)]), "llvm.ctpop.i16")
        bit = b.shl(ir.Constant(i64, 1), b.trunc(s_, i64) if intp.width > 64 else s_)
        bits8 = simd._splat(b, bit, 8)
        zero8 = ir.Constant(v8l, [ir.Constant(i64, 0)] * 8)
        lanes = ir.Constant(v16i, list(range(16)))
        k = cgutils.alloca_once_value(b, ir.Constant(intp, 0))
        with cgutils.for_range_slice(b, ir.Constant(intp, 0), n_, ir.Constant(intp, 16)) as (i, _):
            halves = []
            for h in range(2):
                p = b.bitcast(b.gep(m_.data, [b.add(i, ir.Constant(intp, 8 * h))]),
                              v8l.as_pointer())
                halves.append(b.icmp_unsigned("!=", b.and_(b.load(p, align=8), bits8), zero8))
            keep = b.shuffle_vector(halves[0], halves[1],
                                    ir.Constant(ir.VectorType(i32, 16), list(range(16))))
            inside = b.icmp_signed("<", lanes, simd._splat16(b, b.trunc(b.sub(n_, i), i32)))
            keep = b.and_(keep, inside)
            rows = b.add(lanes, simd._splat16(b, b.trunc(b.add(base_, i), i32)))
            packed = b.call(compress, [rows, ir.Constant(v16i, [ir.Constant(i32, 0)] * 16), keep])
            kk = b.load(k)
            b.store(packed, b.bitcast(b.gep(l_.data, [kk]), v16i.as_pointer()), align=4)
            b.store(b.add(kk, b.zext(b.call(ctpop, [b.bitcast(keep, ir.IntType(16))]), intp)), k)
        return b.load(k)
    return types.intp(m, n, shift, base, lst), codegen


@njit(cache=True, error_model="numpy")
def group_lists(masks, rows, r0, r1, lists, counts, local, g0):
    """For batch rows r0..r1-1 (input row rows[r]): lists[j, :counts[j]] = the
    batch rows, ascending, whose input row has a nonzero in group g0 + j (masks:
    fastmlp.kernels.dense.group_masks), for j < len(counts). local (a row's mask
    words, at least r1 - r0 rounded up to 16 of each) is a workspace, and each list
    has room for as many rows. With AVX-512, 16 rows at a time (_listed_rows);
    elsewhere a store for every row, counted only where it lists one (no branch on
    the data)."""
    n = r1 - r0
    for w in range(masks.shape[1]):
        for r in range(r0, r1):
            local[w, r - r0] = masks[rows[r], w]
    for j in range(counts.shape[0]):
        w = (g0 + j) // 64
        s = np.uint64((g0 + j) % 64)
        if HAS_AVX512:
            counts[j] = _listed_rows(local[w], n, s, r0, lists[j])
        else:
            k = 0
            lst = lists[j]
            for i in range(n):
                lst[k] = r0 + i
                k += np.int64((local[w, i] >> s) & np.uint64(1))
            counts[j] = k
