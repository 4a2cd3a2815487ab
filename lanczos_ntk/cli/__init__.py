"""The ``lanczos-ntk`` command line: ``demo``, ``spectrum``, ``density``, ``sweep``, ``bifurcate``,
``teacher``, ``landscapes``.

Only this package prints, shows progress bars (on stderr) and writes files; it drives the
library's functions, saves their result objects in a run folder and draws the figures with
:mod:`lanczos_ntk.plotting` on the Agg backend. The ``teacher`` experiment's command lives in
``_teacher.py``, the normal-form landscapes' in ``_landscape.py``; both are registered here.
"""

from . import _sweep  # noqa: F401  (registers the sweep and demo commands)
from ._landscape import landscapes_command
from ._main import CliError, main
from ._teacher import teacher_command

main.add_command(teacher_command, "teacher")
main.add_command(landscapes_command, "landscapes")

__all__ = ["CliError", "main"]
