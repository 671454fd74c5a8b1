"""Activation functions by name, in numerically stable forms.

Every activation is applied elementwise except softmax, which acts on each row.
Derivatives are written in terms of the activation A = f(S), not S, so that the
pre-activation S never has to be kept (seed 002: sigmoid A(1-A), tanh 1-A^2,
relu A>0).
"""
import numpy as np

# The integer codes are what the compiled kernels switch on; keep them stable.
CODES = {"linear": 0, "sigmoid": 1, "tanh": 2, "relu": 3, "softmax": 4}
NAMES = tuple(CODES)


def sigmoid(S):
    # Split on the sign of S (seed 002, eq. 75): exp(-|S|) never overflows, so
    # |S| = 1000 gives 0 or 1 without a warning.
    e = np.exp(-np.abs(S))
    return np.where(S >= 0, 1 / (1 + e), e / (1 + e)).astype(S.dtype, copy=False)


def tanh(S):
    # np.tanh saturates to +-1 for large |S| without overflow (the role of
    # seed 002's eqs. 84/86), and is correctly rounded where those are not.
    return np.tanh(S)


def relu(S):
    return np.maximum(S, S.dtype.type(0))


def linear(S):
    return S.copy()


def softmax(S):
    # Subtract the row max (seed 002, eq. 90): the largest exponent is exp(0).
    Z = S - S.max(axis=1, keepdims=True)
    E = np.exp(Z)
    return E / E.sum(axis=1, keepdims=True)


FORWARD = {"linear": linear, "sigmoid": sigmoid, "tanh": tanh, "relu": relu, "softmax": softmax}


def derivative(name, A):
    """f'(S) written in terms of A = f(S), for the elementwise activations."""
    if name == "sigmoid":
        return A * (1 - A)
    if name == "tanh":
        return 1 - A * A
    if name == "relu":
        return (A > 0).astype(A.dtype)
    if name == "linear":
        return np.ones_like(A)
    raise ValueError(f"activation {name!r} has no elementwise derivative; softmax "
                     "is handled through its Jacobian (see fastmlp.losses)")


def vjp(name, A, G):
    """J_f(S)^T G for each row: the gradient with respect to S given G = dL/dA.

    For elementwise activations this is G * f'(A); for softmax, whose Jacobian is
    diag(A) - A A^T (seed 002, eq. 89), it is A * (G - sum(G * A)).
    """
    if name == "softmax":
        return A * (G - (G * A).sum(axis=1, keepdims=True))
    return G * derivative(name, A)


def check_name(name, argument="activation"):
    if not isinstance(name, str) or name not in CODES:
        raise ValueError(f"{argument}: unknown activation {name!r}; expected one of "
                         f"{', '.join(NAMES)}")
    return name
