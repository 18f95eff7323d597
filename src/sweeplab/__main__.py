"""``python -m sweeplab``: the same as the ``sweeplab`` command."""

from sweeplab.cli import sweeplab

sweeplab()
