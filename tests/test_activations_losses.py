import warnings

import numpy as np
import pytest

from fastmlp import activations, losses


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", activations.NAMES)
def test_no_overflow_at_large_inputs(name, dtype):
    S = np.array([[-1000.0, -30.0, 0.0, 30.0, 1000.0]], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A = activations.FORWARD[name](S)
    assert A.dtype == dtype
    assert np.isfinite(A).all()


def test_stable_values():
    S = np.array([[-1000.0, 0.0, 1000.0]])
    np.testing.assert_array_equal(activations.sigmoid(S), [[0.0, 0.5, 1.0]])
    np.testing.assert_array_equal(activations.tanh(S), [[-1.0, 0.0, 1.0]])
    np.testing.assert_allclose(activations.softmax(S), [[0.0, 0.0, 1.0]])
    np.testing.assert_allclose(activations.softmax(np.array([[1000.0, 1000.0]])), [[0.5, 0.5]])


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "relu", "linear"])
def test_derivative_from_activation_matches_numeric(name):
    S = np.linspace(-4, 4, 81) + 0.013  # avoid relu's kink at exactly 0
    eps = 1e-6
    f = lambda s: activations.FORWARD[name](s[None, :])[0]  # noqa: E731
    numeric = (f(S + eps) - f(S - eps)) / (2 * eps)
    np.testing.assert_allclose(activations.derivative(name, f(S)), numeric, rtol=1e-6, atol=1e-9)


def test_softmax_vjp_matches_full_jacobian():
    rng = np.random.default_rng(1)
    S, G = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    A = activations.softmax(S)
    for r in range(3):
        J = np.diag(A[r]) - np.outer(A[r], A[r])          # seed 002, eq. 89
        np.testing.assert_allclose(activations.vjp("softmax", A, G)[r], J.T @ G[r], rtol=1e-13)


def test_loss_values():
    A = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    Y = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    assert losses.value("cross_entropy", "softmax", A, Y) == pytest.approx(
        -(np.log(0.7) + np.log(0.1)) / 2)
    assert losses.value("squared_error", "softmax", A, Y) == pytest.approx(
        0.5 * ((0.09 + 0.04 + 0.01) + (0.01 + 0.81 + 0.64)) / 2)
    P = np.array([[0.9, 0.2]])
    T = np.array([[1.0, 0.0]])
    assert losses.value("cross_entropy", "sigmoid", P, T) == pytest.approx(-np.log(0.9) - np.log(0.8))
    # A confident mistake costs a large but finite loss, never inf.
    assert np.isfinite(losses.value("cross_entropy", "softmax", np.array([[1.0, 0.0]]),
                                    np.array([[0.0, 1.0]])))


def test_cross_entropy_needs_probabilities():
    with pytest.raises(ValueError, match="loss: cross_entropy needs a softmax or sigmoid"):
        losses.check("cross_entropy", "relu")
    with pytest.raises(ValueError, match="loss: unknown loss 'mse'"):
        losses.check("mse", "sigmoid")
