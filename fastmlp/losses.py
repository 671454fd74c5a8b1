"""Losses by name: the per-batch value and the output-layer delta.

Both losses are the mean over the batch of a per-sample loss, so gradients are
mean gradients (seed 002, BP3.2/BP4.2).

- squared_error: per sample 1/2 * sum_k (a_k - y_k)^2; dL/dA = A - Y, and the
  output delta is J^T (A - Y), i.e. (A - Y) * f'(A) for elementwise outputs
  (seed 000, eq. 2.11).
- cross_entropy: with a softmax output, categorical cross-entropy
  -sum_k y_k log a_k and delta A - Y; with a sigmoid output, binary
  cross-entropy per output -sum_k [y log a + (1-y) log(1-a)] and delta A - Y.
"""
import numpy as np

from . import activations

NAMES = ("squared_error", "cross_entropy")
CODES = {"squared_error": 0, "cross_entropy": 1}
# Output activations for which cross-entropy is defined (the outputs must be
# probabilities).
CROSS_ENTROPY_OUTPUTS = ("softmax", "sigmoid")


def check(loss, output_activation):
    if not isinstance(loss, str) or loss not in CODES:
        raise ValueError(f"loss: unknown loss {loss!r}; expected one of {', '.join(NAMES)}")
    if loss == "cross_entropy" and output_activation not in CROSS_ENTROPY_OUTPUTS:
        raise ValueError(
            f"loss: cross_entropy needs a softmax or sigmoid output layer (probabilities), "
            f"but the output activation is {output_activation!r}; use squared_error or "
            "change the output activation")
    return loss


def _clip(A):
    # log(0) would make one confident mistake an infinite loss; the smallest
    # normal number keeps it finite (log(tiny) is -87 in float32, -708 in float64).
    tiny = np.finfo(A.dtype).tiny
    return np.clip(A, tiny, 1 - np.finfo(A.dtype).epsneg)


def per_sample(loss, output_activation, A, Y):
    """The loss of each row of A against Y, shape (B,)."""
    if loss == "squared_error":
        D = A - Y
        return 0.5 * (D * D).sum(axis=1)
    if output_activation == "softmax":
        return -(Y * np.log(np.maximum(A, np.finfo(A.dtype).tiny))).sum(axis=1)
    P = _clip(A)
    return -(Y * np.log(P) + (1 - Y) * np.log1p(-P)).sum(axis=1)


def value(loss, output_activation, A, Y):
    """Mean loss over the batch."""
    return per_sample(loss, output_activation, A, Y).mean()


def output_delta(loss, output_activation, A, Y):
    """dC/dS_L for the mean-over-batch cost, times B (the 1/B is applied to dW, db)."""
    if loss == "cross_entropy":
        # softmax + categorical CE and sigmoid + binary CE both reduce to A - Y.
        return A - Y
    return activations.vjp(output_activation, A, A - Y)
