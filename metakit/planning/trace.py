"""Count what one traced computation costs: live tensor bytes, their peak, FLOPs and bytes moved.

`CostTracker` is a ``TorchDispatchMode``: every operation that reaches the dispatcher while it is
active passes through it, on fake tensors (``FakeTensorMode``, nothing is computed) or on real ones
alike. Memory is counted per storage: a storage is live from the operation that creates it until
its last reference dies (a ``weakref.finalize`` on the storage, whose Python object PyTorch keeps
for as long as the storage lives), so views, in-place updates and storages shared by several
tensors count once. What existed before (parameters, the batch) is excluded with `exclude`.

Fake tensors hold no values, so an operation that reads one (``.item()``, ``bool(t)``, a
data-dependent shape) cannot be traced. The one kind of read a training step routinely makes, a
check that losses or gradients are finite, is answered: the tracker assumes every value is finite
and follows that through ``isfinite``, ``~``, ``any``/``all``, ``stack`` and views. Any other read
raises `UntraceableError` naming the operation and the line of code that made it.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections import Counter
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["CostTracker", "OpCost", "UntraceableError"]

aten = torch.ops.aten

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default}
# Boolean operations that keep a known all-true / all-false value (views, copies, reductions, joins).
_KEEPS = {
    aten.any,
    aten.all,
    aten.stack,
    aten.cat,
    aten.clone,
    aten._to_copy,
    aten.logical_and,
    aten.logical_or,
    aten.bitwise_and,
    aten.bitwise_or,
    aten.min,
    aten.max,
    aten.amin,
    aten.amax,
}
_NEGATES = {aten.logical_not, aten.bitwise_not}
# What a healthy step gives: every value finite. Seen at the Python API: ``isfinite`` decomposes
# into several operations before it reaches the dispatcher.
_ASSUMED = {
    torch.isfinite: True,
    torch.isnan: False,
    torch.isinf: False,
    torch.Tensor.isfinite: True,
    torch.Tensor.isnan: False,
    torch.Tensor.isinf: False,
}
# Largest tensor (elements) whose real value is computed beside its fake: masks, labels, positions.
SHADOW_LIMIT = 1 << 20
_TORCH_DIR = os.path.dirname(torch.__file__)
_HERE = os.path.dirname(__file__)


class UntraceableError(RuntimeError):
    """An operation cannot run on fake tensors (it reads values, or has no fake/meta kernel).

    Attributes:
        op: the operation's name (``aten._local_scalar_dense``, ``mylib.op``...).
        where: ``file:line in function`` of the code that called it, outside PyTorch.
    """

    def __init__(self, op: str, where: str, reason: str):
        self.op, self.where, self.reason = op, where, reason
        super().__init__(f"{op} cannot be traced with fake tensors ({reason}), called at {where}")


@dataclass(frozen=True)
class OpCost:
    """One operation's work: FLOPs, bytes read and written, and whether it ran in 16-bit precision."""

    flops: int
    bytes: int
    low_precision: bool


class CostTracker(TorchDispatchMode):
    """Live bytes (and their peak), FLOPs and memory traffic of the operations run while active.

    Attributes:
        live: bytes of the storages created while active and still alive.
        peak: the largest ``live`` seen.
        ops: ``Counter`` of `OpCost` (identical operations merged): the work, for a time estimate.
        flops: total FLOPs (PyTorch's ``torch.utils.flop_counter`` formulas: matmuls, convolutions,
            attention).

    Example:
        >>> with FakeTensorMode() as fake, CostTracker() as cost:  # doctest: +SKIP
        ...     loss = model(x).sum(); loss.backward()
        >>> cost.peak, cost.flops  # doctest: +SKIP
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.flops = 0
        self.ops: Counter[OpCost] = Counter()
        self._sizes: dict[int, int] = {}
        self._excluded: set[int] = set()
        self._known: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._shadow: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def __enter__(self) -> CostTracker:
        self._checks = _FiniteChecks(self._known)
        self._checks.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self._checks.__exit__(None, None, None)
            raise

    def __exit__(self, *exc) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._checks.__exit__(*exc)

    def exclude(self, tensors) -> None:
        """Treat the storages of ``tensors`` as existing before: never counted as allocated."""
        for tensor in tensors:
            storage = _storage(tensor)
            if storage is not None and id(storage) not in self._excluded:
                self._excluded.add(id(storage))
                weakref.finalize(storage, self._excluded.discard, id(storage))

    def shadow(self, fake: torch.Tensor, real: torch.Tensor) -> None:
        """Give ``fake`` its real value (a batch's tensor), so values computed from it alone are known."""
        if real.numel() <= SHADOW_LIMIT:
            self._shadow[fake] = real

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS:
            known = self._known.get(args[0])
            if known is not None:
                return known
            if args[0] in self._shadow:
                with unset_fake_temporarily():
                    return func(self._shadow[args[0]])
        try:
            out = func(*args, **kwargs)
        except Exception as error:
            raise UntraceableError(_name(func), _caller(), _first_line(error)) from error
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self._allocate(outputs, inputs)
        self._propagate(func, inputs, outputs)
        self._compute_shadow(func, args, kwargs, out, inputs, outputs)
        if not func.is_view:
            self._count(func, args, kwargs, out, inputs, outputs)
        return out

    # -- memory -----------------------------------------------------------------------------------
    def _allocate(self, outputs, inputs) -> None:
        seen = {id(s) for s in map(_storage, inputs) if s is not None} | self._excluded
        for tensor in outputs:
            storage = _storage(tensor)
            if storage is None or id(storage) in seen or id(storage) in self._sizes:
                continue
            size = storage.nbytes()
            self._sizes[id(storage)] = size
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, id(storage))

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    # -- work -------------------------------------------------------------------------------------
    def _count(self, func, args, kwargs, out, inputs, outputs) -> None:
        formula = flop_registry.get(func.overloadpacket)
        flops = int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0
        self.flops += flops
        moved = sum(t.numel() * t.element_size() for t in (*inputs, *outputs))
        low = any(t.dtype in _LOW_PRECISION for t in outputs)
        self.ops[OpCost(flops, moved, low)] += 1

    # -- values a fake tensor does not have: finiteness checks ------------------------------------
    def _propagate(self, func, inputs, outputs) -> None:
        if len(outputs) != 1 or outputs[0].dtype != torch.bool:
            return
        packet = func.overloadpacket
        known = {self._known.get(t) for t in inputs if t.dtype == torch.bool}
        if len(known) != 1 or None in known or len(inputs) == 0:
            return
        (value,) = known
        if packet in _NEGATES:
            value = not value
        elif packet not in _KEEPS and not func.is_view:
            return
        self._known[outputs[0]] = value

    # -- values the batch alone determines: computed for real beside the fake ----------------------
    def _compute_shadow(self, func, args, kwargs, out, inputs, outputs) -> None:
        shadowed = all(t in self._shadow for t in inputs)
        small = outputs and all(t.numel() <= SHADOW_LIMIT for t in outputs)
        if not (shadowed and small):
            if func._schema.is_mutable:  # a shadowed tensor updated from fake values: its value is lost
                for tensor in inputs:
                    self._shadow.pop(tensor, None)
            return
        real_args, real_kwargs = tree_map_only(torch.Tensor, self._shadow.__getitem__, (args, kwargs))
        with unset_fake_temporarily():
            real_out = func(*real_args, **real_kwargs)
        real_outputs = [t for t in tree_leaves(real_out) if isinstance(t, torch.Tensor)]
        for fake, real in zip(outputs, real_outputs, strict=False):
            self._shadow[fake] = real


class _FiniteChecks(TorchFunctionMode):
    """Mark the result of ``isfinite``/``isnan``/``isinf`` as all true / all false (a healthy step)."""

    def __init__(self, known: WeakIdKeyDictionary):
        super().__init__()
        self.known = known

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _ASSUMED and isinstance(out, torch.Tensor):
            self.known[out] = _ASSUMED[func]
        return out


def _storage(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested, storage-less subclasses
        return None
    return storage if storage.nbytes() > 0 else None


def _name(func) -> str:
    return f"{func.namespace}.{func._opname}" if hasattr(func, "namespace") else str(func)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _caller() -> str:
    """``file:line in function`` of the innermost frame outside PyTorch and this package."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if not (path.startswith(_TORCH_DIR) or path.startswith(_HERE)):
            return f"{os.path.relpath(path) if not path.startswith('<') else path}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return "an unknown place"
