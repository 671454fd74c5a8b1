"""Peer comparison: python -m bench.compare

Trains the same configurations on the same MNIST data with the same hyperparameters
(plain SGD, constant learning rate, shuffling every epoch, float32, the same thread
count) in fastmlp (numba), fastmlp (NumPy reference), scikit-learn's MLPClassifier,
PyTorch eager (CPU) and TensorFlow/Keras (CPU), each where it is installed. Only
training is timed; the first epoch is reported apart (it includes compilation or
graph building). Writes bench/results/<host>-<date>.md and .json and a PNG bar chart.

A second table times whole fits of fastmlp.MLPClassifier against scikit-learn's
MLPClassifier (same parameters and random_state, so the same initial weights and
batches): with default parameters (Adam, 100 relu units, batch 200) and with plain
SGD; --estimator-epochs 0 skips it.

Every peer starts from the same initial weights (fastmlp's, seed 0) and trains on the
same batches in the same order (fastmlp's shuffles), so accuracy differences come
from arithmetic alone (and, for scikit-learn on seed000, from its fixed output layer).

scikit-learn's MLPClassifier always ends in softmax with log-loss; where a
configuration asks for another output or loss (seed000: sigmoid + squared error),
its row says so.
"""
import argparse
import datetime
import json
import os
import socket
import time

import numpy as np

from bench import common

SEED002_PUBLISHED = {   # seed 002's own table (test set), for its row of its own
    "Our own (seed 002, CPU)": {"cross_entropy": 0.166, "micro_averaged_accuracy": 0.990,
                                "precision": 0.950, "recall": 0.950, "minutes": 17.95},
    "TensorFlow (seed 002, GPU)": {"cross_entropy": 0.290, "micro_averaged_accuracy": 0.984,
                                   "precision": 0.941, "recall": 0.895, "minutes": 6.64},
}


class NotInstalled(Exception):
    pass


def _acts(acts, n_layers):
    return [acts] * n_layers if isinstance(acts, str) else list(acts)


def initial_weights(cfg):
    """fastmlp's initial weights for a configuration (seed 0), float32: every peer
    starts from these, so that accuracy differences come from training alone."""
    import fastmlp
    sizes, acts = cfg[0], cfg[1]
    m = fastmlp.MLP(sizes, acts, seed=0)
    return [W.copy() for W in m.weights], [b.copy() for b in m.biases]


def batch_orders(n, epochs):
    """The sample order of each epoch, as fastmlp's Trainer(seed=0) draws it; every
    peer trains on these, so all see the same batches in the same order."""
    rng = np.random.default_rng(0)
    return [rng.permutation(n) for _ in range(epochs)]


# Each runner: (config, X, y, Xt, yt, epochs, threads) -> dict(epoch_seconds, test probabilities)

def run_fastmlp(backend):
    def run(cfg, X, y, Xt, yt, epochs, threads):
        import fastmlp
        sizes, acts, loss, bs, lr = cfg
        model = fastmlp.MLP(sizes, acts, seed=0)
        tr = fastmlp.Trainer(model, loss, lr=lr, batch_size=bs, seed=0, backend=backend, threads=threads)
        h = tr.fit(X, y, epochs=epochs)
        return {"epoch_seconds": h["seconds"], "proba": model.predict_proba(Xt), "note": ""}
    return run


def run_sklearn(cfg, X, y, Xt, yt, epochs, threads):
    try:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier
        from threadpoolctl import threadpool_limits
    except ImportError:
        raise NotInstalled("scikit-learn") from None
    sizes, acts, loss, bs, lr = cfg
    hidden = _acts(acts, len(sizes) - 1)[:-1]
    if len(set(hidden)) != 1:
        raise NotInstalled("mixed hidden activations")
    name = {"sigmoid": "logistic", "tanh": "tanh", "relu": "relu", "linear": "identity"}[hidden[0]]
    out = _acts(acts, len(sizes) - 1)[-1]
    note = "" if (out, loss) == ("softmax", "cross_entropy") else \
        f"softmax + log-loss output (asked: {out} + {loss}; not available in scikit-learn)"
    clf = MLPClassifier(hidden_layer_sizes=tuple(sizes[1:-1]), activation=name, solver="sgd",
                        learning_rate="constant", learning_rate_init=lr, momentum=0.0,
                        nesterovs_momentum=False, alpha=0.0, batch_size=bs, shuffle=False,
                        random_state=0, max_iter=1)
    # sklearn draws its own initial weights in _init_coef, one call per layer in order;
    # hand it fastmlp's instead (a benchmark-only override of a private method).
    Ws, bs_ = initial_weights(cfg)
    layers = iter(zip(Ws, bs_))
    clf._init_coef = lambda fan_in, fan_out, dtype: tuple(a.astype(dtype) for a in next(layers))
    times = []
    classes = np.arange(10)
    with threadpool_limits(limits=threads, user_api="blas"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for order in batch_orders(len(X), epochs):
            t = time.perf_counter()
            # One pass of minibatch SGD in fastmlp's order (the gather is its shuffle).
            clf.partial_fit(X[order], y[order], classes=classes)
            times.append(time.perf_counter() - t)
    return {"epoch_seconds": times, "proba": clf.predict_proba(Xt), "note": note}


def run_torch(cfg, X, y, Xt, yt, epochs, threads):
    try:
        import torch
    except ImportError:
        raise NotInstalled("torch") from None
    sizes, acts, loss, bs, lr = cfg
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layers = []
    mods = {"sigmoid": torch.nn.Sigmoid, "tanh": torch.nn.Tanh, "relu": torch.nn.ReLU,
            "linear": torch.nn.Identity}
    all_acts = _acts(acts, len(sizes) - 1)
    for (a, b), act in zip(zip(sizes[:-1], sizes[1:]), all_acts):
        layers.append(torch.nn.Linear(a, b))
        if act == "softmax":
            continue          # folded into the cross-entropy loss (log-softmax)
        layers.append(mods[act]())
    net = torch.nn.Sequential(*layers)
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for lin, W, b in zip(linears, *initial_weights(cfg)):
            lin.weight.copy_(torch.from_numpy(W.T.copy()))   # torch keeps (out, in)
            lin.bias.copy_(torch.from_numpy(b))
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.0)
    Xt_, Xtr = torch.from_numpy(Xt), torch.from_numpy(X)
    ytr = torch.from_numpy(y.astype(np.int64))
    Y1 = torch.nn.functional.one_hot(ytr, 10).float()
    times = []
    for order in batch_orders(len(X), epochs):
        t = time.perf_counter()
        perm = torch.from_numpy(order)
        for s in range(0, len(Xtr), bs):
            idx = perm[s:s + bs]
            out = net(Xtr[idx])
            if loss == "cross_entropy":
                L = torch.nn.functional.cross_entropy(out, ytr[idx])
            else:             # fastmlp's squared error: mean over batch of 1/2 sum (a - y)^2
                L = 0.5 * ((out - Y1[idx]) ** 2).sum(dim=1).mean()
            opt.zero_grad(set_to_none=True)
            L.backward()
            opt.step()
        times.append(time.perf_counter() - t)
    with torch.no_grad():
        out = net(Xt_)
        P = torch.softmax(out, dim=1) if all_acts[-1] == "softmax" else out
    return {"epoch_seconds": times, "proba": P.numpy(), "note": f"torch {torch.__version__}"}


def run_keras(cfg, X, y, Xt, yt, epochs, threads):
    try:
        import tensorflow as tf
    except ImportError:
        raise NotInstalled("tensorflow") from None
    sizes, acts, loss, bs, lr = cfg
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    tf.keras.utils.set_random_seed(0)
    all_acts = _acts(acts, len(sizes) - 1)
    model = tf.keras.Sequential([tf.keras.Input((sizes[0],))] +
                                [tf.keras.layers.Dense(n, activation=a) for n, a in zip(sizes[1:], all_acts)])
    if loss == "cross_entropy":
        lossf = tf.keras.losses.CategoricalCrossentropy()
    else:
        lossf = lambda t, p: 0.5 * tf.reduce_sum((p - t) ** 2, axis=1)  # noqa: E731
    dense_layers = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.Dense)]
    for layer, W, b in zip(dense_layers, *initial_weights(cfg)):
        layer.set_weights([W, b])
    model.compile(optimizer=tf.keras.optimizers.SGD(learning_rate=lr), loss=lossf)
    Y = np.eye(10, dtype=np.float32)[y]
    times = []
    for order in batch_orders(len(X), epochs):
        t = time.perf_counter()
        model.fit(X[order], Y[order], batch_size=bs, epochs=1, shuffle=False, verbose=0)
        times.append(time.perf_counter() - t)
    return {"epoch_seconds": times, "proba": model.predict(Xt, verbose=0),
            "note": f"tensorflow {tf.__version__}"}


PEERS = {"fastmlp (numba)": run_fastmlp("numba"), "fastmlp (numpy reference)": run_fastmlp("numpy"),
         "scikit-learn": run_sklearn, "PyTorch eager (CPU)": run_torch, "Keras (CPU)": run_keras}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="seed000,seed002,wide")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is reported apart)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--peers", default=",".join(PEERS), help="comma-separated peer names")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--estimator-epochs", type=int, default=10,
                   help="max_iter for the fastmlp.MLPClassifier / sklearn fit-time rows (0: skip)")
    p.add_argument("--rounds", type=int, default=2,
                   help="interleaved rounds of each estimator fit; the fastest is reported")
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs: at least 2 (the first epoch is reported apart)")
    from fastmlp import metrics
    X, y, Xt, yt = common.mnist()
    gemm_ways = common.gemm_rates(args.threads)
    gemm = max(gemm_ways.values())
    rows = []
    for name in args.configs.split(","):
        cfg = common.CONFIGS[name]
        flops = common.train_flops_per_sample(cfg[0])
        for peer in args.peers.split(","):
            print(f"{name}: {peer} ...", flush=True)
            try:
                r = PEERS[peer](cfg, X, y, Xt, yt, args.epochs, args.threads)
            except NotInstalled as e:
                rows.append({"config": name, "peer": peer, "status": f"not installed ({e})"})
                continue
            steady = min(r["epoch_seconds"][1:])
            pred = np.asarray(r["proba"]).argmax(axis=1)
            sps = len(X) / steady
            rows.append({"config": name, "peer": peer, "status": "ok", "note": r["note"],
                         "first_epoch_s": r["epoch_seconds"][0], "epoch_s": steady,
                         "samples_per_s": sps, "test_accuracy": metrics.accuracy(yt, pred),
                         "gflops": sps * flops / 1e9, "percent_of_gemm": 100 * sps * flops / 1e9 / gemm})
    for name in args.configs.split(","):
        ours = [r for r in rows if r["config"] == name and r["peer"] == "fastmlp (numba)" and r["status"] == "ok"]
        for r in rows:
            if r["config"] == name and r["status"] == "ok" and ours:
                r["fastmlp_speedup"] = ours[0]["samples_per_s"] / r["samples_per_s"]
    seed002 = seed002_row(X, y, Xt, yt, args.threads) if "seed002" in args.configs.split(",") else None
    estimators = estimator_rows(X, y, Xt, yt, args) if args.estimator_epochs > 0 else []
    write(args, rows, seed002, gemm, estimators, gemm_ways)


ESTIMATOR_SETTINGS = {
    "default parameters (Adam)": {},
    "plain SGD (lr 0.1)": {"solver": "sgd", "momentum": 0.0, "learning_rate_init": 0.1},
}


def first_fit_seconds(params, threads):
    """A new process's first fit (1,000 MNIST samples, one epoch), which loads the
    compiled kernels from numba's on-disk cache (or compiles them if it is empty)."""
    import subprocess
    import sys
    code = ("import time, numpy as np, warnings; warnings.simplefilter('ignore');"
            "from bench import common; from fastmlp import MLPClassifier;"
            "X, y = common.mnist()[:2]; X = X[:1000].astype(np.float32);"
            f"t = time.perf_counter(); MLPClassifier(threads={threads}, "
            f"**{dict(params, max_iter=1)!r}).fit(X, y[:1000]);"
            "print(time.perf_counter() - t)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                       timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"first-fit subprocess failed: {r.stderr[-2000:]}")
    return float(r.stdout.split()[-1])


PAUSE_BETWEEN_FITS = 0.5   # seconds, before each timed estimator fit


def estimator_rows(X, y, Xt, yt, args):
    """Whole fit() times, fastmlp.MLPClassifier against scikit-learn's, interleaved
    round by round; the fastest round of each is reported. fastmlp's first fit in
    the process (which loads or compiles its kernels) is reported apart."""
    try:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier as SklearnMLP
        from threadpoolctl import threadpool_limits
    except ImportError:
        return [{"setting": s, "status": "not installed (scikit-learn)"} for s in ESTIMATOR_SETTINGS]
    from fastmlp import MLPClassifier
    X, Xt = X.astype(np.float32), Xt.astype(np.float32)     # float32 in both: stays float32
    out = []
    for setting, params in ESTIMATOR_SETTINGS.items():
        params = dict(params, max_iter=args.estimator_epochs, random_state=0)
        ests = {"fastmlp": lambda: MLPClassifier(threads=args.threads, **params),
                "scikit-learn": lambda: SklearnMLP(**params)}
        seconds = {k: [] for k in ests}
        fitted = {}
        with warnings.catch_warnings(), threadpool_limits(limits=args.threads, user_api="blas"):
            warnings.simplefilter("ignore", ConvergenceWarning)
            first = first_fit_seconds(params, args.threads)
            for _ in range(args.rounds):
                for k, make in ests.items():
                    est = make()
                    # Each fit starts on an idle machine: BLAS's worker threads spin
                    # for a while after the last product (OpenBLAS: about 2^28
                    # cycles), and a fit started then shares a core with them (a
                    # 10-epoch fastmlp fit right after 20 BLAS products: 0.750-0.840
                    # s against 0.711-0.775, 2 threads, Zen 4).
                    time.sleep(PAUSE_BETWEEN_FITS)
                    t = time.perf_counter()
                    est.fit(X, y)
                    seconds[k].append(time.perf_counter() - t)
                    fitted[k] = est
        acc = {k: float(np.mean(e.predict(Xt) == yt)) for k, e in fitted.items()}
        out.append({"setting": setting, "status": "ok", "params": params,
                    "fit_seconds": {k: min(v) for k, v in seconds.items()},
                    "all_fit_seconds": seconds, "test_accuracy": acc,
                    "n_iter": {k: e.n_iter_ for k, e in fitted.items()},
                    "first_fit_warmup_seconds": first,
                    "speedup": min(seconds["scikit-learn"]) / min(seconds["fastmlp"]),
                    "accuracy_gap_points": 100 * (acc["fastmlp"] - acc["scikit-learn"])})
        print(f"estimator {setting}: {out[-1]['fit_seconds']} {acc}", flush=True)
    return out


def seed002_row(X, y, Xt, yt, threads):
    """Seed 002's published table, reproduced: 5 epochs, batch 32, lr 0.1."""
    import fastmlp
    from fastmlp import metrics
    model = fastmlp.MLP([784, 32, 16, 10], ["tanh", "tanh", "softmax"], seed=0)
    tr = fastmlp.Trainer(model, "cross_entropy", lr=0.1, batch_size=32, seed=0, threads=threads)
    t = time.perf_counter()
    tr.fit(X, y, epochs=5)
    seconds = time.perf_counter() - t
    P = model.predict_proba(Xt)
    pred = P.argmax(axis=1)
    return {"cross_entropy": metrics.cross_entropy(yt, P), "accuracy": metrics.accuracy(yt, pred),
            "micro_averaged_accuracy": metrics.micro_averaged_accuracy(yt, pred, 10),
            "precision_macro": metrics.precision(yt, pred, "macro", 10),
            "recall_macro": metrics.recall(yt, pred, "macro", 10),
            "precision_micro": metrics.precision(yt, pred, "micro", 10),
            "recall_micro": metrics.recall(yt, pred, "micro", 10), "seconds": seconds}


def write(args, rows, seed002, gemm, estimators=(), gemm_ways=None):
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{socket.gethostname()}-{datetime.date.today().isoformat()}")
    # Another run the same day (on another machine of the same name) is kept: -2, -3...
    base, n = stem, 1
    while os.path.exists(stem + ".json"):
        n += 1
        stem = f"{base}-{n}"
    v = common.versions()
    result = {"machine": v, "threads": args.threads, "epochs": args.epochs, "gemm_gflops": gemm, "gemm_gflops_ways": gemm_ways,
              "rows": rows, "seed002": seed002, "seed002_published": SEED002_PUBLISHED,
              "estimators": list(estimators)}
    from fastmlp._io import atomic_write
    with atomic_write(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"# Peer comparison ({datetime.date.today().isoformat()})", "",
             f"`python -m bench.compare --epochs {args.epochs} --threads {args.threads}` on {v['cpu']}, "
             f"{v['cores']} cores; NumPy {v['numpy']}, Numba {v['numba']}, Python {v['python']}. "
             f"OPENBLAS_CORETYPE: {v['OPENBLAS_CORETYPE'] or 'not set'}. NumPy float32 GEMM on "
             f"{args.threads} threads: "
             + ", ".join(f"{r:.0f} GFLOP/s {k}" for k, r in (gemm_ways or {"": gemm}).items())
             + " (% of GEMM is against the best). Plain SGD, constant "
             "lr, shuffled, float32, MNIST 60,000 training samples; samples/s from the best epoch "
             "after the first.", "",
             "| config | peer | first epoch s | s/epoch | samples/s | test acc | GFLOP/s | % of GEMM | fastmlp is | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['config']} | {r['peer']} | | | | | | | | {r['status']} |")
            continue
        lines.append(f"| {r['config']} | {r['peer']} | {r['first_epoch_s']:.2f} | {r['epoch_s']:.3f} | "
                     f"{r['samples_per_s']:,.0f} | {r['test_accuracy']:.4f} | {r['gflops']:.1f} | "
                     f"{r['percent_of_gemm']:.0f}% | {r.get('fastmlp_speedup', float('nan')):.2f}x | {r['note']} |")
    if seed002:
        lines += ["", "Seed 002's table (784-32-16-10 tanh/tanh/softmax, SGD, 5 epochs, batch 32, lr 0.1, "
                  "cross-entropy; test set):", "",
                  "| run | cross-entropy | accuracy | micro-averaged accuracy | precision | recall | training time |",
                  "| --- | --- | --- | --- | --- | --- | --- |",
                  f"| fastmlp (numba, {args.threads} threads) | {seed002['cross_entropy']:.3f} | "
                  f"{seed002['accuracy']:.4f} | {seed002['micro_averaged_accuracy']:.4f} | "
                  f"{seed002['precision_macro']:.4f} (macro) | {seed002['recall_macro']:.4f} (macro) | "
                  f"{seed002['seconds']:.2f} s |"]
        for name, s in SEED002_PUBLISHED.items():
            lines.append(f"| {name} | {s['cross_entropy']:.3f} | - | {s['micro_averaged_accuracy']:.3f} | "
                         f"{s['precision']:.3f} (micro) | {s['recall']:.3f} (micro) | {s['minutes']} min |")
        lines += ["", "Seed 002 reports micro-averaged metrics; its 0.990 accuracy counts true negatives "
                  "(0.8 + 0.2 x multiclass accuracy for 10 classes)."]
    ok = [e for e in estimators if e["status"] == "ok"]
    if ok:
        lines += ["", f"fastmlp.MLPClassifier against scikit-learn's MLPClassifier: whole `fit` on "
                  f"MNIST (float32), `max_iter={args.estimator_epochs}`, `random_state=0`, "
                  f"{args.threads} threads, fastest of {args.rounds} interleaved rounds:", "",
                  "| setting | fastmlp fit s | scikit-learn fit s | fastmlp is | test acc fastmlp | "
                  "test acc scikit-learn | epochs run |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for e in ok:
            fs, acc = e["fit_seconds"], e["test_accuracy"]
            lines.append(f"| {e['setting']} | {fs['fastmlp']:.2f} | {fs['scikit-learn']:.2f} | "
                         f"{e['speedup']:.2f}x | {acc['fastmlp']:.4f} | {acc['scikit-learn']:.4f} | "
                         f"{e['n_iter']['fastmlp']} / {e['n_iter']['scikit-learn']} |")
        lines += ["", "Not included above: fastmlp's first fit in a new process also loads its "
                  "compiled kernels from numba's on-disk cache (or compiles them when the cache is "
                  "empty); a one-epoch fit of 1,000 samples in a fresh process took "
                  + ", ".join(f"{e['first_fit_warmup_seconds']:.2f} s ({e['setting']})" for e in ok)
                  + "."]
    with atomic_write(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    chart(rows, stem + ".png")
    print("\n".join(lines))
    print(f"\nwritten: {stem}.md, {stem}.json, {stem}.png")


def chart(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart")
        return
    ok = [r for r in rows if r["status"] == "ok"]
    configs = sorted({r["config"] for r in ok}, key=list(common.CONFIGS).index)
    peers = [p for p in PEERS if any(r["peer"] == p for r in ok)]
    fig, axes = plt.subplots(1, len(configs), figsize=(4.5 * len(configs), 4), squeeze=False)
    for ax, cfg in zip(axes[0], configs):
        vals = [next((r["samples_per_s"] for r in ok if r["config"] == cfg and r["peer"] == p), 0) for p in peers]
        bars = ax.bar(range(len(peers)), vals, color=["C0" if p.startswith("fastmlp (numba") else "C7" for p in peers])
        ax.set_xticks(range(len(peers)), [p.replace(" (", "\n(") for p in peers], fontsize=7)
        ax.set_title(cfg)
        ax.set_ylabel("samples/s")
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v / 1000:.0f}k", ha="center", va="bottom", fontsize=7)
    fig.suptitle("MNIST training throughput (higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
