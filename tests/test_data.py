"""The MNIST loader against the facts in shared/data/README.md, and against files
that are truncated, foreign or mismatched. Never touches the network."""
import gzip
import hashlib
import os
import shutil

import numpy as np
import pytest

from fastmlp import data

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
IDX_SHA256 = {
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
}


def check_facts(result):
    (xtr, ytr), (xte, yte) = result
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28)
    assert xtr.dtype == np.uint8 and ytr.dtype == np.uint8
    assert np.bincount(ytr, minlength=10).tolist() == TRAIN_COUNTS
    assert np.bincount(yte, minlength=10).tolist() == TEST_COUNTS
    assert xtr.mean() == pytest.approx(33.3184, abs=1e-4)
    assert xtr.std() == pytest.approx(78.5675, abs=1e-4)


def test_npz_matches_readme_facts(mnist_dir):
    check_facts(data.load_mnist(os.path.join(mnist_dir, "mnist.npz")))


def test_idx_directory_matches_npz(mnist_dir, tmp_path):
    for stem in IDX_SHA256:
        shutil.copy(os.path.join(mnist_dir, stem + ".gz"), tmp_path)
    from_idx = data.load_mnist(tmp_path)
    check_facts(from_idx)
    from_npz = data.load_mnist(os.path.join(mnist_dir, "mnist.npz"))
    for a, b in zip(from_idx, from_npz):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_raw_idx_checksums_and_parse(mnist_dir, tmp_path):
    for stem, sha in IDX_SHA256.items():
        raw = gzip.decompress(open(os.path.join(mnist_dir, stem + ".gz"), "rb").read())
        assert hashlib.sha256(raw).hexdigest() == sha
        (tmp_path / stem).write_bytes(raw)
    check_facts(data.load_mnist(tmp_path))


def test_env_variable_is_used(mnist_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("FASTMLP_DATA", mnist_dir)
    monkeypatch.setenv("HOME", str(tmp_path))
    (xtr, _), _ = data.load_mnist(download=False)
    assert xtr.shape == (60000, 28, 28)


def test_search_order_and_no_download(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTMLP_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FASTMLP_CACHE", str(tmp_path / "cache"))
    places = [what for what, _ in data.candidates()]
    assert places == ["keras cache", "fastmlp cache"]
    with pytest.raises(data.DataError, match="MNIST not found"):
        data.load_mnist(download=False)


def test_failed_download_says_where_to_put_the_file(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTMLP_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FASTMLP_CACHE", str(tmp_path / "cache"))
    pooch = pytest.importorskip("pooch")

    def refuse(*a, **k):
        raise ConnectionError("no network here")
    monkeypatch.setattr(pooch, "retrieve", refuse)
    with pytest.raises(data.DataError, match=r"put mnist.npz .*sha256 731c5ac6.* in .*cache"):
        data.load_mnist()


def test_download_is_verified_and_cached(monkeypatch, tmp_path, mnist_dir):
    # Stand in for the network with a local file server-less fake: pooch.retrieve
    # is given the expected hash, and the loader reads what it returns.
    monkeypatch.delenv("FASTMLP_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FASTMLP_CACHE", str(tmp_path / "cache"))
    pooch = pytest.importorskip("pooch")
    seen = {}

    def fake_retrieve(url, known_hash, fname, path, progressbar):
        seen.update(url=url, known_hash=known_hash)
        target = os.path.join(path, fname)
        shutil.copy(os.path.join(mnist_dir, "mnist.npz"), target)
        return target
    monkeypatch.setattr(pooch, "retrieve", fake_retrieve)
    check_facts(data.load_mnist())
    assert seen["known_hash"] == "sha256:" + data.MNIST_SHA256
    assert seen["url"].endswith("mnist.npz")
    # Second call: found in fastmlp's cache, no download.
    monkeypatch.setattr(pooch, "retrieve", None)
    check_facts(data.load_mnist())


def test_idx_header_errors(tmp_path):
    good = np.arange(12, dtype=np.uint8).reshape(3, 4)
    header = bytes([0, 0, 8, 2]) + np.array([3, 4], ">u4").tobytes()
    p = tmp_path / "a.idx"
    p.write_bytes(header + good.tobytes())
    np.testing.assert_array_equal(data.read_idx(p), good)
    p.write_bytes(header + good.tobytes()[:-1])
    with pytest.raises(data.DataError, match="a.idx: IDX data truncated"):
        data.read_idx(p)
    p.write_bytes(header + good.tobytes() + b"x")
    with pytest.raises(data.DataError, match="trailing bytes"):
        data.read_idx(p)
    p.write_bytes(b"PK\x03\x04not idx at all")
    with pytest.raises(data.DataError, match="not an IDX file"):
        data.read_idx(p)
    p.write_bytes(b"\x00\x00")
    with pytest.raises(data.DataError, match="too short"):
        data.read_idx(p)
    p.write_bytes(gzip.compress(header + good.tobytes())[:-10])
    with pytest.raises(data.DataError, match="gzip data is truncated"):
        data.read_idx(p)


def test_corrupted_npz_files(tmp_path, mnist_dir):
    src = open(os.path.join(mnist_dir, "mnist.npz"), "rb").read()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(src[: len(src) // 2])
    with pytest.raises(data.DataError, match="truncated.npz: not a readable .npz"):
        data.load_mnist(truncated)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(data.DataError, match="empty.npz"):
        data.load_mnist(empty)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.zeros(3))
    with pytest.raises(data.DataError, match="foreign.npz: not a keras MNIST file: missing x_train"):
        data.load_mnist(foreign)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x_train=np.zeros((10, 28, 28), np.uint8), y_train=np.zeros(10, np.uint8),
             x_test=np.zeros((10, 28, 28), np.uint8), y_test=np.zeros(10, np.uint8))
    with pytest.raises(data.DataError, match=r"x_train has shape \(10, 28, 28\), expected \(60000, 28, 28\)"):
        data.load_mnist(wrong)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x_train=np.array([object()], dtype=object), y_train=np.zeros(1),
             x_test=np.zeros(1), y_test=np.zeros(1))
    with pytest.raises(data.DataError, match="pickled"):
        data.load_mnist(pickled)


def test_incomplete_idx_directory(tmp_path, mnist_dir):
    shutil.copy(os.path.join(mnist_dir, "train-images-idx3-ubyte.gz"), tmp_path)
    with pytest.raises(data.DataError, match="incomplete IDX set, missing train-labels-idx1-ubyte"):
        data.load_mnist(tmp_path)
    with pytest.raises(data.DataError, match="holds neither mnist.npz nor the MNIST IDX files"):
        data.load_mnist(tmp_path / "..")


def test_preprocessing_helpers(mnist):
    X, y, Xt, yt = mnist
    assert X.shape == (60000, 784) and X.dtype == np.float32
    assert X.min() == 0 and X.max() == 1
    assert X.mean() == pytest.approx(0.1307, abs=1e-4)
    assert X.std() == pytest.approx(0.3081, abs=1e-4)
    Y = data.one_hot(y, 10)
    assert Y.shape == (60000, 10) and (Y.sum(axis=1) == 1).all() and (Y.argmax(1) == y).all()
    (a, b), (c, d) = data.train_val_split(X[:100], y[:100], val_size=0.2, seed=0)
    assert len(a) == 80 and len(c) == 20
    np.testing.assert_array_equal(np.sort(np.concatenate([b, d])), np.sort(y[:100]))
    with pytest.raises(ValueError, match="y: labels must lie in 0..9"):
        data.one_hot(np.array([0, 10]), 10)
