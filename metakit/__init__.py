"""metakit: higher-order-gradient meta-learning for PyTorch.

Compose a meta-learner from a model, a loss, an :class:`InnerLoop`, the outer parameters (a
:class:`Spec`) and a :class:`Strategy`; see ``DESIGN.md`` for the architecture.
"""

from metakit import tasks
from metakit.functional import bind, double_backward_safe
from metakit.inner import InnerLoop, InnerLossError
from metakit.learner import MetaLearner, MetaStepResult
from metakit.spec import Spec, combine, everything, explain, module_type, nothing, regex, select
from metakit.strategies import FirstOrder, Implicit, Reptile, SecondOrder, Strategy, Truncated
from metakit.task import Task

__version__ = "0.1.0"

__all__ = [
    "FirstOrder",
    "Implicit",
    "InnerLoop",
    "InnerLossError",
    "MetaLearner",
    "MetaStepResult",
    "Reptile",
    "SecondOrder",
    "Spec",
    "Strategy",
    "Task",
    "Truncated",
    "bind",
    "combine",
    "double_backward_safe",
    "everything",
    "explain",
    "module_type",
    "nothing",
    "regex",
    "select",
    "tasks",
]
