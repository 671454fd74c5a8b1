"""Side-by-side epoch throughput, as in README's table: python -m bench.table

Every configuration is trained with the NumPy reference and with the numba backend
at 1 and at all threads, in interleaved rounds (so that a noisy neighbour slows all
of them alike); the best epoch of each is reported, with the machine's float32 GEMM
rate measured in the same run.
"""
import argparse
import time

import numba
import numpy as np

import fastmlp
from fastmlp import trainer as trainer_mod

from bench import common


def epoch_seconds(name, backend, threads, X, y, rounds):
    sizes, acts, loss, bs, lr = common.CONFIGS[name]
    model = fastmlp.MLP(sizes, acts, seed=0)
    tr = fastmlp.Trainer(model, loss, lr=lr, batch_size=bs, seed=0, backend=backend, threads=threads)
    engine = tr._get_engine()
    Xc, Yc = trainer_mod._check_xy(model, X, y)
    n = len(Xc)
    order = np.random.default_rng(0).permutation(n)
    times = []
    with engine.threads_context():
        engine.prepare(Xc, Yc)
        engine.train_batches(order, bs, 0, 2, lr)      # compile / warm up
        for _ in range(rounds):
            t = time.perf_counter()
            engine.train_batches(order, bs, 0, -(-n // bs), lr)
            times.append(time.perf_counter() - t)
    return times


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.table", description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(common.CONFIGS), help="comma-separated configurations")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best is kept)")
    args = p.parse_args(argv)
    X, y, _, _ = common.mnist()
    all_threads = numba.config.NUMBA_NUM_THREADS
    runs = [("numpy", all_threads), ("numba", 1), ("numba", all_threads)]
    names = args.configs.split(",")
    best = {}
    for _ in range(args.rounds):
        for name in names:
            for backend, threads in runs:
                t = min(epoch_seconds(name, backend, threads, X, y, 1))
                key = (name, backend, threads)
                best[key] = min(best.get(key, np.inf), t)
    rates1, rates_all = common.gemm_rates(1), common.gemm_rates(None)
    gemm1, gemm_all = max(rates1.values()), max(rates_all.values())
    v = common.versions()
    print(f"Machine: {v['cpu']}, {v['cores']} cores; NumPy {v['numpy']} ({'; '.join(v['blas'])}), "
          f"Numba {v['numba']}, Python {v['python']}.")
    print(f"OPENBLAS_CORETYPE in the environment: {v['OPENBLAS_CORETYPE'] or 'not set'} (both "
          f"NumPy's OpenBLAS, for the reference, and SciPy's, for compiled np.dot, read it).")
    for label in rates1:
        print(f"NumPy float32 GEMM (1024^3), {label}: {rates1[label]:.0f} GFLOP/s on 1 thread, "
              f"{rates_all[label]:.0f} on {all_threads}.")
    print("% of GEMM is against the best of these.\n")
    print("| config | backend | threads | s/epoch | samples/s | vs reference | GFLOP/s | % of GEMM |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        sizes = common.CONFIGS[name][0]
        ref = best[(name, "numpy", all_threads)]
        for backend, threads in runs:
            t = best[(name, backend, threads)]
            gflops = len(X) * common.train_flops_per_sample(sizes) / t / 1e9
            gemm = gemm1 if threads == 1 else gemm_all
            print(f"| {name} | {backend} | {threads} | {t:.3f} | {len(X) / t:,.0f} | {ref / t:.2f}x | "
                  f"{gflops:.1f} | {100 * gflops / gemm:.0f}% |")


if __name__ == "__main__":
    main()
