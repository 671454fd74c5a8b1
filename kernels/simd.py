"""A sparse row times a matrix with the output tile held in vector registers.

LLVM vectorises `out[i, :] += x * M[k, :]` over the output row, but then every
pass loads and stores out[i] and checks at run time that out and M do not
overlap; with 32-100 outputs that overhead dominates. Its SLP vectoriser does
not turn a register-blocked scalar loop into vector code either (tried: 2-5x
slower, scalar FMAs). So combine_tile<n> is written in LLVM IR: n vector
accumulators (8 float32 or 4 float64 lanes each) stay in registers while the
loop runs over the nonzeros, each adding x * M[k, tile] by one fused
multiply-add per vector, and are stored once at the end. The fused multiply-adds
happen in the same order as the scalar loop with `contract`, so results are the
same bits.
"""
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

VECTOR_BYTES = 32          # AVX2


def _check_arrays(fname, arrays, floats):
    """Typing-time checks shared by the intrinsics: arrays is (name, type, ndim);
    floats names the arrays that must share one float dtype."""
    for name, a, nd in arrays:
        if not isinstance(a, types.Array) or a.ndim != nd or a.layout != "C":
            raise TypingError(f"{fname}: {name} must be a C-contiguous {nd}-D array")
    kinds = {a.dtype for name, a, _ in arrays if name in floats}
    if len(kinds) != 1 or kinds.pop() not in (types.float32, types.float64):
        raise TypingError(f"{fname}: {', '.join(floats)} must share a float dtype")


class _Vectors:
    """The vector type of a float dtype (VECTOR_BYTES wide), its zero and fma."""

    def __init__(self, context, builder, dtype):
        self.intp = context.get_value_type(types.intp)
        fty = context.get_value_type(dtype)
        self.lanes = VECTOR_BYTES // (dtype.bitwidth // 8)
        self.vty = ir.VectorType(fty, self.lanes)
        self.align = dtype.bitwidth // 8
        self.zero = ir.Constant(self.vty, [ir.Constant(fty, 0.0)] * self.lanes)
        self.fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(self.vty, [self.vty] * 3),
            f"llvm.fma.v{self.lanes}f{dtype.bitwidth}")
        self.builder = builder

    def ptr(self, base, v):
        """Pointer to the v-th vector from the float pointer base."""
        b = self.builder
        return b.bitcast(b.gep(base, [ir.Constant(self.intp, v * self.lanes)]), self.vty.as_pointer())

    def splat(self, x):
        b = self.builder
        i32 = ir.IntType(32)
        xv = b.insert_element(ir.Constant(self.vty, ir.Undefined), x, ir.Constant(i32, 0))
        return b.shuffle_vector(xv, ir.Constant(self.vty, ir.Undefined),
                                ir.Constant(ir.VectorType(i32, self.lanes), [0] * self.lanes))

    def nonzeros(self, ix, vl, q0, q1):
        """Loop over q in q0..q1-1 yielding (idx[q] as intp, val[q] splatted)."""
        import contextlib

        @contextlib.contextmanager
        def loop():
            b = self.builder
            with cgutils.for_range_slice(b, q0, q1, ir.Constant(self.intp, 1)) as (q, _):
                k = b.load(b.gep(ix.data, [q]))
                k = b.sext(k, self.intp) if k.type.width < self.intp.width else k
                yield k, self.splat(b.load(b.gep(vl.data, [q])))
        return loop()


def _row_ptr(builder, arr, row, col):
    """Pointer to arr[row, col] of a C-contiguous 2-D array."""
    cols = cgutils.unpack_tuple(builder, arr.shape)[1]
    return builder.gep(arr.data, [builder.add(builder.mul(row, cols), col)])


def _tile_intrinsic(n_vec, ends_row=False):
    """combine_tile<n_vec>(out, i, j0, idx, val, q0, q1, M): n_vec vectors of columns
    from j0. With ends_row, combine_row<n_vec>(out, i, idx, val, q0, q1, M, jl): the
    whole row from column 0, the last vector at column jl (n_out - lanes, so that it
    ends on the last column, overlapping the one before)."""
    def codegen(context, builder, signature, args):
        if ends_row:
            out_t, _, idx_t, val_t, _, _, M_t, _ = signature.args
            a_out, a_i, a_idx, a_val, a_q0, a_q1, a_M, a_jl = range(8)
        else:
            out_t, _, _, idx_t, val_t, _, _, M_t = signature.args
            a_out, a_i, a_j0, a_idx, a_val, a_q0, a_q1, a_M = range(8)
        o = context.make_array(out_t)(context, builder, args[a_out])
        ix = context.make_array(idx_t)(context, builder, args[a_idx])
        vl = context.make_array(val_t)(context, builder, args[a_val])
        m = context.make_array(M_t)(context, builder, args[a_M])
        i_, q0_, q1_ = (context.cast(builder, args[n], signature.args[n], types.intp)
                        for n in (a_i, a_q0, a_q1))
        vec = _Vectors(context, builder, M_t.dtype)
        if ends_row:
            j0_ = ir.Constant(vec.intp, 0)
            jl_ = context.cast(builder, args[a_jl], signature.args[a_jl], types.intp)
        else:
            j0_ = context.cast(builder, args[a_j0], signature.args[a_j0], types.intp)

        def ptr(base, v):
            if ends_row and v == n_vec - 1:
                return builder.bitcast(builder.gep(base, [jl_]), vec.vty.as_pointer())
            return vec.ptr(base, v)
        accs = [cgutils.alloca_once_value(builder, vec.zero) for _ in range(n_vec)]
        with vec.nonzeros(ix, vl, q0_, q1_) as (k, xv):
            row = _row_ptr(builder, m, k, j0_)
            for v in range(n_vec):
                w = builder.load(ptr(row, v), align=vec.align)
                builder.store(builder.call(vec.fma, [xv, w, builder.load(accs[v])]), accs[v])
        dst = _row_ptr(builder, o, i_, j0_)
        for v in range(n_vec):
            builder.store(builder.load(accs[v]), ptr(dst, v), align=vec.align)
        return context.get_dummy_value()

    def check(out, idx, val, M, name):
        _check_arrays(name, (("out", out, 2), ("M", M, 2), ("idx", idx, 1), ("val", val, 1)),
                      ("out", "val", "M"))

    if ends_row:
        @intrinsic
        def combine_row(typingctx, out, i, idx, val, q0, q1, M, jl):
            check(out, idx, val, M, "combine_row")
            return types.none(out, i, idx, val, q0, q1, M, jl), codegen
        return combine_row

    @intrinsic
    def combine_tile(typingctx, out, i, j0, idx, val, q0, q1, M):
        check(out, idx, val, M, "combine_tile")
        return types.none(out, i, j0, idx, val, q0, q1, M), codegen
    return combine_tile


combine_tile8 = _tile_intrinsic(8)
combine_tile4 = _tile_intrinsic(4)
combine_tile1 = _tile_intrinsic(1)
(combine_row9, combine_row10, combine_row11, combine_row12, combine_row13, combine_row14,
 combine_row15, combine_row16) = (_tile_intrinsic(n, ends_row=True) for n in range(9, 17))


@njit(inline="always")
def combine_whole_row(out, i, idx, val, q0, q1, M):
    """sparse_combine_row for rows of 9 to 16 vectors (65-128 float32 columns,
    33-64 float64) in one pass over the nonzeros: 9-16 independent chains of fused
    multiply-adds where the passes of 8, 4 and 1 vectors wait on each FMA's latency
    in the short ones. The same sums in the same order: the same bits. For the
    per-chunk CSC weight gradient, where D's rows are in L1 (one MNIST epoch, one
    thread, Zen 5: 0.056 -> 0.050 s at 100 units, 0.045 -> 0.043 at 72, 0.059 ->
    0.055 at 128); the forward product, bound by reading W's rows from L2, gained
    nothing from it (0.041 s either way at 100 units)."""
    lanes = VECTOR_BYTES // M.itemsize
    n_out = M.shape[1]
    n = (n_out + lanes - 1) // lanes
    jl = n_out - lanes
    if n == 9:
        combine_row9(out, i, idx, val, q0, q1, M, jl)
    elif n == 10:
        combine_row10(out, i, idx, val, q0, q1, M, jl)
    elif n == 11:
        combine_row11(out, i, idx, val, q0, q1, M, jl)
    elif n == 12:
        combine_row12(out, i, idx, val, q0, q1, M, jl)
    elif n == 13:
        combine_row13(out, i, idx, val, q0, q1, M, jl)
    elif n == 14:
        combine_row14(out, i, idx, val, q0, q1, M, jl)
    elif n == 15:
        combine_row15(out, i, idx, val, q0, q1, M, jl)
    else:
        combine_row16(out, i, idx, val, q0, q1, M, jl)


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def sparse_combine_row(out, i, idx, val, q0, q1, M):
    """out[i] = sum over q in q0..q1-1 of val[q] * M[idx[q]]: a sparse row times M,
    in tiles of 64, 32 and 8 float32 columns (half as many float64), each summed
    over q in order. Measured against the vectorised loop it replaces (four terms
    per pass over out[i]), one MNIST epoch of CSR forward products, one thread:
    0.049 against 0.080 s (32 units), 0.069 against 0.099 (64), 0.104 against
    0.125 (100), 0.227 against 0.229 (256)."""
    n_out = M.shape[1]
    lanes = VECTOR_BYTES // M.itemsize
    j0 = 0
    while j0 + 8 * lanes <= n_out:
        combine_tile8(out, i, j0, idx, val, q0, q1, M)
        j0 += 8 * lanes
    while j0 + 4 * lanes <= n_out:
        combine_tile4(out, i, j0, idx, val, q0, q1, M)
        j0 += 4 * lanes
    while j0 + lanes <= n_out:
        combine_tile1(out, i, j0, idx, val, q0, q1, M)
        j0 += lanes
    if j0 < n_out and n_out >= lanes:
        # The last partial tile overlaps the one before: those columns are computed
        # again, to the same bits.
        combine_tile1(out, i, n_out - lanes, idx, val, q0, q1, M)
        return
    zero = out.dtype.type(0)
    for j in range(j0, n_out):
        acc = zero
        for q in range(q0, q1):
            acc = acc + val[q] * M[idx[q], j]
        out[i, j] = acc


@intrinsic
def prefetch(typingctx, a, i):
    """Ask the cache for the line holding a[i] (a 1-D array) ahead of its use; no
    effect on results."""
    if not isinstance(a, types.Array) or a.ndim != 1:
        raise TypingError("prefetch: a must be a 1-D array")

    def codegen(context, builder, signature, args):
        arr = context.make_array(a)(context, builder, args[0])
        idx = context.cast(builder, args[1], signature.args[1], types.intp)
        ptr = builder.bitcast(builder.gep(arr.data, [idx]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]),
            "llvm.prefetch.p0i8")
        # read, keep in all cache levels (locality 3), data cache
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.none(a, i), codegen


@njit(cache=True, error_model="numpy")
def prefetch_csr_row(indptr, indices, values, src):
    """Prefetch row src of a CSR matrix (its column indices and values): rows of a
    shuffled batch are scattered over the training set, and the hardware
    prefetcher only catches on after a few lines of each."""
    p0, p1 = indptr[src], indptr[src + 1]
    step = 64 // indices.itemsize
    for p in range(p0, p1, step):
        prefetch(indices, p)
    step = 64 // values.itemsize
    for p in range(p0, p1, step):
        prefetch(values, p)


def _scatter_intrinsic(n_vec):
    @intrinsic
    def scatter_tile(typingctx, dW, touched, D, r, j0, idx, val, q0, q1):
        _check_arrays("scatter_tile", (("dW", dW, 2), ("D", D, 2), ("idx", idx, 1),
                                       ("val", val, 1), ("touched", touched, 1)),
                      ("dW", "val", "D"))
        if touched.dtype != types.boolean:
            raise TypingError("scatter_tile: touched must be a bool array")
        sig = types.none(dW, touched, D, r, j0, idx, val, q0, q1)

        def codegen(context, builder, signature, args):
            dW_t, tc_t, D_t, _, _, idx_t, val_t, _, _ = signature.args
            g = context.make_array(dW_t)(context, builder, args[0])
            tc = context.make_array(tc_t)(context, builder, args[1])
            d = context.make_array(D_t)(context, builder, args[2])
            ix = context.make_array(idx_t)(context, builder, args[5])
            vl = context.make_array(val_t)(context, builder, args[6])
            r_, j0_, q0_, q1_ = (context.cast(builder, args[n], signature.args[n], types.intp)
                                 for n in (3, 4, 7, 8))
            vec = _Vectors(context, builder, D_t.dtype)
            # D's row stays in registers for the whole run of nonzeros.
            drow = _row_ptr(builder, d, r_, j0_)
            dv = [builder.load(vec.ptr(drow, v), align=vec.align) for v in range(n_vec)]
            with vec.nonzeros(ix, vl, q0_, q1_) as (k, xv):
                seen = builder.icmp_unsigned("!=", builder.load(builder.gep(tc.data, [k])),
                                             ir.Constant(ir.IntType(8), 0))
                row = _row_ptr(builder, g, k, j0_)
                for v in range(n_vec):
                    p = vec.ptr(row, v)
                    # A select, not a branch: whether a row was seen before is close to a
                    # coin toss early in a batch. Stale contents are never multiplied.
                    base = builder.select(seen, builder.load(p, align=vec.align), vec.zero)
                    builder.store(builder.call(vec.fma, [xv, dv[v], base]), p, align=vec.align)
            return context.get_dummy_value()
        return sig, codegen
    return scatter_tile


scatter_tile8 = _scatter_intrinsic(8)
scatter_tile4 = _scatter_intrinsic(4)
scatter_tile1 = _scatter_intrinsic(1)


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def sparse_scatter_row(dW, touched, D, r, idx, val, q0, q1):
    """dW[idx[q]] = (dW[idx[q]] if touched[idx[q]] else 0) + val[q] * D[r] for q in
    q0..q1-1 (one fused multiply-add per number, D's row held in registers); the
    indices idx[q0:q1] must be distinct, and touched is read, not written: the
    caller marks the rows once the whole run is added."""
    n_out = D.shape[1]
    lanes = VECTOR_BYTES // D.itemsize
    j0 = 0
    while j0 + 8 * lanes <= n_out:
        scatter_tile8(dW, touched, D, r, j0, idx, val, q0, q1)
        j0 += 8 * lanes
    while j0 + 4 * lanes <= n_out:
        scatter_tile4(dW, touched, D, r, j0, idx, val, q0, q1)
        j0 += 4 * lanes
    while j0 + lanes <= n_out:
        scatter_tile1(dW, touched, D, r, j0, idx, val, q0, q1)
        j0 += lanes
    if j0 < n_out:
        zero = D.dtype.type(0)
        for q in range(q0, q1):
            k = idx[q]
            x = val[q]
            seen = touched[k]
            for j in range(j0, n_out):
                dW[k, j] = (dW[k, j] if seen else zero) + x * D[r, j]
