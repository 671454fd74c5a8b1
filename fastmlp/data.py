"""MNIST: find it, read it, check it, and prepare it for training.

`load_mnist()` returns `(x_train, y_train), (x_test, y_test)` as uint8 arrays of
shapes (60000, 28, 28), (60000,), (10000, 28, 28), (10000,), exactly like
`tensorflow.keras.datasets.mnist.load_data()`.

It looks, in order, at: the `path` argument; $FASTMLP_DATA; keras' cache
~/.keras/datasets/mnist.npz; fastmlp's own cache directory ($FASTMLP_CACHE, else
the platform's user cache dir); and only then downloads keras' mnist.npz once
(pooch: progress bar, SHA-256 check, atomic move into the cache).

A path may be a keras-layout .npz file or a directory holding mnist.npz or the four
IDX files (gzip-compressed or raw).
"""
import gzip
import os

import numpy as np

MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
MNIST_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
NPZ_NAME = "mnist.npz"
IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_EXPECTED = {"x_train": (60000, 28, 28), "y_train": (60000,),
             "x_test": (10000, 28, 28), "y_test": (10000,)}
# IDX type codes (the third byte of the magic number).
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DataError(ValueError):
    """A data file is missing, truncated, foreign or does not match MNIST."""


def cache_dir():
    """fastmlp's own cache directory for downloaded data."""
    env = os.environ.get("FASTMLP_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastmlp")


def read_idx(path):
    """Read one IDX file (gzip or raw) into an array, checking its header.

    Header: two zero bytes, a type code, the number of dimensions, then one
    big-endian uint32 per dimension; the data must fill exactly that shape.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: gzip data is truncated or corrupted ({e})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (magic bytes {raw[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: IDX header announces {ndim} dimensions but the file ends early")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have = len(raw) - header
    if have != need:
        what = "truncated" if have < need else "has trailing bytes"
        raise DataError(f"{path}: IDX data {what}: header says shape {shape} "
                        f"({need} bytes), found {have} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(
        dtype.newbyteorder("="))


def _idx_file(directory, stem):
    for name in (stem + ".gz", stem):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    # Some mirrors name them t10k-images.idx3-ubyte.
    alt = stem.replace("-idx", ".idx")
    for name in (alt + ".gz", alt):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    return None


def _read_npz(path):
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _EXPECTED if k not in z.files]
            if missing:
                raise DataError(f"{path}: not a keras MNIST file: missing {', '.join(missing)} "
                                f"(has {', '.join(z.files) or 'nothing'})")
            return {k: z[k] for k in _EXPECTED}
    except DataError:
        raise
    except Exception as e:  # zipfile.BadZipFile, EOFError, ValueError (pickled), OSError
        raise DataError(f"{path}: not a readable .npz file (truncated, corrupted or "
                        f"pickled): {e}") from None


def _check(arrays, source):
    for k, shape in _EXPECTED.items():
        a = arrays[k]
        if a.shape != shape:
            raise DataError(f"{source}: {k} has shape {a.shape}, expected {shape} for MNIST")
        if a.dtype != np.uint8:
            raise DataError(f"{source}: {k} has dtype {a.dtype}, expected uint8")
    for k in ("y_train", "y_test"):
        if arrays[k].max() > 9:
            raise DataError(f"{source}: {k} has label {int(arrays[k].max())}, expected 0 to 9")
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])


def _from_path(path):
    """Load from a file or directory; None when a directory holds no MNIST at all."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return _check(_read_npz(path), path)
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such file or directory")
    npz = os.path.join(path, NPZ_NAME)
    if os.path.isfile(npz):
        return _check(_read_npz(npz), npz)
    files = {k: _idx_file(path, stem) for k, stem in IDX_NAMES.items()}
    if not any(files.values()):
        return None
    missing = [IDX_NAMES[k] for k, f in files.items() if f is None]
    if missing:
        raise DataError(f"{path}: incomplete IDX set, missing {', '.join(missing)}(.gz)")
    arrays = {}
    for k, f in files.items():
        arrays[k] = read_idx(f)
        if arrays[k].shape != _EXPECTED[k]:
            raise DataError(f"{f}: shape {arrays[k].shape}, expected {_EXPECTED[k]} for MNIST")
    return _check(arrays, path)


def _download(directory):
    try:
        import pooch
    except ImportError:  # pragma: no cover - pooch is a dependency
        raise DataError(f"MNIST not found and pooch is not installed to download it; put "
                        f"{NPZ_NAME} in {directory} or set FASTMLP_DATA") from None
    try:
        return pooch.retrieve(MNIST_URL, known_hash="sha256:" + MNIST_SHA256, fname=NPZ_NAME,
                              path=directory, progressbar=_has_tqdm())
    except Exception as e:
        raise DataError(
            f"could not download MNIST from {MNIST_URL} ({e}). Download it by hand and put "
            f"{NPZ_NAME} (sha256 {MNIST_SHA256}) in {directory}, or point FASTMLP_DATA or "
            f"load_mnist(path=...) at a directory holding it or the four IDX files") from None


def _has_tqdm():
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def candidates(path=None):
    """Where load_mnist looks, in order: [(description, path), ...]."""
    out = []
    if path is not None:
        out.append(("path argument", os.fspath(path)))
    if os.environ.get("FASTMLP_DATA"):
        out.append(("$FASTMLP_DATA", os.environ["FASTMLP_DATA"]))
    out.append(("keras cache", os.path.join(os.path.expanduser("~"), ".keras", "datasets", NPZ_NAME)))
    out.append(("fastmlp cache", os.path.join(cache_dir(), NPZ_NAME)))
    return out


def load_mnist(path=None, download=True):
    """MNIST as uint8 arrays: (x_train, y_train), (x_test, y_test)."""
    for i, (what, p) in enumerate(candidates(path)):
        explicit = what in ("path argument", "$FASTMLP_DATA")
        if not explicit and not os.path.exists(p):
            continue
        try:
            found = _from_path(p)
        except DataError as e:
            if explicit:
                raise DataError(f"{what}: {e}") from None
            raise
        if found is not None:
            return found
        if explicit:
            raise DataError(f"{what}: {p} holds neither {NPZ_NAME} nor the MNIST IDX files")
    if not download:
        raise DataError("MNIST not found in " + "; ".join(f"{w} ({p})" for w, p in candidates(path)))
    directory = cache_dir()
    os.makedirs(directory, exist_ok=True)
    return _check(_read_npz(_download(directory)), os.path.join(directory, NPZ_NAME))


def flatten(x):
    """(n, 28, 28) images to (n, 784) rows."""
    x = np.asarray(x)
    return x.reshape(x.shape[0], -1)


def scale(x, dtype=np.float32):
    """uint8 pixels to [0, 1] in `dtype` (float32 unless asked)."""
    return np.asarray(x, dtype=dtype) / np.asarray(255, dtype=dtype)


def one_hot(y, n_classes=None, dtype=np.float32):
    """Integer labels (n,) to one-hot rows (n, n_classes)."""
    y = np.asarray(y)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ValueError(f"y: expected a 1-D array of integer labels, got shape {y.shape} "
                         f"dtype {y.dtype}")
    k = int(y.max()) + 1 if n_classes is None else int(n_classes)
    if y.size and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"y: labels must lie in 0..{k - 1}, got {int(y.min())}..{int(y.max())}")
    out = np.zeros((y.shape[0], k), dtype=dtype)
    out[np.arange(y.shape[0]), y] = 1
    return out


def prepare(x, dtype=np.float32):
    """Flatten and scale in one step: what the trainer wants from raw images."""
    return scale(flatten(x), dtype)


def train_val_split(x, y, val_size=0.1, seed=0):
    """Split off a random validation set; val_size is a fraction (< 1) or a count."""
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x and y: expected the same length, got {n} and {len(y)}")
    k = int(round(val_size * n)) if val_size < 1 else int(val_size)
    if not 0 < k < n:
        raise ValueError(f"val_size: gives {k} validation samples of {n}; expected 1 to {n - 1}")
    perm = np.random.default_rng(seed).permutation(n)
    tr, va = perm[k:], perm[:k]
    return (x[tr], y[tr]), (x[va], y[va])
