"""Old home of :class:`DeflatedSLQ`: results saved before it moved into
:mod:`lanczos_ntk.spectral` name ``lanczos_ntk._deflated:DeflatedSLQ``, and still load.
"""

from .spectral import DeflatedSLQ, deflated_slq  # noqa: F401
