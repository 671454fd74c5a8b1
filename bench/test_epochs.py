"""One training step and one whole epoch per configuration, numba against the NumPy
reference. Compilation and workspace set-up happen in the fixtures, never inside
the timed call."""

import numpy as np
import pytest

import fastmlp
from fastmlp import trainer as trainer_mod

from bench import common
from bench.conftest import THREADS

CASES = [(name, "numpy", None) for name in common.CONFIGS] + \
        [(name, "numba", t) for name in common.CONFIGS for t in THREADS]


def make_engine(name, backend, threads, X, y):
    sizes, acts, loss, bs, lr = common.CONFIGS[name]
    model = fastmlp.MLP(sizes, acts, seed=0)
    tr = fastmlp.Trainer(model, loss, lr=lr, batch_size=bs, seed=0, backend=backend, threads=threads)
    engine = tr._get_engine()
    Xc, Yc = trainer_mod._check_xy(model, X, y)
    return tr, engine, Xc, Yc


def record(benchmark, name, backend, threads, samples, gemm, versions):
    sizes, acts, loss, bs, lr = common.CONFIGS[name]
    best = benchmark.stats.stats.min if benchmark.stats else None
    info = {"config": name, "backend": backend, "threads": threads or "all", "dtype": "float32",
            "batch_size": bs, "samples": samples, "gemm_gflops_1_thread": round(gemm["1"], 1),
            "gemm_gflops_all_threads": round(gemm["all"], 1), "gemm_gflops_ways": gemm["ways"],
            "versions": versions}
    if best:
        info["samples_per_second"] = samples / best
        info["gflops"] = samples * common.train_flops_per_sample(sizes) / best / 1e9
        info["percent_of_gemm"] = 100 * info["gflops"] / gemm["1" if threads == 1 else "all"]
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("name,backend,threads", CASES)
def test_epoch(benchmark, mnist, gemm, versions, name, backend, threads):
    X, y = mnist[0], mnist[1]
    tr, engine, Xc, Yc = make_engine(name, backend, threads, X, y)
    bs, n = tr.batch_size, len(Xc)
    n_batches = -(-n // bs)
    order = np.random.default_rng(0).permutation(n)
    with engine.threads_context():
        engine.prepare(Xc, Yc)
        engine.train_batches(order, bs, 0, 2, tr.lr)          # compile / warm up
        benchmark.group = f"epoch {name}"
        benchmark.pedantic(engine.train_batches, args=(order, bs, 0, n_batches, tr.lr),
                           rounds=3, iterations=1)
    record(benchmark, name, backend, threads, n, gemm, versions)


@pytest.mark.parametrize("name,backend,threads", CASES)
def test_step(benchmark, mnist, gemm, versions, name, backend, threads):
    X, y = mnist[0], mnist[1]
    tr, engine, Xc, Yc = make_engine(name, backend, threads, X, y)
    bs = tr.batch_size
    order = np.arange(len(Xc))
    with engine.threads_context():
        engine.prepare(Xc, Yc)
        engine.train_batches(order, bs, 0, 1, tr.lr)
        benchmark.group = f"step {name}"
        benchmark.pedantic(engine.train_batches, args=(order, bs, 1, 2, tr.lr), rounds=50,
                           iterations=1, warmup_rounds=2)
    record(benchmark, name, backend, threads, bs, gemm, versions)


@pytest.mark.parametrize("threads", THREADS)
def test_prepare(benchmark, mnist, versions, threads):
    """Engine.prepare on MNIST's training set (seed000's network): the sparse-or-dense
    decision from sampled rows and the split into dense columns and a CSR, which
    every fit pays once before its first epoch."""
    X, y = mnist[0], mnist[1]
    tr, engine, Xc, Yc = make_engine("seed000", "numba", threads, X, y)
    with engine.threads_context():
        engine.prepare(Xc, Yc)                                  # compile / warm up
        benchmark.group = "prepare (MNIST, the split)"
        benchmark.pedantic(engine.prepare, args=(Xc, Yc), rounds=5, iterations=1)
    benchmark.extra_info.update(threads=threads or "all", samples=len(Xc), sparse=engine.sparse,
                                dense_columns=engine.n_dense, versions=versions)
    if benchmark.stats:
        benchmark.extra_info["samples_per_second"] = len(Xc) / benchmark.stats.stats.min
