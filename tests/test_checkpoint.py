"""Checkpoints, resume to the same bytes, and Ctrl-C between batches."""
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import fastmlp

SIZES, ACTS = [784, 32, 16, 10], ["tanh", "tanh", "softmax"]


def data(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.random((n, 784)).astype(np.float32)
    X[rng.random(X.shape) < 0.8] = 0
    return X, rng.integers(0, 10, n)


def digest(model):
    return hashlib.sha256(b"".join(a.tobytes() for a in model.weights + model.biases)).hexdigest()


def trainer(backend, seed=0):
    return fastmlp.Trainer(fastmlp.MLP(SIZES, ACTS, seed=1), "cross_entropy", lr=0.1,
                           batch_size=32, seed=seed, backend=backend)


@pytest.mark.parametrize("backend", fastmlp.trainer.BACKENDS)
def test_resume_at_epoch_boundary_is_bit_identical(backend, tmp_path):
    X, y = data()
    straight = trainer(backend)
    h_straight = straight.fit(X, y, epochs=4)
    ck = tmp_path / "ck.npz"
    first = trainer(backend)
    first.fit(X, y, epochs=2, checkpoint=ck)
    second = trainer(backend)                     # a new process would start like this
    h = second.fit(X, y, epochs=4, checkpoint=ck, resume=True)
    assert digest(second.model) == digest(straight.model)
    assert [r["loss"] for r in h.epochs] == [r["loss"] for r in h_straight.epochs]
    assert len(h) == 4


def test_resume_refuses_a_different_run(tmp_path):
    X, y = data(500)
    ck = tmp_path / "ck.npz"
    trainer("numba").fit(X, y, epochs=1, checkpoint=ck)
    other = fastmlp.Trainer(fastmlp.MLP(SIZES, ACTS, seed=1), "cross_entropy", lr=0.2, batch_size=32)
    with pytest.raises(ValueError, match=r"checkpoint is from a different run.*'lr': \(0.1, 0.2\)"):
        other.fit(X, y, epochs=2, checkpoint=ck, resume=True)
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.npz: not a readable fastmlp checkpoint"):
        trainer("numba").fit(X, y, epochs=2, checkpoint=tmp_path / "bad.npz", resume=True)
    with pytest.raises(ValueError, match="resume: needs checkpoint"):
        trainer("numba").fit(X, y, epochs=2, resume=True)


@pytest.mark.parametrize("backend", fastmlp.trainer.BACKENDS)
def test_sigint_stops_between_batches_and_resume_matches(backend, tmp_path):
    X, y = data(20000)
    straight = trainer(backend)
    straight.fit(X, y, epochs=3)
    ck = tmp_path / "ck.npz"
    first = trainer(backend)
    first.fit(X, y, epochs=1)                    # compile outside the timed part
    first = trainer(backend)
    progress = []

    def interrupt_soon():
        while not progress:
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=interrupt_soon, daemon=True).start()
    with pytest.raises(fastmlp.TrainingInterrupted, match=r"interrupted at epoch \d, after batch \d+ of 625; "
                                                          r"checkpoint saved"):
        first.fit(X, y, epochs=3, checkpoint=ck, on_progress=progress.append)
    assert ck.exists()
    import json
    with np.load(ck) as z:
        state = json.loads(str(z["state"]))
    assert 0 < state["next_batch"] < 625 or state["epoch"] > 0
    # The time spent in the interrupted epoch so far is saved with it...
    assert state["seconds"] > 0 or state["next_batch"] == 0
    resumed = trainer(backend)
    h = resumed.fit(X, y, epochs=3, checkpoint=ck, resume=True)
    assert digest(resumed.model) == digest(straight.model)
    # ...and the resumed epoch reports at least that much.
    assert h.epochs[state["epoch"]]["seconds"] >= state["seconds"]


def test_cli_ctrl_c_saves_and_resume_finishes(mnist_dir, tmp_path):
    ck, final, ref = tmp_path / "ck.npz", tmp_path / "final.npz", tmp_path / "ref.npz"
    common = [sys.executable, "-m", "fastmlp.train", "--preset", "seed002", "--epochs", "3",
              "--data", mnist_dir, "--threads", "1"]
    proc = subprocess.Popen(common + ["--checkpoint", str(ck), "--save", str(final)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()                 # the header: training is about to start
    assert line.startswith("fastmlp")
    deadline = time.time() + 120
    while not ck.exists() and time.time() < deadline:   # after the first epoch
        time.sleep(0.02)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved to" in err and "Traceback" not in err
    r = subprocess.run(common + ["--checkpoint", str(ck), "--resume", "--save", str(final), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(common + ["--save", str(ref), "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert digest(fastmlp.load(final)) == digest(fastmlp.load(ref))
