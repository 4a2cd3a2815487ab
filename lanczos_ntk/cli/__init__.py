"""The ``lanczos-ntk`` command line: ``demo``, ``spectrum``, ``density``, ``sweep``, ``bifurcate``.

Only this package prints, shows progress bars (on stderr) and writes files; it drives the
library's functions, saves their result objects in a run folder and draws the figures with
:mod:`lanczos_ntk.plotting` on the Agg backend. Experiment commands living elsewhere (such as
``teacher`` in :mod:`lanczos_ntk.cli_teacher`) are registered here with ``main.add_command``.
"""

from . import _sweep  # noqa: F401  (registers the sweep and demo commands)
from ._main import CliError, main

try:
    from ..cli_teacher import teacher_command
except ImportError:  # pragma: no cover - the experiment module is optional
    pass
else:
    main.add_command(teacher_command, "teacher")

__all__ = ["CliError", "main"]
