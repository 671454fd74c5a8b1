"""Momentum, Nesterov, Adam and L2: the NumPy rules against scikit-learn's optimiser
classes and against hand-derived properties, and the fused kernel inside the
compiled epoch against the NumPy rules."""
import hashlib

import numba
import numpy as np
import pytest

import fastmlp
from fastmlp.optimizers import Optimizer

THREADS = sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)})
CASES = [("sgd", {}), ("sgd", {"alpha": 0.3}), ("momentum", {}),
         ("momentum", {"momentum": 0.5, "alpha": 0.1}), ("momentum", {"nesterov": True}),
         ("momentum", {"nesterov": True, "alpha": 0.2}), ("adam", {}),
         ("adam", {"beta_1": 0.5, "beta_2": 0.9, "epsilon": 1e-4, "alpha": 0.2})]


def params(rng, sizes, dtype):
    Ws = [rng.normal(size=(a, b)).astype(dtype) for a, b in zip(sizes[:-1], sizes[1:])]
    bs = [rng.normal(size=b).astype(dtype) for b in sizes[1:]]
    return Ws, bs


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-13), (np.float32, 2e-6)])
@pytest.mark.parametrize("name,kw", [c for c in CASES if c[0] != "sgd" and "alpha" not in c[1]])
def test_updates_equal_scikit_learn_optimizers(name, kw, dtype, rtol):
    """Five steps of Optimizer.step against sklearn's SGDOptimizer / AdamOptimizer
    fed the same gradients (sklearn's optimisers see grads that already include L2,
    so only alpha=0 is compared here; L2 is checked through the estimator)."""
    opt_mod = pytest.importorskip("sklearn.neural_network._stochastic_optimizers")
    rng = np.random.default_rng(3)
    Ws, bs = params(rng, [7, 5, 3], dtype)
    sk_params = [p.copy() for p in Ws + bs]
    ours = Optimizer(name, **kw)
    lr = 0.01
    if name == "adam":
        sk = opt_mod.AdamOptimizer(sk_params, lr, kw.get("beta_1", 0.9), kw.get("beta_2", 0.999),
                                   kw.get("epsilon", 1e-8))
    else:
        sk = opt_mod.SGDOptimizer(sk_params, lr, "constant", kw.get("momentum", 0.9),
                                  kw.get("nesterov", False))
    for _ in range(5):
        grads = [(rng.normal(size=W.shape).astype(dtype), rng.normal(size=b.shape).astype(dtype))
                 for W, b in zip(Ws, bs)]
        ours.step(Ws, bs, grads, lr, batch_size=10)
        sk.update_params(sk_params, [g for g, _ in grads] + [g for _, g in grads])
    for got, want in zip(Ws + bs, sk_params):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol)


def test_adam_first_step_moves_every_parameter_by_lr():
    """At t=1 the bias-corrected m / sqrt(v) is g / |g|: each parameter moves by
    exactly lr against its gradient's sign (epsilon aside)."""
    rng = np.random.default_rng(0)
    Ws, bs = params(rng, [4, 3], np.float64)
    before = [p.copy() for p in Ws + bs]
    grads = [(rng.normal(size=Ws[0].shape), rng.normal(size=bs[0].shape))]
    Optimizer("adam", epsilon=1e-300).step(Ws, bs, grads, 0.01, batch_size=1)
    for p, p0, g in zip(Ws + bs, before, grads[0]):
        np.testing.assert_allclose(p - p0, -0.01 * np.sign(g), rtol=1e-12)


def test_momentum_with_a_constant_gradient_is_a_geometric_series():
    """v_k = -lr g (1 + mu + ... + mu^(k-1)), so after n steps the parameter has moved
    by -lr g sum_k (1 - mu^k) / (1 - mu); Nesterov adds one more mu v_k - lr g."""
    mu, lr, n = 0.5, 0.1, 6
    for nesterov in (False, True):
        W, b = [np.zeros((1, 1))], [np.zeros(1)]
        opt = Optimizer("momentum", momentum=mu, nesterov=nesterov)
        for _ in range(n):
            opt.step(W, b, [(np.ones((1, 1)), np.ones(1))], lr, batch_size=1)
        v = [-lr * (1 - mu ** k) / (1 - mu) for k in range(1, n + 1)]
        moved = sum(mu * vk - lr for vk in v) if nesterov else sum(v)
        np.testing.assert_allclose(W[0][0, 0], moved, rtol=1e-14)
        np.testing.assert_allclose(b[0][0], moved, rtol=1e-14)


def test_l2_adds_alpha_over_batch_times_weights_to_weights_only():
    W, b = [np.full((2, 2), 3.0)], [np.full(2, 3.0)]
    Optimizer("sgd", alpha=0.5).step(W, b, [(np.zeros((2, 2)), np.zeros(2))], 0.1, batch_size=5)
    np.testing.assert_allclose(W[0], 3.0 - 0.1 * 0.5 / 5 * 3.0)
    np.testing.assert_array_equal(b[0], 3.0)       # biases are not penalised
    assert Optimizer("sgd", alpha=0.5).penalty([np.full((2, 2), 3.0)]) == pytest.approx(0.25 * 9 * 4)


def data(rng, n, n_in, sparse):
    X = rng.normal(size=(n, n_in))
    X[X < 0.6] = 0
    return (X if sparse else X + 1.0), rng.integers(0, 3, n)


def split_data(rng, n):
    """Sparse overall (about 40% nonzeros) with 20 of 60 columns nonzero in about
    90% of rows: the compiled epoch reads those as dense, W_1 and its moments
    with their rows reordered while it runs (Engine.perm)."""
    X = rng.normal(size=(n, 60))
    X[rng.random(X.shape) < np.where(np.arange(60) % 3 == 1, 0.1, 0.85)] = 0
    return X, rng.integers(0, 3, n)


def level_data(rng, n, d=255):
    """split_data's pattern with every value an 8-bit level c / d (c in 1..255 where
    nonzero), as images scaled by 1/255 are: the split keeps its dense columns as
    uint8 levels (Engine.levels)."""
    X, y = split_data(rng, n)
    return np.where(X != 0, rng.integers(1, 256, X.shape) / d, 0.0), y


def _epochs_against_reference(name, kw, inputs, threads, epochs, chunks=None, split=None,
                              hidden=8, batch_size=10):
    """The compiled loop against fastmlp.reference, float64, the same shuffles,
    partial last batch included; chunks: workspaces for that many chunks (run by
    the threads there are); split: whether the first layer must have been split by
    input columns (None: where the Engine does that by itself); hidden: the first
    layer's width. Returns the numba engine."""
    rng = np.random.default_rng(7)
    if inputs == "split-input":
        X, y = split_data(rng, 103)
    elif inputs == "level-input":
        X, y = level_data(rng, 103)
    else:
        X, y = data(rng, 103, 17, inputs == "sparse-input")
    runs = []
    for backend in ("numpy", "numba"):
        m = fastmlp.MLP([X.shape[1], hidden, 5, 3], ["tanh", "relu", "softmax"], dtype="float64",
                        seed=1)
        t = fastmlp.Trainer(m, "cross_entropy", lr=0.05, batch_size=batch_size, seed=2,
                            backend=backend, threads=threads, optimizer=name, **kw)
        if backend == "numba":
            engine = t._get_engine()
            if chunks is not None:
                allocate = engine._allocate
                engine._allocate = lambda T: allocate(chunks)
        runs.append((m, t.fit(X, y, epochs=epochs)))
    (ref, h_ref), (got, h_got) = runs
    for a, b in zip(ref.weights + ref.biases, got.weights + got.biases):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(h_got["loss"], h_ref["loss"], rtol=1e-12)
    assert engine.sparse == (inputs != "dense-input")
    assert engine.n_dense == (20 if inputs in ("split-input", "level-input") else 0)
    assert (engine.X.dtype == np.uint8) == (inputs == "level-input")
    # With two or more chunks, the optimisers that keep moments split a sparse
    # first layer between the chunks by input columns (its own kernels and update).
    if split is None:
        split = engine.sparse and engine.called.shape[1] >= 2 and name != "sgd"
    assert (engine.cuts is not None) == split
    return engine


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("inputs", ["sparse-input", "dense-input", "split-input", "level-input"])
@pytest.mark.parametrize("name,kw", CASES)
def test_compiled_epochs_equal_reference_float64(name, kw, inputs, threads):
    """Three epochs of the compiled loop (fused optimiser update, the sparse first
    layer's touched rows, L2 in the loss) against fastmlp.reference."""
    _epochs_against_reference(name, kw, inputs, threads, 3)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("name,kw", [("sgd", {}), ("sgd", {"alpha": 0.3}), ("adam", {})])
def test_compiled_epochs_with_large_chunks_equal_reference_float64(name, kw, threads):
    """Batches of 40 (chunks of 20 or 40 rows): the back-propagation through the
    8x5 layer takes a transposed copy and the register tiles
    (dense.backprop_transposed; the other tests' chunks of 5-10 rows take BLAS)."""
    from fastmlp.kernels import dense
    assert dense.backprop_transposed(np.zeros((8, 5)), 20) == dense.TILES
    _epochs_against_reference(name, kw, "sparse-input", threads, 3, batch_size=40)


@pytest.mark.parametrize("inputs", ["sparse-input", "split-input", "dense-input"])
@pytest.mark.parametrize("name,kw", [("adam", {"alpha": 0.2}),
                                     ("momentum", {"nesterov": True, "alpha": 0.1}),
                                     ("sgd", {"alpha": 0.3})])
def test_compiled_epochs_on_three_chunks_equal_reference_float64(name, kw, inputs):
    """update_share's general path (more than two chunks: gradients summed into
    dW[0] first, then the optimiser), which machines with 3+ threads take: three
    chunks' workspaces run by one thread (check_in's ALL, the same bits as three
    threads)."""
    engine = _epochs_against_reference(name, kw, inputs, 1, 2, chunks=3)
    assert engine.called.shape == (4, 3)


@pytest.mark.parametrize("inputs", ["sparse-input", "split-input"])
@pytest.mark.parametrize("kw", [{}, {"alpha": 0.3}])
def test_sgd_with_the_first_layer_split_by_columns_equals_reference(kw, inputs, monkeypatch):
    """SGD trains with the first layer split by rows of the batch (it measured
    faster); forced to split it by input columns, as the optimisers with moments
    do, it still matches the reference (update_share's own-rows SGD path)."""
    from fastmlp import _numba_backend
    monkeypatch.setattr(_numba_backend.Engine, "splits_features",
                        lambda self, T: self.sparse and T >= 2)
    engine = _epochs_against_reference("sgd", kw, inputs, 1, 2, chunks=3, split=True)
    assert engine.called.shape == (4, 3)


@pytest.mark.parametrize("inputs", ["sparse-input", "split-input"])
@pytest.mark.parametrize("name,kw", [("adam", {"alpha": 0.2}), ("sgd", {"alpha": 0.3})])
def test_split_first_layer_summed_from_a_csc_equals_reference(name, kw, inputs, monkeypatch):
    """A first layer wide enough that its weight gradient sums from a per-chunk CSC
    (epoch.sparse_grad_uses_csc), split by input columns: the partial forward
    product sorts each chunk's CSC as it reads the nonzeros, and the gradient sums
    from it (the tests above take the scatter, 8 units wide)."""
    from fastmlp import _numba_backend
    from fastmlp.kernels.epoch import sparse_grad_uses_csc
    assert sparse_grad_uses_csc(100)
    monkeypatch.setattr(_numba_backend.Engine, "splits_features",
                        lambda self, T: self.sparse and T >= 2)
    engine = _epochs_against_reference(name, kw, inputs, 1, 2, chunks=3, split=True, hidden=100)
    assert engine.cptr is not None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_touched_rows_equals_optimizer_row_on_zeroed_rows(dtype):
    """sgd_touched_rows (SGD with L2 over a share of W_1's rows, two chunks'
    gradients) against optimizer_row over the same rows after zeroing each chunk's
    untouched gradient rows, as update_share did before: the same weights bit for
    bit on many random cases. The untouched rows hold NaN, so reading one would
    show; some weights and gradients are -0 (a -0 gradient plus a zeroed row is
+0, which with no L2 decides the sign of a -0 weight)."""
    from fastmlp.kernels import epoch
    rng = np.random.default_rng(11)
    for _ in range(40):
        n_in, n = int(rng.integers(1, 30)), int(rng.integers(1, 40))
        k0 = int(rng.integers(0, n_in))
        k1 = int(rng.integers(k0, n_in + 1))
        W = rng.normal(size=(n_in, n)).astype(dtype)
        W[rng.random(W.shape) < 0.1] = -0.0
        G = [rng.normal(size=(n_in, n)).astype(dtype) for _ in range(2)]
        for g in G:
            g[rng.random(g.shape) < 0.1] = -0.0
        t = [rng.random(n_in) < p for p in (0.5, 0.7)]
        inv_n, decay, lr = (dtype(v) for v in (1 / rng.integers(1, 300), rng.choice([0, 1e-3, 0.2]),
                                               rng.uniform(0.01, 1)))
        want, sq_want = W.copy(), np.zeros(1)
        Z = [np.where(tc[:, None], g, dtype(0)) for g, tc in zip(G, t)]
        rows = slice(k0, k1)
        x = dtype(0)
        epoch.optimizer_row(want[rows].reshape(-1), Z[0][rows].reshape(-1), Z[1][rows].reshape(-1),
                            want[rows].reshape(-1), want[rows].reshape(-1), epoch.SGD, inv_n,
                            decay, lr, x, x, x, x, x, x, True, sq_want)
        stale = [np.where(tc[:, None], g, dtype(np.nan)) for g, tc in zip(G, t)]
        got, sq_got = W.copy(), np.zeros(1)
        epoch.sgd_touched_rows(got, stale[0], stale[1], t[0], t[1], np.int64(k0), np.int64(k1),
                               inv_n, decay, lr, sq_got)
        np.testing.assert_array_equal(got, want)
        assert np.signbit(got).tolist() == np.signbit(want).tolist()
        np.testing.assert_allclose(sq_got, sq_want, rtol=1e-12)


@pytest.mark.parametrize("name,kw", [c for c in CASES if c[1]])
def test_compiled_float32_close_to_reference_and_deterministic(name, kw):
    rng = np.random.default_rng(8)
    X, y = data(rng, 300, 40, True)
    out = []
    for backend in ("numpy", "numba", "numba"):
        m = fastmlp.MLP([40, 16, 3], ["sigmoid", "softmax"], seed=4)
        fastmlp.Trainer(m, "cross_entropy", lr=0.02, batch_size=16, seed=5, backend=backend,
                        threads=THREADS[-1], optimizer=name, **kw).fit(X.astype(np.float32), y, epochs=2)
        assert m.weights[0].dtype == np.float32
        out.append(m)
    ref, a, b = out
    for p, q, r in zip(ref.weights + ref.biases, a.weights + a.biases, b.weights + b.biases):
        np.testing.assert_allclose(q, p, rtol=1e-4, atol=1e-5)
        assert q.tobytes() == r.tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("d", [255, 1])
def test_dense_columns_as_levels_train_the_same_bits(dtype, d, monkeypatch):
    """Dense columns kept as 8-bit levels (X / 255 and raw 0-255 values) give the
    same weights, bit for bit, as the same columns kept as floats: the epoch turns
    each level back into exactly the input's value."""
    rng = np.random.default_rng(11)
    X, y = level_data(rng, 250, d)
    X = X.astype(dtype)
    out = []
    from fastmlp import _numba_backend
    for use_levels in (True, False):
        monkeypatch.setattr(_numba_backend, "LEVEL_DIVISORS", (255, 1) if use_levels else ())
        m = fastmlp.MLP([60, 16, 3], ["relu", "softmax"], dtype=dtype, seed=3)
        t = fastmlp.Trainer(m, "cross_entropy", lr=0.05, batch_size=20, seed=4, backend="numba",
                            threads=THREADS[-1], optimizer="adam", alpha=1e-3)
        engine = t._get_engine()
        t.fit(X, y, epochs=2)
        assert engine.X.dtype == (np.uint8 if use_levels else np.dtype(dtype))
        assert engine.levels == d or not use_levels
        out.append(m)
    a, b = out
    for p, q in zip(a.weights + a.biases, b.weights + b.biases):
        assert p.tobytes() == q.tobytes()


@pytest.mark.parametrize("name,kw", [("adam", {"alpha": 1e-3}), ("momentum", {"momentum": 0.9}),
                                     ("sgd", {"alpha": 1e-3})])
def test_kept_moments_train_the_same_bits_and_go_back(name, kw):
    """train_batches(keep_moments=True) leaves W_1's moments in the Engine's row
    order between runs: after release(), weights and moments are those of runs
    that put them back every time, to the bit; prepare() puts them back too, and
    a run with other moment arrays (a new optimiser) puts the kept ones back first."""
    from fastmlp import _numba_backend
    rng = np.random.default_rng(5)
    X, y = split_data(rng, 103)
    Y = np.eye(3)[y]
    order = rng.permutation(103)

    def engine():
        m = fastmlp.MLP([60, 24, 3], ["relu", "softmax"], dtype="float64", seed=3)
        e = _numba_backend.Engine(m, "cross_entropy", 10, 2, Optimizer(name, **kw))
        e.prepare(X, Y)
        assert e.perm is not None
        return e

    def state(e):
        s = e.optimizer.state
        return [a.tobytes() for a in e.model.weights + e.model.biases +
                [w for k in ("mW", "vW") for w in s.get(k, [])]]
    with _numba_backend.num_threads(2):
        plain, kept = engine(), engine()
        for _ in range(3):
            plain.train_batches(order, 10, 0, 11, 0.05)
            kept.train_batches(order, 10, 0, 11, 0.05, keep_moments=True)
        if name != "sgd":       # the moments really stayed in the workspaces
            assert state(kept) != state(plain)
        kept.release()
        assert state(kept) == state(plain)
        kept.release()          # nothing left to put back
        assert state(kept) == state(plain)
        kept.train_batches(order, 10, 0, 11, 0.05, keep_moments=True)
        kept.prepare(X, Y)
        plain.train_batches(order, 10, 0, 11, 0.05)
        assert state(kept) == state(plain)
        kept.train_batches(order, 10, 0, 11, 0.05, keep_moments=True)
        old = kept.optimizer
        kept.optimizer = Optimizer(name, **kw)
        kept.train_batches(order, 10, 0, 11, 0.05)
        plain.train_batches(order, 10, 0, 11, 0.05)
        assert [a.tobytes() for k in ("mW", "vW") for a in old.state.get(k, [])] == \
            [a.tobytes() for k in ("mW", "vW") for a in plain.optimizer.state.get(k, [])]


def test_engine_reuses_kernel_addresses_only_for_the_same_arguments():
    """The Engine keeps the kernels' addresses of its last run for the next run
    with the same arrays; another optimiser (another update kernel, or none of
    optimizer_row for plain SGD) or new data takes new ones: the same bits as an
    Engine that works them out for every run."""
    from fastmlp import _numba_backend
    rng = np.random.default_rng(9)
    X, y = split_data(rng, 103)
    X2, y2 = data(rng, 103, 60, True)
    Y, Y2 = np.eye(3)[y], np.eye(3)[y2]
    order = rng.permutation(103)
    runs = [("adam", {}, X, Y), ("adam", {}, X, Y), ("sgd", {}, X, Y),
            ("momentum", {"momentum": 0.5}, X, Y), ("momentum", {"momentum": 0.5}, X2, Y2)]
    out = []
    for forget in (False, True):
        m = fastmlp.MLP([60, 24, 3], ["relu", "softmax"], dtype="float64", seed=3)
        e = _numba_backend.Engine(m, "cross_entropy", 10, 2)
        with _numba_backend.num_threads(2):
            for name, kw, Xr, Yr in runs:
                if e.optimizer.name != name or Xr is not getattr(e, "_x", None):
                    e.optimizer = Optimizer(name, **kw)
                    e.prepare(Xr, Yr)
                    e._x = Xr
                if forget:
                    e._kernels_for = None
                e.train_batches(order, 10, 0, 11, 0.05)
        out.append([a.tobytes() for a in m.weights + m.biases])
    assert out[0] == out[1]


def test_optimizer_state_survives_checkpoint_resume(tmp_path):
    """Adam's moments and step count are part of the checkpoint: resuming gives the
    bytes of an uninterrupted run."""
    rng = np.random.default_rng(1)
    X, y = data(rng, 200, 20, True)

    def trainer():
        return fastmlp.Trainer(fastmlp.MLP([20, 8, 3], ["relu", "softmax"], seed=1), "cross_entropy",
                               lr=0.01, batch_size=16, seed=0, optimizer="adam", alpha=0.01)

    def digest(t):
        return hashlib.sha256(b"".join(p.tobytes() for p in t.model.weights + t.model.biases)).digest()
    straight = trainer()
    straight.fit(X, y, epochs=3)
    ck = tmp_path / "ck.npz"
    trainer().fit(X, y, epochs=1, checkpoint=ck)
    resumed = trainer()
    resumed.fit(X, y, epochs=3, checkpoint=ck, resume=True)
    assert digest(resumed) == digest(straight)
    assert int(resumed.optimizer.state["step"][0]) == 3 * 13
    other = fastmlp.Trainer(fastmlp.MLP([20, 8, 3], ["relu", "softmax"], seed=1), "cross_entropy",
                            lr=0.01, batch_size=16, seed=0, optimizer="momentum")
    with pytest.raises(ValueError, match="different run.*optimizer"):
        other.fit(X, y, epochs=3, checkpoint=ck, resume=True)


@pytest.mark.parametrize("kw,message", [
    ({"optimizer": "rmsprop"}, "optimizer: unknown optimizer 'rmsprop'"),
    ({"optimizer": "momentum", "momentum": 1.5}, r"momentum: expected a number in \[0, 1\]"),
    ({"optimizer": "adam", "beta_2": -0.1}, r"beta_2: expected a number in \[0, 1\)"),
    ({"optimizer": "adam", "epsilon": 0}, r"epsilon: expected a number in \(0, inf\)"),
    ({"alpha": float("nan")}, r"alpha: expected a number in \[0, inf\)"),
])
def test_bad_optimizer_arguments_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        fastmlp.Trainer(fastmlp.MLP([3, 2], "sigmoid"), **kw)
