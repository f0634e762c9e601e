"""metakit: higher-order-gradient meta-learning for PyTorch.

Compose a meta-learner from a model, a loss, an :class:`InnerLoop`, the outer parameters (a
:class:`Spec`) and a :class:`Strategy`; ``docs/architecture.md`` describes the architecture.
"""

from metakit import executors, tasks
from metakit.capabilities import Capabilities, CompositionError
from metakit.functional import bind, double_backward_safe
from metakit.implicit import ImplicitResidualError, ImplicitResidualWarning
from metakit.inner import InnerLoop, InnerLossError
from metakit.lean import ForwardModeError
from metakit.learner import MetaLearner, MetaStepResult
from metakit.preflight import Finding, Report, check
from metakit.problem import Partition, TaskGradient, TaskProblem
from metakit.prototype import PrototypeClassifier, PrototypeHead, prototype_loss, prototype_task
from metakit.reuse import Cut, CutError
from metakit.spec import Spec, combine, everything, explain, module_type, nothing, regex, select
from metakit.strategies import FirstOrder, Implicit, Reptile, SecondOrder, Strategy, Truncated, Unrolled
from metakit.task import Task

__version__ = "0.1.0"

__all__ = [
    "Capabilities",
    "CompositionError",
    "Cut",
    "CutError",
    "Finding",
    "FirstOrder",
    "ForwardModeError",
    "Implicit",
    "ImplicitResidualError",
    "ImplicitResidualWarning",
    "InnerLoop",
    "InnerLossError",
    "MetaLearner",
    "MetaStepResult",
    "Partition",
    "PrototypeClassifier",
    "PrototypeHead",
    "Report",
    "Reptile",
    "SecondOrder",
    "Spec",
    "Strategy",
    "Task",
    "TaskGradient",
    "TaskProblem",
    "Truncated",
    "Unrolled",
    "bind",
    "check",
    "combine",
    "double_backward_safe",
    "everything",
    "executors",
    "explain",
    "module_type",
    "nothing",
    "prototype_loss",
    "prototype_task",
    "regex",
    "select",
    "tasks",
]
