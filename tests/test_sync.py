"""fastmlp.kernels.sync: the check-in and barrier that let a run of batches be one
parallel region, and the compiled epoch when its chunks cannot run at once."""
import copy
import os
import subprocess
import sys
import time

import numba
import numpy as np
import pytest
from numba import njit, prange

import fastmlp
from fastmlp._numba_backend import num_threads
from fastmlp.kernels import sync
from fastmlp.kernels.sync import ALL, ALONE, PARALLEL, CTL_SIZE, barrier, check_in, cycle_count

from conftest import random_targets
from test_backends import NETS, digest, inputs

TWO = numba.config.NUMBA_NUM_THREADS >= 2
needs_two = pytest.mark.skipif(not TWO, reason="needs 2 numba threads")


@njit(parallel=True)
def _check_in_parallel(ctl, modes):
    for t in prange(modes.shape[0]):
        modes[t] = check_in(ctl, modes.shape[0])


@njit
def _check_in_one_after_another(ctl, modes):
    for t in range(modes.shape[0]):
        modes[t] = check_in(ctl, modes.shape[0])


@njit(parallel=True)
def _rounds(ctl, cells, seen, rounds):
    # Each chunk writes its round number, and after a barrier reads every chunk's:
    # a barrier that let a chunk through early shows up as a cell from the round
    # before (or after, without the second barrier).
    n = cells.shape[0]
    for t in prange(n):
        gen = 0
        bad = 0
        for r in range(1, rounds + 1):
            cells[t] = r
            gen = barrier(ctl, n, gen)
            for c in range(n):
                bad += cells[c] != r
            gen = barrier(ctl, n, gen)
        seen[t] = bad


@needs_two
def test_chunks_running_at_once_all_check_in():
    with num_threads(2):
        for _ in range(20):
            ctl = np.zeros(CTL_SIZE, dtype=np.int64)
            modes = np.full(2, -1, dtype=np.int64)
            _check_in_parallel(ctl, modes)
            assert modes.tolist() == [PARALLEL, PARALLEL]


def test_chunks_run_one_after_another_leave_the_work_to_one():
    # What a pool that runs both chunks on one thread looks like: the first waits,
    # gives up and takes every chunk's work (ALL); the second then does nothing.
    ctl = np.zeros(CTL_SIZE, dtype=np.int64)
    modes = np.full(3, -1, dtype=np.int64)
    _check_in_one_after_another(ctl, modes)
    assert modes.tolist() == [ALL, ALONE, ALONE]
    assert ctl[sync.ARRIVED] >= sync.CLOSED


@njit
def _cycles():
    return cycle_count()


def test_cycle_count_advances():
    a = _cycles()
    time.sleep(0.01)
    b = _cycles()
    if a == 0 and b == 0:
        pytest.skip("LLVM has no cycle counter for this CPU (check_in counts yields only)")
    assert b > a


def test_a_chunk_left_alone_gives_up_soon_on_a_busy_machine():
    """check_in's wait is bounded by the clock, not only by its number of yields:
    with more runnable threads than cores a yield can hand the CPU over for a whole
    time slice (on a 2-core VM with four busy processes, 1,000 yields took about 2 s,
    and check_in counting 100,000 yields had not given up after 40 s; bounded by the
    cycle counter it gives up in 0.08 s). Without a counter (CPUs other than x86)
    only the yields bound it, so this needs x86; 10 s is far from either."""
    if _cycles() == 0:
        pytest.skip("no cycle counter on this CPU: check_in counts yields only")
    _check_in_one_after_another(np.zeros(CTL_SIZE, dtype=np.int64), np.zeros(2, dtype=np.int64))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(min(2 * (cores or 1), 8))]
    try:
        time.sleep(0.3)
        ctl = np.zeros(CTL_SIZE, dtype=np.int64)
        modes = np.full(2, -1, dtype=np.int64)
        t = time.perf_counter()
        _check_in_one_after_another(ctl, modes)
        seconds = time.perf_counter() - t
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert modes.tolist() == [ALL, ALONE]
    assert seconds < 10


def test_one_chunk_checks_in_alone():
    ctl = np.zeros(CTL_SIZE, dtype=np.int64)
    modes = np.full(1, -1, dtype=np.int64)
    _check_in_one_after_another(ctl, modes)
    assert modes.tolist() == [PARALLEL]


@needs_two
def test_barrier_holds_every_chunk_until_all_arrive():
    with num_threads(2):
        ctl = np.zeros(CTL_SIZE, dtype=np.int64)
        cells = np.zeros(2, dtype=np.int64)
        seen = np.full(2, -1, dtype=np.int64)
        _rounds(ctl, cells, seen, 20000)
        assert seen.tolist() == [0, 0]
        assert ctl[sync.GEN] == 40000 and ctl[sync.COUNT] == 0


@needs_two
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("sizes,acts,loss", NETS[:3])
def test_epoch_with_its_chunks_on_one_thread_gives_the_same_bytes(sizes, acts, loss, optimizer):
    """Workspaces for two chunks, run with one numba thread: the chunks run one
    after the other, the first does both chunks' work (check_in's ALL), and the
    weights are those of two threads, to the bit. With Adam a sparse first layer
    is split between the chunks by input columns (four steps a batch)."""
    rng = np.random.default_rng(3)
    n, bs = 301, 40
    X = inputs(rng, n, sizes[0]).astype(np.float32)
    model = fastmlp.MLP(sizes, acts, seed=2)
    Y = fastmlp.trainer.targets(model, random_targets(rng, n, sizes[-1], loss, model.activations[-1]))
    order = rng.permutation(n)
    results = []
    for serial in (False, True):
        m = copy.deepcopy(model)
        engine = fastmlp.Trainer(m, loss=loss, lr=0.1, batch_size=bs, threads=2,
                                 optimizer=optimizer)._get_engine()
        with engine.threads_context():
            engine.prepare(X, Y)
            assert engine.called.shape == (4, 2)
            assert (engine.cuts is not None) == (engine.sparse and optimizer == "adam")
            with num_threads(1 if serial else 2):
                total, correct, bad, done = engine.train_batches(order, bs, 0, -(-n // bs), 0.1)
        assert (bad, done) == (-1, -(-n // bs))
        results.append((digest(m), total, correct))
    assert results[0] == results[1]
    assert results[0][0] != digest(model)
