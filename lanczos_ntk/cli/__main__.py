"""``python -m lanczos_ntk.cli`` is the same as the ``lanczos-ntk`` command."""

from . import main

main(prog_name="lanczos-ntk")
