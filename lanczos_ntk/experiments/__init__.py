"""Experiments: library code that runs a whole study and returns its results.

* :mod:`lanczos_ntk.experiments.teacher` — the student–teacher experiment (a student learns a
  pitchfork and its sNTK collapses on the way);
* :mod:`lanczos_ntk.experiments.sweep` — the spectral summary of one operator and the parameter
  sweep of the ``sweep`` / ``demo`` commands.

Nothing here prints or writes files; the command line (:mod:`lanczos_ntk.cli`) does.
"""
