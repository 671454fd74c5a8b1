"""The numba backend against the reference: gradients, one step, one epoch, and
determinism for a given seed and thread count."""
import copy
import hashlib

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastmlp
from fastmlp import reference

from conftest import random_model, random_targets

NETS = [
    ([784, 64, 32, 16, 10], "sigmoid", "squared_error"),                     # seed 000
    ([784, 32, 16, 10], ["tanh", "tanh", "softmax"], "cross_entropy"),       # seed 002
    # scikit-learn's default: the per-chunk CSC gradient (epoch.sparse_grad_uses_csc)
    ([784, 100, 10], ["relu", "softmax"], "cross_entropy"),
    # the widest the scatter gradient takes
    ([784, 128, 10], ["relu", "softmax"], "cross_entropy"),
    ([17, 9, 3], ["relu", "sigmoid"], "cross_entropy"),
    ([5, 4, 1], ["tanh", "linear"], "squared_error"),
    ([13, 7, 4], ["relu", "softmax"], "squared_error"),
]
THREADS = sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)})


def digest(model):
    h = hashlib.sha256()
    for a in model.weights + model.biases:
        h.update(a.tobytes())
    return h.hexdigest()


# The 784-input nets whose test inputs have a band of dense columns, which the
# compiled epoch's first layer reads through its dense products (Engine.perm);
# the others' inputs are sparse throughout. Each of the two sparse weight
# gradients (scatter: 64 units, 32; CSC: 100 units) is tested both ways.
SPLIT_NETS = ([784, 64, 32, 16, 10], [784, 100, 10])


def inputs(rng, n, n_in, split=True):
    X = rng.random((n, n_in))
    if n_in == 784:
        # MNIST-like sparsity (80% zeros): the CSR path; with split, columns
        # 300-499 are nonzero in 70% of rows, as MNIST's middle pixels are.
        zero = np.full(n_in, 0.8)
        if split:
            zero[300:500] = 0.3
        X[rng.random(X.shape) < zero] = 0
    return X


@pytest.mark.parametrize("sizes,acts,loss", NETS)
def test_gradients_equal_reference(sizes, acts, loss):
    rng = np.random.default_rng(len(sizes))
    model = random_model(rng, sizes, acts)
    for B in (1, 7, 100):
        X = inputs(rng, B, sizes[0])
        Y = random_targets(rng, B, sizes[-1], loss, model.activations[-1])
        ref = fastmlp.gradients(model, X, Y, loss=loss, backend="numpy")
        got = fastmlp.gradients(model, X, Y, loss=loss, backend="numba")
        for (rW, rb), (gW, gb) in zip(ref, got):
            np.testing.assert_allclose(gW, rW, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(gb, rb, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("sizes,acts,loss", NETS)
def test_epoch_equals_reference_float64(sizes, acts, loss, threads):
    """A full epoch with a fixed shuffle, partial last batch included, in float64."""
    _epoch_against_reference(sizes, acts, loss, threads)


@pytest.mark.parametrize("sizes,acts,loss", NETS[:4])
def test_epoch_on_three_chunks_equals_reference_float64(sizes, acts, loss):
    """update_share has a loop of its own for one or two chunks' plain-SGD update of
    W_1; three chunks take the general one. Workspaces for three chunks, run by one
    thread: the first chunk, alone, runs all three chunks' work (check_in's ALL; the
    same bits as three threads), so no machine needs three cores for it."""
    _epoch_against_reference(sizes, acts, loss, 1, chunks=3)


@pytest.mark.parametrize("sizes,acts,loss", NETS[:2])
def test_epoch_with_large_batches_equals_reference_float64(sizes, acts, loss):
    """Batches of 300 rows in two chunks: their rows of the batch-row workspaces
    are MAX_CHUNK_GAP rows apart, not a chunk's share (150)."""
    _epoch_against_reference(sizes, acts, loss, 1, chunks=2, n=700, bs=300)


def _epoch_against_reference(sizes, acts, loss, threads, chunks=None, n=230, bs=32):
    # By default 8 batches, the last of 6 rows.
    rng = np.random.default_rng(99)
    X = inputs(rng, n, sizes[0], split=sizes in SPLIT_NETS)
    ref_model = fastmlp.MLP(sizes, acts, dtype="float64", seed=5)
    Y = fastmlp.trainer.targets(ref_model, random_targets(rng, n, sizes[-1], loss, ref_model.activations[-1]))
    got_model = copy.deepcopy(ref_model)
    order = rng.permutation(n)
    t_ref, c_ref = reference.train_epoch(ref_model.weights, ref_model.biases, ref_model.activations,
                                           loss, X, Y, 0.1, bs, order)
    trainer = fastmlp.Trainer(got_model, loss=loss, lr=0.1, batch_size=bs, backend="numba", threads=threads)
    engine = trainer._get_engine()
    with engine.threads_context():
        engine.prepare(X, Y)
        if chunks is not None:
            engine._allocate(chunks)
            assert engine.called.shape == (4, chunks)
        t_got, c_got, bad, done = engine.train_batches(order, bs, 0, -(-n // bs), 0.1)
    # NETS covers both sparse weight gradients of the compiled epoch.
    from fastmlp.kernels.epoch import sparse_grad_uses_csc
    assert engine.sparse == (sizes[0] == 784)
    assert (engine.cptr is not None) == (engine.sparse and sparse_grad_uses_csc(sizes[1]))
    assert (engine.cptr is not None) == (sizes[:2] == [784, 100])   # both ways are tested
    # The band of dense columns (and only it) is read as dense, where it exists.
    split = sizes in SPLIT_NETS
    assert engine.n_dense == (200 if split else 0)
    if split:
        np.testing.assert_array_equal(np.sort(engine.perm[:200]), np.arange(300, 500))
    # The dense columns' products skip all-zero groups of columns where the tiles
    # take them (float64: 32 units and more, W_1 under F64_MAX_WEIGHTS numbers):
    # seed 000's network, compared with the reference below.
    from fastmlp.kernels import dense
    assert (engine.groups is not None) == (split and dense.uses_groups(got_model.weights[0]))
    if split and dense.TILES and sizes[1] == 64:
        assert engine.groups is not None
    assert done == -(-n // bs)
    assert bad == -1
    # With the batch split by rows, each chunk's rows of the batch-row workspaces
    # start a chunk's share further on than the last's (a gap between chunks),
    # and the epoch reads them where they were written: the comparison below.
    from fastmlp._numba_backend import MAX_CHUNK_GAP
    T = engine.called.shape[1]
    gap = min(-(-bs // T), MAX_CHUNK_GAP) if T > 1 and engine.cuts is None else 0
    assert engine.batch[2] == gap
    for a in (engine.Yb,) + engine.As + engine.Ds:
        assert a.shape[0] == bs + (T - 1) * gap
    assert c_got == c_ref
    assert t_got == pytest.approx(t_ref, rel=1e-12)
    for a, b in zip(ref_model.weights + ref_model.biases, got_model.weights + got_model.biases):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12)
    # Training moved the weights: the comparison is not of two untouched copies.
    assert not np.allclose(ref_model.weights[0], fastmlp.MLP(sizes, acts, dtype="float64", seed=5).weights[0])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_split_input_puts_w1_and_its_moments_back(optimizer):
    """The compiled epoch sees W_1 and its moments with rows reordered (Engine.perm)
    and puts them back however the run ends: a run stopped before its first batch
    leaves them exactly as they were. (That the rows are put back in the right
    order after training is what the epoch tests against the reference check.)"""
    rng = np.random.default_rng(4)
    X = inputs(rng, 640, 784)
    y = rng.integers(0, 10, 640)
    model = fastmlp.MLP([784, 100, 10], ["relu", "softmax"], dtype="float64", seed=2)
    trainer = fastmlp.Trainer(model, lr=0.01, batch_size=32, threads=1, optimizer=optimizer)
    trainer.fit(X, y, epochs=1)                   # moments that are not zero
    engine = trainer._get_engine()
    assert engine.n_dense == 200
    state = trainer.optimizer.state
    before = [a.copy() for a in [model.weights[0]] + list(state.get("mW", [])[:1])
              + list(state.get("vW", [])[:1])]
    Y = fastmlp.trainer.targets(model, y)
    with engine.threads_context():
        engine.prepare(X, Y)
        total, correct, bad, done = engine.train_batches(np.arange(640), 32, 0, 2, 0.01,
                                                         np.ones(1, dtype=np.int64))
    assert done == 0
    after = [model.weights[0]] + list(state.get("mW", [])[:1]) + list(state.get("vW", [])[:1])
    assert len(after) == (3 if optimizer == "adam" else 1)
    for a, b in zip(before, after):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("threads", THREADS)
def test_one_hot_targets_as_classes_same_bytes(threads, monkeypatch):
    """The engine keeps one-hot targets as each row's class and writes the batch's
    target rows from them: the same numbers, so the same bytes as copying the
    rows, which it does for any other targets (here: told they are not one-hot)."""
    rng = np.random.default_rng(8)
    X = inputs(rng, 400, 784).astype(np.float32)
    y = rng.integers(0, 10, 400)
    digests, kinds = [], []
    for one_hot in (True, False):
        if not one_hot:
            monkeypatch.setattr(fastmlp._numba_backend.dense, "one_hot_labels",
                                lambda Y, labels: False)
        model = fastmlp.MLP([784, 100, 10], ["relu", "softmax"], seed=3)
        trainer = fastmlp.Trainer(model, lr=0.1, batch_size=32, seed=4, threads=threads)
        trainer.fit(X, y, epochs=2)
        digests.append(digest(model))
        Y = trainer._get_engine().Y
        kinds.append((Y.ndim, Y.dtype))
    assert kinds == [(1, np.int32), (2, np.float32)]
    assert digests[0] == digests[1]


@pytest.mark.parametrize("threads", THREADS)
def test_same_seed_same_threads_same_bytes(threads):
    rng = np.random.default_rng(0)
    X = inputs(rng, 500, 784).astype(np.float32)
    y = rng.integers(0, 10, 500)
    digests = []
    for _ in range(2):
        model = fastmlp.MLP([784, 64, 32, 16, 10], "sigmoid", seed=3)
        fastmlp.Trainer(model, lr=2.0, batch_size=37, seed=4, threads=threads).fit(X, y, epochs=2)
        digests.append(digest(model))
    assert digests[0] == digests[1]
    other = fastmlp.MLP([784, 64, 32, 16, 10], "sigmoid", seed=3)
    fastmlp.Trainer(other, lr=2.0, batch_size=37, seed=5, threads=threads).fit(X, y, epochs=2)
    assert digest(other) != digests[0]        # the shuffle seed matters


def test_threads_restored_after_fit():
    before = numba.get_num_threads()
    model = fastmlp.MLP([4, 3, 2], "tanh", seed=0)
    fastmlp.Trainer(model, lr=0.1, threads=1).fit(np.ones((5, 4)), [0, 1, 0, 1, 1])
    assert numba.get_num_threads() == before


def test_too_many_threads_is_a_clear_error():
    model = fastmlp.MLP([4, 3, 2], "tanh", seed=0)
    limit = numba.config.NUMBA_NUM_THREADS
    with pytest.raises(ValueError, match=f"threads: at most {limit}"):
        fastmlp.Trainer(model, threads=limit + 1).fit(np.ones((5, 4)), [0, 1, 0, 1, 1])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(1, 9), min_size=2, max_size=4),
       hidden=st.sampled_from(["sigmoid", "tanh", "relu", "linear"]),
       out=st.sampled_from(["sigmoid", "softmax", "linear"]),
       batch=st.integers(1, 12), n=st.integers(1, 30), scale=st.floats(0.01, 30.0),
       seed=st.integers(0, 2**16))
def test_property_numba_step_matches_reference(sizes, hidden, out, batch, n, scale, seed):
    if out == "softmax" and sizes[-1] < 2:
        sizes[-1] = 2
    loss = "squared_error" if out == "linear" else "cross_entropy"
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, sizes[0])) * scale
    ref_model = fastmlp.MLP(sizes, [hidden] * (len(sizes) - 2) + [out], dtype="float64", seed=seed)
    Y = random_targets(rng, n, sizes[-1], loss, out)
    got_model = copy.deepcopy(ref_model)
    order = rng.permutation(n)
    reference.train_batches(ref_model.weights, ref_model.biases, ref_model.activations, loss, X,
                            fastmlp.trainer.targets(ref_model, Y), 0.05, order, batch, 0, 1)
    trainer = fastmlp.Trainer(got_model, loss=loss, lr=0.05, batch_size=batch, backend="numba")
    engine = trainer._get_engine()
    with engine.threads_context():
        engine.prepare(X, fastmlp.trainer.targets(got_model, Y))
        engine.train_batches(order, batch, 0, 1, 0.05)
    for a, b in zip(ref_model.weights + ref_model.biases, got_model.weights + got_model.biases):
        assert np.isfinite(b).all()
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)


def test_engine_runs_scipys_blas_on_one_thread_and_restores_it():
    """Inside threads_context every BLAS threadpoolctl knows (SciPy's, which the
    compiled np.dot calls, among them) runs one thread, twice in a row (the
    controller is made once per process), and the counts are back afterwards."""
    import scipy.linalg.cython_blas  # noqa: F401
    from threadpoolctl import threadpool_info
    from fastmlp import _numba_backend
    m = fastmlp.MLP([6, 5, 3], ["relu", "softmax"], seed=0)
    engine = _numba_backend.Engine(m, "cross_entropy", 4, None)

    def blas():
        return {i["filepath"]: i["num_threads"] for i in threadpool_info()
                if i["user_api"] == "blas"}
    before = blas()
    assert any("scipy" in path for path in before)
    for _ in range(2):
        with engine.threads_context():
            assert set(blas().values()) == {1}
        assert blas() == before
