"""bench.compare end to end on a reduced run, so that it cannot rot."""
import json

import pytest

from bench import compare


def test_compare_writes_table_json_and_chart(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    compare.main(["--configs", "seed002", "--epochs", "2", "--threads", "1", "--out", str(tmp_path),
                  "--peers", "fastmlp (numba),fastmlp (numpy reference),scikit-learn,Keras (CPU)",
                  "--estimator-epochs", "1", "--rounds", "1"])
    md = next(tmp_path.glob("*.md")).read_text()
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert next(tmp_path.glob("*.png")).stat().st_size > 1000
    assert data["gemm_gflops"] == max(data["gemm_gflops_ways"].values()) > 0
    ok = {r["peer"]: r for r in data["rows"] if r["status"] == "ok"}
    assert ok["fastmlp (numba)"]["test_accuracy"] > 0.9
    assert ok["fastmlp (numba)"]["fastmlp_speedup"] == pytest.approx(1.0)
    assert "fastmlp (numpy reference)" in md and "17.95 min" in md
    assert data["seed002"]["micro_averaged_accuracy"] == pytest.approx(
        0.8 + 0.2 * data["seed002"]["accuracy"], abs=1e-9)
    if "scikit-learn" in ok:      # same initial weights, same batches: the same accuracy
        assert abs(ok["scikit-learn"]["test_accuracy"] - ok["fastmlp (numba)"]["test_accuracy"]) < 0.005
    keras = [r for r in data["rows"] if r["peer"] == "Keras (CPU)"][0]
    assert keras["status"] == "ok" or keras["status"].startswith("not installed")
    if data["estimators"] and data["estimators"][0]["status"] == "ok":
        for e in data["estimators"]:
            assert e["test_accuracy"]["fastmlp"] > 0.85 and e["n_iter"]["fastmlp"] == 1
            assert abs(e["accuracy_gap_points"]) < 1.0      # same weights, same batches
        assert "fastmlp.MLPClassifier against scikit-learn" in md


def test_peers_see_fastmlps_batch_order():
    import numpy as np

    import fastmlp
    seen = []

    class Spy(fastmlp.trainer._NumpyEngine):
        def train_batches(self, order, *a, **k):
            seen.append(np.array(order))
            return super().train_batches(order, *a, **k)
    tr = fastmlp.Trainer(fastmlp.MLP([3, 2], "sigmoid"), lr=0.1, batch_size=4, seed=0, backend="numpy")
    tr._engine = Spy(tr.model, tr.loss, None)
    tr.fit(np.random.default_rng(1).random((10, 3)), np.zeros((10, 2)), epochs=3)
    for got, want in zip(seen, compare.batch_orders(10, 3)):
        np.testing.assert_array_equal(got, want)
