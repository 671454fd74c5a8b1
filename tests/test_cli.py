import json
import subprocess
import sys

import pytest

from fastmlp import train


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fastmlp.train", *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_help_explains_every_flag():
    r = run("--help")
    assert r.returncode == 0
    for flag in ("--preset", "--layers", "--activations", "--loss", "--epochs", "--batch-size", "--lr",
                 "--seed", "--dtype", "--backend", "--threads", "--data", "--save", "--report", "--quiet",
                 "--optimizer", "--momentum", "--nesterov", "--beta1", "--beta2", "--epsilon", "--alpha"):
        assert flag in r.stdout


@pytest.mark.parametrize("args,message", [
    (["--lr", "-1"], "--lr: expected a number > 0"),
    (["--epochs", "0"], "--epochs: expected a number > 0"),
    (["--layers", "784,x,10"], "--layers: expected comma-separated integers"),
    (["--activations", "swish"], "unknown activation 'swish'"),
    (["--backend", "gpu"], "invalid choice: 'gpu'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    (["--momentum", "1.5"], "--momentum: expected a number in [0, 1]"),
    (["--beta2", "1"], "--beta2: expected a number in [0, 1)"),
    (["--alpha", "-0.1"], "--alpha: expected a finite number >= 0"),
])
def test_bad_flags_exit_2(args, message):
    r = run(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_api_errors_exit_2_without_traceback(mnist_dir):
    r = run("--data", mnist_dir, "--layers", "784,10,9", "--epochs", "1")
    assert r.returncode == 2 and "--layers: MNIST needs 784 inputs and 10 outputs" in r.stderr
    r = run("--data", mnist_dir, "--activations", "relu,softmax,relu,sigmoid", "--epochs", "1")
    assert r.returncode == 2 and "softmax is only allowed on the output layer" in r.stderr
    r = run("--data", "/nonexistent/place", "--epochs", "1")
    assert r.returncode == 2 and "no such file or directory" in r.stderr and "Traceback" not in r.stderr


def test_preset_resolution():
    args = train.build_parser().parse_args(["--preset", "seed002"])
    cfg = train.resolve(args)
    assert cfg["layers"] == [784, 32, 16, 10] and cfg["activations"] == ["tanh", "tanh", "softmax"]
    assert cfg["loss"] == "cross_entropy" and cfg["batch_size"] == 32 and cfg["lr"] == 0.1 and cfg["epochs"] == 5
    default = train.resolve(train.build_parser().parse_args([]))
    assert default["layers"] == [784, 64, 32, 16, 10] and default["activations"] == "sigmoid"
    assert default["loss"] == "squared_error" and default["batch_size"] == 100
    override = train.resolve(train.build_parser().parse_args(["--lr", "0.5", "--activations", "relu"]))
    assert override["lr"] == 0.5 and override["activations"] == "relu"


def test_seed002_one_epoch_report_and_save(mnist_dir, tmp_path):
    report, model = tmp_path / "r.json", tmp_path / "m.npz"
    r = run("--preset", "seed002", "--epochs", "1", "--data", mnist_dir, "--report", str(report),
            "--save", str(model), "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "epoch   1/1" in r.stdout and "samples/s" in r.stdout
    assert "confusion matrix" in r.stdout
    rep = json.loads(report.read_text())
    assert rep["test"]["accuracy"] >= 0.93
    assert set(rep["test"]) >= {"accuracy", "loss", "precision_macro", "recall_macro", "confusion_matrix"}
    assert rep["config"]["backend"] == "numba" and rep["config"]["threads"] == 1
    assert len(rep["history"]) == 1 and rep["history"][0]["samples_per_second"] > 0
    assert "numba" in rep["versions"]
    import fastmlp
    m = fastmlp.load(model)
    assert m.layer_sizes == [784, 32, 16, 10]
    assert sum(sum(row) for row in rep["test"]["confusion_matrix"]) == 10000


def test_quiet_prints_only_summary(mnist_dir):
    r = run("--preset", "seed002", "--epochs", "1", "--data", mnist_dir, "--quiet", "--batch-size", "128",
            "--lr", "0.3")
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("test accuracy")
    assert r.stderr == ""


def test_adam_and_nesterov_from_the_command_line(mnist_dir, tmp_path):
    report = tmp_path / "r.json"
    r = run("--preset", "seed002", "--epochs", "1", "--data", mnist_dir, "--quiet", "--optimizer",
            "adam", "--lr", "0.003", "--alpha", "0.0001", "--report", str(report))
    assert r.returncode == 0, r.stderr
    rep = json.loads(report.read_text())
    assert rep["config"]["optimizer"] == "adam" and rep["config"]["beta_2"] == 0.999
    assert rep["config"]["alpha"] == 0.0001 and rep["test"]["accuracy"] >= 0.93
    r = run("--preset", "seed002", "--epochs", "1", "--data", mnist_dir, "--quiet", "--optimizer",
            "momentum", "--nesterov", "--momentum", "0.9", "--lr", "0.01")
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split()[2]) >= 0.93       # "test accuracy 0.95..."
