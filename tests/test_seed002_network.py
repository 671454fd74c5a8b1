"""Seed 002's own test: a 3-2-2 network (sigmoid hidden layer, softmax output with
categorical cross-entropy) whose forward values and gradients are worked out by
hand, scalar by scalar, with the seed's Jacobians (eqs. 92-103), and compared with
the library's vectorised reference and every backend."""
import math

import numpy as np
import pytest

import fastmlp
from fastmlp import reference

W1 = [[0.1, -0.3], [0.4, 0.2], [-0.5, 0.6]]     # 3 inputs x 2 hidden
B1 = [0.05, -0.1]
W2 = [[0.7, -0.2], [-0.4, 0.9]]                  # 2 hidden x 2 outputs
B2 = [0.3, -0.25]
X = [[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]]
Y = [[0.0, 1.0], [1.0, 0.0]]


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def by_hand(x, y):
    """One example, every quantity written out as the seed derives it."""
    z1 = [sum(x[i] * W1[i][j] for i in range(3)) + B1[j] for j in range(2)]
    a1 = [sigmoid(z) for z in z1]
    z2 = [sum(a1[i] * W2[i][j] for i in range(2)) + B2[j] for j in range(2)]
    e = [math.exp(z) for z in z2]
    a2 = [v / sum(e) for v in e]
    loss = -sum(y[k] * math.log(a2[k]) for k in range(2))
    # dL/da2 (eq. 93) times the softmax Jacobian (eq. 94): the output error.
    dl_da2 = [-y[k] / a2[k] for k in range(2)]
    jac2 = [[a2[0] * (1 - a2[0]), -a2[0] * a2[1]], [-a2[1] * a2[0], a2[1] * (1 - a2[1])]]
    d2 = [sum(dl_da2[k] * jac2[k][j] for k in range(2)) for j in range(2)]
    dW2 = [[a1[i] * d2[j] for j in range(2)] for i in range(3 - 1)]     # eq. 95
    db2 = list(d2)                                                       # eq. 97
    # back through W2 (eq. 99) and the sigmoid Jacobian (eq. 100)
    d1 = [sum(d2[j] * W2[i][j] for j in range(2)) * a1[i] * (1 - a1[i]) for i in range(2)]
    dW1 = [[x[i] * d1[j] for j in range(2)] for i in range(3)]           # eq. 101
    db1 = list(d1)                                                       # eq. 103
    return a1, a2, loss, dW1, db1, dW2, db2


def model():
    m = fastmlp.MLP([3, 2, 2], ["sigmoid", "softmax"], dtype="float64")
    m.weights = [np.array(W1), np.array(W2)]
    m.biases = [np.array(B1), np.array(B2)]
    return m


def test_forward_matches_hand_computation():
    m = model()
    As = reference.forward(m.weights, m.biases, m.activations, np.array(X))
    for row, (x, y) in enumerate(zip(X, Y)):
        a1, a2, loss, *_ = by_hand(x, y)
        np.testing.assert_allclose(As[1][row], a1, rtol=1e-14)
        np.testing.assert_allclose(As[2][row], a2, rtol=1e-14)
    losses = [by_hand(x, y)[2] for x, y in zip(X, Y)]
    got = fastmlp.losses.value("cross_entropy", "softmax", As[2], np.array(Y))
    assert got == pytest.approx(np.mean(losses), rel=1e-14)
    # Sanity of the hand numbers themselves: softmax rows sum to one.
    assert sum(by_hand(X[0], Y[0])[1]) == pytest.approx(1.0, rel=1e-15)


@pytest.mark.parametrize("backend", fastmlp.trainer.BACKENDS)
def test_gradients_match_hand_computation(backend):
    hand = [by_hand(x, y) for x, y in zip(X, Y)]
    mean = lambda k: np.mean([np.array(h[k]) for h in hand], axis=0)  # noqa: E731
    (dW1, db1), (dW2, db2) = fastmlp.gradients(model(), np.array(X), np.array(Y),
                                              loss="cross_entropy", backend=backend)
    np.testing.assert_allclose(dW1, mean(3), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(db1, mean(4), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dW2, mean(5), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(db2, mean(6), rtol=1e-12, atol=1e-15)
    # The gradients are not trivially small: the comparison has teeth.
    assert np.abs(dW1).max() > 1e-3 and np.abs(dW2).max() > 1e-2


def test_single_example_gradient_is_that_examples():
    _, _, _, dW1, db1, dW2, db2 = by_hand(X[1], Y[1])
    (gW1, gb1), (gW2, gb2) = fastmlp.gradients(model(), np.array(X[1:]), np.array(Y[1:]),
                                              loss="cross_entropy", backend="numpy")
    np.testing.assert_allclose(gW1, dW1, rtol=1e-12)
    np.testing.assert_allclose(gW2, dW2, rtol=1e-12)
    np.testing.assert_allclose(gb1, db1, rtol=1e-12)
    np.testing.assert_allclose(gb2, db2, rtol=1e-12)
