"""Checkpoint files: the model plus the trainer's state, as .npz without pickles."""
import json
import os

import numpy as np

from ._io import atomic_write
from .model import FORMAT_VERSION
from .optimizers import SGD

MARKER = "fastmlp-checkpoint"


def _config(trainer, n_samples):
    m = trainer.model
    return {"layer_sizes": m.layer_sizes, "activations": m.activations, "dtype": m.dtype.name,
            "loss": trainer.loss, "lr": trainer.lr, "batch_size": trainer.batch_size,
            "shuffle": trainer.shuffle, "n_samples": n_samples, **trainer.optimizer.config()}


def save(path, trainer, n_samples, state):
    """Write model parameters and state atomically (temporary file, fsync, rename)."""
    meta = {"config": _config(trainer, n_samples), "epoch": state.epoch,
            "next_batch": state.next_batch, "total": state.total, "correct": state.correct,
            "seconds": state.seconds, "rng_state": state.rng_state, "history": state.history.epochs}
    arrays = {"format": np.array(MARKER), "format_version": np.array(FORMAT_VERSION),
              "state": np.array(json.dumps(meta))}
    for i, (W, b) in enumerate(zip(trainer.model.weights, trainer.model.biases)):
        arrays[f"W{i}"], arrays[f"b{i}"] = W, b
    arrays.update(trainer.optimizer.state_arrays())
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def load(path, trainer, n_samples):
    """Restore the model's parameters from `path` and return the saved state, after
    checking that it was written by a run with the same configuration."""
    from .trainer import History, _State
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:
        raise ValueError(f"{path}: not a readable fastmlp checkpoint (truncated, corrupted, "
                         f"pickled or not .npz): {e}") from None
    if "format" not in data or str(data["format"]) != MARKER:
        raise ValueError(f"{path}: not a fastmlp checkpoint (no '{MARKER}' marker)")
    if int(data["format_version"]) > FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {int(data['format_version'])} is "
                         f"newer than this fastmlp reads ({FORMAT_VERSION})")
    try:
        meta = json.loads(str(data["state"]))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: checkpoint state is missing or malformed: {e}") from None
    want = _config(trainer, n_samples)
    # Checkpoints written before optimisers existed were plain SGD.
    saved = {"optimizer": "sgd", "alpha": 0.0, **meta.get("config", {})}
    if saved != want:
        diff = {k: (saved.get(k), v) for k, v in want.items() if saved.get(k) != v}
        raise ValueError(f"{path}: checkpoint is from a different run; (saved, now) differ in "
                         f"{diff}")
    m = trainer.model
    for i in range(len(m.weights)):
        W, b = data.get(f"W{i}"), data.get(f"b{i}")
        if W is None or b is None or W.shape != m.weights[i].shape or b.shape != m.biases[i].shape:
            raise ValueError(f"{path}: checkpoint layer {i + 1} parameters are missing or of the "
                             f"wrong shape")
        m.weights[i][...] = W
        m.biases[i][...] = b
    if trainer.optimizer.code != SGD or "opt_step" in data:
        trainer.optimizer.load_state_arrays(data, m.weights, m.biases, path)
    history = History()
    for record in meta["history"]:
        history.append(record)
    return _State(meta["epoch"], meta["next_batch"], meta["total"], meta["correct"],
                  meta["seconds"], meta["rng_state"], history)
