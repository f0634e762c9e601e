"""metakit: higher-order-gradient meta-learning for PyTorch.

Compose a meta-learner from a model, a loss, an `InnerLoop`, the outer parameters (a
`Spec`) and a `Strategy`; ``docs/architecture.md`` describes the architecture. The core
needs torch and torchopt only; ``metakit.peft`` (Hugging Face models), ``metakit.logging``
(TensorBoard), ``metakit.experiments`` and ``metakit.bench`` come with extras
(``pip install 'metakit[hf]'``, ``[tensorboard]``, ``[experiments]``, ``[bench]``).
"""

import importlib
import warnings
from typing import Any

from metakit import executors, recipes, tasks
from metakit.capabilities import Capabilities, CompositionError
from metakit.functional import bind, double_backward_safe
from metakit.implicit import ImplicitResidualError, ImplicitResidualWarning
from metakit.inner import InnerLoop, InnerLossError
from metakit.lean import ForwardModeError
from metakit.learner import MetaLearner, MetaStepResult
from metakit.planning import Device, Plan, plan
from metakit.preflight import Report, check
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
    "Device",
    "FirstOrder",
    "ForwardModeError",
    "Implicit",
    "ImplicitResidualError",
    "ImplicitResidualWarning",
    "InnerLoop",
    "InnerLossError",
    "MetaLearner",
    "MetaStepResult",
    "Plan",
    "Report",
    "Reptile",
    "SecondOrder",
    "Spec",
    "Strategy",
    "Task",
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
    "peft",
    "plan",
    "recipes",
    "regex",
    "select",
    "tasks",
]

# Names that left the top level: they still work for one release, with a DeprecationWarning.
_MOVED = {
    "Finding": "metakit.preflight",
    "Partition": "metakit.problem",
    "TaskGradient": "metakit.problem",
    "TaskProblem": "metakit.problem",
    "PrototypeClassifier": "metakit.prototype",
    "PrototypeHead": "metakit.prototype",
    "prototype_loss": "metakit.prototype",
    "prototype_task": "metakit.prototype",
}


def __getattr__(name: str) -> Any:
    if name == "peft":  # PE modules for Hugging Face models; imported on first use
        return importlib.import_module("metakit.peft")
    if name in _MOVED:
        warnings.warn(
            f"metakit.{name} is no longer a top-level name; import it from {_MOVED[name]} "
            "(the old name goes away in the next release).",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'metakit' has no attribute {name!r}")
