"""metakit: higher-order-gradient meta-learning for PyTorch.

Compose a meta-learner from a model, a loss, an :class:`InnerLoop`, the outer parameters (a
:class:`Spec`) and a :class:`Strategy`; see ``DESIGN.md`` for the architecture.
"""

from metakit.functional import bind, double_backward_safe
from metakit.spec import Spec, combine, everything, explain, module_type, nothing, regex, select

__version__ = "0.1.0"

__all__ = [
    "Spec",
    "bind",
    "combine",
    "double_backward_safe",
    "everything",
    "explain",
    "module_type",
    "nothing",
    "regex",
    "select",
]
