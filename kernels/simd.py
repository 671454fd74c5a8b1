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
import contextlib

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

VECTOR_BYTES = 32          # AVX2


def _check_arrays(fname, arrays, floats, contiguous=True):
    """Typing-time checks shared by the intrinsics: arrays is (name, type, ndim);
    floats names the arrays that must share one float dtype. contiguous=False
    admits any layout (for intrinsics that read rows through strides)."""
    for name, a, nd in arrays:
        if not isinstance(a, types.Array) or a.ndim != nd:
            raise TypingError(f"{fname}: {name} must be a {nd}-D array")
        if contiguous and a.layout != "C":
            raise TypingError(f"{fname}: {name} must be a C-contiguous {nd}-D array")
    kinds = {a.dtype for name, a, _ in arrays if name in floats}
    if len(kinds) != 1 or kinds.pop() not in (types.float32, types.float64):
        raise TypingError(f"{fname}: {', '.join(floats)} must share a float dtype")


def _switch(builder, intp, value, cases, name, emit):
    """One block per case, emit(case) filling it, chosen by value at run time; any
    other value does nothing."""
    done = builder.append_basic_block(f"{name}.done")
    switch = builder.switch(value, done)
    for case in cases:
        block = builder.append_basic_block(f"{name}.{case}")
        switch.add_case(ir.Constant(intp, case), block)
        builder.position_at_end(block)
        emit(case)
        builder.branch(done)
    builder.position_at_end(done)


class _Vectors:
    """The vector type of a float dtype (vector_bytes wide), its zero and fma."""

    def __init__(self, context, builder, dtype, vector_bytes=VECTOR_BYTES):
        self.intp = context.get_value_type(types.intp)
        fty = context.get_value_type(dtype)
        self.lanes = vector_bytes // (dtype.bitwidth // 8)
        self.vty = ir.VectorType(fty, self.lanes)
        self.align = dtype.bitwidth // 8
        self.ivty = ir.VectorType(ir.IntType(dtype.bitwidth), self.lanes)   # same-size ints
        self.zero = ir.Constant(self.vty, [ir.Constant(fty, 0.0)] * self.lanes)
        self.fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(self.vty, [self.vty] * 3),
            f"llvm.fma.v{self.lanes}f{dtype.bitwidth}")
        self.builder = builder

    def ptr(self, base, v):
        """Pointer to the v-th vector from the float pointer base."""
        b = self.builder
        return b.bitcast(b.gep(base, [ir.Constant(self.intp, v * self.lanes)]), self.vty.as_pointer())

    def tile_ptr(self, base, v, n_vec, j0, jl):
        """Pointer to vector v of a tile of n_vec vectors whose columns start at j0
        (base points there): the v-th vector, except that the last one starts at
        column jl when jl is given (ending on a row's last column, overlapping the
        one before)."""
        if jl is not None and v == n_vec - 1:
            b = self.builder
            return b.bitcast(b.gep(base, [b.sub(jl, j0)]), self.vty.as_pointer())
        return self.ptr(base, v)

    def splat(self, x):
        """A vector of this width with x (a float or an integer) in every lane."""
        b = self.builder
        i32 = ir.IntType(32)
        vty = ir.VectorType(x.type, self.lanes)
        xv = b.insert_element(ir.Constant(vty, ir.Undefined), x, ir.Constant(i32, 0))
        return b.shuffle_vector(xv, ir.Constant(vty, ir.Undefined),
                                ir.Constant(ir.VectorType(i32, self.lanes), [0] * self.lanes))

    def nonzero(self, ix, vl, q):
        """(idx[q] as intp, val[q] splatted)."""
        b = self.builder
        k = b.load(b.gep(ix.data, [q]))
        k = b.sext(k, self.intp) if k.type.width < self.intp.width else k
        return k, self.splat(b.load(b.gep(vl.data, [q])))

    def nonzeros(self, ix, vl, q0, q1):
        """Loop over q in q0..q1-1 yielding nonzero(ix, vl, q)."""
        @contextlib.contextmanager
        def loop():
            with cgutils.for_range_slice(self.builder, q0, q1, ir.Constant(self.intp, 1)) as (q, _):
                yield self.nonzero(ix, vl, q)
        return loop()


def _row_ptr(builder, arr, row, col):
    """Pointer to arr[row, col] of a C-contiguous 2-D array."""
    cols = cgutils.unpack_tuple(builder, arr.shape)[1]
    return builder.gep(arr.data, [builder.add(builder.mul(row, cols), col)])


def _start(builder, vec, acc_, dst, ptr, n_vec):
    """The accumulators' first values: out's n_vec vectors at dst where acc_ (an i1)
    is true, else zeros (out is read either way: it is the output, in bounds)."""
    return [cgutils.alloca_once_value(builder, builder.select(
        acc_, builder.load(ptr(dst, v), align=vec.align), vec.zero)) for v in range(n_vec)]


def _emit_combine(builder, vec, o, ix, vl, m, i_, j0_, q0_, q1_, n_vec, acc_, jl_=None):
    """out[i, tile] (+)= sum over q of val[q] * M[idx[q], tile] for the n_vec vectors
    of columns from j0 (the last one at jl instead, when given), each an
    accumulator in a register while the loop runs over the nonzeros, starting from
    out's own values where acc_ (an i1) is true, else from zero."""
    def ptr(base, v):
        return vec.tile_ptr(base, v, n_vec, j0_, jl_)
    dst = _row_ptr(builder, o, i_, j0_)
    accs = _start(builder, vec, acc_, dst, ptr, n_vec)
    with vec.nonzeros(ix, vl, q0_, q1_) as (k, xv):
        row = _row_ptr(builder, m, k, j0_)
        for v in range(n_vec):
            w = builder.load(ptr(row, v), align=vec.align)
            builder.store(builder.call(vec.fma, [xv, w, builder.load(accs[v])]), accs[v])
    for v in range(n_vec):
        builder.store(builder.load(accs[v]), ptr(dst, v), align=vec.align)


def _emit_combine2(builder, vec, o, ix, vl, m, i_, q0_, q1_, n_vec, acc_, jl_):
    """_emit_combine's sum for a row of n_vec vectors (the last at jl) with two
    accumulators per vector: the terms q0, q0+2, ... in one (which starts from
    out's values where acc_), q0+1, q0+3, ... in the other, added at the end. A
    narrow row has too few vectors to keep both FMA units busy with one chain each
    (an FMA waits for the one before in its chain)."""
    j0_ = ir.Constant(vec.intp, 0)

    def ptr(base, v):
        return vec.tile_ptr(base, v, n_vec, j0_, jl_)

    def add_term(q, accs):
        k, xv = vec.nonzero(ix, vl, q)
        row = _row_ptr(builder, m, k, j0_)
        for v in range(n_vec):
            w = builder.load(ptr(row, v), align=vec.align)
            builder.store(builder.call(vec.fma, [xv, w, builder.load(accs[v])]), accs[v])

    one = ir.Constant(vec.intp, 1)
    dst = _row_ptr(builder, o, i_, j0_)
    even = _start(builder, vec, acc_, dst, ptr, n_vec)
    odd = [cgutils.alloca_once_value(builder, vec.zero) for _ in range(n_vec)]
    pairs_end = builder.sub(q1_, one)
    with cgutils.for_range_slice(builder, q0_, pairs_end, ir.Constant(vec.intp, 2)) as (q, _):
        add_term(q, even)
        add_term(builder.add(q, one), odd)
    n_terms = builder.sub(q1_, q0_)
    is_odd = builder.icmp_signed(">", builder.and_(n_terms, one), ir.Constant(vec.intp, 0))
    with builder.if_then(is_odd):
        add_term(pairs_end, even)
    for v in range(n_vec):
        total = builder.fadd(builder.load(even[v]), builder.load(odd[v]))
        builder.store(total, ptr(dst, v), align=vec.align)


def _combine_arrays(context, builder, signature, args, positions):
    """The array structs of args at positions (out, idx, val, M), by their types."""
    return tuple(context.make_array(signature.args[n])(context, builder, args[n])
                 for n in positions)


def _check_combine(name, out, idx, val, M):
    _check_arrays(name, (("out", out, 2), ("M", M, 2), ("idx", idx, 1), ("val", val, 1)),
                  ("out", "val", "M"))


def _tile_intrinsic(n_vec):
    @intrinsic
    def combine_tile(typingctx, out, i, j0, idx, val, q0, q1, M, acc):
        """n_vec vectors of out[i]'s columns from j0 (added to where acc)."""
        _check_combine("combine_tile", out, idx, val, M)

        def codegen(context, builder, signature, args):
            o, ix, vl, m = _combine_arrays(context, builder, signature, args, (0, 3, 4, 7))
            i_, j0_, q0_, q1_ = (context.cast(builder, args[n], signature.args[n], types.intp)
                                 for n in (1, 2, 5, 6))
            vec = _Vectors(context, builder, signature.args[7].dtype)
            acc_ = context.cast(builder, args[8], signature.args[8], types.boolean)
            _emit_combine(builder, vec, o, ix, vl, m, i_, j0_, q0_, q1_, n_vec, acc_)
            return context.get_dummy_value()
        return types.none(out, i, j0, idx, val, q0, q1, M, acc), codegen
    return combine_tile


combine_tile8 = _tile_intrinsic(8)
combine_tile4 = _tile_intrinsic(4)
combine_tile1 = _tile_intrinsic(1)

WHOLE_ROW_VECTORS = (9, 16)   # rows combine_whole_row takes, in vectors


def _row_vectors(builder, vec, m):
    """(n, jl) for rows of M's width: its number of vectors (a row narrower than one
    counts as none) and the column where the last one starts (ending on the row's
    last column)."""
    n_out = cgutils.unpack_tuple(builder, m.shape)[1]
    lanes = ir.Constant(vec.intp, vec.lanes)
    n = builder.udiv(builder.add(n_out, builder.sub(lanes, ir.Constant(vec.intp, 1))), lanes)
    n = builder.select(builder.icmp_signed("<", n_out, lanes), ir.Constant(vec.intp, 0), n)
    return n, builder.sub(n_out, lanes)


def _whole_row_codegen(lo, hi, name, emit):
    """Codegen of an intrinsic (out, i, idx, val, q0, q1, M, acc) that sums a whole
    row of M's width in one pass (onto out's own values where acc): a switch on the
    row's number of vectors (lo to hi; a row narrower than one vector counts as
    none) picks the pass emit(builder, vec, o, ix, vl, m, i, q0, q1, n_vec, acc,
    jl) compiled for it, whose last vector starts at column jl (overlapping the one
    before); other widths are not written."""
    def codegen(context, builder, signature, args):
        o, ix, vl, m = _combine_arrays(context, builder, signature, args, (0, 2, 3, 6))
        i_, q0_, q1_ = (context.cast(builder, args[n], signature.args[n], types.intp)
                        for n in (1, 4, 5))
        vec = _Vectors(context, builder, signature.args[6].dtype)
        acc_ = context.cast(builder, args[7], signature.args[7], types.boolean)
        n, jl = _row_vectors(builder, vec, m)
        _switch(builder, vec.intp, n, range(lo, hi + 1), name,
                lambda n_vec: emit(builder, vec, o, ix, vl, m, i_, q0_, q1_, n_vec, acc_, jl))
        return context.get_dummy_value()
    return codegen


@intrinsic
def combine_whole_row(typingctx, out, i, idx, val, q0, q1, M, acc):
    """out[i] = sum over q of val[q] * M[idx[q]] (out[i] + that sum where acc, each
    column's terms added to it in order) for rows of 9 to 16 vectors (65-128
    float32 columns, 33-64 float64) in one pass over the nonzeros, the last vector
    ending on the last column (overlapping the one before: those columns are
    computed again, to the same bits). A switch on the row's vector count picks
    the pass compiled for it; other widths are not written."""
    _check_combine("combine_whole_row", out, idx, val, M)
    lo, hi = WHOLE_ROW_VECTORS

    def emit(builder, vec, o, ix, vl, m, i_, q0_, q1_, n_vec, acc_, jl):
        _emit_combine(builder, vec, o, ix, vl, m, i_, ir.Constant(vec.intp, 0), q0_, q1_,
                      n_vec, acc_, jl)
    return types.none(out, i, idx, val, q0, q1, M, acc), _whole_row_codegen(
        lo, hi, "whole_row", emit)


def _check_csc(name, cptr, crow, cval, val):
    for nm, a, kinds in (("cptr", cptr, (types.int64,)), ("crow", crow, (types.int32,)),
                         ("cval", cval, (val.dtype,))):
        if not isinstance(a, types.Array) or a.ndim != 1 or a.layout != "C":
            raise TypingError(f"{name}: {nm} must be a C-contiguous 1-D array")
        if a.dtype not in kinds:
            raise TypingError(f"{name}: {nm} must be {' or '.join(map(str, kinds))}")


@intrinsic
def combine_whole_row_csc(typingctx, out, i, idx, val, q0, q1, M, acc, k0, R, cptr, crow,
                          cval):
    """combine_whole_row's sum (the same bits), and, as each nonzero q is read, its
    entry in a CSC of the nonzeros by column (weight_grad_csc's fixed slots): with
    k = idx[q] and s = (k - k0) * R + cptr[k], crow[s] = i, cval[s] = val[q] and
    cptr[k] += 1 (k0 <= k and i < 2^31: the caller's). The stores go where the
    loop waits on M's rows anyway, so the sort costs almost nothing more than the
    product."""
    _check_combine("combine_whole_row_csc", out, idx, val, M)
    _check_csc("combine_whole_row_csc", cptr, crow, cval, val)
    lo, hi = WHOLE_ROW_VECTORS

    def codegen(context, builder, signature, args):
        o, ix, vl, m = _combine_arrays(context, builder, signature, args, (0, 2, 3, 6))
        cp, cr, cv = _combine_arrays(context, builder, signature, args, (10, 11, 12))
        i_, q0_, q1_, k0_, R_ = (context.cast(builder, args[n], signature.args[n], types.intp)
                                 for n in (1, 4, 5, 8, 9))
        vec = _Vectors(context, builder, signature.args[6].dtype)
        acc_ = context.cast(builder, args[7], signature.args[7], types.boolean)
        n, jl = _row_vectors(builder, vec, m)
        row32 = builder.trunc(i_, ir.IntType(32))
        one = ir.Constant(vec.intp, 1)

        def emit(n_vec):
            b = builder
            j0_ = ir.Constant(vec.intp, 0)

            def ptr(base, v):
                return vec.tile_ptr(base, v, n_vec, j0_, jl)
            dst = _row_ptr(b, o, i_, j0_)
            accs = _start(b, vec, acc_, dst, ptr, n_vec)
            with cgutils.for_range_slice(b, q0_, q1_, one) as (q, _):
                k = b.load(b.gep(ix.data, [q]))
                k = b.sext(k, vec.intp) if k.type.width < vec.intp.width else k
                x = b.load(b.gep(vl.data, [q]))
                xv = vec.splat(x)
                row = _row_ptr(b, m, k, j0_)
                for v in range(n_vec):
                    w = b.load(ptr(row, v), align=vec.align)
                    b.store(b.call(vec.fma, [xv, w, b.load(accs[v])]), accs[v])
                count = b.gep(cp.data, [k])
                c = b.load(count)
                slot = b.add(b.mul(b.sub(k, k0_), R_), c)
                b.store(row32, b.gep(cr.data, [slot]))
                b.store(x, b.gep(cv.data, [slot]))
                b.store(b.add(c, ir.Constant(c.type, 1)), count)
            for v in range(n_vec):
                b.store(b.load(accs[v]), ptr(dst, v), align=vec.align)
        _switch(builder, vec.intp, n, range(lo, hi + 1), "whole_row_csc", emit)
        return context.get_dummy_value()
    return (types.none(out, i, idx, val, q0, q1, M, acc, k0, R, cptr, crow, cval), codegen)


NARROW_ROW_VECTORS = 4   # rows combine_narrow_row takes: 1 to this many vectors


@intrinsic
def combine_narrow_row(typingctx, out, i, idx, val, q0, q1, M, acc):
    """out[i] = sum over q of val[q] * M[idx[q]] (onto out[i] where acc) for rows of
    1 to NARROW_ROW_VECTORS vectors (8-32 float32 columns, 4-16 float64), two
    chains of fused multiply-adds per vector (_emit_combine2: out[i] or zero and
    the even terms, the odd terms, then their sum), the last vector ending on the
    last column. Other widths are not written."""
    _check_combine("combine_narrow_row", out, idx, val, M)
    return types.none(out, i, idx, val, q0, q1, M, acc), _whole_row_codegen(
        1, NARROW_ROW_VECTORS, "narrow_row", _emit_combine2)


@njit(error_model="numpy", inline="always")
def takes_narrow_row(M):
    """Whether combine_narrow_row takes rows of M's width."""
    lanes = VECTOR_BYTES // M.itemsize
    return lanes <= M.shape[1] <= NARROW_ROW_VECTORS * lanes


@njit(error_model="numpy", inline="always")
def takes_whole_row(M):
    """Whether combine_whole_row takes rows of M's width (integer arithmetic only,
    so inlining it changes no floating-point flags)."""
    lanes = VECTOR_BYTES // M.itemsize
    lo, hi = WHOLE_ROW_VECTORS
    return (lo - 1) * lanes < M.shape[1] <= hi * lanes


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def sparse_combine_row(out, i, idx, val, q0, q1, M, acc):
    """out[i] = sum over q in q0..q1-1 of val[q] * M[idx[q]]: a sparse row times M,
    each column summed over q in order (the same bits every way below); where acc,
    out[i] + that sum, each column's terms added to out[i]'s value in order.

    Rows of 9 to 16 vectors go through combine_whole_row: one pass of 9-16
    independent chains of fused multiply-adds, where the later passes of 4 and 1
    vectors below wait on each FMA's latency. Same process, interleaved, one
    thread, Zen 5, one MNIST epoch of forward products (medians): 0.044 -> 0.038 s
    (100 units), 0.032 -> 0.026 (72), 0.052 -> 0.040 (128). Other widths: tiles of
    64, 32 and 8 float32 columns (half as many float64), measured against the
    vectorised loop they replaced (four terms per pass over out[i]), forward
    products: 0.049 against 0.080 s (32 units), 0.069 against 0.099 (64), 0.227
    against 0.229 (256)."""
    if takes_whole_row(M):
        combine_whole_row(out, i, idx, val, q0, q1, M, acc)
        return
    n_out = M.shape[1]
    lanes = VECTOR_BYTES // M.itemsize
    j0 = 0
    while j0 + 8 * lanes <= n_out:
        combine_tile8(out, i, j0, idx, val, q0, q1, M, acc)
        j0 += 8 * lanes
    while j0 + 4 * lanes <= n_out:
        combine_tile4(out, i, j0, idx, val, q0, q1, M, acc)
        j0 += 4 * lanes
    while j0 + lanes <= n_out:
        combine_tile1(out, i, j0, idx, val, q0, q1, M, acc)
        j0 += lanes
    if j0 < n_out and n_out >= lanes and not acc:
        # The last partial tile overlaps the one before: those columns are computed
        # again, to the same bits (not where acc: the tile before has already added
        # its sums to them).
        combine_tile1(out, i, n_out - lanes, idx, val, q0, q1, M, acc)
        return
    zero = out.dtype.type(0)
    for j in range(j0, n_out):
        s = out[i, j] if acc else zero
        for q in range(q0, q1):
            s = s + val[q] * M[idx[q], j]
        out[i, j] = s


def _splat(builder, value, n):
    """A vector of n lanes with value in every one."""
    v = ir.VectorType(value.type, n)
    i32 = ir.IntType(32)
    xv = builder.insert_element(ir.Constant(v, ir.Undefined), value, ir.Constant(i32, 0))
    return builder.shuffle_vector(xv, ir.Constant(v, ir.Undefined),
                                  ir.Constant(ir.VectorType(i32, n), [0] * n))


def _splat16(builder, value):
    return _splat(builder, value, 16)


def _splat64(builder, value):
    return _splat(builder, value, 64)


@intrinsic
def compress_row(typingctx, X, i, where, n_dense, indices, values, q0, q1):
    """indices[q0:], values[q0:] = where[j], X[i, j] for the columns j of row i with
    X[i, j] != 0 (NaN included) and where[j] >= n_dense, in column order, at most
    q1 - q0 of them: 16 columns at a time, each block's entries packed together by
    AVX-512's compress and written by a masked store (AVX-512 only: float32 X and
    values, int32 where and indices). The scalar loop it replaces keeps a branch-free
    store for every column; packing sixteen at once took MNIST's split 12 ms against
    19 (2 threads, float32 dense columns)."""
    _check_arrays("compress_row", (("X", X, 2), ("values", values, 1)), ("X", "values"))
    for name, a in (("where", where), ("indices", indices)):
        if not isinstance(a, types.Array) or a.ndim != 1 or a.layout != "C":
            raise TypingError(f"compress_row: {name} must be a C-contiguous 1-D array")
    if X.dtype != types.float32 or where.dtype != types.int32 or indices.dtype != types.int32:
        raise TypingError("compress_row: X and values float32, where and indices int32")

    def codegen(context, builder, signature, args):
        b = builder
        Xa, Wa, Ia, Va = (context.make_array(signature.args[n])(context, builder, args[n])
                          for n in (0, 2, 4, 5))
        intp = context.get_value_type(types.intp)
        i_, nd, q0_, q1_ = (context.cast(builder, args[n], signature.args[n], types.intp)
                            for n in (1, 3, 6, 7))
        f32, i32 = ir.FloatType(), ir.IntType(32)
        v16f, v16i, v16b = (ir.VectorType(t, 16) for t in (f32, i32, ir.IntType(1)))
        mod = b.module

        def fn(name, ret, argtys):
            return cgutils.get_or_insert_function(mod, ir.FunctionType(ret, argtys), name)
        compress_f = fn("llvm.x86.avx512.mask.compress.v16f32", v16f, [v16f, v16f, v16b])
        compress_i = fn("llvm.x86.avx512.mask.compress.v16i32", v16i, [v16i, v16i, v16b])
        load_f = fn("llvm.masked.load.v16f32.p0", v16f, [v16f.as_pointer(), i32, v16b, v16f])
        load_i = fn("llvm.masked.load.v16i32.p0", v16i, [v16i.as_pointer(), i32, v16b, v16i])
        store_f = fn("llvm.masked.store.v16f32.p0", ir.VoidType(),
                     [v16f, v16f.as_pointer(), i32, v16b])
        store_i = fn("llvm.masked.store.v16i32.p0", ir.VoidType(),
                     [v16i, v16i.as_pointer(), i32, v16b])
        ctpop = fn("llvm.ctpop.i16", ir.IntType(16), [ir.IntType(16)])
        four = ir.Constant(i32, 4)
        zero_f = ir.Constant(v16f, [ir.Constant(f32, 0.0)] * 16)
        zero_i = ir.Constant(v16i, [ir.Constant(i32, 0)] * 16)
        lanes = ir.Constant(v16i, list(range(16)))
        ndv = _splat16(b, b.trunc(nd, i32))
        n_cols = cgutils.unpack_tuple(b, Xa.shape)[1]
        row = b.gep(Xa.data, [b.mul(i_, n_cols)])
        q = cgutils.alloca_once_value(b, q0_)
        start, step = ir.Constant(intp, 0), ir.Constant(intp, 16)
        with cgutils.for_range_slice(b, start, n_cols, step) as (j, _):
            inside = b.icmp_signed("<", lanes, _splat16(b, b.trunc(b.sub(n_cols, j), i32)))
            x = b.call(load_f, [b.bitcast(b.gep(row, [j]), v16f.as_pointer()), four, inside,
                                zero_f])
            w = b.call(load_i, [b.bitcast(b.gep(Wa.data, [j]), v16i.as_pointer()), four, inside,
                                ndv])
            keep = b.and_(b.fcmp_unordered("!=", x, zero_f), b.icmp_signed(">=", w, ndv))
            keep = b.and_(keep, inside)
            n = b.zext(b.call(ctpop, [b.bitcast(keep, ir.IntType(16))]), intp)
            qq = b.load(q)
            room = b.sub(q1_, qq)
            n = b.select(b.icmp_signed("<", room, n), room, n)
            first = b.icmp_signed("<", lanes, _splat16(b, b.trunc(n, i32)))
            b.call(store_f, [b.call(compress_f, [x, zero_f, keep]),
                             b.bitcast(b.gep(Va.data, [qq]), v16f.as_pointer()), four, first])
            b.call(store_i, [b.call(compress_i, [w, zero_i, keep]),
                             b.bitcast(b.gep(Ia.data, [qq]), v16i.as_pointer()), four, first])
            b.store(b.add(qq, n), q)
        return context.get_dummy_value()
    return types.none(X, i, where, n_dense, indices, values, q0, q1), codegen


BLOCK = 16   # put_block's columns


@intrinsic
def put_block(typingctx, X, i, s, dense, w, d, n):
    """dense[i, w:w+BLOCK] = X[i, s:s+BLOCK], as 8-bit levels where dense is uint8
    (each value's integer c nearest x * d, 0 where that is not in 0..255 or x is NaN
    or -0.0: put_dense's, vector by vector), else as they are (dense of X's type);
    returns whether the first n of them (n may exceed BLOCK) are exact levels (c / d
    == x in X's float type, as put_dense decides for one value), always True for a
    float dense. The caller keeps both slices inside their rows. The same
    operations as the scalar code (multiply, then add, unfused), in vectors: a
    sparse input's split spent 8 of its 13 ms filling MNIST's dense columns one by
    one (2 threads)."""
    _check_arrays("put_block", (("X", X, 2), ("dense", dense, 2)), ("X",))
    levels = dense.dtype == types.uint8
    if not levels and dense.dtype != X.dtype:
        raise TypingError("put_block: dense must be uint8 or of X's dtype")
    if levels and d != X.dtype:
        raise TypingError("put_block: d must be of X's float type")

    def codegen(context, builder, signature, args):
        b = builder
        Xa, Da = (context.make_array(signature.args[n])(context, builder, args[n]) for n in (0, 3))
        i_, s_, w_, n_ = (context.cast(builder, args[k], signature.args[k], types.intp)
                          for k in (1, 2, 4, 6))
        fty = context.get_value_type(X.dtype)
        bits = X.dtype.bitwidth
        vf = ir.VectorType(fty, BLOCK)
        i32 = ir.IntType(32)
        x_row = b.gep(Xa.data, [b.add(b.mul(i_, cgutils.unpack_tuple(b, Xa.shape)[1]), s_)])
        x = b.load(b.bitcast(x_row, vf.as_pointer()), align=bits // 8)
        d_row = b.gep(Da.data, [b.add(b.mul(i_, cgutils.unpack_tuple(b, Da.shape)[1]), w_)])
        if not levels:
            b.store(x, b.bitcast(d_row, vf.as_pointer()), align=bits // 8)
            return ir.Constant(ir.IntType(1), 1)

        def splat(c):
            return ir.Constant(vf, [ir.Constant(fty, c)] * BLOCK)
        dv = _splat16(b, args[5])
        y = b.fadd(b.fmul(x, dv), splat(0.5))
        vi = ir.VectorType(ir.IntType(bits), BLOCK)
        positive = b.icmp_signed(">=", b.bitcast(x, vi), ir.Constant(vi, [0] * BLOCK))
        ok = b.and_(b.and_(b.fcmp_ordered(">=", y, splat(0.0)),
                           b.fcmp_ordered("<", y, splat(256.0))), positive)
        c = b.fptosi(b.select(ok, y, splat(0.0)), ir.VectorType(i32, BLOCK))
        exact = b.and_(ok, b.fcmp_ordered("==", b.fdiv(b.sitofp(c, vf), dv), x))
        b.store(b.trunc(c, ir.VectorType(ir.IntType(8), BLOCK)),
                b.bitcast(d_row, ir.VectorType(ir.IntType(8), BLOCK).as_pointer()), align=1)
        n32 = b.trunc(b.select(b.icmp_signed("<", n_, ir.Constant(n_.type, BLOCK)), n_,
                               ir.Constant(n_.type, BLOCK)), i32)
        counted = b.icmp_signed("<", ir.Constant(ir.VectorType(i32, BLOCK), list(range(BLOCK))),
                                _splat16(b, n32))
        wrong = b.and_(counted, b.not_(exact))
        return b.icmp_unsigned("==", b.bitcast(wrong, ir.IntType(BLOCK)),
                               ir.Constant(ir.IntType(BLOCK), 0))
    return types.boolean(X, i, s, dense, w, d, n), codegen


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


@njit(error_model="numpy", inline="always")
def prefetch_range(a, p0, p1):
    """Prefetch every line of a[p0:p1] (a 1-D array), its last included."""
    if p1 > p0:
        for p in range(p0, p1, 64 // a.itemsize):
            prefetch(a, p)
        prefetch(a, p1 - 1)


@njit(cache=True, error_model="numpy")
def prefetch_csr_part(indices, values, p0, p1):
    """Prefetch the nonzeros p0..p1-1 of a CSR matrix (their column indices and
    values): rows of a shuffled batch are scattered over the training set, and the
    hardware prefetcher only catches on after a few lines of each."""
    prefetch_range(indices, p0, p1)
    prefetch_range(values, p0, p1)


def _check_scatter(name, dW, touched, D, idx, val):
    _check_arrays(name, (("dW", dW, 2), ("D", D, 2), ("idx", idx, 1), ("val", val, 1),
                         ("touched", touched, 1)), ("dW", "val", "D"))
    if touched.dtype != types.boolean:
        raise TypingError(f"{name}: touched must be a bool array")


def _scatter_setup(context, builder, signature, args):
    """What the scatter intrinsics (dW, touched, D, r, j0, idx, val, q0, q1) unpack:
    the array structs of dW, touched, D, idx and val, then r, j0, q0, q1 as intp, and
    D's vectors."""
    arrays = tuple(context.make_array(signature.args[n])(context, builder, args[n])
                   for n in (0, 1, 2, 5, 6))
    ints = tuple(context.cast(builder, args[n], signature.args[n], types.intp)
                 for n in (3, 4, 7, 8))
    return arrays + ints + (_Vectors(context, builder, signature.args[2].dtype),)


def _emit_scatter(builder, vec, g, tc, d, ix, vl, r_, j0_, q0_, q1_, n_vec, jl_=None):
    """dW[idx[q], tile] = (old if touched[idx[q]] else 0) + val[q] * D[r, tile] for the
    n_vec vectors of columns from j0 (the last one at jl instead, when given).

    The old contents are kept or zeroed by a bit mask, all ones where touched[k] (a
    bool, 0 or 1) and zeros where not: whether a row was seen before is close to a
    coin toss early in a batch, so this must not be a branch, and LLVM's x86 back end
    turned `select(seen, load, 0)` into one (perf: mispredicted branches were the
    hottest instructions of a seed002 epoch). Masking gives the same bits as the
    select: stale contents, even NaN, become +0.0 and are never multiplied.

    D's tile stays in registers for the whole run of nonzeros. With jl (a row whose
    width is not a whole number of vectors), the last two vectors' old contents are
    both loaded before either is stored, so the columns where the last vector
    overlaps the one before are computed twice from the same old values, to the
    same bits.
    """
    ivty = vec.ivty

    def ptr(base, v):
        return vec.tile_ptr(base, v, n_vec, j0_, jl_)
    drow = _row_ptr(builder, d, r_, j0_)
    dv = [builder.load(ptr(drow, v), align=vec.align) for v in range(n_vec)]
    with vec.nonzeros(ix, vl, q0_, q1_) as (k, xv):
        seen = builder.zext(builder.load(builder.gep(tc.data, [k])), ivty.element)
        mask = vec.splat(builder.neg(seen))
        row = _row_ptr(builder, g, k, j0_)
        new = []
        for v in range(n_vec):
            p = ptr(row, v)
            old = builder.bitcast(builder.load(p, align=vec.align), ivty)
            base = builder.bitcast(builder.and_(old, mask), vec.vty)
            new.append((p, builder.call(vec.fma, [xv, dv[v], base])))
            if jl_ is None or v < n_vec - 2:
                builder.store(new[-1][1], p, align=vec.align)
        if jl_ is not None:
            for p, value in new[-2:]:
                builder.store(value, p, align=vec.align)


def _scatter_intrinsic(n_vec):
    @intrinsic
    def scatter_tile(typingctx, dW, touched, D, r, j0, idx, val, q0, q1):
        _check_scatter("scatter_tile", dW, touched, D, idx, val)
        sig = types.none(dW, touched, D, r, j0, idx, val, q0, q1)

        def codegen(context, builder, signature, args):
            g, tc, d, ix, vl, r_, j0_, q0_, q1_, vec = _scatter_setup(
                context, builder, signature, args)
            _emit_scatter(builder, vec, g, tc, d, ix, vl, r_, j0_, q0_, q1_, n_vec)
            return context.get_dummy_value()
        return sig, codegen
    return scatter_tile


TAIL_MAX_VECTORS = 8   # whole vectors scatter_tail takes before its overlapping last one


@intrinsic
def scatter_tail(typingctx, dW, touched, D, r, j0, idx, val, q0, q1):
    """scatter_tile over the last columns of rows whose width is not a whole number
    of vectors: the m = 1..TAIL_MAX_VECTORS whole vectors from j0, then one ending
    on the last column (overlapping the one before), in one pass; a switch on m
    picks the pass compiled for it. Other m are not written."""
    _check_scatter("scatter_tail", dW, touched, D, idx, val)

    def codegen(context, builder, signature, args):
        g, tc, d, ix, vl, r_, j0_, q0_, q1_, vec = _scatter_setup(
            context, builder, signature, args)
        n_out = cgutils.unpack_tuple(builder, d.shape)[1]
        lanes = ir.Constant(vec.intp, vec.lanes)
        m = builder.udiv(builder.sub(n_out, j0_), lanes)
        jl = builder.sub(n_out, lanes)
        _switch(builder, vec.intp, m, range(1, TAIL_MAX_VECTORS + 1), "scatter_tail",
                lambda n: _emit_scatter(builder, vec, g, tc, d, ix, vl, r_, j0_, q0_, q1_,
                                        n + 1, jl))
        return context.get_dummy_value()
    return types.none(dW, touched, D, r, j0, idx, val, q0, q1), codegen


scatter_tile8 = _scatter_intrinsic(8)
scatter_tile4 = _scatter_intrinsic(4)
scatter_tile1 = _scatter_intrinsic(1)


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def sparse_scatter_row(dW, touched, D, r, idx, val, q0, q1):
    """dW[idx[q]] = (dW[idx[q]] if touched[idx[q]] else 0) + val[q] * D[r] for q in
    q0..q1-1 (one fused multiply-add per number, D's row held in registers); the
    indices idx[q0:q1] must be distinct, and touched is read, not written: the
    caller marks the rows once the whole run is added. A width that is not a whole
    number of vectors ends in scatter_tail's pass, whose last vector overlaps (the
    scalar loop it replaced took 0.09 s of an MNIST epoch at 10 units)."""
    n_out = D.shape[1]
    lanes = VECTOR_BYTES // D.itemsize
    if n_out % lanes != 0 and n_out > lanes:
        j0 = 0
        while (n_out - j0) // lanes > TAIL_MAX_VECTORS:
            scatter_tile8(dW, touched, D, r, j0, idx, val, q0, q1)
            j0 += 8 * lanes
        scatter_tail(dW, touched, D, r, j0, idx, val, q0, q1)
        return
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
    if j0 < n_out:    # rows narrower than one vector
        zero = D.dtype.type(0)
        for q in range(q0, q1):
            k = idx[q]
            x = val[q]
            seen = touched[k]
            for j in range(j0, n_out):
                dW[k, j] = (dW[k, j] if seen else zero) + x * D[r, j]


@intrinsic
def popcount(typingctx, x):
    """The number of bits set in x (a 64-bit unsigned integer): one instruction."""
    if x != types.uint64:
        raise TypingError("popcount: x must be a uint64")

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i64]),
                                            "llvm.ctpop.i64")
        return builder.call(fn, [args[0]])
    return types.int64(x), codegen


@intrinsic
def permute_bytes(typingctx, dense, i, order):
    """dense[i, p] = dense[i, order[p]] for p < n_dense, every read before any
    write (a uint8 row of at most 256 numbers, in place): each 64-byte block of
    the result picked from the row's four blocks by two AVX-512 VBMI two-table
    byte permutes and a blend on each index's top bit. order is uint8, its
    length a multiple of 64 covering the row."""
    for name, a in (("dense", dense), ("order", order)):
        if not (isinstance(a, types.Array) and a.dtype == types.uint8 and a.layout == "C"):
            raise TypingError(f"permute_bytes: {name} must be a C-contiguous uint8 array")
    if dense.ndim != 2 or order.ndim != 1:
        raise TypingError("permute_bytes: dense 2-D, order 1-D")

    def codegen(context, builder, signature, args):
        b = builder
        D = context.make_array(signature.args[0])(context, builder, args[0])
        O = context.make_array(signature.args[2])(context, builder, args[2])
        intp = context.get_value_type(types.intp)
        i_ = context.cast(builder, args[1], signature.args[1], types.intp)
        i8, i32, i1 = ir.IntType(8), ir.IntType(32), ir.IntType(1)
        v64, vb = ir.VectorType(i8, 64), ir.VectorType(i1, 64)

        def fn(name, ret, argtys):
            return cgutils.get_or_insert_function(b.module, ir.FunctionType(ret, argtys), name)
        perm2 = fn("llvm.x86.avx512.vpermi2var.qi.512", v64, [v64, v64, v64])
        mload = fn("llvm.masked.load.v64i8.p0", v64, [v64.as_pointer(), i32, vb, v64])
        mstore = fn("llvm.masked.store.v64i8.p0", ir.VoidType(), [v64, v64.as_pointer(), i32, vb])
        n = cgutils.unpack_tuple(b, D.shape)[1]
        row = b.gep(D.data, [b.mul(i_, n)])
        lanes = ir.Constant(ir.VectorType(i32, 64), list(range(64)))
        zero = ir.Constant(v64, [ir.Constant(i8, 0)] * 64)

        def inside(c):
            # lanes of block c inside the row
            left = b.sub(n, ir.Constant(intp, 64 * c))
            left = b.select(b.icmp_signed("<", left, ir.Constant(intp, 0)),
                            ir.Constant(intp, 0), left)
            left = b.select(b.icmp_signed(">", left, ir.Constant(intp, 64)),
                            ir.Constant(intp, 64), left)
            return b.icmp_signed("<", lanes, _splat64(b, b.trunc(left, i32)))

        def ptr(base, c):
            return b.bitcast(b.gep(base, [ir.Constant(intp, 64 * c)]), v64.as_pointer())
        src = [b.call(mload, [ptr(row, c), ir.Constant(i32, 1), inside(c), zero])
               for c in range(4)]
        out = []
        for c in range(4):
            idx = b.call(mload, [ptr(O.data, c), ir.Constant(i32, 1), inside(c), zero])
            lo = b.call(perm2, [src[0], idx, src[1]])
            hi = b.call(perm2, [src[2], idx, src[3]])
            top = b.icmp_signed("<", idx, zero)
            out.append(b.select(top, hi, lo))
        for c in range(4):
            b.call(mstore, [out[c], ptr(row, c), ir.Constant(i32, 1), inside(c)])
        return context.get_dummy_value()
    return types.none(dense, i, order), codegen



@intrinsic
def quad_nonzeros(typingctx, X, i, k, n):
    """Bit q (q < 16) set where any of X[i, k + 4q .. k + 4q + 3] is nonzero, those
    columns below k + n (n > 0; the row's columns past it read as zeros): 64 bytes
    of a uint8 row at once, as sixteen 32-bit lanes compared with zero."""
    if not (isinstance(X, types.Array) and X.ndim == 2 and X.dtype == types.uint8
            and X.layout == "C"):
        raise TypingError("quad_nonzeros: X must be a C-contiguous 2-D uint8 array")

    def codegen(context, builder, signature, args):
        b = builder
        A = context.make_array(signature.args[0])(context, builder, args[0])
        intp = context.get_value_type(types.intp)
        i_, k_, n_ = (context.cast(builder, args[j], signature.args[j], types.intp)
                      for j in (1, 2, 3))
        i8, i32, i1 = ir.IntType(8), ir.IntType(32), ir.IntType(1)
        v64, vb = ir.VectorType(i8, 64), ir.VectorType(i1, 64)
        v16 = ir.VectorType(i32, 16)
        mload = cgutils.get_or_insert_function(
            b.module, ir.FunctionType(v64, [v64.as_pointer(), i32, vb, v64]),
            "llvm.masked.load.v64i8.p0")
        cols = cgutils.unpack_tuple(b, A.shape)[1]
        p = b.gep(A.data, [b.add(b.mul(i_, cols), k_)])
        left = b.select(b.icmp_signed(">", n_, ir.Constant(intp, 64)), ir.Constant(intp, 64), n_)
        lanes = ir.Constant(ir.VectorType(i32, 64), list(range(64)))
        inside = b.icmp_signed("<", lanes, _splat64(b, b.trunc(left, i32)))
        zero = ir.Constant(v64, [ir.Constant(i8, 0)] * 64)
        x = b.call(mload, [b.bitcast(p, v64.as_pointer()), ir.Constant(i32, 1), inside, zero])
        nz = b.icmp_unsigned("!=", b.bitcast(x, v16), ir.Constant(v16, [ir.Constant(i32, 0)] * 16))
        return b.zext(b.bitcast(nz, ir.IntType(16)), ir.IntType(64))
    return types.uint64(X, i, k, n), codegen
