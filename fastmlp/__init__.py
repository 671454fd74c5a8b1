"""fastmlp: train multi-layer perceptrons fast on a CPU, with math you can check.

    import fastmlp
    model = fastmlp.MLP([784, 64, 32, 16, 10], activations="sigmoid", seed=0)
    trainer = fastmlp.Trainer(model, loss="squared_error", lr=3.0, batch_size=100, seed=0)
    history = trainer.fit(X, y, epochs=3)
"""
from . import activations, data, losses, metrics, optimizers, reference
from .data import load_mnist
from .model import MLP, load
from .trainer import History, Trainer, TrainingDiverged, TrainingInterrupted, gradients

__version__ = "0.1.0"


def __getattr__(name):
    # The scikit-learn estimator loads sklearn only when asked for, so that
    # `import fastmlp` never needs it.
    if name == "MLPClassifier":
        try:
            from ._sklearn import MLPClassifier
        except ImportError as e:
            raise ImportError("fastmlp.MLPClassifier needs scikit-learn: pip install "
                              f"\"fastmlp[sklearn]\" ({e})") from e
        return MLPClassifier
    raise AttributeError(f"module 'fastmlp' has no attribute {name!r}")


__all__ = ["MLP", "Trainer", "History", "TrainingDiverged", "TrainingInterrupted", "gradients", "load", "load_mnist",
           "activations", "losses", "metrics", "optimizers", "reference", "data", "MLPClassifier",
           "__version__"]
