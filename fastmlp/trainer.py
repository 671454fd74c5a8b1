"""Mini-batch gradient descent around a backend that trains whole epochs."""
import contextlib
import numbers
import os
import time

import numpy as np

from . import _checkpoint, losses, metrics, optimizers, reference
from ._interrupt import StopOnInterrupt
from .model import MLP

BACKENDS = ("numba", "numpy")
DEFAULT_BACKEND = "numba"


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the model keeps its last finite weights."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training between two batches (after saving the checkpoint, if
    one was given)."""


class _State:
    """Where a fit stands: epochs done, the next batch of the current epoch, the
    epoch's partial sums, the shuffling RNG state at the epoch's start, history."""

    def __init__(self, epoch, next_batch, total, correct, seconds, rng_state, history):
        self.epoch, self.next_batch = epoch, next_batch
        self.total, self.correct, self.seconds = total, correct, seconds
        self.rng_state, self.history = rng_state, history

    @classmethod
    def fresh(cls, rng):
        return cls(0, 0, 0.0, 0, 0.0, rng.bit_generator.state, History())

    def next_epoch(self, rng):
        self.epoch += 1
        self.next_batch, self.total, self.correct, self.seconds = 0, 0.0, 0, 0.0
        self.rng_state = rng.bit_generator.state


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    return backend


def targets(model, Y, argument="Y"):
    """Y as float rows of the model's dtype: integer labels become one-hot."""
    Y = np.asarray(Y)
    n_out = model.n_outputs
    if Y.ndim == 1:
        if Y.dtype.kind not in "biu":
            if Y.dtype.kind == "f" and Y.size and np.all(Y == np.round(Y)) and np.isfinite(Y).all():
                Y = Y.astype(np.int64)
            else:
                raise TypeError(f"{argument}: expected integer class labels or one-hot rows, "
                                f"got a 1-D array of dtype {Y.dtype}")
        if n_out == 1:
            if Y.size and (Y.min() < 0 or Y.max() > 1):
                raise ValueError(f"{argument}: a single-output model needs labels 0 or 1, got "
                                 f"{Y.min()}..{Y.max()}")
            return Y.astype(model.dtype).reshape(-1, 1)
        if Y.size and (Y.min() < 0 or Y.max() >= n_out):
            raise ValueError(f"{argument}: labels must lie in 0..{n_out - 1} (the model has "
                             f"{n_out} outputs), got {Y.min()}..{Y.max()}")
        out = np.zeros((Y.shape[0], n_out), dtype=model.dtype)
        out[np.arange(Y.shape[0]), Y] = 1
        return out
    if Y.ndim != 2 or Y.shape[1] != n_out:
        raise ValueError(f"{argument}: expected labels (n,) or rows (n, {n_out}), got shape {Y.shape}")
    if Y.dtype.kind not in "biuf":
        raise TypeError(f"{argument}: expected numbers, got dtype {Y.dtype}")
    Y = np.ascontiguousarray(Y, dtype=model.dtype)
    if not np.isfinite(Y).all():
        raise ValueError(f"{argument}: contains NaN or infinity")
    out_act = model.activations[-1]
    if out_act == "softmax":
        # A softmax output is a probability vector, so the targets must be too.
        sums = Y.sum(axis=1)
        bad = np.flatnonzero((Y < 0).any(axis=1) | (np.abs(sums - 1) > 1e-3))
        if bad.size:
            r = int(bad[0])
            raise ValueError(f"{argument}: row {r} is not one-hot (nor a probability vector): "
                             f"{Y[r].tolist()} sums to {sums[r]:g}; a softmax output needs rows "
                             "of non-negative values summing to 1, or integer labels")
    elif out_act == "sigmoid" and ((Y < 0) | (Y > 1)).any():
        raise ValueError(f"{argument}: a sigmoid output needs targets in [0, 1], got values from "
                         f"{Y.min():g} to {Y.max():g}")
    return Y


def _check_xy(model, X, Y):
    X = model.check_input(X)
    Y = targets(model, Y)
    if len(X) != len(Y):
        raise ValueError(f"X and Y: expected the same number of samples, got {len(X)} and {len(Y)}")
    return X, Y


class History:
    """Per-epoch records of a fit: `history["loss"][e]` etc., like Keras' History."""

    def __init__(self):
        self.epochs = []

    def append(self, record):
        self.epochs.append(dict(record))

    @property
    def history(self):
        keys = []
        for r in self.epochs:
            keys += [k for k in r if k not in keys]
        return {k: [r.get(k) for r in self.epochs] for k in keys}

    def __getitem__(self, key):
        return self.history[key]

    def __len__(self):
        return len(self.epochs)

    def __repr__(self):
        return f"History({len(self.epochs)} epochs)"


def gradients(model, X, Y, loss="squared_error", backend="numpy"):
    """Mean-over-batch gradients [(dW, db), ...] of `loss` for one batch (X, Y).

    Every backend gives the same numbers; the tests compare them through here.
    """
    losses.check(loss, model.activations[-1])
    check_backend(backend)
    X, Y = _check_xy(model, X, Y)
    if backend == "numba":
        from . import _numba_backend
        return _numba_backend.gradients(model, X, Y, loss)
    As = reference.forward(model.weights, model.biases, model.activations, X)
    return reference.backward(model.weights, model.activations, As, Y, loss)


class Trainer:
    """Train `model` by mini-batch gradient descent.

    Trainer(model, loss="squared_error", lr=1.0, batch_size=32, shuffle=True,
            seed=None, backend=DEFAULT_BACKEND, threads=None, optimizer="sgd",
            momentum=0.9, nesterov=False, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
            alpha=0.0)

    Gradients are means over the batch; the last partial batch is trained. With a
    seed, shuffling (numpy.random.default_rng(seed)) and so the whole run are
    reproducible bit for bit.

    optimizer: "sgd" (plain gradient descent, the default: the seeds' method),
    "momentum" (heavy ball, or Nesterov's with nesterov=True) or "adam"; alpha is
    an L2 penalty on the weights, alpha / (2B) * sum W^2 added to each batch's mean
    loss as scikit-learn defines it. See fastmlp.optimizers for the update rules.
    A fastmlp.optimizers.Optimizer may be passed instead of a name.
    """

    def __init__(self, model, loss="squared_error", lr=1.0, batch_size=32, shuffle=True,
                 seed=None, backend=DEFAULT_BACKEND, threads=None, optimizer="sgd",
                 momentum=0.9, nesterov=False, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                 alpha=0.0):
        if not isinstance(model, MLP):
            raise TypeError(f"model: expected a fastmlp.MLP, got {type(model).__name__}")
        self.model = model
        self.loss = losses.check(loss, model.activations[-1])
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not np.isfinite(lr) or lr <= 0:
            raise ValueError(f"lr: expected a finite number > 0, got {lr!r}")
        self.lr = float(lr)
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.backend = check_backend(backend)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, numbers.Integral)
                                    or threads < 1):
            raise ValueError(f"threads: expected None or an integer >= 1, got {threads!r}")
        self.threads = threads
        if isinstance(optimizer, optimizers.Optimizer):
            self.optimizer = optimizer
        else:
            self.optimizer = optimizers.Optimizer(optimizer, momentum=momentum, nesterov=nesterov,
                                                  beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                                                  alpha=alpha)
        self._rng = np.random.default_rng(seed)
        self._engine = None

    def _get_engine(self):
        if self._engine is None:
            self._engine = make_engine(self.backend, self.model, self.loss, self.batch_size,
                                       self.threads, self.optimizer)
        return self._engine

    def fit(self, X, Y, epochs=1, validation_data=None, on_progress=None, on_epoch_end=None,
            checkpoint=None, resume=False):
        """Train until `epochs` passes over (X, Y) are done; returns a History.

        on_progress(n_samples) is called as chunks of batches finish (to drive a
        progress bar); on_epoch_end(epoch, record) after each epoch.

        checkpoint: a path; the model and the trainer's state (shuffling RNG, epoch,
        position, history) are written there atomically after every epoch and on
        Ctrl-C. resume=True continues from that file if it exists, to the same
        weights as an uninterrupted run with the same seed, bit for bit.

        Ctrl-C (SIGINT) finishes the batch being trained, writes the checkpoint (if
        one was given) and raises TrainingInterrupted.
        """
        X, Y = _check_xy(self.model, X, Y)
        if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 0:
            raise ValueError(f"epochs: expected an integer >= 0, got {epochs!r}")
        validation = None
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise ValueError("validation_data: expected a tuple (X_val, y_val)")
            validation = _check_xy(self.model, *validation_data)
        if resume and checkpoint is None:
            raise ValueError("resume: needs checkpoint=path to resume from")
        state = _State.fresh(self._rng)
        if resume and os.path.exists(checkpoint):
            state = _checkpoint.load(checkpoint, self, len(X))
        engine = self._get_engine()
        with engine.threads_context():
            engine.prepare(X, Y)
            return self._fit_epochs(engine, X, Y, int(epochs), validation, on_progress,
                                    on_epoch_end, checkpoint, state)

    def _fit_epochs(self, engine, X, Y, epochs, validation, on_progress, on_epoch_end,
                    checkpoint, state):
        n, bs = len(X), self.batch_size
        n_batches = -(-n // bs)
        # Chunks of batches between progress reports: about 1/20 of an epoch, so that
        # Python runs a few dozen times per epoch, never once per batch.
        chunk = max(1, n_batches // 20) if on_progress is not None else n_batches
        history = state.history
        with StopOnInterrupt() as interrupt:
            while state.epoch < epochs:
                # The order is drawn from the RNG state saved at the epoch's start, so a
                # resumed epoch sees the same order as the uninterrupted one.
                self._rng.bit_generator.state = state.rng_state
                order = self._rng.permutation(n) if self.shuffle else np.arange(n)
                b0 = state.next_batch
                while b0 < n_batches:
                    b1 = min(n_batches, b0 + chunk)
                    t0 = time.perf_counter()
                    snapshot = [p.copy() for p in self.model.weights + self.model.biases]
                    t, c, bad, done = engine.train_batches(order, bs, b0, b1, self.lr, interrupt.flag)
                    # Training time only, kept in the state so that a checkpoint written
                    # mid-epoch carries it and the resumed epoch reports all of it.
                    state.seconds += time.perf_counter() - t0
                    state.total += t
                    state.correct += c
                    if bad >= 0:
                        self._diverged(state.epoch, bad, n_batches, b0, snapshot)
                    # The loss only sees the weights before each update: an update that
                    # overflows shows up at the next batch's loss, or, after the last
                    # batch trained here, nowhere but in the weights themselves.
                    if done > b0 and not self._params_finite():
                        self._diverged(state.epoch, done - 1, n_batches, b0, snapshot,
                                       after_update=True)
                    if on_progress is not None and done > b0:
                        on_progress(min(done * bs, n) - b0 * bs)
                    b0 = state.next_batch = done
                    if interrupt.interrupted:
                        self._interrupted(state, n, n_batches, checkpoint)
                seconds = state.seconds
                record = {"epoch": state.epoch + 1, "loss": state.total / n,
                          "accuracy": state.correct / n, "seconds": seconds,
                          "samples_per_second": n / seconds if seconds > 0 else float("inf")}
                if validation:
                    v = self._evaluate_checked(*validation)
                    record["val_loss"], record["val_accuracy"] = v["loss"], v["accuracy"]
                history.append(record)
                state.next_epoch(self._rng)
                if checkpoint is not None:
                    _checkpoint.save(checkpoint, self, n, state)
                if on_epoch_end is not None:
                    on_epoch_end(state.epoch, record)
        return history

    def _interrupted(self, state, n, n_batches, checkpoint):
        where = f"epoch {state.epoch + 1}, after batch {state.next_batch} of {n_batches}"
        if checkpoint is not None:
            _checkpoint.save(checkpoint, self, n, state)
            raise TrainingInterrupted(f"interrupted at {where}; checkpoint saved to {checkpoint} "
                                      "(continue with resume=True / --resume)")
        raise TrainingInterrupted(f"interrupted at {where}; the model holds the weights "
                                  "trained so far")

    def _params_finite(self):
        return all(np.isfinite(p).all() for p in self.model.weights + self.model.biases)

    def _diverged(self, epoch, bad, n_batches, b0, snapshot, after_update=False):
        # The bad batch's update was not applied (or, after_update, it was and made a
        # weight NaN or infinite). If a weight is not finite, go back to the last state
        # known finite.
        params = self.model.weights + self.model.biases
        kept = f"the weights from before batch {bad + 1}"
        if not self._params_finite():
            for p, s in zip(params, snapshot):
                p[...] = s
            kept = f"the last finite weights (from before batch {b0 + 1})"
        what = "the weights became" if after_update else "the loss became"
        raise TrainingDiverged(
            f"training diverged: {what} NaN or infinite at epoch {epoch + 1}, batch "
            f"{bad + 1} of {n_batches}; the model keeps {kept}. Try a lower learning rate "
            f"(lr={self.lr:g}).")

    def _evaluate_checked(self, X, Y):
        P = self.model.predict_proba(X)
        out = {"loss": float(losses.value(self.loss, self.model.activations[-1], P, Y))}
        t, p = metrics._labels(Y, "y"), metrics._labels(P, "P")
        k = max(self.model.n_outputs, 2)
        out["accuracy"] = metrics.accuracy(t, p)
        out["precision_macro"] = metrics.precision(t, p, "macro", k)
        out["recall_macro"] = metrics.recall(t, p, "macro", k)
        out["f1_macro"] = metrics.f1(t, p, "macro", k)
        out["micro_averaged_accuracy"] = metrics.micro_averaged_accuracy(t, p, k)
        return out

    def evaluate(self, X, y):
        """Loss, accuracy, macro precision/recall/F1 and seed 002's micro-averaged
        accuracy of the model on (X, y), as a dict of floats."""
        X, Y = _check_xy(self.model, X, y)
        return self._evaluate_checked(X, Y)


def make_engine(backend, model, loss, batch_size, threads, optimizer):
    """The object that trains runs of batches for a backend: prepare(X, Y), then
    train_batches(order, batch_size, b0, b1, lr, stop) inside threads_context()."""
    if backend == "numba":
        from . import _numba_backend
        return _numba_backend.Engine(model, loss, batch_size, threads, optimizer)
    return _NumpyEngine(model, loss, threads, optimizer)


class _NumpyEngine:
    """The reference backend: plain vectorised NumPy, one Python step per batch."""

    def __init__(self, model, loss, threads, optimizer=None):
        self.model, self.loss, self.threads, self.optimizer = model, loss, threads, optimizer

    def threads_context(self):
        # BLAS threads, for a fair comparison at a given thread count; restored after.
        if self.threads is None:
            return contextlib.nullcontext()
        from threadpoolctl import threadpool_limits
        return threadpool_limits(limits=int(self.threads), user_api="blas")

    def prepare(self, X, Y):
        self.X, self.Y = X, Y

    def release(self):
        """Nothing to put back (see the numba Engine's)."""

    def train_batches(self, order, bs, b0, b1, lr, stop=None, keep_moments=False):
        # (the numba Engine's keep_moments has nothing to keep here)
        m = self.model
        return reference.train_batches(m.weights, m.biases, m.activations, self.loss,
                                       self.X, self.Y, lr, order, bs, b0, b1, stop,
                                       self.optimizer)
