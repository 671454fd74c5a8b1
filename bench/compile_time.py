"""Compile time: how long a new process takes to train its first epoch, with an
empty numba cache (cold: every kernel is compiled) and with the cache that run
left (warm: the kernels are loaded).

    FASTMLP_DATA=../shared/data python -m bench.compile_time --rounds 3

Each round uses a fresh temporary NUMBA_CACHE_DIR; the cold and warm runs are
separate processes. What is timed in the process: `import fastmlp`, then one
epoch of a configuration (default seed000: 784-64-32-16-10 sigmoid, float32) on
1,000 MNIST rows, which compiles (or loads) everything a training run needs.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from bench import common

_CHILD = """
import json
import time
t0 = time.perf_counter()
import numpy as np
import fastmlp
t1 = time.perf_counter()
from bench import common
sizes, acts, loss, batch, lr = common.CONFIGS[{config!r}]
X, y = common.mnist()[:2]
X, y = np.ascontiguousarray(X[:1000], dtype=np.float32), y[:1000]
model = fastmlp.MLP(sizes, acts, seed=0)
t2 = time.perf_counter()
fastmlp.Trainer(model, loss, lr=lr, batch_size=batch, seed=0, threads={threads}).fit(X, y, epochs=1)
t3 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "first_epoch": t3 - t2}}))
"""


def run_once(config, threads, cache_dir):
    """{'import': s, 'first_epoch': s} of one new process using cache_dir."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _CHILD.format(config=config, threads=threads)],
                       capture_output=True, text=True, cwd=root, env=env, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"compile-time subprocess failed: {r.stderr[-2000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {k: float(res[k]) for k in ("import", "first_epoch")}


def measure(config="seed000", threads=None, rounds=1):
    """Per round, a cold then a warm process; returns {'cold': [...], 'warm': [...]},
    each a list of {'import', 'first_epoch'}."""
    import numba
    threads = threads or numba.config.NUMBA_NUM_THREADS
    out = {"cold": [], "warm": []}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="fastmlp-numba-cache-") as d:
            out["cold"].append(run_once(config, threads, d))
            out["warm"].append(run_once(config, threads, d))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="seed000", choices=sorted(common.CONFIGS))
    p.add_argument("--threads", type=int, default=None, help="numba threads (default: all)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="also write the measurements to this file")
    args = p.parse_args(argv)
    res = measure(args.config, args.threads, args.rounds)
    for kind in ("cold", "warm"):
        epochs = [r["first_epoch"] for r in res[kind]]
        imports = [r["import"] for r in res[kind]]
        print(f"{args.config} {kind}: first epoch {statistics.median(epochs):.2f} s median "
              f"({min(epochs):.2f}-{max(epochs):.2f} over {len(epochs)} processes), "
              f"import fastmlp {statistics.median(imports):.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(res, config=args.config, versions=common.versions()), f, indent=1)
    return res


if __name__ == "__main__":
    main()
