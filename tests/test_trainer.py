import numpy as np
import pytest

import fastmlp


def toy(n=64, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1)
    return X, y


@pytest.mark.parametrize("backend", fastmlp.trainer.BACKENDS)
def test_history_and_learning(backend):
    X, y = toy(300)
    model = fastmlp.MLP([5, 8, 3], ["tanh", "softmax"], seed=0)
    h = fastmlp.Trainer(model, "cross_entropy", lr=0.5, batch_size=16, seed=0, backend=backend).fit(
        X, y, epochs=15, validation_data=(X[:50], y[:50]))
    assert len(h) == 15
    assert set(h.history) >= {"loss", "accuracy", "val_loss", "val_accuracy", "seconds", "samples_per_second"}
    assert h["loss"][-1] < 0.5 * h["loss"][0]
    assert h["accuracy"][-1] > 0.9


def test_labels_and_one_hot_train_identically():
    X, y = toy()
    m1 = fastmlp.MLP([5, 4, 3], "sigmoid", seed=1)
    m2 = fastmlp.MLP([5, 4, 3], "sigmoid", seed=1)
    fastmlp.Trainer(m1, lr=1.0, batch_size=10, seed=2).fit(X, y, 2)
    fastmlp.Trainer(m2, lr=1.0, batch_size=10, seed=2).fit(X, np.eye(3)[y], 2)
    for a, b in zip(m1.weights, m2.weights):
        np.testing.assert_array_equal(a, b)


def test_last_partial_batch_is_trained():
    # 10 samples, batch 4: 3 steps; with batch 4 and only 8 samples the last two
    # rows would never be seen. Check against the reference loop by hand.
    X, y = toy(10)
    model = fastmlp.MLP([5, 3], "softmax", dtype="float64", seed=0)
    W0 = model.weights[0].copy()
    fastmlp.Trainer(model, "cross_entropy", lr=0.1, batch_size=4, shuffle=False,
                    backend="numpy").fit(X, y, 1)
    ref = fastmlp.MLP([5, 3], "softmax", dtype="float64", seed=0)
    Y = np.eye(3)[y]
    for s in (slice(0, 4), slice(4, 8), slice(8, 10)):
        g = fastmlp.gradients(ref, X[s], Y[s], loss="cross_entropy", backend="numpy")
        fastmlp.reference.sgd_step(ref.weights, ref.biases, g, 0.1)
    np.testing.assert_allclose(model.weights[0], ref.weights[0], rtol=1e-14)
    assert not np.allclose(model.weights[0], W0)


def test_evaluate_and_predict():
    X, y = toy(200)
    model = fastmlp.MLP([5, 8, 3], ["relu", "softmax"], seed=0)
    tr = fastmlp.Trainer(model, "cross_entropy", lr=0.3, batch_size=20, seed=0)
    tr.fit(X, y, 20)
    r = tr.evaluate(X, y)
    assert set(r) == {"loss", "accuracy", "precision_macro", "recall_macro", "f1_macro",
                      "micro_averaged_accuracy"}
    assert r["accuracy"] == pytest.approx(np.mean(model.predict(X) == y))
    P = model.predict_proba(X)
    np.testing.assert_allclose(P.sum(axis=1), 1, rtol=1e-5)
    assert P.dtype == np.float32


def test_single_sigmoid_output_binary_labels():
    X, y = toy(200)
    yb = (y > 0).astype(int)
    model = fastmlp.MLP([5, 6, 1], ["tanh", "sigmoid"], seed=0)
    tr = fastmlp.Trainer(model, "cross_entropy", lr=0.5, batch_size=16, seed=0)
    tr.fit(X, yb, 20)
    assert tr.evaluate(X, yb)["accuracy"] > 0.85
    assert set(np.unique(model.predict(X))) <= {0, 1}


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=0), "lr: expected a finite number > 0"),
    (dict(lr=-1.0), "lr: expected a finite number > 0"),
    (dict(lr=float("nan")), "lr: expected a finite number > 0"),
    (dict(batch_size=0), "batch_size: expected an integer >= 1"),
    (dict(batch_size=2.5), "batch_size: expected an integer >= 1"),
    (dict(backend="cuda"), "backend: unknown backend 'cuda'"),
    (dict(loss="hinge"), "loss: unknown loss 'hinge'"),
    (dict(threads=0), "threads: expected None or an integer >= 1"),
])
def test_trainer_argument_errors(kwargs, match):
    model = fastmlp.MLP([5, 3], "softmax")
    args = dict(loss="cross_entropy")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fastmlp.Trainer(model, **args)


@pytest.mark.parametrize("X,y,exc,match", [
    (np.ones((4, 6)), [0, 1, 2, 0], ValueError, "X: expected 5 features"),
    (np.ones(5), [0], ValueError, "X: expected a 2-D array"),
    (np.ones((0, 5)), [], ValueError, "X: expected at least one sample"),
    (np.full((2, 5), np.nan), [0, 1], ValueError, "X: contains NaN or infinity"),
    (np.array([["a"] * 5]), [0], TypeError, "X: expected numbers"),
    (np.ones((3, 5)), [0, 1], ValueError, "X and Y: expected the same number of samples, got 3 and 2"),
    (np.ones((2, 5)), [0, 3], ValueError, r"Y: labels must lie in 0..2"),
    (np.ones((2, 5)), [0.5, 1.0], TypeError, "Y: expected integer class labels"),
    (np.ones((2, 5)), np.ones((2, 4)), ValueError, r"Y: expected labels \(n,\) or rows \(n, 3\)"),
    (np.ones((2, 5)), [[1, 1, 0], [0, 1, 0]], ValueError, r"Y: row 0 is not one-hot .* sums to 2"),
    (np.ones((2, 5)), [[1.5, -0.5, 0], [0, 1, 0]], ValueError, r"Y: row 0 is not one-hot"),
])
def test_fit_input_errors(X, y, exc, match):
    model = fastmlp.MLP([5, 3], "softmax")
    for backend in fastmlp.trainer.BACKENDS:
        with pytest.raises(exc, match=match):
            fastmlp.Trainer(model, "cross_entropy", backend=backend).fit(X, y)


def test_soft_labels_and_sigmoid_targets():
    X, y = toy(20)
    soft = np.full((20, 3), 0.1)
    soft[np.arange(20), y] = 0.8
    fastmlp.Trainer(fastmlp.MLP([5, 3], "softmax"), "cross_entropy").fit(X, soft)   # accepted
    with pytest.raises(ValueError, match=r"Y: a sigmoid output needs targets in \[0, 1\]"):
        fastmlp.Trainer(fastmlp.MLP([5, 3], "sigmoid"), "cross_entropy").fit(X, soft * 2)


def test_non_contiguous_and_integer_input_is_converted():
    X, y = toy(40)
    Xf = np.asfortranarray(X.astype(np.float64))
    m1, m2 = fastmlp.MLP([5, 3], "softmax", seed=0), fastmlp.MLP([5, 3], "softmax", seed=0)
    fastmlp.Trainer(m1, "cross_entropy", lr=0.1, seed=0).fit(Xf, y)
    fastmlp.Trainer(m2, "cross_entropy", lr=0.1, seed=0).fit(X, y)
    np.testing.assert_array_equal(m1.weights[0], m2.weights[0])
    assert model_ok(fastmlp.MLP([5, 3], "softmax").predict(np.ones((2, 5), dtype=np.int64)))


def model_ok(pred):
    return pred.shape == (2,)


@pytest.mark.parametrize("kwargs,match", [
    (dict(layer_sizes=[5]), "layer_sizes: expected at least two sizes"),
    (dict(layer_sizes=[5, 0]), "layer_sizes: every size must be a positive integer"),
    (dict(layer_sizes=[5, 3], activations="swish"), "activations: unknown activation 'swish'"),
    (dict(layer_sizes=[5, 4, 3], activations=["softmax", "softmax"]), "softmax is only allowed on the output layer"),
    (dict(layer_sizes=[5, 4, 3], activations=["relu"]), "expected one name or 2 names"),
    (dict(layer_sizes=[5, 3], dtype="float16"), "dtype: expected 'float32' or 'float64'"),
    (dict(layer_sizes=[5, 3], init="zeros"), "init: expected None, 'glorot' or 'he'"),
])
def test_model_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastmlp.MLP(**kwargs)


def test_init_is_seeded_and_scaled():
    a, b = fastmlp.MLP([100, 50, 10], "relu", seed=1), fastmlp.MLP([100, 50, 10], "relu", seed=1)
    np.testing.assert_array_equal(a.weights[0], b.weights[0])
    assert np.abs(a.weights[0]).max() <= np.sqrt(6 / 100)           # He uniform
    g = fastmlp.MLP([100, 50, 10], "tanh", seed=1)
    assert np.abs(g.weights[0]).max() <= np.sqrt(6 / 150)           # Glorot uniform
    assert np.abs(g.weights[0]).max() > 0.9 * np.sqrt(6 / 150)
    assert all((bias == 0).all() for bias in g.biases)


def test_divergence_stops_with_finite_weights():
    X, y = toy(64)
    for backend in fastmlp.trainer.BACKENDS:
        model = fastmlp.MLP([5, 16, 1], ["relu", "linear"], seed=0)
        tr = fastmlp.Trainer(model, "squared_error", lr=1e6, batch_size=8, seed=0, backend=backend)
        with pytest.raises(fastmlp.TrainingDiverged, match=r"epoch \d+, batch \d+ of 8.*lower learning rate"):
            with np.errstate(over="ignore", invalid="ignore"):
                tr.fit(X, y.astype(float)[:, None] * 1e3, epochs=50)
        assert all(np.isfinite(p).all() for p in model.weights + model.biases)


def test_divergence_stops_with_the_first_layer_split_by_columns():
    """Momentum on a sparse input on two threads splits the first layer between
    them by input columns (four steps a batch): a batch whose loss is not finite
    still stops every thread before its update, and the weights stay finite."""
    import numba
    rng = np.random.default_rng(0)
    X = rng.random((64, 40)) * (rng.random((64, 40)) < 0.2)
    y = rng.random(64) * 1e3
    model = fastmlp.MLP([40, 16, 1], ["relu", "linear"], seed=0)
    threads = min(2, numba.config.NUMBA_NUM_THREADS)
    tr = fastmlp.Trainer(model, "squared_error", lr=1e6, batch_size=8, seed=0, backend="numba",
                         threads=threads, optimizer="momentum")
    with pytest.raises(fastmlp.TrainingDiverged, match=r"epoch \d+, batch \d+ of 8"):
        with np.errstate(over="ignore", invalid="ignore"):
            tr.fit(X, y[:, None], epochs=50)
    assert all(np.isfinite(p).all() for p in model.weights + model.biases)
    assert (tr._get_engine().cuts is not None) == (threads == 2)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_overflow_in_the_last_update_is_divergence(backend):
    # One row, one batch an epoch: the update that overflows a weight is the last
    # one, and no later loss sees it; fit must still not return infinite weights.
    X = np.array([[3.3e38, 0, 0, 0]], dtype=np.float32)
    model = fastmlp.MLP([4, 5, 3], ["relu", "softmax"], seed=0)
    W0 = [W.copy() for W in model.weights]
    tr = fastmlp.Trainer(model, "cross_entropy", lr=1e3, batch_size=4, seed=0, backend=backend)
    with np.errstate(all="ignore"), pytest.raises(fastmlp.TrainingDiverged, match="weights became"):
        tr.fit(X, [0], epochs=1)
    assert all(np.isfinite(p).all() for p in model.weights + model.biases)
    for W, W_0 in zip(model.weights, W0):
        np.testing.assert_array_equal(W, W_0)
