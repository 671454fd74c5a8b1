"""Dense forward and backward per layer shape: the compiled kernels against the NumPy
reference's expressions, float32, single-threaded BLAS."""
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from fastmlp import activations, losses
from fastmlp.kernels import dense

SHAPES = [(784, 32), (784, 64), (784, 512), (512, 512), (64, 32), (16, 10)]
BATCH = 100


def arrays(n_in, n_out, seed=0):
    rng = np.random.default_rng(seed)
    f = np.float32
    return (rng.random((BATCH, n_in), dtype=f), (rng.normal(size=(n_in, n_out)) * 0.05).astype(f),
            np.zeros(n_out, f), rng.normal(size=(BATCH, n_out)).astype(f))


def info(benchmark, n_in, n_out, flops):
    if benchmark.stats:
        benchmark.extra_info["gflops"] = flops / benchmark.stats.stats.min / 1e9
    benchmark.extra_info.update(shape=f"{n_in}x{n_out}", batch=BATCH, dtype="float32", threads=1)


@pytest.mark.parametrize("impl", ["numba", "numpy"])
@pytest.mark.parametrize("n_in,n_out", SHAPES)
def test_dense_forward(benchmark, n_in, n_out, impl):
    X, W, b, _ = arrays(n_in, n_out)
    out = np.empty((BATCH, n_out), np.float32)
    code = activations.CODES["sigmoid"]
    benchmark.group = f"forward {n_in}x{n_out}"
    with threadpool_limits(1):
        if impl == "numba":
            dense.dense_forward(X, W, b, code, out)
            benchmark(dense.dense_forward, X, W, b, code, out)
        else:
            benchmark(lambda: activations.sigmoid(X @ W + b))
    info(benchmark, n_in, n_out, 2 * BATCH * n_in * n_out)


@pytest.mark.parametrize("impl", ["numba", "numpy"])
@pytest.mark.parametrize("n_in,n_out", SHAPES)
def test_dense_backward(benchmark, n_in, n_out, impl):
    X, W, b, G = arrays(n_in, n_out)
    A = activations.sigmoid(X @ W + b)
    dW, db = np.empty_like(W), np.empty_like(b)
    dX = np.empty_like(X)
    code = activations.CODES["sigmoid"]
    benchmark.group = f"backward {n_in}x{n_out}"
    with threadpool_limits(1):
        if impl == "numba":
            work = G.copy()
            dense.dense_backward(work, A, code, X, W, dW, db, dX, True)

            def run():
                work[...] = G
                dense.dense_backward(work, A, code, X, W, dW, db, dX, True)
            benchmark(run)
        else:
            def run():
                d = G * (A * (1 - A))
                return X.T @ d / BATCH, d.sum(axis=0) / BATCH, d @ W.T
            benchmark(run)
    info(benchmark, n_in, n_out, 6 * BATCH * n_in * n_out)


def test_output_delta(benchmark):
    rng = np.random.default_rng(0)
    A = activations.softmax(rng.normal(size=(BATCH, 10)).astype(np.float32))
    Y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, BATCH)]
    D = np.empty_like(A)
    f = np.finfo(np.float32)
    args = (losses.CODES["cross_entropy"], activations.CODES["softmax"], A, Y, D, np.float32(f.tiny),
            np.float32(1) - np.float32(f.epsneg), 0, BATCH)
    dense.output_delta_rows(*args)
    benchmark.group = "output delta"
    benchmark(dense.output_delta_rows, *args)


def test_crossover_measures_both_sides():
    # python -m bench.crossover is where dense.py's choice between tiles and BLAS
    # comes from; keep it running.
    from bench import crossover
    from fastmlp.kernels import gemm
    if not gemm.HAS_TILES:
        pytest.skip("no AVX2/FMA or AVX-512: BLAS only")
    r = crossover.measure((16, 32, 16), np.float32, 1)
    assert set(r) == {"X W", "X^T D", "D W^T"}
    assert all(t > 0 and b > 0 for t, b in r.values())
