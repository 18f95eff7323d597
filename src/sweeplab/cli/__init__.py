"""The console commands ``sweeplab``, ``sweeplab-eval`` and ``sweeplab-runs``.

Each starts with the garbage collector off; the app turns it back on once its heavy imports are
done (``sweeplab.run.process.imports_done``). Nothing outside this package imports from it.
"""

import gc
import importlib
import sys

from sweeplab.run.process import imports_done


def sweeplab() -> None:
    """``sweeplab``: the run turns the collector back on once training and tracking are imported
    (``sweeplab.cli.train``), a sweep when it starts (``sweeplab.sweep.callback``)."""
    gc.disable()
    from sweeplab.cli.train import command

    command()


def _command(module: str) -> None:
    gc.disable()
    main = importlib.import_module(module).main
    imports_done()
    sys.exit(main())


def sweeplab_eval() -> None:
    _command("sweeplab.cli.eval")


def sweeplab_runs() -> None:
    _command("sweeplab.cli.runs")
