"""``python -m lanczos_ntk`` is the same as the ``lanczos-ntk`` command."""

from .cli import main

main(prog_name="lanczos-ntk")
