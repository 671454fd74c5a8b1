"""What the benchmarks share: configurations, FLOP counts, the machine's GEMM rate."""
import os
import platform
import time

import numpy as np

CONFIGS = {
    # name: (layer sizes, activations, loss, batch size, lr) -- plain SGD on MNIST, float32
    "seed000": ([784, 64, 32, 16, 10], "sigmoid", "squared_error", 100, 4.0),
    "seed002": ([784, 32, 16, 10], ["tanh", "tanh", "softmax"], "cross_entropy", 32, 0.1),
    "wide": ([784, 512, 512, 10], ["relu", "relu", "softmax"], "cross_entropy", 128, 0.1),
}


def train_flops_per_sample(sizes):
    """Nominal (dense) FLOPs of one SGD step per sample: forward X W (2 n_in n_out),
    weight gradient A^T delta (2 n_in n_out), and delta W^T for every layer but the
    first (2 n_in n_out). Skipped zeros are not subtracted: GFLOP/s figures are
    effective rates against dense work."""
    pairs = list(zip(sizes[:-1], sizes[1:]))
    return sum(4 * a * b for a, b in pairs) + sum(2 * a * b for a, b in pairs[1:])


def mnist():
    from fastmlp import data
    path = os.environ.get("FASTMLP_DATA")
    if not path:
        raise RuntimeError("set FASTMLP_DATA to the MNIST directory (e.g. ../shared/data)")
    (xtr, ytr), (xte, yte) = data.load_mnist(path)
    return data.prepare(xtr), ytr, data.prepare(xte), yte


def gemm_rate(threads=None, n=1024, repeats=7):
    """Best float32 GEMM rate (GFLOP/s) of NumPy's BLAS on an n x n product."""
    from threadpoolctl import threadpool_limits
    rng = np.random.default_rng(0)
    A = rng.random((n, n), dtype=np.float32)
    B = rng.random((n, n), dtype=np.float32)
    with threadpool_limits(limits=threads, user_api="blas"):
        A @ B
        best = min(_timed(lambda: A @ B) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


AVX512 = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")  # what SkylakeX uses


def openblas_below_cpu():
    """True where the CPU has AVX-512 (as LLVM reads it: the OS saves its registers)
    but a loaded OpenBLAS runs AVX2 kernels, because it did not recognise the CPU
    or because OPENBLAS_CORETYPE says so (the AMD Zen 5 machine of 2026-12-02 sets
    OPENBLAS_CORETYPE=Haswell in its environment)."""
    try:
        import llvmlite.binding as llvm
        from threadpoolctl import threadpool_info
        features = llvm.get_host_cpu_features()
        cores = {(i.get("architecture") or "").lower() for i in threadpool_info()
                 if i.get("internal_api") == "openblas"}
    except Exception:  # pragma: no cover
        return False
    return all(features.get(f, False) for f in AVX512) and bool(cores) and \
        cores <= {"haswell", "zen", "sandybridge"}


def gemm_rates(threads=None):
    """{label: GFLOP/s} of NumPy's float32 GEMM as this process runs it and, where
    openblas_below_cpu(), as it runs with OPENBLAS_CORETYPE=SkylakeX (measured in a
    new process: OpenBLAS reads the variable only when it loads). The kernels issue
    asks for the rate both ways; % of GEMM is taken against the best."""
    rates = {"as loaded": gemm_rate(threads)}
    if openblas_below_cpu():
        import subprocess
        import sys
        env = dict(os.environ, OPENBLAS_CORETYPE="SkylakeX")
        code = f"from bench import common; print(common.gemm_rate({threads!r}))"
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, check=True,
                             capture_output=True, text=True).stdout
        rates["OPENBLAS_CORETYPE=SkylakeX"] = float(out.strip().splitlines()[-1])
    return rates


def _timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def versions():
    import numba
    import fastmlp
    try:
        from threadpoolctl import threadpool_info
        blas = sorted({f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')})"
                       for i in threadpool_info() if i.get("user_api") == "blas"})
    except Exception:  # pragma: no cover
        blas = []
    return {"fastmlp": fastmlp.__version__, "numpy": np.__version__, "numba": numba.__version__,
            "python": platform.python_version(), "cpu": cpu_name(), "cores": os.cpu_count(),
            "blas": blas, "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
