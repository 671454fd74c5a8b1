"""The plain NumPy path: the definition of correct for every other backend.

Layout (seed 000): batch-first rows. X is (B, n_in), W is (n_in, n_out), b is
(n_out,), S = X W + b, A = f(S). Written the way a user writes it in NumPy
(`X @ W + b`), and never slowed down to flatter the compiled kernels.
"""
import numpy as np

from . import activations, losses


def forward(weights, biases, acts, X):
    """Activations of every layer: [A_0 = X, A_1, ..., A_L]."""
    As = [X]
    for W, b, name in zip(weights, biases, acts):
        As.append(activations.FORWARD[name](As[-1] @ W + b))
    return As


def backward(weights, acts, As, Y, loss):
    """Mean-over-batch gradients [(dW_1, db_1), ..., (dW_L, db_L)].

    delta_L comes from the loss; delta_l = (delta_{l+1} W_{l+1}^T) * f'(A_l);
    dW_l = A_{l-1}^T delta_l / B; db_l = sum over rows of delta_l / B. Only
    reads the weights, so every delta is computed before anything changes.
    """
    B = As[0].shape[0]
    inv_b = As[-1].dtype.type(1.0 / B)
    delta = losses.output_delta(loss, acts[-1], As[-1], Y)
    grads = [None] * len(weights)
    for l in range(len(weights) - 1, -1, -1):
        grads[l] = ((As[l].T @ delta) * inv_b, delta.sum(axis=0) * inv_b)
        if l > 0:
            delta = (delta @ weights[l].T) * activations.derivative(acts[l - 1], As[l])
    return grads


def sgd_step(weights, biases, grads, lr):
    """Plain gradient descent in place: W -= lr dW, b -= lr db (seed 000, eq. 3.1)."""
    for W, b, (dW, db) in zip(weights, biases, grads):
        W -= W.dtype.type(lr) * dW
        b -= b.dtype.type(lr) * db


def n_correct(out, Y):
    """Rows whose predicted class equals the target's (output >= 0.5 for one output)."""
    if out.shape[1] == 1:
        return int(np.count_nonzero((out[:, 0] >= 0.5) == (Y[:, 0] >= 0.5)))
    return int(np.count_nonzero(out.argmax(axis=1) == Y.argmax(axis=1)))


def train_batches(weights, biases, acts, loss, X, Y, lr, order, batch_size, b0, b1, stop=None,
                  optimizer=None):
    """Steps for batches b0..b1-1 of the epoch; batch b is rows
    order[b*batch_size:(b+1)*batch_size] of X, so the last one may be partial.
    Plain SGD, or the given fastmlp.optimizers.Optimizer (whose L2 term, if any,
    is added to the loss as scikit-learn reports it).

    Returns (summed per-sample loss, number correct, bad, done): loss and accuracy
    come from each batch's forward pass before its update. bad is the first batch
    whose loss is NaN or infinite (its update is not applied and training stops
    there), or -1; done is the first batch not trained (b1 unless stop[0] was set,
    checked before each batch).
    """
    total, correct = 0.0, 0
    for b in range(b0, b1):
        if stop is not None and stop[0]:
            return total, correct, -1, b
        idx = order[b * batch_size:(b + 1) * batch_size]
        Xb, Yb = X[idx], Y[idx]
        As = forward(weights, biases, acts, Xb)
        t = float(losses.per_sample(loss, acts[-1], As[-1], Yb).sum())
        if not np.isfinite(t):
            return total, correct, b, b
        grads = backward(weights, acts, As, Yb, loss)
        if optimizer is None:
            sgd_step(weights, biases, grads, lr)
        else:
            t += optimizer.penalty(weights)
            optimizer.step(weights, biases, grads, lr, len(idx))
        total += t
        correct += n_correct(As[-1], Yb)
    return total, correct, -1, b1


def train_epoch(weights, biases, acts, loss, X, Y, lr, batch_size, order):
    """One epoch of mini-batch SGD over the rows of X in the given order: ceil(N/M)
    steps, the last partial batch trained, not dropped (seed 002)."""
    n_batches = -(-len(order) // batch_size)
    total, correct, _, _ = train_batches(weights, biases, acts, loss, X, Y, lr, order, batch_size,
                                         0, n_batches)
    return total, correct
