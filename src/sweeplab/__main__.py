"""``python -m sweeplab`` runs the same Hydra app as the ``sweeplab`` command."""

from sweeplab.cli import main

main()
