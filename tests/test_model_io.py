import os
import signal
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

import fastmlp


def test_roundtrip(tmp_path):
    m = fastmlp.MLP([6, 5, 4, 3], ["relu", "tanh", "softmax"], dtype="float64", seed=3)
    p = tmp_path / "m.npz"
    m.save(p)
    r = fastmlp.load(p)
    assert r.layer_sizes == m.layer_sizes and r.activations == m.activations and r.dtype == m.dtype
    for a, b in zip(m.weights + m.biases, r.weights + r.biases):
        np.testing.assert_array_equal(a, b)
    X = np.random.default_rng(0).normal(size=(4, 6))
    np.testing.assert_array_equal(m.predict_proba(X), r.predict_proba(X))
    assert not [f for f in os.listdir(tmp_path) if f != "m.npz"]     # no temp file left


def test_bad_files(tmp_path):
    good = tmp_path / "good.npz"
    fastmlp.MLP([3, 2], "softmax").save(good)
    raw = good.read_bytes()
    cases = {
        "truncated.npz": raw[: len(raw) // 2],
        "empty.npz": b"",
        "text.npz": b"hello",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name}: not a readable fastmlp model file"):
            fastmlp.load(tmp_path / name)
    np.savez(tmp_path / "foreign.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="foreign.npz: not a fastmlp model file"):
        fastmlp.load(tmp_path / "foreign.npz")
    with np.load(good) as z:
        d = dict(z)
    d["format_version"] = np.array(99)
    np.savez(tmp_path / "newer.npz", **d)
    with pytest.raises(ValueError, match="newer.npz: model format version 99 is newer"):
        fastmlp.load(tmp_path / "newer.npz")
    d["format_version"] = np.array(1)
    d["W0"] = np.zeros((4, 2))
    np.savez(tmp_path / "shape.npz", **d)
    with pytest.raises(ValueError, match=r"layer 1 has weights \(4, 2\)"):
        fastmlp.load(tmp_path / "shape.npz")


def test_pickled_content_is_never_executed(tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    with np.load(_model_file(tmp_path)) as z:
        d = dict(z)
    d["W0"] = np.array([Evil()], dtype=object)
    np.savez(tmp_path / "evil.npz", **d)
    with pytest.raises(ValueError, match="evil.npz"):
        fastmlp.load(tmp_path / "evil.npz")
    assert not marker.exists()


def _model_file(tmp_path):
    p = tmp_path / "base.npz"
    fastmlp.MLP([3, 2], "softmax").save(p)
    return p


def test_killed_writer_leaves_old_file_intact(tmp_path):
    """A writer killed in the middle of save() never leaves a half-written model."""
    target = tmp_path / "model.npz"
    fastmlp.MLP([3, 2], "softmax", seed=1).save(target)
    before = target.read_bytes()
    script = textwrap.dedent(f"""
        import os, sys, numpy as np, fastmlp
        import fastmlp._io as io
        real_fsync = os.fsync
        def stall(fd):
            print("writing", flush=True)
            sys.stdin.readline()          # the parent kills us here, mid-write
            real_fsync(fd)
        os.fsync = stall
        fastmlp.MLP([300, 200], "softmax", seed=2).save({str(target)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert target.read_bytes() == before
    assert fastmlp.load(target).layer_sizes == [3, 2]
    leftovers = [f for f in os.listdir(tmp_path) if f != "model.npz"]
    assert all(f.startswith(".model.npz.") and f.endswith(".tmp") for f in leftovers)
    assert zipfile.is_zipfile(target)
