"""Plan a meta-step before running it: predicted peak memory and time per gradient mode, per device.

``mk.plan(model, learner, batch, device="a100-80gb")`` traces one meta-step per mode on fake tensors
(`metakit.planning.trace`), and evaluates it for a device (`metakit.planning.devices`).
The core: torch and torchopt only; transformers only where a caller builds a Hugging Face model.
"""

from metakit.planning.devices import DEVICES, Device, UnknownDeviceError, get_device
from metakit.planning.planner import Mode, Plan, PlanRow, default_modes, plan
from metakit.planning.trace import CostTracker, UntraceableError

__all__ = [
    "DEVICES",
    "CostTracker",
    "Device",
    "Mode",
    "Plan",
    "PlanRow",
    "UnknownDeviceError",
    "UntraceableError",
    "default_modes",
    "get_device",
    "plan",
]
