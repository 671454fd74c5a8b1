"""Random shapes, dtypes and values at the public API and the loaders: either a
correct answer or one of the documented errors, never a crash, hang or silent NaN."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastmlp
from fastmlp import data

DOCUMENTED = (ValueError, TypeError, fastmlp.TrainingDiverged)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

dtypes = st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.bool_, np.complex64, np.str_])
arrays = dtypes.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0,
                                                                    max_side=6)))


@FUZZ
@given(X=arrays, y=arrays, backend=st.sampled_from(fastmlp.trainer.BACKENDS),
       lr=st.floats(1e-4, 10.0), batch=st.integers(1, 8))
def test_fit_random_input(X, y, backend, lr, batch):
    model = fastmlp.MLP([4, 3, 2], ["tanh", "softmax"], seed=0)
    tr = fastmlp.Trainer(model, "cross_entropy", lr=lr, batch_size=batch, backend=backend)
    try:
        with np.errstate(all="ignore"):
            h = tr.fit(X, y, epochs=2)
    except DOCUMENTED:
        pass
    else:
        # It trained: X was 2-D with 4 numeric columns, y valid labels or rows.
        assert np.asarray(X).ndim == 2 and np.asarray(X).shape[1] == 4
        assert all(np.isfinite(r["loss"]) for r in h.epochs)
    assert all(np.isfinite(p).all() for p in model.weights + model.biases)


@FUZZ
@given(X=arrays)
def test_predict_random_input(X):
    model = fastmlp.MLP([3, 2], "softmax", seed=0)
    try:
        P = model.predict_proba(X)
    except DOCUMENTED:
        return
    assert P.shape == (np.asarray(X).shape[0], 2)
    assert np.isfinite(P).all()
    np.testing.assert_allclose(P.sum(axis=1), 1, rtol=1e-5)


@FUZZ
@given(raw=st.binary(max_size=200), gz=st.booleans())
def test_read_idx_random_bytes(raw, gz, tmp_path_factory):
    import gzip
    p = tmp_path_factory.mktemp("idx") / "f"
    p.write_bytes(gzip.compress(raw) if gz else raw)
    try:
        a = data.read_idx(p)
    except data.DataError:
        return
    assert isinstance(a, np.ndarray)


@FUZZ
@given(raw=st.binary(max_size=300))
def test_load_random_bytes(raw, tmp_path_factory):
    p = tmp_path_factory.mktemp("model") / "m.npz"
    p.write_bytes(raw)
    with pytest.raises(ValueError):
        fastmlp.load(p)


@FUZZ
@given(sizes=st.lists(st.integers(-2, 6), min_size=0, max_size=4),
       acts=st.one_of(st.sampled_from(["relu", "softmax", "swish", ""]),
                      st.lists(st.sampled_from(["relu", "tanh", "softmax", "nope"]), max_size=4)),
       dtype=st.sampled_from(["float32", "float64", "float16", "int8", None]))
def test_model_constructor(sizes, acts, dtype):
    try:
        m = fastmlp.MLP(sizes, acts, dtype=dtype)
    except DOCUMENTED:
        return
    assert len(m.weights) == len(sizes) - 1
    assert all(np.isfinite(W).all() for W in m.weights)


@FUZZ
@given(X=hnp.arrays(np.float64, st.tuples(st.integers(1, 20), st.just(4)),
                    elements=st.floats(allow_nan=True, allow_infinity=True, width=64)),
       labels=st.lists(st.integers(-1, 3), min_size=1, max_size=20),
       backend=st.sampled_from(fastmlp.trainer.BACKENDS), lr=st.floats(1e-3, 1e3))
def test_fit_valid_shapes_wild_values(X, labels, backend, lr):
    y = np.resize(np.array(labels), len(X))
    model = fastmlp.MLP([4, 5, 3], ["relu", "softmax"], seed=0)
    tr = fastmlp.Trainer(model, "cross_entropy", lr=lr, batch_size=4, backend=backend)
    try:
        with np.errstate(all="ignore"):
            h = tr.fit(X, y, epochs=3)
    except fastmlp.TrainingDiverged:
        pass
    except ValueError as e:
        assert not np.isfinite(X).all() or y.min() < 0 or y.max() > 2 or \
            "float32" in str(e), e
    else:
        assert np.isfinite(X).all() and 0 <= y.min() and y.max() <= 2
        assert all(np.isfinite(r["loss"]) for r in h.epochs)
    assert all(np.isfinite(p).all() for p in model.weights + model.biases)
