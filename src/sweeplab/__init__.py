"""sweeplab: train PyTorch models from Hydra configs and track them in MLflow."""

__version__ = "0.1.0"
