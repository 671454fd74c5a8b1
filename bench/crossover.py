"""Tiles against BLAS, per product and shape: the measurements behind the choice in
kernels/dense.py (above FWD_MIN_BYTES).

    python -m bench.crossover [--dtype float32] [--rounds 9]

One thread (BLAS limited to one, as inside the compiled epoch, where each thread
multiplies its own rows). For each shape (rows, n_in, n_out) and product, the two
implementations run interleaved and the best of the rounds is kept, in microseconds
per call: X W (forward), X^T D (weight gradient), D W^T (the previous layer's delta).
"""
import argparse
import time

import numpy as np
from numba import njit
from threadpoolctl import threadpool_limits

from fastmlp.kernels import gemm

SHAPES = [(16, 16, 10), (16, 32, 16), (50, 32, 16), (50, 64, 32), (100, 100, 10),
          (64, 512, 10), (50, 100, 100), (64, 512, 128), (64, 512, 256), (64, 128, 512),
          (64, 512, 512), (64, 784, 512)]


@njit(cache=True)
def _tiles(which, X, W, D, out, dW, back, n):
    for _ in range(n):
        if which == 0:
            gemm.gemm_rows(X, W, out, 0, X.shape[0])
        elif which == 1:
            gemm.gemm_tn(X, D, dW, 0, X.shape[0])
        else:
            gemm.gemm_nt(D, W, back, 0, D.shape[0])


@njit(cache=True)
def _blas(which, X, W, D, out, dW, back, n):
    for _ in range(n):
        if which == 0:
            np.dot(X, W, out)
        elif which == 1:
            np.dot(X.T, D, dW)
        else:
            np.dot(D, W.T, back)


def measure(shape, dtype, rounds):
    """{product: (tiles_us, blas_us)} for one shape."""
    M, K, N = shape
    rng = np.random.default_rng(0)
    X, W = rng.normal(size=(M, K)).astype(dtype), rng.normal(size=(K, N)).astype(dtype)
    D = rng.normal(size=(M, N)).astype(dtype)
    out, dW, back = np.zeros((M, N), dtype), np.zeros((K, N), dtype), np.zeros((M, K), dtype)
    n = max(3, int(3e7 / (2 * M * K * N)))
    products = {"X W": 0, "X^T D": 1, "D W^T": 2} if N >= gemm.lanes_of(D) else {"D W^T": 2}
    best = {}
    for name, which in products.items():
        for f in (_tiles, _blas):
            f(which, X, W, D, out, dW, back, 1)
    for _ in range(rounds):
        for name, which in products.items():
            for impl, f in (("tiles", _tiles), ("blas", _blas)):
                t = time.perf_counter()
                f(which, X, W, D, out, dW, back, n)
                dt = (time.perf_counter() - t) / n * 1e6
                best[name, impl] = min(best.get((name, impl), np.inf), dt)
    return {name: (best[name, "tiles"], best[name, "blas"]) for name in products}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.crossover",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args(argv)
    if not gemm.HAS_TILES:
        raise SystemExit("this CPU has neither AVX2 with FMA nor AVX-512: fastmlp uses BLAS only")
    import scipy.linalg.cython_blas  # noqa: F401  (load SciPy's BLAS so the limit reaches it)
    isa = "AVX-512" if gemm.HAS_AVX512 else "AVX2"
    print(f"{isa} tiles ({gemm.VECTOR_BYTES}-byte vectors), {args.dtype}, one thread; "
          f"microseconds per call, tiles / BLAS, best of {args.rounds}")
    print("| rows, n_in, n_out | X W | X^T D | D W^T |")
    print("| --- | --- | --- | --- |")
    with threadpool_limits(limits=1, user_api="blas"):
        for shape in SHAPES:
            r = measure(shape, np.dtype(args.dtype), args.rounds)
            cells = [f"{r[k][0]:.1f} / {r[k][1]:.1f}" if k in r else "-"
                     for k in ("X W", "X^T D", "D W^T")]
            print(f"| {shape} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
