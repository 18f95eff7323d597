"""The Hydra config groups: the YAML read by ``sweeplab`` and ``sweeplab-eval``, installed as ``sweeplab.conf``."""
