"""The multi-layer perceptron: parameters as plain NumPy arrays."""
import numbers
import os
import zipfile

import numpy as np

from . import activations, reference
from ._io import atomic_write

FORMAT_VERSION = 1
DTYPES = ("float32", "float64")
INITS = ("glorot", "he")


def _check_dtype(dtype):
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"dtype: expected 'float32' or 'float64', got {dtype!r}")
    return np.dtype(name)


class MLP:
    """A stack of dense layers.

    MLP(layer_sizes, activations="sigmoid", dtype="float32", seed=None, init=None)

    layer_sizes: [n_in, n_1, ..., n_out], at least two entries.
    activations: one name for every layer, or one per layer (len(layer_sizes) - 1);
        sigmoid, tanh, relu, linear, and softmax on the output layer only.
    init: None picks per layer (he for relu, glorot otherwise), or "glorot" or "he"
        for every layer. Glorot is uniform in +-sqrt(6 / (fan_in + fan_out)), He is
        uniform in +-sqrt(6 / fan_in); biases start at zero.
    seed: seeds numpy.random.default_rng, so a seed gives the same weights every time.

    Parameters live in `weights` (W_l has shape (n_{l-1}, n_l)) and `biases`.
    """

    def __init__(self, layer_sizes, activations="sigmoid", dtype="float32", seed=None,
                 init=None):
        sizes = _check_sizes(layer_sizes)
        acts = _check_activations(activations, len(sizes) - 1)
        self.dtype = _check_dtype(dtype)
        self.layer_sizes = sizes
        self.activations = acts
        if init is not None and init not in INITS:
            raise ValueError(f"init: expected None, 'glorot' or 'he', got {init!r}")
        rng = np.random.default_rng(seed)
        self.weights, self.biases = [], []
        for fan_in, fan_out, act in zip(sizes[:-1], sizes[1:], acts):
            scheme = init or ("he" if act == "relu" else "glorot")
            limit = np.sqrt(6.0 / (fan_in + fan_out if scheme == "glorot" else fan_in))
            self.weights.append(rng.uniform(-limit, limit, (fan_in, fan_out)).astype(self.dtype))
            self.biases.append(np.zeros(fan_out, dtype=self.dtype))

    @property
    def n_inputs(self):
        return self.layer_sizes[0]

    @property
    def n_outputs(self):
        return self.layer_sizes[-1]

    def __repr__(self):
        return (f"MLP({self.layer_sizes}, activations={self.activations}, "
                f"dtype={self.dtype.name!r})")

    def check_input(self, X, argument="X"):
        """X as a C-contiguous array of the model's dtype, or a clear error."""
        X = np.asarray(X)
        if X.dtype.kind not in "biuf":
            raise TypeError(f"{argument}: expected numbers, got an array of dtype {X.dtype}")
        if X.ndim != 2:
            raise ValueError(f"{argument}: expected a 2-D array (samples, features), "
                             f"got shape {X.shape}")
        if X.shape[0] == 0:
            raise ValueError(f"{argument}: expected at least one sample, got shape {X.shape}")
        if X.shape[1] != self.n_inputs:
            raise ValueError(f"{argument}: expected {self.n_inputs} features per sample "
                             f"(the model's input size), got {X.shape[1]}")
        with np.errstate(over="ignore"):      # an overflow is reported just below
            converted = np.ascontiguousarray(X, dtype=self.dtype)
        if not np.isfinite(converted).all():
            if X.dtype.kind == "f" and np.isfinite(X).all():
                raise ValueError(f"{argument}: values up to {np.abs(X).max():.3g} do not fit in "
                                 f"{self.dtype.name} (max {np.finfo(self.dtype).max:.3g}); scale "
                                 f"the input or use dtype='float64'")
            raise ValueError(f"{argument}: contains NaN or infinity")
        return converted

    def predict_proba(self, X):
        """The output layer's activations, shape (n_samples, n_outputs)."""
        X = self.check_input(X)
        return reference.forward(self.weights, self.biases, self.activations, X)[-1]

    def predict(self, X):
        """Class labels: argmax of the outputs, or output >= 0.5 for a single output."""
        out = self.predict_proba(X)
        if out.shape[1] == 1:
            return (out[:, 0] >= 0.5).astype(np.int64)
        return out.argmax(axis=1)

    def save(self, path):
        """Write the model to `path` (.npz, no pickled objects), atomically."""
        arrays = {
            "format": np.array("fastmlp-mlp"),
            "format_version": np.array(FORMAT_VERSION),
            "layer_sizes": np.array(self.layer_sizes, dtype=np.int64),
            "activations": np.array(self.activations),
            "dtype": np.array(self.dtype.name),
        }
        for i, (W, b) in enumerate(zip(self.weights, self.biases)):
            arrays[f"W{i}"] = W
            arrays[f"b{i}"] = b
        with atomic_write(path) as f:
            np.savez(f, **arrays)

    @classmethod
    def from_arrays(cls, layer_sizes, activations, dtype, weights, biases):
        model = cls.__new__(cls)
        model.layer_sizes = _check_sizes(layer_sizes)
        model.activations = _check_activations(list(activations), len(model.layer_sizes) - 1)
        model.dtype = _check_dtype(dtype)
        model.weights = [np.ascontiguousarray(W, dtype=model.dtype) for W in weights]
        model.biases = [np.ascontiguousarray(b, dtype=model.dtype) for b in biases]
        return model


def _check_sizes(layer_sizes):
    try:
        sizes = list(layer_sizes)
    except TypeError:
        raise TypeError(f"layer_sizes: expected a sequence of integers, got {layer_sizes!r}") from None
    if len(sizes) < 2:
        raise ValueError(f"layer_sizes: expected at least two sizes (inputs and outputs), got {sizes}")
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1:
            raise ValueError(f"layer_sizes: every size must be a positive integer, got {sizes}")
    return [int(s) for s in sizes]


def _check_activations(acts, n_layers):
    if isinstance(acts, str):
        acts = [acts] * n_layers
    else:
        acts = list(acts)
        if len(acts) != n_layers:
            raise ValueError(f"activations: expected one name or {n_layers} names (one per "
                             f"layer), got {len(acts)}: {acts}")
    for a in acts:
        activations.check_name(a, "activations")
    for i, a in enumerate(acts[:-1]):
        if a == "softmax":
            raise ValueError(f"activations: softmax is only allowed on the output layer, "
                             f"but layer {i + 1} of {n_layers} has it")
    return acts


def load(path):
    """Read a model written by MLP.save. Never unpickles anything from the file."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a readable fastmlp model file "
                         f"(truncated, corrupted, pickled or not .npz): {e}") from None
    if "format" not in data or data["format"].shape != () or str(data["format"]) != "fastmlp-mlp":
        raise ValueError(f"{path}: not a fastmlp model file (no 'fastmlp-mlp' format marker)")
    version = int(data["format_version"]) if "format_version" in data else -1
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: model format version {version} is newer than this "
                         f"fastmlp reads ({FORMAT_VERSION}); upgrade fastmlp")
    if version < 1:
        raise ValueError(f"{path}: unknown model format version {version}")
    try:
        sizes = [int(s) for s in data["layer_sizes"]]
        acts = [str(a) for a in data["activations"]]
        dtype = str(data["dtype"])
        n = len(sizes) - 1
        weights = [data[f"W{i}"] for i in range(n)]
        biases = [data[f"b{i}"] for i in range(n)]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: fastmlp model file is missing or has malformed entries: {e}") from None
    for i in range(n):
        if weights[i].shape != (sizes[i], sizes[i + 1]) or biases[i].shape != (sizes[i + 1],):
            raise ValueError(f"{path}: layer {i + 1} has weights {weights[i].shape} and biases "
                             f"{biases[i].shape}, expected {(sizes[i], sizes[i + 1])} and "
                             f"{(sizes[i + 1],)}")
        if weights[i].dtype.kind != "f" or biases[i].dtype.kind != "f":
            raise ValueError(f"{path}: layer {i + 1} parameters are not floating point")
    return MLP.from_arrays(sizes, acts, dtype, weights, biases)
