import os

import numpy as np
import pytest

import fastmlp
from fastmlp import data


@pytest.fixture(scope="session")
def mnist_dir():
    path = os.environ.get("FASTMLP_DATA")
    if not path:
        pytest.fail("set FASTMLP_DATA to a directory holding MNIST (e.g. ../shared/data); "
                    "the tests never download it")
    return path


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    (xtr, ytr), (xte, yte) = data.load_mnist(mnist_dir)
    return data.prepare(xtr), ytr, data.prepare(xte), yte


def random_model(rng, sizes, acts, dtype="float64"):
    """A model with weights big enough that every activation is off its linear part."""
    model = fastmlp.MLP(sizes, acts, dtype=dtype, seed=int(rng.integers(1 << 30)))
    for W, b in zip(model.weights, model.biases):
        W[...] = rng.normal(0, 1.0 / np.sqrt(W.shape[0]), W.shape) * 1.5
        b[...] = rng.normal(0, 0.5, b.shape)
    return model


def random_targets(rng, n, k, loss, out_act):
    if loss == "cross_entropy" and out_act == "sigmoid":
        return (rng.random((n, k)) < 0.5).astype(np.float64)
    if loss == "cross_entropy" or k == 1 or out_act == "softmax":
        return np.eye(k)[rng.integers(0, k, n)]
    return rng.random((n, k))
