"""fastmlp: train multi-layer perceptrons fast on a CPU, with math you can check.

    import fastmlp
    model = fastmlp.MLP([784, 64, 32, 16, 10], activations="sigmoid", seed=0)
    trainer = fastmlp.Trainer(model, loss="squared_error", lr=3.0, batch_size=100, seed=0)
    history = trainer.fit(X, y, epochs=3)
"""
from . import activations, data, losses, metrics, reference
from .data import load_mnist
from .model import MLP, load
from .trainer import History, Trainer, TrainingDiverged, TrainingInterrupted, gradients

__version__ = "0.1.0"
__all__ = ["MLP", "Trainer", "History", "TrainingDiverged", "TrainingInterrupted", "gradients", "load", "load_mnist",
           "activations", "losses", "metrics", "reference", "data", "__version__"]
