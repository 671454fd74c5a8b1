"""fastmlp.MLPClassifier against scikit-learn's: its estimator checks, and the same
weights as sklearn.neural_network.MLPClassifier from the same random_state."""
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.neural_network import MLPClassifier as SklearnMLP  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from fastmlp import MLPClassifier  # noqa: E402

BACKENDS = ["numba", "numpy"]


@parametrize_with_checks([MLPClassifier()])
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


def blobs(n=300, n_features=12, k=4, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 2, (k, n_features))
    y = rng.integers(0, k, n)
    X = centers[y] + rng.normal(size=(n, n_features))
    return X.astype(dtype), y


def targets(kind, y, seed=1):
    rng = np.random.default_rng(seed)
    if kind == "binary":
        return np.where(y % 2 == 0, "even", "odd")               # string labels
    if kind == "multilabel":
        Y = np.eye(4, dtype=int)[y]
        return Y | (rng.random(Y.shape) < 0.3)
    return np.array(["a", "b", "c", "d"])[y]


def fit_both(params, X, y, backend="numba"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = SklearnMLP(**params).fit(X, y)
        got = MLPClassifier(backend=backend, **params).fit(X, y)
    return ref, got


def assert_same_fit(ref, got, rtol, atol):
    assert len(got.coefs_) == len(ref.coefs_)
    for a, b in zip(ref.coefs_ + ref.intercepts_, got.coefs_ + got.intercepts_):
        assert b.dtype == a.dtype
        np.testing.assert_allclose(b, a, rtol=rtol, atol=atol)
    assert got.n_iter_ == ref.n_iter_ and got.t_ == ref.t_
    np.testing.assert_allclose(got.loss_curve_, ref.loss_curve_, rtol=max(rtol, 1e-12))
    for name in ("n_layers_", "n_outputs_", "out_activation_", "n_features_in_"):
        assert getattr(got, name) == getattr(ref, name), name
    np.testing.assert_array_equal(got.classes_, ref.classes_)


COMMON = dict(hidden_layer_sizes=(16, 9), random_state=3, batch_size=32)
SOLVERS = [
    dict(solver="sgd", momentum=0.0, alpha=0.0, learning_rate_init=0.05),     # plain SGD
    dict(solver="adam", alpha=0.0),
    dict(solver="sgd", momentum=0.9, nesterovs_momentum=False, alpha=1e-3),
    dict(solver="sgd", momentum=0.8, nesterovs_momentum=True, alpha=1e-2),
    dict(solver="adam", alpha=1e-2, beta_1=0.8, beta_2=0.99, epsilon=1e-6, activation="tanh"),
    dict(solver="sgd", learning_rate="invscaling", power_t=0.3, activation="logistic"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["multiclass", "binary", "multilabel"])
@pytest.mark.parametrize("solver", SOLVERS, ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()))
def test_one_epoch_equals_scikit_learn_float64(solver, kind, backend):
    """Same random_state: same initial weights, same shuffle, same batches, and so
    the same coefs_ after an epoch (to float64 rounding) for each optimiser."""
    X, y = blobs()
    ref, got = fit_both(dict(COMMON, max_iter=1, **solver), X, targets(kind, y), backend)
    assert_same_fit(ref, got, rtol=1e-10, atol=1e-12)


def test_epoch_shuffle_draws_as_scikit_learn():
    """The epoch order fastmlp draws is sklearn.utils.shuffle's, from the same
    random_state, epoch after epoch (each reorders the last order)."""
    from sklearn.utils import shuffle

    from fastmlp._sklearn import _shuffled
    for n, seed in [(1, 0), (2, 1), (17, 2), (60000, 3)]:
        ours, theirs = np.random.RandomState(seed), np.random.RandomState(seed)
        a = b = np.arange(n, dtype=np.int64)
        for _ in range(3):
            a, b = _shuffled(a, ours), shuffle(b, random_state=theirs)
            np.testing.assert_array_equal(a, b)
        assert ours.randint(1 << 30) == theirs.randint(1 << 30)   # streams still in step


def test_compiled_shuffle_is_randomstates():
    """The compiled shuffle against RandomState.shuffle itself: the same order and the
    same state after it (the next draws agree), for sizes around the powers of 2
    (where the rejection mask halves) and the generator's 624-word refills, from
    states part-way through a refill; another bit generator falls back to its own
    shuffle."""
    from fastmlp._sklearn import _shuffled
    for n in [0, 1, 2, 3, 4, 5, 8, 9, 255, 256, 257, 623, 624, 625, 1249, 4097, 60000]:
        for seed in range(3):
            ours, theirs = np.random.RandomState(seed), np.random.RandomState(seed)
            ours.random_sample(seed * 300)
            theirs.random_sample(seed * 300)
            x = np.arange(n, dtype=np.int64) * 3 + 1
            want = x.copy()
            theirs.shuffle(want)
            got = _shuffled(x, ours)
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(x, np.arange(n) * 3 + 1)     # idx untouched
            assert ours.get_state()[2] == theirs.get_state()[2]
            np.testing.assert_array_equal(ours.random_sample(5), theirs.random_sample(5))
    ours = np.random.RandomState(np.random.PCG64(5))
    theirs = np.random.RandomState(np.random.PCG64(5))
    want = np.arange(100)
    theirs.shuffle(want)
    np.testing.assert_array_equal(_shuffled(np.arange(100), ours), want)
    # NumPy's global RandomState (random_state=None) draws as its own shuffle does.
    from sklearn.utils import check_random_state
    shared = check_random_state(None)
    state = shared.get_state()
    want = np.arange(1000)
    shared.shuffle(want)
    shared.set_state(state)
    np.testing.assert_array_equal(_shuffled(np.arange(1000), shared), want)


@pytest.mark.parametrize("params", [
    dict(solver="adam", max_iter=30, n_iter_no_change=3, tol=1e-2),     # stops on the loss
    dict(solver="sgd", learning_rate="adaptive", max_iter=25, n_iter_no_change=2, tol=0.05),
    dict(solver="adam", early_stopping=True, max_iter=15, n_iter_no_change=2, tol=1e-3),
    dict(solver="sgd", shuffle=False, max_iter=4, batch_size=1000),      # batch clipped to n
], ids=["tol-stop", "adaptive", "early-stopping", "no-shuffle-big-batch"])
def test_schedules_and_stopping_follow_scikit_learn(params):
    X, y = blobs(n=240)
    p = dict(COMMON, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref, got = fit_both(p, X, y)
    assert_same_fit(ref, got, rtol=1e-8, atol=1e-10)
    assert got.best_loss_ == pytest.approx(ref.best_loss_) if ref.best_loss_ is not None else (
        got.best_loss_ is None)
    if params.get("early_stopping"):
        np.testing.assert_allclose(got.validation_scores_, ref.validation_scores_)
        assert got.best_validation_score_ == ref.best_validation_score_
    if params.get("learning_rate") == "adaptive":
        assert got._learning_rate < p.get("learning_rate_init", 1e-3)   # it was divided


@pytest.mark.parametrize("solver", ["sgd", "adam"])
def test_float32_input_stays_float32_and_tracks_scikit_learn(solver):
    X, y = blobs(dtype=np.float32)
    ref, got = fit_both(dict(COMMON, solver=solver, max_iter=3), X, y)
    assert got.coefs_[0].dtype == np.float32 and got.predict_proba(X).dtype == np.float32
    for a, b in zip(ref.coefs_, got.coefs_):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got.predict(X), ref.predict(X))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_images_as_levels_fit_like_the_float_copy_and_scikit_learn(dtype, monkeypatch):
    """Image-like input (pixels c / 255, mostly zero, a block of often-nonzero
    ones): the split keeps those columns as 8-bit levels, and fit, partial_fit and
    predict give the same bits as with the levels turned off, and track
    scikit-learn's."""
    from fastmlp import _numba_backend
    rng = np.random.default_rng(5)
    n, y = 300, rng.integers(0, 3, 300)
    X = np.where(rng.random((n, 120)) < np.where(np.arange(120) < 40, 0.8, 0.05),
                 rng.integers(1, 256, (n, 120)), 0).astype(dtype) / dtype(255)
    X[np.arange(n), 40 + y] = 1.0                       # something to learn
    p = dict(hidden_layer_sizes=(24,), max_iter=3, batch_size=30, random_state=0,
             learning_rate_init=0.01)
    kept = []
    prepare = _numba_backend.Engine.prepare

    def spy(engine, *args, **kwargs):
        prepare(engine, *args, **kwargs)
        kept.append(engine.X.dtype)
    monkeypatch.setattr(_numba_backend.Engine, "prepare", spy)
    fits = []
    for divisors in ((255, 1), ()):
        monkeypatch.setattr(_numba_backend, "LEVEL_DIVISORS", divisors)
        est = MLPClassifier(threads=2, **p).fit(X, y)
        est.partial_fit(X[:100], y[:100])
        fits.append(est)
    assert kept == [np.uint8] * 2 + [np.dtype(dtype)] * 2
    a, b = fits
    for u, v in zip(a.coefs_ + a.intercepts_, b.coefs_ + b.intercepts_):
        assert u.tobytes() == v.tobytes()
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    ref = SklearnMLP(**p).fit(X, y)
    ref.partial_fit(X[:100], y[:100])
    # float32: 33 Adam steps divide gradients near zero by their own running size,
    # so one rounding apart can move a weight by up to a step. Here one weight of
    # 2,880 is 1.25e-5 from scikit-learn's (the first layer's CSR nonzeros added
    # onto its dense columns' product), 7.2e-6 when they were summed apart and then
    # added; other seeds (6-8) stay within 3e-6 either way.
    tol = dict(rtol=1e-4, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    for u, v in zip(ref.coefs_, a.coefs_):
        np.testing.assert_allclose(v, u, **tol)


def test_dtype_parameter_overrides_the_input():
    X, y = blobs()
    est = MLPClassifier(hidden_layer_sizes=(5,), max_iter=2, dtype="float32").fit(X, y)
    assert est.coefs_[0].dtype == np.float32
    huge = X.copy()
    huge[0, 0] = 1e300                    # finite in float64, infinite in float32
    with pytest.raises(ValueError, match="do not fit in float32"):
        MLPClassifier(hidden_layer_sizes=(5,), dtype="float32").fit(huge, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_fit_sequence_equals_scikit_learn(backend):
    X, y = blobs(n=200)
    labels = np.array(["w", "x", "y", "z"])[y]
    p = dict(COMMON, solver="adam")
    ref, got = SklearnMLP(**p), MLPClassifier(backend=backend, **p)
    for i, part in enumerate(np.array_split(np.arange(200), 4)):
        kw = {"classes": np.unique(labels)} if i == 0 else {}
        ref.partial_fit(X[part], labels[part], **kw)
        got.partial_fit(X[part], labels[part], **kw)
    for a, b in zip(ref.coefs_, got.coefs_):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12)
    assert got.n_iter_ == 1 and got.t_ == ref.t_ == 200
    with pytest.raises(ValueError, match="classes not in"):
        got.partial_fit(X[:5], np.array(["v"] * 5))


def test_warm_start_continues_like_scikit_learn():
    X, y = blobs()
    p = dict(COMMON, solver="sgd", max_iter=2, warm_start=True)
    ref, got = fit_both(p, X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref.fit(X, y)
        got.fit(X, y)
    for a, b in zip(ref.coefs_, got.coefs_):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12)
    assert len(got.loss_curve_) == 4


def test_lbfgs_follows_scikit_learn():
    X, y = blobs(n=150)
    ref, got = fit_both(dict(COMMON, solver="lbfgs", max_iter=15), X, y)
    assert got.n_iter_ == ref.n_iter_
    assert got.loss_ == pytest.approx(ref.loss_, rel=1e-6)
    np.testing.assert_array_equal(got.predict(X), ref.predict(X))
    with pytest.raises(AttributeError, match="has no attribute 'partial_fit'"):
        got.partial_fit(X, y)


def test_pipeline_grid_search_clone_and_pickle():
    """GridSearchCV runs fits in joblib worker processes (n_jobs=2); every fold's
    score equals the one scikit-learn's MLPClassifier gets."""
    X, y = blobs(n=200)
    labels = np.array(["a", "b", "c", "d"])[y]
    grid_params = {"mlpclassifier__alpha": [1e-4, 1e-1], "mlpclassifier__solver": ["adam", "sgd"]}
    grids = []
    for cls in (MLPClassifier, SklearnMLP):
        pipe = make_pipeline(StandardScaler(), cls(hidden_layer_sizes=(8,), max_iter=100,
                                                   learning_rate_init=0.01, random_state=0))
        grid = GridSearchCV(pipe, grid_params, cv=2, n_jobs=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            grids.append(grid.fit(X, labels))
    grid, ref = grids
    assert grid.best_score_ > 0.9
    np.testing.assert_allclose(grid.cv_results_["mean_test_score"],
                               ref.cv_results_["mean_test_score"])
    best = grid.best_estimator_
    again = pickle.loads(pickle.dumps(best))
    np.testing.assert_array_equal(again.predict(X), best.predict(X))
    np.testing.assert_array_equal(again.predict_proba(X), best.predict_proba(X))
    fresh = clone(best.steps[-1][1])
    assert not hasattr(fresh, "coefs_") and fresh.get_params() == best.steps[-1][1].get_params()


def test_probabilities_and_log_probabilities():
    X, y = blobs()
    for yy in (y, y % 2):
        est = MLPClassifier(hidden_layer_sizes=(6,), max_iter=30, random_state=0).fit(X, yy)
        P = est.predict_proba(X)
        assert P.shape == (len(X), len(np.unique(yy)))
        np.testing.assert_allclose(P.sum(axis=1), 1, rtol=1e-12)
        np.testing.assert_allclose(est.predict_log_proba(X), np.log(P))
        np.testing.assert_array_equal(est.predict(X), est.classes_[P.argmax(axis=1)])
        assert est.score(X, yy) == np.mean(est.predict(X) == yy)


def test_unsupported_arguments_are_refused_not_ignored():
    X, y = blobs(n=50)
    with pytest.raises(TypeError, match="sample_weight"):
        MLPClassifier().fit(X, y, sample_weight=np.ones(50))
    with pytest.raises(ValueError, match="backend"):
        MLPClassifier(backend="gpu").fit(X, y)
    with pytest.raises(ValueError, match="solver"):
        MLPClassifier(solver="rmsprop").fit(X, y)
    with pytest.raises(ValueError, match="hidden_layer_sizes must be > 0"):
        MLPClassifier(hidden_layer_sizes=(4, 0)).fit(X, y)
    with pytest.raises(ValueError, match="NaN"):
        MLPClassifier().fit(np.where(X > 2, np.nan, X), y)


@pytest.mark.parametrize("kind", ["split", "csr", "dense"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_found_by_training_is_refused_like_scikit_learn(kind, bad):
    """The numba backend's stochastic solvers find a NaN or an infinity in X as
    they prepare it (a sparse input's split counts every value) instead of
    validation: the error is scikit-learn's own, and nothing fitted changes, as
    when scikit-learn checks first. kind: a sparse input with often-nonzero
    columns (split), without them (the CSR alone), or dense."""
    from sklearn.neural_network import MLPClassifier as Sk
    rng = np.random.default_rng(11)
    X = rng.random((200, 40)).astype(np.float32)
    if kind != "dense":
        X[rng.random(X.shape) < (0.9 if kind == "csr" else np.where(np.arange(40) < 20, 0.3,
                                                                     0.95))] = 0
    y = rng.integers(0, 3, 200)
    bad_X = X.copy()
    bad_X[137, 29] = bad
    for solver in ("adam", "sgd"):
        with pytest.raises(ValueError) as sk_error:
            Sk(solver=solver).fit(bad_X, y)
        est = MLPClassifier(solver=solver, max_iter=2, random_state=0)
        with pytest.raises(ValueError) as error:
            est.fit(bad_X, y)
        assert str(error.value) == str(sk_error.value)
        assert not [k for k in vars(est) if k.endswith("_")]      # not fitted
        est.fit(X, y)
        fitted = pickle.dumps(est)
        for again in (lambda: est.partial_fit(bad_X, y),
                      lambda: est.set_params(warm_start=True).fit(bad_X, y)):
            with pytest.raises(ValueError, match=str(error.value)[:20]):
                again()
            assert pickle.dumps(est.set_params(warm_start=False)) == fitted


def test_indicator_matrix_is_the_label_binarizers():
    """_indicators' shortcut for multiclass labels (numbers, strings, objects,
    labels the binarizer does not know) against LabelBinarizer.transform, and the
    binary and multilabel cases it leaves to it."""
    from sklearn.preprocessing import LabelBinarizer
    rng = np.random.default_rng(13)
    cases = [(rng.integers(0, 10, 500), None),
             (rng.choice(np.array(["a", "bb", "c", "z"]), 300), None),
             (rng.choice(np.array(["a", "bb", "c"], dtype=object), 300), None),
             (rng.integers(-3, 3, 200).astype(float), None),
             (np.array([1, 5, 3, 0, 2]), [1, 2, 3]),            # 5 and 0 unknown
             (rng.integers(0, 2, 100), None),                   # binary
             (rng.integers(0, 2, (100, 4)), None)]              # multilabel
    for y, classes in cases:
        est = MLPClassifier()
        est._label_binarizer = LabelBinarizer().fit(y if classes is None else classes)
        got = est._indicators(y)
        want = est._label_binarizer.transform(y).astype(bool)
        assert got.dtype == bool and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_import_fastmlp_does_not_import_sklearn():
    code = "import sys, fastmlp; assert 'sklearn' not in sys.modules; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_overflow_in_an_epochs_last_update_raises(backend):
    # One batch an epoch: every update is an epoch's last, seen by no later loss.
    X = np.array([[3.3e38, 0, 0, 0]] * 2, dtype=np.float32)
    clf = MLPClassifier(hidden_layer_sizes=(5,), solver="sgd", learning_rate_init=1e3,
                        max_iter=1, random_state=0, backend=backend)
    with np.errstate(all="ignore"), pytest.raises(ValueError, match="last update"):
        clf.fit(X, [0, 1])
