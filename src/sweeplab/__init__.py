"""sweeplab: train PyTorch models from Hydra configs and track them in MLflow."""

from pathlib import Path

__version__ = "0.1.0"

# The Hydra config groups; the app is run from a clone (editable install), beside src/.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"
