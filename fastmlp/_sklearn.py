"""fastmlp.MLPClassifier: scikit-learn's MLPClassifier, trained by fastmlp's compiled epoch.

Same parameters, defaults, attributes and training procedure as
sklearn.neural_network.MLPClassifier (Glorot-uniform initialisation from
`random_state`, sklearn's shuffling and early-stopping split, its optimisers,
learning-rate schedules and stopping rule), so that with the same random_state both
train the same network through the same sequence of batches. The epochs run in
fastmlp's compiled loop (backend="numba", the default) or its NumPy reference.

Needs scikit-learn (pip install "fastmlp[sklearn]"); `import fastmlp` does not.
"""
import contextlib
import numbers
import warnings

import numpy as np
import scipy.optimize
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier as _SklearnMLPClassifier
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import _check_partial_fit_first_call, type_of_target, unique_labels
from sklearn.utils.validation import check_array, check_is_fitted, column_or_1d, validate_data

from . import losses, reference
from ._interrupt import StopOnInterrupt
from .model import MLP
from .kernels.shuffle import mt19937_shuffle
from .optimizers import Optimizer
from .trainer import BACKENDS, DEFAULT_BACKEND, _NumpyEngine, make_engine

# scikit-learn's activation names -> fastmlp's.
ACTIVATIONS = {"identity": "linear", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu"}
DTYPES = {None: None, "float32": np.float32, "float64": np.float64, np.float32: np.float32,
          np.float64: np.float64}


@contextlib.contextmanager
def _releasing(engine):
    """engine.release() on the way out (see the numba Engine's train_batches)."""
    try:
        yield
    finally:
        engine.release()


def _shuffled(idx, random_state):
    """sklearn.utils.shuffle(idx, random_state=random_state): the same draws from
    random_state and the same order, without its argument checks and indexing
    dispatch. scikit-learn shuffles arange(n) and takes idx in that order; the
    shuffle's swaps depend only on n and the draws, so shuffling a copy of idx
    gives the same array without the gather. A RandomState on MT19937 (every one
    check_random_state makes) is shuffled by the compiled twin of its own shuffle
    (fastmlp.kernels.shuffle: MNIST's 60,000 rows, once an epoch, 0.42 against
    0.61 ms), its state read and written back. NumPy's global RandomState
    (random_state=None) shuffles itself under its own lock, since other threads
    may draw from it between that read and write."""
    out = idx.copy()
    if random_state is check_random_state(None):
        random_state.shuffle(out)
        return out
    state = random_state.get_state(legacy=False)
    if state["bit_generator"] != "MT19937" or out.ndim != 1 or len(out) > 1 << 32:
        random_state.shuffle(out)
        return out
    key = np.array(state["state"]["key"], dtype=np.uint32)
    pos = mt19937_shuffle(out, key, int(state["state"]["pos"]))
    state["state"] = {"key": key, "pos": pos}
    random_state.set_state(state)
    return out


class MLPClassifier(ClassifierMixin, BaseEstimator):
    """Multi-layer perceptron classifier: a drop-in for scikit-learn's, trained by
    fastmlp's compiled kernels.

    Every parameter of sklearn.neural_network.MLPClassifier has the same name,
    default and meaning (see its documentation); fastmlp adds three:

    backend : {"numba", "numpy"}, default "numba"
        The compiled epoch, or fastmlp's plain NumPy reference path.
    threads : int or None, default None
        Threads for training (numba threads; BLAS threads for "numpy"). None uses
        numba's default (all cores).
    dtype : {None, "float32", "float64"}, default None
        Floating-point type of the parameters. None follows the input as
        scikit-learn does: float32 input stays float32, anything else is float64.

    solver="lbfgs" minimises the full-batch loss with SciPy's L-BFGS-B, taking the
    loss and gradient from fastmlp's kernels. fit has no sample_weight (scikit-learn
    added it in 1.7); passing one raises TypeError.
    """

    _parameter_constraints = {
        **_SklearnMLPClassifier._parameter_constraints,
        "backend": [StrOptions(set(BACKENDS))],
        "threads": [None, Interval(numbers.Integral, 1, None, closed="left")],
        "dtype": [None, StrOptions({"float32", "float64"}), type],
    }

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000,
                 backend=DEFAULT_BACKEND, threads=None, dtype=None):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.backend = backend
        self.threads = threads
        self.dtype = dtype

    # -- fitting ---------------------------------------------------------------------

    def fit(self, X, y):
        """Train on X (n_samples, n_features) and class labels y (or a multilabel
        indicator matrix); returns self."""
        self._validate_params()
        return self._fit(X, y, incremental=False)

    def _check_solver(self):
        if self.solver not in ("sgd", "adam"):
            raise AttributeError(f"partial_fit is only available for stochastic optimizers. "
                                 f"{self.solver} is not stochastic.")
        return True

    @available_if(lambda est: est._check_solver())
    def partial_fit(self, X, y, classes=None):
        """One epoch over (X, y), continuing from the current state (weights and
        optimiser). The first call needs classes=, all the labels there will be."""
        self._validate_params()
        if _check_partial_fit_first_call(self, classes):
            self._label_binarizer = LabelBinarizer()
            if type_of_target(y).startswith("multilabel"):
                self._label_binarizer.fit(y)
            else:
                self._label_binarizer.fit(classes)
        return self._fit(X, y, incremental=True)

    def _engine_checks_finite(self):
        """Whether training's own pass over X finds a NaN or an infinity, so that
        validation need not: the compiled epoch's Engine.prepare does, where the
        whole training set reaches it (not with early stopping, which keeps part of
        it for validation)."""
        return self.solver in ("sgd", "adam") and self.backend == "numba" and \
            not self.early_stopping

    def _validate_input(self, X, y, incremental, reset):
        X, y = validate_data(self, X, y, multi_output=True, dtype=(np.float64, np.float32),
                             reset=reset, ensure_all_finite=not self._engine_checks_finite())
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if not hasattr(self, "classes_") or (not self.warm_start and not incremental):
            self._label_binarizer = LabelBinarizer()
            self._label_binarizer.fit(y)
            self.classes_ = self._label_binarizer.classes_
        else:
            classes = unique_labels(y)
            if self.warm_start:
                if set(classes) != set(self.classes_):
                    raise ValueError(
                        "warm_start can only be used where `y` has the same classes as in the "
                        f"previous call to fit. Previously got {self.classes_}, `y` has {classes}")
            elif len(np.setdiff1d(classes, self.classes_, assume_unique=True)):
                raise ValueError(f"`y` has classes not in `self.classes_`. `self.classes_` has "
                                 f"{self.classes_}. 'y' has {classes}.")
        return X, self._indicators(y)

    def _indicators(self, y):
        """The label binarizer's indicator matrix of y, as bool. For a multiclass
        binarizer (three or more classes) and a 1-D y, y compared with each class:
        the same matrix, labels it does not know giving rows of zeros as
        label_binarize's do, without its sparse matrix (MNIST's 60,000 labels: 0.6
        against 2.1-3.5 ms)."""
        lb = self._label_binarizer
        classes = lb.classes_
        if lb.y_type_ != "multiclass" or len(classes) < 3 or np.ndim(y) != 1:
            return lb.transform(y).astype(bool)
        return np.asarray(y)[:, None] == classes

    def _hidden_sizes(self):
        sizes = self.hidden_layer_sizes
        sizes = list(sizes) if hasattr(sizes, "__iter__") else [sizes]
        if np.any(np.array(sizes) <= 0):
            raise ValueError(f"hidden_layer_sizes must be > 0, got {sizes}.")
        return [int(s) for s in sizes]

    def _fit(self, X, y, incremental):
        if not self._engine_checks_finite():
            return self._fit_checked(X, y, incremental)
        from ._numba_backend import NonFiniteInput
        before = dict(self.__dict__)
        try:
            return self._fit_checked(X, y, incremental)
        except NonFiniteInput as e:
            # As scikit-learn's own check would have: nothing fitted changes, and
            # its message.
            self.__dict__.clear()
            self.__dict__.update(before)
            error = e
        check_array(X, dtype=None, ensure_2d=False, ensure_all_finite=True, estimator=self,
                    input_name="X")
        raise error

    def _fit_checked(self, X, y, incremental):
        hidden = self._hidden_sizes()
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected None, 'float32' or 'float64', got {self.dtype!r}")
        first_pass = not hasattr(self, "coefs_") or (not self.warm_start and not incremental)
        X, Y = self._validate_input(X, y, incremental, reset=first_pass)
        if Y.ndim == 1:
            Y = Y.reshape(-1, 1)
        layer_units = [X.shape[1]] + hidden + [Y.shape[1]]
        self._random_state = check_random_state(self.random_state)
        if first_pass:
            dtype = np.dtype(DTYPES[self.dtype] or X.dtype)
            self.n_outputs_ = Y.shape[1]
            self._initialize(Y, layer_units, dtype)
        elif [c.shape for c in self.coefs_] != list(zip(layer_units[:-1], layer_units[1:])):
            raise ValueError(
                f"hidden_layer_sizes: the fitted network has layers "
                f"{[self.coefs_[0].shape[0]] + [c.shape[1] for c in self.coefs_]}, this fit "
                f"needs {layer_units}; refit from scratch (warm_start=False)")
        model = self._model()
        # validate_data has found X finite (or training will: _engine_checks_finite);
        # a cast to another dtype (float64 input, float32 parameters) must stay
        # finite too: fastmlp's own input check.
        X = model.check_input(X) if X.dtype != model.dtype else np.ascontiguousarray(X)
        if self.solver in ("sgd", "adam"):
            self._fit_stochastic(model, X, Y, incremental)
        else:
            self._fit_lbfgs(model, X, Y)
        if not all(np.isfinite(p).all() for p in self.coefs_ + self.intercepts_):
            raise ValueError("Solver produced non-finite parameter weights. The input data may "
                             "contain large values and need to be preprocessed.")
        return self

    def _initialize(self, Y, layer_units, dtype):
        # scikit-learn's order of random draws, so that a random_state gives the same
        # initial weights as sklearn's MLPClassifier.
        self.n_iter_ = 0
        self.t_ = 0
        self.n_layers_ = len(layer_units)
        self.out_activation_ = ("softmax" if self._label_binarizer.y_type_ == "multiclass"
                                else "logistic")
        factor = 2.0 if self.activation == "logistic" else 6.0
        self.coefs_, self.intercepts_ = [], []
        for fan_in, fan_out in zip(layer_units[:-1], layer_units[1:]):
            bound = np.sqrt(factor / (fan_in + fan_out))
            W = self._random_state.uniform(-bound, bound, (fan_in, fan_out))
            b = self._random_state.uniform(-bound, bound, fan_out)
            self.coefs_.append(np.ascontiguousarray(W, dtype=dtype))
            self.intercepts_.append(np.ascontiguousarray(b, dtype=dtype))
        self._best_coefs = [c.copy() for c in self.coefs_]
        self._best_intercepts = [i.copy() for i in self.intercepts_]
        if self.solver in ("sgd", "adam"):
            self.loss_curve_ = []
            self._no_improvement_count = 0
            if self.early_stopping:
                self.validation_scores_ = []
                self.best_validation_score_ = -np.inf
                self.best_loss_ = None
            else:
                self.best_loss_ = np.inf
                self.validation_scores_ = None
                self.best_validation_score_ = None

    def _model(self):
        """A fastmlp.MLP over the fitted arrays themselves (training updates them)."""
        hidden = ACTIVATIONS[self.activation]
        out = "softmax" if self.out_activation_ == "softmax" else "sigmoid"
        acts = [hidden] * (len(self.coefs_) - 1) + [out]
        sizes = [self.coefs_[0].shape[0]] + [c.shape[1] for c in self.coefs_]
        model = MLP.from_arrays(sizes, acts, self.coefs_[0].dtype, self.coefs_, self.intercepts_)
        self.coefs_, self.intercepts_ = model.weights, model.biases
        return model

    def _new_optimizer(self):
        if self.solver == "adam":
            return Optimizer("adam", beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon,
                             alpha=self.alpha)
        if self.momentum > 0:
            return Optimizer("momentum", momentum=self.momentum, nesterov=self.nesterovs_momentum,
                             alpha=self.alpha)
        return Optimizer("sgd", alpha=self.alpha)

    def _fit_stochastic(self, model, X, Y, incremental):
        if not incremental or not hasattr(self, "_optimizer"):
            self._optimizer = self._new_optimizer()
            self._optimizer.init_state(model.weights, model.biases)
            self._learning_rate = float(self.learning_rate_init)
        if self.early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        early_stopping = self.early_stopping
        X_val = y_val = None
        if early_stopping:
            stratify = Y if self.n_outputs_ == 1 else None      # not for multilabel
            X, X_val, Y, Y_val = train_test_split(X, Y, random_state=self._random_state,
                                                  test_size=self.validation_fraction,
                                                  stratify=stratify)
            if X_val.shape[0] < 2:
                raise ValueError("The validation set is too small. Increase "
                                 "'validation_fraction' or the size of your dataset.")
            y_val = self._label_binarizer.inverse_transform(Y_val)
        n = X.shape[0]
        if self.batch_size == "auto":
            batch_size = min(200, n)
        else:
            if self.batch_size > n:
                warnings.warn("Got `batch_size` less than 1 or larger than sample size. It is "
                              "going to be clipped")
            batch_size = int(np.clip(self.batch_size, 1, n))
        n_batches = -(-n // batch_size)
        sample_idx = np.arange(n, dtype=np.int64)
        engine = make_engine(self.backend, model, "cross_entropy", batch_size, self.threads,
                             self._optimizer)
        self.n_iter_ = 0
        with engine.threads_context(), StopOnInterrupt() as interrupt, _releasing(engine):
            # (only the numba Engine takes check_finite)
            check = {"check_finite": True} if self._engine_checks_finite() else {}
            engine.prepare(np.ascontiguousarray(X), np.ascontiguousarray(Y, dtype=model.dtype),
                           **check)
            # prepare may replace non-contiguous parameters; training updates these in place.
            self.coefs_, self.intercepts_ = model.weights, model.biases
            for _ in range(self.max_iter):
                if self.shuffle:
                    sample_idx = _shuffled(sample_idx, self._random_state)
                # W_1's moments stay in the Engine's row order between epochs (putting
                # them back and taking them again cost 0.3 ms an epoch); _releasing
                # puts them back when the epochs end, however they end.
                total, _, bad, done = engine.train_batches(sample_idx, batch_size, 0, n_batches,
                                                           self._learning_rate, interrupt.flag,
                                                           keep_moments=True)
                if bad >= 0:
                    raise ValueError(
                        f"Solver produced non-finite parameter weights: the loss became NaN or "
                        f"infinite at epoch {self.n_iter_ + 1}, batch {bad + 1} of {n_batches}. "
                        f"The input data may contain large values and need to be preprocessed, "
                        f"or learning_rate_init={self.learning_rate_init:g} is too high.")
                # An update that overflows is seen by the next batch's loss, or after the
                # epoch's last batch, only in the weights (scikit-learn checks them too).
                if not all(np.isfinite(p).all() for p in model.weights + model.biases):
                    raise ValueError(
                        f"Solver produced non-finite parameter weights: they became NaN or "
                        f"infinite in epoch {self.n_iter_ + 1}'s last update. The input data "
                        f"may contain large values and need to be preprocessed, or "
                        f"learning_rate_init={self.learning_rate_init:g} is too high.")
                if interrupt.interrupted:
                    warnings.warn("Training interrupted by user.")
                    break
                self.n_iter_ += 1
                self.loss_ = total / n
                self.t_ += n
                self.loss_curve_.append(self.loss_)
                if self.verbose:
                    print("Iteration %d, loss = %.8f" % (self.n_iter_, self.loss_))
                self._update_no_improvement_count(early_stopping, model, X_val, y_val)
                if self.solver == "sgd" and self.learning_rate == "invscaling":
                    self._learning_rate = (float(self.learning_rate_init)
                                           / (self.t_ + 1) ** self.power_t)
                if self._no_improvement_count > self.n_iter_no_change:
                    what = "Validation score" if early_stopping else "Training loss"
                    msg = (f"{what} did not improve more than tol={self.tol:f} for "
                           f"{self.n_iter_no_change} consecutive epochs.")
                    if (self.solver == "sgd" and self.learning_rate == "adaptive"
                            and self._learning_rate > 1e-6):
                        self._learning_rate /= 5.0
                        self._no_improvement_count = 0
                        if self.verbose:
                            print(msg + " Setting learning rate to %f" % self._learning_rate)
                    else:
                        if self.verbose:
                            print(msg + " Stopping.")
                        break
                if incremental:
                    break
                if self.n_iter_ == self.max_iter:
                    warnings.warn(f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) "
                                  "reached and the optimization hasn't converged yet.",
                                  ConvergenceWarning)
        if early_stopping:
            self.coefs_, self.intercepts_ = self._best_coefs, self._best_intercepts

    def _update_no_improvement_count(self, early_stopping, model, X_val, y_val):
        if early_stopping:
            # scikit-learn's score: accuracy, or subset accuracy for multilabel.
            score = float(accuracy_score(y_val, self._labels(model.predict_proba(X_val))))
            self.validation_scores_.append(score)
            if self.verbose:
                print("Validation score: %f" % score)
            if score < self.best_validation_score_ + self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if score > self.best_validation_score_:
                self.best_validation_score_ = score
                self._best_coefs = [c.copy() for c in model.weights]
                self._best_intercepts = [b.copy() for b in model.biases]
        else:
            if self.loss_curve_[-1] > self.best_loss_ - self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if self.loss_curve_[-1] < self.best_loss_:
                self.best_loss_ = self.loss_curve_[-1]

    def _fit_lbfgs(self, model, X, Y):
        """SciPy's L-BFGS-B on the full-batch loss (mean cross-entropy plus
        alpha / (2n) * sum W^2) and its gradient, both from fastmlp's kernels."""
        Y = np.ascontiguousarray(Y, dtype=model.dtype)
        n = X.shape[0]
        params = model.weights + model.biases
        sizes = [p.size for p in params]
        splits = np.cumsum(sizes)[:-1]
        alpha = float(self.alpha)

        def loss_grad(theta):
            for p, part in zip(params, np.split(theta, splits)):
                p[...] = part.reshape(p.shape)
            total, grads = self._loss_and_gradients(model, X, Y)
            sq = sum(float(np.dot(W.ravel(), W.ravel())) for W in model.weights)
            loss = total / n + 0.5 * alpha * sq / n
            flat = [dW + (alpha / n) * W for (dW, _), W in zip(grads, model.weights)]
            flat += [db for _, db in grads]
            return loss, np.concatenate([g.ravel() for g in flat]).astype(np.float64)

        theta0 = np.concatenate([p.ravel() for p in params]).astype(np.float64)
        iprint = {"iprint": 1} if self.verbose is True or self.verbose >= 1 else {}
        # Whole-dataset products: let BLAS use the threads (the numba Engine's context
        # would pin it to one, which suits only its own per-thread chunks).
        with _NumpyEngine(model, "cross_entropy", self.threads).threads_context():
            res = scipy.optimize.minimize(loss_grad, theta0, method="L-BFGS-B", jac=True,
                                          options={"maxfun": self.max_fun,
                                                   "maxiter": self.max_iter, "gtol": self.tol,
                                                   **iprint})
        if res.status != 0:
            warnings.warn(f"lbfgs failed to converge after {res.nit} iteration(s) (status="
                          f"{res.status}): {res.message}. Increase the number of iterations "
                          "(max_iter) or scale the data.", ConvergenceWarning)
        for p, part in zip(params, np.split(res.x, splits)):
            p[...] = part.reshape(p.shape)
        self.n_iter_ = int(min(res.nit, self.max_iter))
        self.loss_ = float(res.fun)
        self.coefs_, self.intercepts_ = model.weights, model.biases

    def _loss_and_gradients(self, model, X, Y):
        if self.backend == "numba":
            from . import _numba_backend
            return _numba_backend.loss_and_gradients(model, X, Y, "cross_entropy")
        As = reference.forward(model.weights, model.biases, model.activations, X)
        total = float(losses.per_sample("cross_entropy", model.activations[-1], As[-1], Y).sum())
        return total, reference.backward(model.weights, model.activations, As, Y, "cross_entropy")

    # -- prediction ------------------------------------------------------------------

    def _forward(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        return self._model().predict_proba(X)

    def _labels(self, out):
        return self._label_binarizer.inverse_transform(out.ravel() if out.shape[1] == 1 else out)

    def predict(self, X):
        """Class labels (or a label indicator matrix for multilabel targets)."""
        return self._labels(self._forward(X))

    def predict_proba(self, X):
        """Class probabilities, columns in the order of classes_."""
        out = self._forward(X)
        if out.shape[1] == 1:
            p = out.ravel()
            return np.vstack([1 - p, p]).T
        return out

    def predict_log_proba(self, X):
        """log(predict_proba(X))."""
        P = self.predict_proba(X)
        return np.log(P, out=P)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags
