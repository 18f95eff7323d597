"""``python -m sweeplab``: the same as the ``sweeplab`` command."""

from sweeplab.commands import sweeplab

sweeplab()
