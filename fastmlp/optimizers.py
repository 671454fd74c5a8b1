"""Optimisers by name, their state, and their update rules in plain NumPy.

The update rules are scikit-learn's (sklearn.neural_network._stochastic_optimizers),
so that fastmlp.MLPClassifier trains like sklearn's MLPClassifier:

- sgd:       p -= lr g
- momentum:  v = mu v - lr g;  p += v
- nesterov:  v = mu v - lr g;  p += mu v - lr g
- adam:      t += 1;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
             p -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)

g is the batch-mean gradient plus the L2 term: for weights (not biases)
g = dW + (alpha / B) W, the gradient of adding alpha / (2B) * sum of all W^2 to the
batch's mean loss (scikit-learn's convention; B is the batch's size).

These functions are the reference twins of the fused update in
fastmlp.kernels.epoch; tests compare the two, and these with scikit-learn's own
optimiser classes.
"""
import numbers

import numpy as np

NAMES = ("sgd", "momentum", "adam")
SGD, MOMENTUM, NESTEROV, ADAM = 0, 1, 2, 3


def _real(name, value, lo, hi, lo_open=False, hi_open=False):
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and np.isfinite(value)
          and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi))
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{name}: expected a number in {interval}, got {value!r}")
    return float(value)


class Optimizer:
    """What to do with a gradient: a name, its hyperparameters and its state.

    Optimizer(name="sgd", momentum=0.9, nesterov=False, beta_1=0.9, beta_2=0.999,
              epsilon=1e-8, alpha=0.0)

    The learning rate is not part of it: the Trainer (and the estimator's schedules)
    pass it with every call, since it may change between epochs.
    State arrays (velocities, Adam's moments and step) are created by `init_state`
    and live here, so that both backends, checkpoints and partial_fit share them.
    """

    def __init__(self, name="sgd", momentum=0.9, nesterov=False, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-8, alpha=0.0):
        if not isinstance(name, str) or name not in NAMES:
            raise ValueError(f"optimizer: unknown optimizer {name!r}; expected one of "
                             f"{', '.join(NAMES)}")
        self.name = name
        self.momentum = _real("momentum", momentum, 0, 1)
        self.nesterov = bool(nesterov)
        self.beta_1 = _real("beta_1", beta_1, 0, 1, hi_open=True)
        self.beta_2 = _real("beta_2", beta_2, 0, 1, hi_open=True)
        self.epsilon = _real("epsilon", epsilon, 0, np.inf, lo_open=True, hi_open=True)
        self.alpha = _real("alpha", alpha, 0, np.inf, hi_open=True)
        self.state = None

    @property
    def code(self):
        if self.name == "adam":
            return ADAM
        if self.name == "momentum":
            return NESTEROV if self.nesterov else MOMENTUM
        return SGD

    def config(self):
        """The hyperparameters, as plain values (for checkpoints and reports)."""
        out = {"optimizer": self.name, "alpha": self.alpha}
        if self.name == "momentum":
            out.update(momentum=self.momentum, nesterov=self.nesterov)
        if self.name == "adam":
            out.update(beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon)
        return out

    def init_state(self, weights, biases):
        """Zero state for these parameters: first moments (velocities) m, second
        moments v (Adam only) and the step count, as lists of arrays shaped like
        the weights and the biases."""
        n_moments = {SGD: 0, MOMENTUM: 1, NESTEROV: 1, ADAM: 2}[self.code]
        self.state = {"step": np.zeros(1, dtype=np.int64)}
        for name in ("m", "v")[:n_moments]:
            self.state[name + "W"] = [np.zeros_like(W) for W in weights]
            self.state[name + "b"] = [np.zeros_like(b) for b in biases]
        return self.state

    def ensure_state(self, weights, biases):
        """init_state unless the state already matches these parameters."""
        s = self.state
        if s is None or ("mW" in s) != (self.code != SGD) or ("vW" in s) != (self.code == ADAM) or (
                "mW" in s and [a.shape + (a.dtype,) for a in s["mW"]]
                != [W.shape + (W.dtype,) for W in weights]):
            return self.init_state(weights, biases)
        return s

    def step(self, weights, biases, grads, lr, batch_size):
        """One update in place from mean gradients [(dW, db), ...] of a batch of
        `batch_size` rows: the NumPy reference for the fused kernel."""
        s = self.ensure_state(weights, biases)
        dt = weights[0].dtype.type
        decay = dt(self.alpha / batch_size)
        code = self.code
        if code == ADAM:
            s["step"][0] += 1
            t = int(s["step"][0])
            lr = lr * np.sqrt(1 - self.beta_2 ** t) / (1 - self.beta_1 ** t)
        lr, mu = dt(lr), dt(self.momentum)
        b1, b2, eps = dt(self.beta_1), dt(self.beta_2), dt(self.epsilon)
        # 1 - beta in float64, then rounded once, as scikit-learn computes it.
        c1, c2 = dt(1 - self.beta_1), dt(1 - self.beta_2)
        for l, (dW, db) in enumerate(grads):
            for kind, p, g in (("W", weights[l], dW), ("b", biases[l], db)):
                if kind == "W" and self.alpha:
                    g = g + decay * p
                if code == SGD:
                    p -= lr * g
                elif code in (MOMENTUM, NESTEROV):
                    v = s["m" + kind][l]
                    v *= mu
                    v -= lr * g
                    p += (mu * v - lr * g) if code == NESTEROV else v
                else:
                    m, v = s["m" + kind][l], s["v" + kind][l]
                    m *= b1
                    m += c1 * g
                    v *= b2
                    v += c2 * (g * g)
                    p -= lr * m / (np.sqrt(v) + eps)

    def penalty(self, weights):
        """The L2 term's contribution to a batch's summed loss: alpha/2 * sum W^2
        (the batch mean's alpha / (2B) times B rows)."""
        if not self.alpha:
            return 0.0
        return 0.5 * self.alpha * sum(float(np.dot(W.ravel(), W.ravel())) for W in weights)

    def state_arrays(self):
        """The state as a flat {name: array} dict (for checkpoints)."""
        if self.state is None:
            return {}
        out = {"opt_step": self.state["step"]}
        for key, arrays in self.state.items():
            if key != "step":
                for i, a in enumerate(arrays):
                    out[f"opt_{key}{i}"] = a
        return out

    def load_state_arrays(self, arrays, weights, biases, where):
        """Restore state_arrays() output, checking every shape."""
        s = self.init_state(weights, biases)
        if "opt_step" not in arrays:
            raise ValueError(f"{where}: optimizer state is missing")
        s["step"][...] = arrays["opt_step"]
        for key, dst in s.items():
            if key == "step":
                continue
            for i, a in enumerate(dst):
                src = arrays.get(f"opt_{key}{i}")
                if src is None or src.shape != a.shape:
                    raise ValueError(f"{where}: optimizer state {key}{i} is missing or of the "
                                     "wrong shape")
                a[...] = src
