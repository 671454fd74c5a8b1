"""Train an MLP on MNIST from the command line: python -m fastmlp.train --help"""
import argparse
import json
import platform
import sys
import time

import numpy as np

from . import __version__, activations, data, losses, metrics, optimizers
from ._io import atomic_write
from .model import MLP
from .trainer import BACKENDS, DEFAULT_BACKEND, Trainer, TrainingDiverged, TrainingInterrupted

PRESETS = {
    # Seed 000's network (784-64-32-16-10, sigmoid everywhere, squared error, batch
    # 100). Its notebook sums gradients with lr 0.01 (a mean-gradient lr of 1.0) and
    # reaches 92.7% in 30 epochs; with shuffling and lr 4.0 (measured, see README)
    # this reaches >= 95%.
    "seed000": dict(layers=[784, 64, 32, 16, 10], activations=["sigmoid"], loss="squared_error",
                    batch_size=100, lr=4.0, epochs=10),
    # Seed 002's published configuration.
    "seed002": dict(layers=[784, 32, 16, 10], activations=["tanh", "tanh", "softmax"],
                    loss="cross_entropy", batch_size=32, lr=0.1, epochs=5),
}


def _int_list(text):
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if len(values) < 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected at least two positive sizes, got {text!r}")
    return values


def _name_list(text):
    names = [v for v in text.replace(" ", "").split(",") if v]
    for n in names:
        if n not in activations.CODES:
            raise argparse.ArgumentTypeError(
                f"unknown activation {n!r}; expected {', '.join(activations.NAMES)}")
    return names


def _number(kind, accept, expected):
    """An argparse type: `kind(text)`, kept if accept(value), else an error saying
    what was expected."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not accept(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v
    return parse


def _positive(kind):
    return _number(kind, lambda v: v > 0 and (kind is not float or np.isfinite(v)),
                   "a number > 0")


def _fraction(closed=False):
    return _number(float, (lambda v: 0 <= v <= 1) if closed else (lambda v: 0 <= v < 1),
                   f"a number in [0, 1{']' if closed else ')'}")


_non_negative = _number(float, lambda v: v >= 0 and np.isfinite(v), "a finite number >= 0")


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m fastmlp.train",
        description="Train a multi-layer perceptron on MNIST. The defaults reproduce seed 000's "
                    "network (784-64-32-16-10, sigmoid, squared error, batch 100); flags override "
                    "the chosen preset.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="seed000",
                   help="starting configuration (default: seed000; seed002 is 784-32-16-10 "
                        "tanh/tanh/softmax, cross-entropy, batch 32, lr 0.1, 5 epochs)")
    p.add_argument("--layers", type=_int_list, metavar="N,N,...",
                   help="all layer sizes including input (784) and output (10), e.g. 784,64,32,16,10")
    p.add_argument("--activations", "--activation", dest="activations", type=_name_list,
                   metavar="NAME[,NAME...]",
                   help="one activation for every layer or one per layer: "
                        + ", ".join(activations.NAMES) + " (softmax on the output layer only)")
    p.add_argument("--loss", choices=losses.NAMES, help="training loss")
    p.add_argument("--epochs", type=_positive(int), help="passes over the training set")
    p.add_argument("--batch-size", type=_positive(int), help="samples per gradient step")
    p.add_argument("--lr", type=_positive(float), help="learning rate (gradients are batch means)")
    p.add_argument("--optimizer", choices=optimizers.NAMES, default="sgd",
                   help="sgd (plain gradient descent, the seeds' method; default), momentum or "
                        "adam (scikit-learn's update rules; Adam wants a small --lr, e.g. 0.001)")
    p.add_argument("--momentum", type=_fraction(closed=True), default=0.9,
                   help="momentum coefficient for --optimizer momentum (default 0.9)")
    p.add_argument("--nesterov", action="store_true",
                   help="Nesterov's momentum instead of heavy-ball (--optimizer momentum)")
    p.add_argument("--beta1", type=_fraction(), default=0.9,
                   help="Adam's first-moment decay (default 0.9)")
    p.add_argument("--beta2", type=_fraction(), default=0.999,
                   help="Adam's second-moment decay (default 0.999)")
    p.add_argument("--epsilon", type=_positive(float), default=1e-8,
                   help="Adam's epsilon (default 1e-8)")
    p.add_argument("--alpha", type=_non_negative, default=0.0,
                   help="L2 penalty on the weights, scikit-learn's alpha (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed for initial weights and shuffling (default 0)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="floating-point type of parameters and data (default float32)")
    p.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND,
                   help=f"numba (compiled kernels) or numpy (the reference path); default {DEFAULT_BACKEND}")
    p.add_argument("--threads", type=_positive(int),
                   help="threads for training (numba threads, or BLAS threads for numpy)")
    p.add_argument("--data", metavar="PATH",
                   help="MNIST .npz file or directory of mnist.npz / IDX files (default: "
                        "$FASTMLP_DATA, keras' cache, fastmlp's cache, else download)")
    p.add_argument("--save", metavar="PATH", help="write the trained model here (.npz)")
    p.add_argument("--report", metavar="PATH",
                   help="write a JSON report: configuration, per-epoch history, timings, "
                        "versions and final test metrics under \"test\"")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="save model and training state here after every epoch and on Ctrl-C")
    p.add_argument("--resume", action="store_true",
                   help="continue from --checkpoint if it exists (same result as an "
                        "uninterrupted run with the same flags)")
    p.add_argument("--quiet", action="store_true", help="print only the final summary")
    return p


def resolve(args):
    cfg = dict(PRESETS[args.preset])
    for key in ("layers", "activations", "loss", "epochs", "batch_size", "lr"):
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    acts = cfg["activations"]
    cfg["activations"] = acts[0] if len(acts) == 1 else acts
    cfg.update(seed=args.seed, dtype=args.dtype, backend=args.backend, threads=args.threads,
               optimizer=args.optimizer, alpha=args.alpha)
    if args.optimizer == "momentum":
        cfg.update(momentum=args.momentum, nesterov=args.nesterov)
    if args.optimizer == "adam":
        cfg.update(beta_1=args.beta1, beta_2=args.beta2, epsilon=args.epsilon)
    return cfg


def _versions():
    import numba
    return {"fastmlp": __version__, "numpy": np.__version__, "numba": numba.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine()}


def run(args, out=sys.stdout):
    if args.resume and not args.checkpoint:
        raise ValueError("--resume: needs --checkpoint PATH to resume from")
    cfg = resolve(args)
    (xtr, ytr), (xte, yte) = data.load_mnist(args.data)
    X, Xt = data.prepare(xtr, cfg["dtype"]), data.prepare(xte, cfg["dtype"])
    sizes = cfg["layers"]
    if sizes[0] != X.shape[1] or sizes[-1] != 10:
        raise ValueError(f"--layers: MNIST needs {X.shape[1]} inputs and 10 outputs, got "
                         f"{','.join(map(str, sizes))}")
    model = MLP(sizes, cfg["activations"], dtype=cfg["dtype"], seed=cfg["seed"])
    opt_keys = ("optimizer", "momentum", "nesterov", "beta_1", "beta_2", "epsilon", "alpha")
    trainer = Trainer(model, loss=cfg["loss"], lr=cfg["lr"], batch_size=cfg["batch_size"],
                      seed=cfg["seed"], backend=cfg["backend"], threads=cfg["threads"],
                      **{k: cfg[k] for k in opt_keys if k in cfg})
    say = (lambda *a: None) if args.quiet else (lambda text: print(text, file=out, flush=True))
    say(f"fastmlp {__version__}: {'-'.join(map(str, sizes))} "
        f"{'/'.join(model.activations)}, {cfg['loss']}, batch {cfg['batch_size']}, lr {cfg['lr']:g}, "
        f"{cfg['epochs']} epochs, {cfg['optimizer']}, {cfg['dtype']}, backend {cfg['backend']}")

    bar = None
    if not args.quiet:
        from tqdm import tqdm
        bar = tqdm(total=cfg["epochs"] * len(X), unit="sample", unit_scale=True, leave=False,
                   file=sys.stderr, dynamic_ncols=True)

    def on_epoch_end(epoch, record):
        record["test_accuracy"] = float(np.mean(model.predict(Xt) == yte))
        line = (f"epoch {epoch:3d}/{cfg['epochs']}  loss {record['loss']:.4f}  "
                f"train acc {record['accuracy']:.4f}  test acc {record['test_accuracy']:.4f}  "
                f"{record['seconds']:.2f} s  {record['samples_per_second']:,.0f} samples/s")
        if bar is not None:
            bar.write(line, file=out)
        else:
            say(line)

    t0 = time.perf_counter()
    try:
        history = trainer.fit(X, ytr, epochs=cfg["epochs"],
                              on_progress=bar.update if bar is not None else None,
                              on_epoch_end=on_epoch_end, checkpoint=args.checkpoint,
                              resume=args.resume)
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t0
    test = trainer.evaluate(Xt, yte)
    cm = metrics.confusion_matrix(yte, model.predict(Xt), 10)
    print(f"test accuracy {test['accuracy']:.4f}  precision (macro) {test['precision_macro']:.4f}  "
          f"recall (macro) {test['recall_macro']:.4f}  loss {test['loss']:.4f}  "
          f"trained in {wall:.2f} s", file=out)
    if not args.quiet:
        print("confusion matrix (rows: true digit, columns: predicted):", file=out)
        print("     " + " ".join(f"{j:5d}" for j in range(10)), file=out)
        for i, row in enumerate(cm):
            print(f"{i:3d}  " + " ".join(f"{v:5d}" for v in row), file=out)
    if args.save:
        model.save(args.save)
        say(f"model saved to {args.save}")
    if args.report:
        report = {"config": cfg, "history": history.epochs, "train_seconds": wall,
                  "versions": _versions(), "test": dict(test, confusion_matrix=cm.tolist())}
        with atomic_write(args.report, "w") as f:
            json.dump(report, f, indent=2)
        say(f"report written to {args.report}")
    return test


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, TypeError, data.DataError, TrainingDiverged) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except TrainingInterrupted as e:
        parser.exit(130, f"{parser.prog}: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
