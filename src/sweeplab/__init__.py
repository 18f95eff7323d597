"""sweeplab: train PyTorch models from Hydra configs and track them in MLflow."""

__version__ = "0.1.0"

# The Hydra config groups: the repo's top-level conf/, installed as the package sweeplab.conf.
CONFIG_MODULE = f"{__name__}.conf"
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"
