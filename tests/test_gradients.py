"""Backpropagation against central finite differences of the loss, in float64,
for every activation x loss pair that is defined, on random shapes and batch
sizes (batch 1 included)."""
import itertools
import zlib

import numpy as np
import pytest

import fastmlp
from fastmlp import losses, reference

from conftest import random_model, random_targets

HIDDEN = ["sigmoid", "tanh", "relu", "linear"]
OUTPUT = ["sigmoid", "tanh", "relu", "linear", "softmax"]
CASES = [(h, o, loss) for h, o, loss in itertools.product(HIDDEN, OUTPUT, losses.NAMES)
         if not (loss == "cross_entropy" and o not in losses.CROSS_ENTROPY_OUTPUTS)]


def cost(model, X, Y, loss):
    As = reference.forward(model.weights, model.biases, model.activations, X)
    if loss == "squared_error":
        return losses.value(loss, model.activations[-1], As[-1], Y)
    # Cross-entropy from the output's pre-activation S, not from A: near
    # saturation log(1 - A) loses digits to cancellation, and a difference
    # quotient of that noise was off by 5e-5 relative in ~5% of random draws.
    S = As[-2] @ model.weights[-1] + model.biases[-1]
    if model.activations[-1] == "softmax":
        per = np.logaddexp.reduce(S, axis=1) - (Y * S).sum(axis=1)
    else:
        per = (np.logaddexp(0, S) - Y * S).sum(axis=1)
    return per.mean()


def numeric_gradient(model, X, Y, loss, param, eps=1e-6):
    g = np.zeros_like(param)
    for i in np.ndindex(param.shape):
        old = param[i]
        param[i] = old + eps
        up = cost(model, X, Y, loss)
        param[i] = old - eps
        down = cost(model, X, Y, loss)
        param[i] = old
        g[i] = (up - down) / (2 * eps)
    return g


@pytest.mark.parametrize("hidden,output,loss", CASES)
def test_backprop_matches_finite_differences(hidden, output, loss):
    # crc32, not hash(): str hashes change with PYTHONHASHSEED, so a failure
    # would not reproduce.
    rng = np.random.default_rng(zlib.crc32(f"{hidden}-{output}-{loss}".encode()))
    for batch in (1, 4):
        sizes = [int(rng.integers(1, 6)), int(rng.integers(1, 6)), int(rng.integers(1, 5)),
                 int(rng.integers(2 if output == "softmax" else 1, 5))]
        model = random_model(rng, sizes, [hidden, hidden, output])
        X = rng.normal(size=(batch, sizes[0]))
        Y = random_targets(rng, batch, sizes[-1], loss, output)
        grads = fastmlp.gradients(model, X, Y, loss=loss, backend="numpy")
        for (dW, db), W, b in zip(grads, model.weights, model.biases):
            nW = numeric_gradient(model, X, Y, loss, W)
            nb = numeric_gradient(model, X, Y, loss, b)
            # relu has a kink at 0; a random input lands that close with negligible odds.
            np.testing.assert_allclose(dW, nW, rtol=1e-5, atol=1e-8)
            np.testing.assert_allclose(db, nb, rtol=1e-5, atol=1e-8)


def test_finite_difference_check_can_fail():
    # The harness would notice a wrong gradient: scale one layer's and it fails.
    rng = np.random.default_rng(0)
    model = random_model(rng, [3, 4, 2], ["tanh", "softmax"])
    X, Y = rng.normal(size=(3, 3)), np.eye(2)[[0, 1, 1]]
    (dW, _), _ = fastmlp.gradients(model, X, Y, loss="cross_entropy")
    nW = numeric_gradient(model, X, Y, "cross_entropy", model.weights[0])
    assert not np.allclose(dW * 1.01, nW, rtol=1e-5, atol=1e-8)
