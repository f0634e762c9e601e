"""Exact meta-gradients whose memory hardly grows with the number of inner steps.

Two ways to run the differentiated inner steps of :class:`~metakit.SecondOrder` without keeping
every step's activations until the outer backward pass:

- :func:`unroll_forward_over_reverse` (``SecondOrder(hvp="forward")``, MixFlow-MG, Kemaev et al.
  2025). Each inner step is one custom autograd op. Its forward computes the update with a plain,
  first-order gradient and keeps only the step's inputs (inner parameters, optimizer state) and
  that gradient. Its backward pulls the adjoint through the optimizer's update by reverse mode
  (cheap, elementwise), which gives the adjoint ``v`` of the inner gradient, and then forms the
  Hessian terms ``H_pp v`` and the mixed term ``H_cp v`` (context ``c``: outer-only parameters) in
  one forward-over-reverse pass, ``torch.func.jvp`` of ``torch.func.grad`` of the support loss
  along ``v``. Memory: S × (inner parameters + optimizer state + gradient) plus one step's
  activations.
- :func:`unroll_checkpointed` (``SecondOrder(checkpoint=k)``): the usual reverse-over-reverse
  graph, recomputed in segments of ``k`` steps during the backward pass, each segment freed once its
  adjoints are through. Memory grows like S/k segment boundaries plus one segment's k steps.

Both give the same meta-gradient as differentiating a ``create_graph=True`` unroll. Random ops
(dropout) see the same random numbers when a step is recomputed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optree
import torch

from metakit.functional import double_backward_safe
from metakit.inner import (
    Adaptation,
    InnerLoop,
    Objective,
    check_finite_trace,
    check_scalar_loss,
    fresh_leaves,
)

__all__ = ["ForwardModeError", "unroll_checkpointed", "unroll_forward_over_reverse"]

Params = dict[str, torch.Tensor]


class ForwardModeError(RuntimeError):
    """An operation in the model has no forward-mode derivative, which ``hvp="forward"`` needs."""


_NO_FORWARD_RULE = re.compile(r"forward AD with (\S+?)(?: that does not support it|\b)")


def forward_mode_error(error: BaseException) -> ForwardModeError | None:
    """A :class:`ForwardModeError` naming the operation, if ``error`` is PyTorch's missing-rule error."""
    text = str(error)
    if "ZeroTensors are immutable" in text:
        return ForwardModeError(
            "SecondOrder(hvp='forward') differentiates the support loss's gradient in forward mode, and "
            "an operation's forward-mode rule failed inside PyTorch ('ZeroTensors are immutable'). A known "
            "case is torch.nn.functional.mse_loss: write ((prediction - target) ** 2).mean() instead. "
            "Or use SecondOrder(checkpoint=k), also exact and memory-lean."
        )
    if not any(marker in text for marker in ("forward AD", "forward mode AD", "forward-mode AD")):
        return None
    match = _NO_FORWARD_RULE.search(text)
    operation = match.group(1) if match else _custom_function_in(error) or "an operation"
    return ForwardModeError(
        f"SecondOrder(hvp='forward') needs a forward-mode derivative of every operation in the inner "
        f"loss, but {operation} has none in this PyTorch build ({text.splitlines()[0]}). Use "
        "SecondOrder(checkpoint=k) for an exact meta-gradient with low memory instead, or "
        "SecondOrder() (reverse over reverse)."
    )


def _custom_function_in(error: BaseException) -> str | None:
    """The custom ``autograd.Function`` whose missing ``jvp`` raised ``error``, from its traceback."""
    traceback = error.__traceback__
    found = None
    while traceback is not None:
        ctx = traceback.tb_frame.f_locals.get("ctx")
        if ctx is not None and type(ctx).__name__.endswith("Backward"):
            found = f"the custom autograd.Function {type(ctx).__name__.removesuffix('Backward')}"
        traceback = traceback.tb_next
    return found


# -- shared plumbing ------------------------------------------------------------------------------
@dataclass
class _Layout:
    """How one step's tensors are laid out in a flat argument list of an autograd op."""

    param_names: list[str]
    state_spec: Any
    state_is_float: list[bool]
    context_names: list[str]
    lr_names: list[str]

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        return len(self.param_names), len(self.state_is_float), len(self.context_names), len(self.lr_names)

    def split(self, flat: Sequence[Any]) -> tuple[list, list, list, list]:
        n_p, n_s, n_c, n_lr = self.sizes
        flat = list(flat)
        return (
            flat[:n_p],
            flat[n_p : n_p + n_s],
            flat[n_p + n_s : n_p + n_s + n_c],
            flat[n_p + n_s + n_c : n_p + n_s + n_c + n_lr],
        )

    def params(self, tensors: Sequence[torch.Tensor]) -> Params:
        return dict(zip(self.param_names, tensors, strict=True))

    def context(self, tensors: Sequence[torch.Tensor]) -> Params:
        return dict(zip(self.context_names, tensors, strict=True))

    def lr_scales(self, tensors: Sequence[torch.Tensor]) -> Params | None:
        return dict(zip(self.lr_names, tensors, strict=True)) if self.lr_names else None

    def state(self, leaves: Sequence[torch.Tensor]) -> Any:
        return optree.tree_unflatten(self.state_spec, list(leaves))


def _layout(
    params: Params, state: Any, context_live: Params, lr_scales: Mapping | None
) -> tuple[_Layout, list]:
    leaves, spec = optree.tree_flatten(state)
    if not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
        kinds = sorted({type(leaf).__name__ for leaf in leaves if not isinstance(leaf, torch.Tensor)})
        raise TypeError(
            f"the inner optimizer's state holds non-tensor leaves ({kinds}); metakit cannot run it step by step."
        )
    layout = _Layout(
        param_names=list(params),
        state_spec=spec,
        state_is_float=[leaf.is_floating_point() for leaf in leaves],
        context_names=list(context_live),
        lr_names=list(lr_scales or {}),
    )
    return layout, leaves


def _split_context(context: Mapping[str, torch.Tensor]) -> tuple[Params, Params]:
    """(tensors the meta-gradient flows into, constants)."""
    live = {name: value for name, value in context.items() if value.requires_grad}
    constants = {name: value.detach() for name, value in context.items() if not value.requires_grad}
    return live, constants


class _RandomState:
    """The RNG state at a step's start, so that recomputing the step draws the same numbers."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    def restored(self):
        fork = torch.random.fork_rng(devices=self.devices)

        class _Restore:
            def __enter__(inner_self):
                fork.__enter__()
                torch.set_rng_state(self.cpu)
                for device, state in zip(self.devices, self.cuda, strict=True):
                    torch.cuda.set_rng_state(state, device)

            def __exit__(inner_self, *exc):
                return fork.__exit__(*exc)

        return _Restore()


# -- forward over reverse -------------------------------------------------------------------------
@dataclass
class _Step:
    """The non-tensor part of one forward-over-reverse step."""

    inner: InnerLoop
    objective: Objective
    batch: Any
    constants: Params
    layout: _Layout
    where: str
    random: _RandomState | None = None


class _ForwardOverReverseStep(torch.autograd.Function):
    """One inner step whose backward forms Hessian-vector products by forward over reverse mode."""

    @staticmethod
    def forward(ctx, step: _Step, *flat: torch.Tensor):  # type: ignore[override]
        layout = step.layout
        params, state_leaves, context, lr = layout.split(flat)
        step.random = _RandomState(list(params) + list(context))
        with torch.enable_grad():  # an autograd.Function's forward runs with grad mode off
            leaves = [p.detach().requires_grad_(True) for p in params]
            loss = step.objective(
                {**step.constants, **layout.context([c.detach() for c in context]), **layout.params(leaves)},
                step.batch,
            )
            check_scalar_loss(loss, step.where)
            grads = torch.autograd.grad(loss, leaves)
        new_params, new_state = step.inner.update(
            layout.params(grads),
            layout.state(state_leaves),
            layout.params([p.detach() for p in params]),
            layout.lr_scales([s.detach() for s in lr]),
        )
        new_leaves = optree.tree_leaves(new_state)
        loss = loss.detach()
        ctx.step = step
        ctx.save_for_backward(*params, *state_leaves, *context, *lr, *grads)
        ctx.mark_non_differentiable(
            loss,
            *(leaf for leaf, is_float in zip(new_leaves, layout.state_is_float, strict=True) if not is_float),
        )
        return (*new_params.values(), *new_leaves, loss)

    @staticmethod
    def backward(ctx, *adjoints: torch.Tensor | None):  # type: ignore[override]
        step: _Step = ctx.step
        layout = step.layout
        n_p, n_s, n_c, n_lr = layout.sizes
        saved = ctx.saved_tensors
        params, state_leaves, context, lr = layout.split(saved)
        grads = saved[n_p + n_s + n_c + n_lr :]
        adj_params = [_or_zeros(a, p) for a, p in zip(adjoints[:n_p], params, strict=True)]
        adj_state = list(adjoints[n_p : n_p + n_s])

        # 1. Reverse mode through the optimizer's update (elementwise): adjoints of the gradient,
        #    of the parameters' direct path, of the state and of the MetaSGD scales.
        with torch.enable_grad():
            g_in = [g.detach().requires_grad_(True) for g in grads]
            p_in = [p.detach().requires_grad_(True) for p in params]
            s_in = [
                s.detach().requires_grad_(True) if is_float else s.detach()
                for s, is_float in zip(state_leaves, layout.state_is_float, strict=True)
            ]
            lr_in = [s.detach().requires_grad_(True) for s in lr]
            new_params, new_state = step.inner.update(
                layout.params(g_in), layout.state(s_in), layout.params(p_in), layout.lr_scales(lr_in)
            )
            outputs = list(new_params.values())
            out_adjoints = list(adj_params)
            for leaf, adjoint, is_float in zip(
                optree.tree_leaves(new_state), adj_state, layout.state_is_float, strict=True
            ):
                if is_float and adjoint is not None and leaf.requires_grad:
                    outputs.append(leaf)
                    out_adjoints.append(adjoint)
            float_state = [s for s, is_float in zip(s_in, layout.state_is_float, strict=True) if is_float]
            inputs = g_in + p_in + float_state + lr_in
            pulled = torch.autograd.grad(outputs, inputs, out_adjoints, allow_unused=True)
        pulled = [_or_zeros(a, x) for a, x in zip(pulled, inputs, strict=True)]
        v = pulled[:n_p]
        grad_params = pulled[n_p : 2 * n_p]
        grad_float_state = iter(pulled[2 * n_p : 2 * n_p + len(float_state)])
        grad_lr = pulled[2 * n_p + len(float_state) :]

        # 2. Forward over reverse: H_pp v and the mixed term H_cp v in one jvp of the gradient.
        hvp_params, hvp_context = _hessian_vector_products(step, params, context, v)
        grad_params = [g + h for g, h in zip(grad_params, hvp_params, strict=True)]
        grad_state = [next(grad_float_state) if is_float else None for is_float in layout.state_is_float]
        return (None, *grad_params, *grad_state, *hvp_context, *grad_lr)


def _hessian_vector_products(
    step: _Step, params: Sequence[torch.Tensor], context: Sequence[torch.Tensor], v: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    layout = step.layout
    context_values = layout.context([c.detach() for c in context])

    def loss(inner: Params, outer: Params) -> torch.Tensor:
        return step.objective({**step.constants, **outer, **inner}, step.batch)

    def gradient(inner: Params) -> tuple[Params, Params]:
        return torch.func.grad(loss, argnums=(0, 1))(inner, context_values)

    primals = layout.params([p.detach() for p in params])
    tangents = layout.params([t.detach() for t in v])
    assert step.random is not None
    try:
        with step.random.restored(), double_backward_safe():
            _, (hvp_inner, hvp_outer) = torch.func.jvp(gradient, (primals,), (tangents,))
    except (RuntimeError, NotImplementedError) as error:
        translated = forward_mode_error(error)
        if translated is None:
            raise
        raise translated from error
    return [hvp_inner[n] for n in layout.param_names], [hvp_outer[n] for n in layout.context_names]


def _or_zeros(adjoint: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if adjoint is None else adjoint


def unroll_forward_over_reverse(
    inner: InnerLoop,
    params: Mapping[str, torch.Tensor],
    batch: Any,
    context: Mapping[str, torch.Tensor],
    *,
    objective: Objective,
    lr_scales: Mapping[str, torch.Tensor] | None = None,
    task_index: int = 0,
    trace_final: bool = True,
) -> Adaptation:
    """Every inner step differentiable, with Hessian-vector products formed by forward over reverse.

    Same arguments as :meth:`InnerLoop.adapt` with every step differentiated; the result's
    ``params`` carry a graph of one op per step, which holds only that step's inputs.
    """

    def one_step(layout: _Layout, constants: Params, first: int, count: int):
        where = f"support loss of task {task_index} at inner step {first}"
        return _ForwardOverReverseStep, _Step(inner, objective, batch, constants, layout, where)

    return _unroll(
        inner,
        params,
        batch,
        context,
        objective,
        lr_scales,
        task_index,
        trace_final,
        chunk=1,
        make_op=one_step,
    )


@dataclass
class _Segment:
    """The non-tensor part of one recomputed segment of inner steps."""

    inner: InnerLoop
    objective: Objective
    batch: Any
    constants: Params
    layout: _Layout
    first: int
    count: int
    task_index: int
    random: _RandomState | None = None

    def run(self, flat: Sequence[torch.Tensor], *, create_graph: bool):
        """``count`` steps from the segment's inputs: (params, state leaves, losses)."""
        layout = self.layout
        params, state_leaves, context, lr = layout.split(flat)
        current, state = layout.params(params), layout.state(state_leaves)
        full_context = {**self.constants, **layout.context(context)}
        losses = []
        for index in range(self.first, self.first + self.count):
            current, state, loss = self.inner.step(
                current,
                state,
                self.batch,
                full_context,
                create_graph=create_graph,
                objective=self.objective,
                lr_scales=layout.lr_scales(lr),
                where=f"support loss of task {self.task_index} at inner step {index}",
            )
            if not create_graph:
                current = fresh_leaves(current)
            losses.append(loss.detach())
        return list(current.values()), optree.tree_leaves(state), torch.stack(losses)


class _RecomputedSegment(torch.autograd.Function):
    """Inner steps whose forward keeps only the segment's inputs; the backward pass rebuilds the
    segment's reverse-over-reverse graph, pulls the adjoints through it and frees it."""

    @staticmethod
    def forward(ctx, segment: _Segment, *flat: torch.Tensor):  # type: ignore[override]
        segment.random = _RandomState(list(flat))
        with torch.enable_grad(), double_backward_safe():  # the kernel the recomputation uses
            leaves = [x.detach().requires_grad_(True) if x.is_floating_point() else x for x in flat]
            params, state_leaves, losses = segment.run(leaves, create_graph=False)
        params = [p.detach() for p in params]
        state_leaves = [leaf.detach() for leaf in state_leaves]
        ctx.segment = segment
        ctx.save_for_backward(*flat)
        ctx.mark_non_differentiable(losses, *(leaf for leaf in state_leaves if not leaf.is_floating_point()))
        return (*params, *state_leaves, losses)

    @staticmethod
    def backward(ctx, *adjoints: torch.Tensor | None):  # type: ignore[override]
        segment: _Segment = ctx.segment
        flat = ctx.saved_tensors
        assert segment.random is not None
        with torch.enable_grad(), segment.random.restored(), double_backward_safe():
            inputs = [x.detach().requires_grad_(True) if x.is_floating_point() else x.detach() for x in flat]
            params, state_leaves, _ = segment.run(inputs, create_graph=True)
            outputs, out_adjoints = [], []
            for output, adjoint in zip([*params, *state_leaves], adjoints[:-1], strict=True):
                if adjoint is not None and output.requires_grad:
                    outputs.append(output)
                    out_adjoints.append(adjoint)
            wrt = [x for x in inputs if x.requires_grad]
            grads = iter(
                torch.autograd.grad(outputs, wrt, out_adjoints, allow_unused=True) if outputs else []
            )
        pulled = (
            [next(grads) if x.requires_grad else None for x in inputs] if outputs else [None] * len(inputs)
        )
        return (None, *pulled)


def unroll_checkpointed(
    inner: InnerLoop,
    params: Mapping[str, torch.Tensor],
    batch: Any,
    context: Mapping[str, torch.Tensor],
    *,
    objective: Objective,
    segment: int,
    lr_scales: Mapping[str, torch.Tensor] | None = None,
    task_index: int = 0,
    trace_final: bool = True,
) -> Adaptation:
    """Every inner step differentiable (reverse over reverse), recomputed in segments of ``segment`` steps.

    Same arguments as :meth:`InnerLoop.adapt` with every step differentiated. Only the parameters
    and optimizer state at each segment boundary stay alive until the outer backward pass; each
    segment's graph is rebuilt when the backward pass reaches it and freed once its adjoints are
    pulled through (a custom autograd op: ``torch.utils.checkpoint`` keeps every recomputed
    segment's double-backward graph alive until the end of the backward pass, which costs more
    memory than not checkpointing at all).
    """

    def one_segment(layout: _Layout, constants: Params, first: int, count: int):
        return _RecomputedSegment, _Segment(
            inner, objective, batch, constants, layout, first, count, task_index
        )

    return _unroll(
        inner,
        params,
        batch,
        context,
        objective,
        lr_scales,
        task_index,
        trace_final,
        chunk=segment,
        make_op=one_segment,
    )


def _unroll(inner, params, batch, context, objective, lr_scales, task_index, trace_final, *, chunk, make_op):
    """Run every inner step through custom ops of ``chunk`` steps each; ``make_op`` builds one."""
    anchor = fresh_leaves(params)
    live_context, constants = _split_context(context)
    state = inner.init({name: value.detach() for name, value in anchor.items()})
    layout, state_leaves = _layout(anchor, state, live_context, lr_scales)
    n_p = len(layout.param_names)
    current = list(anchor.values())
    losses: list[torch.Tensor] = []
    for first in range(0, inner.steps, chunk):
        op, meta = make_op(layout, constants, first, min(chunk, inner.steps - first))
        outputs = op.apply(meta, *current, *state_leaves, *live_context.values(), *(lr_scales or {}).values())
        current, state_leaves = list(outputs[:n_p]), list(outputs[n_p:-1])
        losses.extend(outputs[-1].reshape(-1).unbind())
    return _finish(
        inner,
        layout,
        anchor,
        current,
        state_leaves,
        losses,
        batch,
        {**constants, **_detached(live_context)},
        objective=objective,
        task_index=task_index,
        trace_final=trace_final,
    )


def _finish(
    inner: InnerLoop,
    layout: _Layout,
    anchor: Params,
    current: list[torch.Tensor],
    state_leaves: list[torch.Tensor],
    losses: list[torch.Tensor],
    batch: Any,
    context: Params,
    *,
    objective: Objective,
    task_index: int,
    trace_final: bool,
) -> Adaptation:
    """The :class:`Adaptation` of an unroll: the trace (with the final support loss if asked), checked."""
    adapted = layout.params(current)
    losses.append(
        inner.final_loss(adapted, batch, context, objective)
        if trace_final
        else torch.full_like(losses[0], float("nan"))
    )
    trace = torch.stack(losses)
    check_finite_trace(trace if trace_final else trace[:-1], task_index, has_final=trace_final)
    return Adaptation(params=adapted, anchor=anchor, losses=trace, state=layout.state(state_leaves))


def _detached(params: Mapping[str, torch.Tensor]) -> Params:
    return {name: value.detach() for name, value in params.items()}
