"""Real training runs on MNIST, with the accuracy the foundation issue asks for."""
import copy

import fastmlp


def test_seed002_preset_one_epoch(mnist):
    X, y, Xt, yt = mnist
    model = fastmlp.MLP([784, 32, 16, 10], ["tanh", "tanh", "softmax"], seed=0)
    tr = fastmlp.Trainer(model, "cross_entropy", lr=0.1, batch_size=32, seed=0)
    tr.fit(X, y, epochs=1)
    assert tr.evaluate(Xt, yt)["accuracy"] >= 0.93


def test_default_network_three_epochs(mnist):
    from fastmlp.train import PRESETS
    cfg = PRESETS["seed000"]
    X, y, Xt, yt = mnist
    model = fastmlp.MLP(cfg["layers"], cfg["activations"][0], seed=0)
    tr = fastmlp.Trainer(model, cfg["loss"], lr=cfg["lr"], batch_size=cfg["batch_size"], seed=0)
    tr.fit(X, y, epochs=3)
    assert tr.evaluate(Xt, yt)["accuracy"] >= 0.90


def test_numba_epoch_matches_reference_accuracy(mnist):
    """One real float32 epoch: the numba backend lands within 0.2 points of the
    reference's test accuracy from the same start and the same shuffle."""
    X, y, Xt, yt = mnist
    start = fastmlp.MLP([784, 64, 32, 16, 10], "sigmoid", seed=1)
    acc = {}
    for backend in ("numpy", "numba"):
        model = copy.deepcopy(start)
        tr = fastmlp.Trainer(model, "squared_error", lr=4.0, batch_size=100, seed=2, backend=backend)
        tr.fit(X, y, epochs=1)
        acc[backend] = tr.evaluate(Xt, yt)["accuracy"]
    assert acc["numba"] > 0.75, acc           # it learned (10% is chance)
    assert abs(acc["numba"] - acc["numpy"]) <= 0.002, acc
