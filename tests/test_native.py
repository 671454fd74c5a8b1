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


def _packed_locals_freed_before(func, runner):
    """Arrays that func allocates itself, packs into a block (pack_call) and lets
    numba free (a `del`, numba's release of a variable after its last use) on some
    path from the packing to the call of runner, which runs the packed calls. The
    block holds no reference, so those would be freed memory when the kernels
    use them."""
    from numba.core import compiler, ir, postproc
    fir = compiler.run_frontend(func.py_func)
    postproc.PostProcessor(fir).run(emit_dels=True)

    def callee(expr):
        if isinstance(expr, ir.Expr) and expr.op == "call":
            target = fir.get_definition(expr.func)
            if isinstance(target, (ir.Global, ir.FreeVar)):
                return target.value
            if isinstance(target, ir.Expr) and target.op == "getattr":
                owner = fir.get_definition(target.value)
                if isinstance(owner, (ir.Global, ir.FreeVar)):
                    return getattr(owner.value, target.attr, None)
        return None

    packed, allocated = [], set()
    run_at = None
    for label, block in fir.blocks.items():
        for i, stmt in enumerate(block.body):
            if not isinstance(stmt, ir.Assign):
                continue
            fn = callee(stmt.value)
            if fn is pack_call:
                args = fir.get_definition(stmt.value.args[2])
                # A tuple built here; one passed in (an ir.Arg) is the caller's.
                items = args.items if isinstance(args, ir.Expr) and args.op == "build_tuple" else []
                # numba may release an item as soon as the tuple holds it: count
                # from the tuple's construction.
                built = next(j for j, st in enumerate(block.body) if isinstance(st, ir.Assign)
                             and st.target.name == stmt.value.args[2].name)
                packed.append(((label, built), [v.name for v in items
                                                if isinstance(v, ir.Var)]))
            elif fn in (np.zeros, np.empty, np.ones):
                allocated.add(stmt.target.name)
            elif fn is runner:
                run_at = (label, i)
    assert packed and run_at is not None
    succ = {label: [t for t in (getattr(b.terminator, "target", None),
                                getattr(b.terminator, "truebr", None),
                                getattr(b.terminator, "falsebr", None)) if t is not None]
            for label, b in fir.blocks.items()}

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in succ[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    freed = set()
    for (plabel, pi), names in packed:
        mine = set(names) & allocated
        # Blocks on a path from the packing to the run (both included).
        between = {b for b in reach(plabel) | {plabel}
                   if b == run_at[0] or run_at[0] in reach(b)}
        for label in between:
            for i, stmt in enumerate(fir.blocks[label].body):
                if (label == plabel and i <= pi) or (label == run_at[0] and i >= run_at[1]):
                    continue
                if isinstance(stmt, ir.Del) and stmt.value in mine:
                    freed.add(stmt.value)
    return freed


def test_train_epoch_keeps_every_packed_array_alive_while_the_chunks_run():
    # The barriers' counters were once allocated in train_epoch and packed for the
    # chunks, whose run then read and wrote freed memory: numba released the array
    # right after packing it (its last use), and a rare reuse of that memory hung
    # every chunk at a barrier.
    from fastmlp.kernels import epoch
    assert _packed_locals_freed_before(epoch.train_epoch, epoch.run_chunks) == set()


def test_the_packed_lifetime_check_sees_a_freed_array():
    # The check above, on the mistake it guards against: a local array packed and
    # not used again.
    @njit
    def freed_too_early(addr, key, called):
        ctl = np.zeros(4, dtype=np.int64)
        tramp, block = pack_call(addr, key, (ctl,))
        _run_packed(tramp, block, called)

    @njit
    def kept(addr, key, called):
        ctl = np.zeros(4, dtype=np.int64)
        tramp, block = pack_call(addr, key, (ctl,))
        _run_packed(tramp, block, called)
        return ctl[0]

    assert _packed_locals_freed_before(freed_too_early, _run_packed) == {"ctl"}
    assert _packed_locals_freed_before(kept, _run_packed) == set()


@njit
def _run_packed(tramp, block, called):
    for t in range(called.shape[0]):
        called[t] = call_packed(tramp, block, t)
