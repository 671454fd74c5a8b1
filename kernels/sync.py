"""Barriers for the chunks of one parallel region, so that a whole run of
batches is one region instead of two per batch.

A numba parallel loop costs a fork and a join of the thread pool, 1-8 us each on a
2-vCPU VM; a 32-row batch (seed002) trains in ~40 us and took two. Here the chunks
enter one region, check that they all run at the same time (check_in), and then
wait for each other at barriers: an atomic count of arrivals, the last of which
moves a generation number on that the others poll, yielding the CPU between looks
(barrier says why they do not spin).

Waiting for each other needs every chunk on a thread of its own at the same
time. OpenMP's static schedule does that (numba gives each thread one chunk when
there are as many chunks as threads), but a pool that may run two chunks one after the other on one
thread (TBB's work stealing, a busy pool) would wait forever; check_in gives up
after a while and lets the chunk that gave up run every chunk's work itself
(the same bits: a chunk's result does not depend on its thread). A waiting chunk
yields the CPU (sched_yield), so that more threads than cores still progress
(seed002's network, 4 threads on 2 cores: 0.022 s for 6,000 rows, 2 threads 0.016).
"""
import sys

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

from .fpenv import _is_x86


def _cell(context, builder, arrty, arr, i):
    a = context.make_array(arrty)(context, builder, arr)
    return builder.gep(a.data, [i])


def _check(name, arr, i):
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64 and arr.ndim == 1):
        raise TypingError(f"{name}: the array must be a 1-D int64 array")
    if not isinstance(i, types.Integer):
        raise TypingError(f"{name}: the index must be an integer")


@intrinsic
def atomic_add(typingctx, arr, i, v):
    """arr[i] += v atomically (sequentially consistent); returns the old value."""
    _check("atomic_add", arr, i)

    def codegen(context, builder, sig, args):
        p = _cell(context, builder, sig.args[0], args[0], args[1])
        return builder.atomic_rmw("add", p, context.cast(builder, args[2], sig.args[2],
                                                          types.int64), "seq_cst")
    return types.int64(arr, i, v), codegen


@intrinsic
def atomic_cas(typingctx, arr, i, expected, new):
    """arr[i] = new if arr[i] == expected, atomically; returns whether it did."""
    _check("atomic_cas", arr, i)

    def codegen(context, builder, sig, args):
        p = _cell(context, builder, sig.args[0], args[0], args[1])
        e = context.cast(builder, args[2], sig.args[2], types.int64)
        n = context.cast(builder, args[3], sig.args[3], types.int64)
        res = builder.cmpxchg(p, e, n, "seq_cst", "seq_cst")
        return builder.extract_value(res, 1)
    return types.boolean(arr, i, expected, new), codegen


@intrinsic
def atomic_load(typingctx, arr, i):
    """arr[i], an acquire load: later reads see what was written before the store
    that this load saw."""
    _check("atomic_load", arr, i)

    def codegen(context, builder, sig, args):
        p = _cell(context, builder, sig.args[0], args[0], args[1])
        return builder.load_atomic(p, "acquire", 8)
    return types.int64(arr, i), codegen


@intrinsic
def atomic_store(typingctx, arr, i, v):
    """arr[i] = v, a release store: what was written before it is seen by an acquire
    load that sees v."""
    _check("atomic_store", arr, i)

    def codegen(context, builder, sig, args):
        p = _cell(context, builder, sig.args[0], args[0], args[1])
        builder.store_atomic(context.cast(builder, args[2], sig.args[2], types.int64), p,
                             "release", 8)
        return context.get_dummy_value()
    return types.none(arr, i, v), codegen


@intrinsic
def yield_cpu(typingctx):
    """sched_yield(): let another thread run on this CPU (a pause on Windows)."""
    def codegen(context, builder, sig, args):
        if sys.platform == "win32":
            if _is_x86(builder):    # the pause hint; nothing on other CPUs
                fn = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
                builder.call(fn, [])
        else:
            fn = cgutils.get_or_insert_function(builder.module,
                                                ir.FunctionType(ir.IntType(32), []),
                                                "sched_yield")
            builder.call(fn, [])
        return context.get_dummy_value()
    return types.none(), codegen


@intrinsic
def cycle_count(typingctx):
    """x86's time stamp counter (rdtsc through llvm.readcyclecounter; it runs at a
    constant rate of about 1-4 GHz), or 0 on other CPUs: there the intrinsic reads
    a performance counter that Linux and macOS keep from user code (AArch64's
    PMCCNTR_EL0 traps)."""
    def codegen(context, builder, sig, args):
        if not _is_x86(builder):
            return ir.Constant(ir.IntType(64), 0)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(64), []),
                                            "llvm.readcyclecounter")
        return builder.call(fn, [])
    return types.int64(), codegen


# ctl's cells, a cache line apart: barrier's arrival count and generation,
# check_in's arrivals, and a flag the leading chunk raises to stop every chunk.
COUNT, GEN, ARRIVED, STOP = 0, 8, 16, 24
CTL_SIZE = 32
CLOSED = 1 << 40            # added to ARRIVED when a chunk gave up waiting
# check_in gives up after CHECK_IN_CYCLES of the cycle counter (0.05-0.2 s at 1-4
# GHz) and at least CHECK_IN_MIN_YIELDS yields, or after CHECK_IN_YIELDS yields
# whatever the counter says (it reads 0 on CPUs other than x86). Yields alone are
# no measure of time: on an idle core 100,000 take 0.05-0.1 s, but with other
# threads ready to run each may hand over the CPU for a whole time slice (minutes
# in all).
CHECK_IN_CYCLES = 200_000_000
CHECK_IN_MIN_YIELDS = 10
CHECK_IN_YIELDS = 100_000
ALONE, PARALLEL, ALL = 0, 1, 2   # check_in's answers


# inline="always": numba inlines these where they are called instead of compiling
# each on its own (0.3 s of a cold start each).
@njit(error_model="numpy", inline="always")
def check_in(ctl, n):
    """Called once by each of the n chunks of a region (ctl zeroed before it).
    PARALLEL: all n are running at once, each on its own thread, and may use
    barrier. ALL: they were not (a chunk waited for the others as long as
    CHECK_IN_CYCLES and the yields above say); this chunk runs every chunk's work,
    alone. ALONE: another chunk took the work (ALL); this one does nothing. Exactly one of the n gets ALL, or all
    get PARALLEL: a chunk gives up only by a compare-and-swap of the arrival count
    it saw (below n) to that count plus CLOSED, after which no count equals n."""
    if atomic_add(ctl, ARRIVED, 1) >= CLOSED:
        return ALONE
    yields = 0
    start = cycle_count()
    while True:
        seen = atomic_load(ctl, ARRIVED)
        if seen == n:
            return PARALLEL
        if seen >= CLOSED:
            return ALONE
        waited = yields > CHECK_IN_YIELDS or (yields >= CHECK_IN_MIN_YIELDS and
                                              cycle_count() - start > CHECK_IN_CYCLES)
        if waited and atomic_cas(ctl, ARRIVED, seen, seen + CLOSED):
            return ALL
        yield_cpu()
        yields += 1


@njit(error_model="numpy", inline="always")
def barrier(ctl, n, gen):
    """Wait until all n chunks have called barrier with this gen; returns the next
    generation (every chunk passes the value returned to the next call).

    A waiting chunk yields the CPU between looks, without spinning first: with more
    threads than cores, a chunk that spins keeps the core from the chunk it waits
    for. seed002's network, 6,000 rows, batch 32, on a 2-core VM, best and median of
    5 epochs, 2,000 pauses before yielding against 100 against none: 3 threads
    0.054/0.068 s, 0.025/0.034, 0.021/0.025; 4 threads 0.053/0.057, 0.024/0.027,
    0.022/0.025 (2 threads 0.016). With a core per thread, paired whole epochs on 2
    threads against 2,000 pauses: none, seed002 0.91-1.09 in five sets (geometric
    mean 1.00), the estimator's network (Adam, L2) 1.01, 1.08, 0.96; 100, seed002
    1.00-1.08 (geometric mean 1.04), the estimator's 1.02, 0.98, 0.90: within the
    noise either way, and none is best for the tightest target (seed002's) and for
    an oversubscribed pool."""
    if atomic_add(ctl, COUNT, 1) == n - 1:
        atomic_store(ctl, COUNT, 0)
        atomic_store(ctl, GEN, gen + 1)
    else:
        while atomic_load(ctl, GEN) == gen:
            yield_cpu()
    return gen + 1
