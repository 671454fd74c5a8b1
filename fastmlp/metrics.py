"""Classification metrics on labels, one-hot rows or probability rows.

Note on seed 002's table: its "accuracy" of 0.990 is *micro-averaged* accuracy,
(TP + TN) / (TP + TN + FP + FN) counted over all classes one-vs-rest. That counts
true negatives, so for a single-label problem with K classes it equals
1 - 2 (1 - accuracy) / K (0.8 + 0.2 x accuracy for MNIST): it is not multiclass
accuracy, which is `accuracy` here. `micro_averaged_accuracy` reproduces the seed's
number. Micro-averaged precision and recall both equal multiclass accuracy for
single-label problems.
"""
import numpy as np


def _labels(y, argument):
    y = np.asarray(y)
    if y.ndim == 2:
        if y.shape[1] == 1:
            return (y[:, 0] >= 0.5).astype(np.int64) if y.dtype.kind == "f" else y[:, 0].astype(np.int64)
        return y.argmax(axis=1)
    if y.ndim != 1:
        raise ValueError(f"{argument}: expected labels (n,) or rows of scores (n, k), got shape {y.shape}")
    if y.dtype.kind not in "biu":
        if y.dtype.kind == "f" and np.all(y == np.round(y)):
            return y.astype(np.int64)
        raise TypeError(f"{argument}: expected integer labels, got dtype {y.dtype}")
    return y.astype(np.int64)


def _pair(y_true, y_pred):
    t, p = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred: expected the same number of samples, got "
                         f"{t.shape[0]} and {p.shape[0]}")
    if t.size == 0:
        raise ValueError("y_true: expected at least one sample")
    return t, p


def accuracy(y_true, y_pred):
    """Fraction of samples whose predicted class equals the true class."""
    t, p = _pair(y_true, y_pred)
    return float(np.mean(t == p))


def confusion_matrix(y_true, y_pred, n_classes=None):
    """C[i, j] = number of samples of true class i predicted as class j."""
    t, p = _pair(y_true, y_pred)
    if min(t.min(), p.min()) < 0:
        raise ValueError("y_true/y_pred: labels must be non-negative class indices")
    k = int(max(t.max(), p.max())) + 1 if n_classes is None else int(n_classes)
    if max(t.max(), p.max()) >= k:
        raise ValueError(f"n_classes: labels go up to {max(t.max(), p.max())}, more than {k} classes")
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k)


def _counts(y_true, y_pred, n_classes):
    C = confusion_matrix(y_true, y_pred, n_classes)
    tp = np.diag(C).astype(np.float64)
    fp = C.sum(axis=0) - tp
    fn = C.sum(axis=1) - tp
    tn = C.sum() - tp - fp - fn
    return tp, fp, fn, tn


def _ratio(num, den):
    # A class never predicted (or never present) has an undefined ratio; count it as
    # 0, as scikit-learn does with zero_division=0.
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _average(average):
    if average not in ("macro", "micro"):
        raise ValueError(f"average: expected 'macro' or 'micro', got {average!r}")


def precision(y_true, y_pred, average="macro", n_classes=None):
    _average(average)
    tp, fp, fn, tn = _counts(y_true, y_pred, n_classes)
    if average == "micro":
        return float(_ratio(np.array(tp.sum()), np.array(tp.sum() + fp.sum())))
    return float(_ratio(tp, tp + fp).mean())


def recall(y_true, y_pred, average="macro", n_classes=None):
    _average(average)
    tp, fp, fn, tn = _counts(y_true, y_pred, n_classes)
    if average == "micro":
        return float(_ratio(np.array(tp.sum()), np.array(tp.sum() + fn.sum())))
    return float(_ratio(tp, tp + fn).mean())


def f1(y_true, y_pred, average="macro", n_classes=None):
    _average(average)
    tp, fp, fn, tn = _counts(y_true, y_pred, n_classes)
    if average == "micro":
        tp, fp, fn = np.array(tp.sum()), np.array(fp.sum()), np.array(fn.sum())
    return float(_ratio(2 * tp, 2 * tp + fp + fn).mean())


def micro_averaged_accuracy(y_true, y_pred, n_classes=None):
    """Seed 002's "accuracy": (TP + TN) / all, over every class one-vs-rest."""
    tp, fp, fn, tn = _counts(y_true, y_pred, n_classes)
    return float((tp.sum() + tn.sum()) / (tp + fp + fn + tn).sum())


def cross_entropy(Y, P):
    """Mean categorical cross-entropy of probability rows P against one-hot rows
    (or integer labels) Y."""
    P = np.asarray(P, dtype=np.float64)
    Y = np.asarray(Y)
    if Y.ndim == 1:
        Y = np.eye(P.shape[1])[Y]
    if Y.shape != P.shape:
        raise ValueError(f"Y and P: expected the same shape, got {Y.shape} and {P.shape}")
    return float(-(Y * np.log(np.maximum(P, np.finfo(np.float64).tiny))).sum(axis=1).mean())


def mean_squared_error(Y, P):
    """Mean over samples and outputs of (P - Y)^2 (seed 000, eq. 4.1)."""
    P = np.asarray(P, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if Y.shape != P.shape:
        raise ValueError(f"Y and P: expected the same shape, got {Y.shape} and {P.shape}")
    return float(np.mean((P - Y) ** 2))
