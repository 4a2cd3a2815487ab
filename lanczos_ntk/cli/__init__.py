"""The ``lanczos-ntk`` command line: ``demo``, ``spectrum``, ``density``, ``sweep``, ``bifurcate``,
``teacher``, ``landscapes``, ``track``.

Only this package prints, shows progress bars (on stderr) and writes files; it drives the
library's functions, saves their result objects in a run folder and draws the figures with
:mod:`lanczos_ntk.plotting` on the Agg backend. :mod:`._app` holds the command group and what
the commands share (options, configuration, run folder, errors, progress); each command lives in
its own module and registers itself on the group when imported here.
"""

from . import _bifurcate, _landscape, _spectrum, _sweep, _teacher, _track  # noqa: F401  (register)
from ._app import CliError, main

__all__ = ["CliError", "main"]
