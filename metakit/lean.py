"""Exact meta-gradients whose memory hardly grows with the number of inner steps.

Two runners (`metakit.step`) of the differentiated inner steps of `SecondOrder`
that do not keep every step's activations until the outer backward pass. Both run the task's one
`InnerStep`; a recomputation runs it again through the one loop
(`run_steps`), on throw-away buffers:

- `ForwardOverReverse` (``SecondOrder(hvp="forward")``, MixFlow-MG, Kemaev et al.
  2025). Each inner step is one custom autograd op. Its forward computes the update with a plain,
  first-order gradient and keeps only the step's inputs (inner parameters, optimizer state) and
  that gradient. Its backward pulls the adjoint through the optimizer's update by reverse mode
  (cheap, elementwise), which gives the adjoint ``v`` of the inner gradient, and then forms the
  Hessian terms ``H_pp v`` and the mixed term ``H_cp v`` (context ``c``: outer-only parameters) in
  one forward-over-reverse pass: a backward pass of the support loss on dual tensors
  (``torch.autograd.forward_ad``) whose parameters carry the tangent ``v``; it builds no graph, so it
  holds one forward pass's activations and their tangents. Memory: S × (inner parameters + optimizer state + gradient) plus one step's
  activations.
- `Recomputed` (``SecondOrder(checkpoint=k)``): the usual reverse-over-reverse
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
from metakit.step import FixedSteps, InnerStep, Plain, run_steps

__all__ = ["ForwardModeError", "ForwardOverReverse", "Recomputed", "forward_mode_error"]

Params = dict[str, torch.Tensor]


class ForwardModeError(RuntimeError):
    """An operation in the model has no forward-mode derivative, which ``hvp="forward"`` needs."""


_NO_FORWARD_RULE = re.compile(r"forward AD with (\S+?)(?: that does not support it|\b)")


def forward_mode_error(error: BaseException) -> ForwardModeError | None:
    """A `ForwardModeError` naming the operation, if ``error`` is PyTorch's missing-rule error."""
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
class _Call:
    """The non-tensor part of one op over inner steps: the step, where it starts, how many it runs."""

    step: InnerStep
    layout: _Layout
    index: int
    count: int = 1
    random: _RandomState | None = None
    #: Per context tensor: does the support loss depend on it? Found once, by the first step's graph.
    used: list[bool] | None = None


def _reached(loss: torch.Tensor, leaves: Sequence[torch.Tensor]) -> list[bool]:
    """Which ``leaves`` ``loss``'s graph reaches (the graph's structure outlives its freed buffers).

    Under a cut, the live context holds every outer-only parameter, of which the top reads few; the
    mixed term of the others is zero, and forming it would materialise a zero tensor per parameter
    and per step.
    """
    wanted = {id(leaf): i for i, leaf in enumerate(leaves) if leaf.requires_grad}
    found = [False] * len(leaves)
    if not wanted or loss.grad_fn is None:
        return found
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in wanted:
            found[wanted[id(variable)]] = True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _step_forward(
    call: _Call, index: int, params: Sequence[torch.Tensor], state_leaves, context, lr, replay: bool = False
):
    """One inner step, first order: ``(new params, new state leaves, gradient, loss)``, all detached.

    ``replay``: the step runs again (in a backward pass), on throw-away buffers. Sets ``call.used``:
    which context tensors the loss depends on differentiably.
    """
    step, layout = call.step, call.layout
    with torch.enable_grad():  # an autograd.Function's forward runs with grad mode off
        leaves = [p.detach().requires_grad_(True) for p in params]
        context_leaves = [c.detach().requires_grad_(c.is_floating_point()) for c in context]
        grads, loss = step.gradient(
            index,
            layout.params(leaves),
            layout.context(context_leaves),
            create_graph=False,
            replay=replay,
        )
    if call.used is None:
        call.used = _reached(loss, context_leaves)
    grads = [g.detach() for g in grads.values()]
    new_params, new_state = step.update(
        layout.params(grads),
        layout.state(state_leaves),
        layout.params([p.detach() for p in params]),
        layout.lr_scales([s.detach() for s in lr]),
    )
    new_params = [p.detach() for p in new_params.values()]
    new_leaves = [leaf.detach() for leaf in optree.tree_leaves(new_state)]
    return new_params, new_leaves, grads, loss.detach()


def _step_backward(
    call: _Call,
    index: int,
    random: _RandomState,
    saved: tuple[
        Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[torch.Tensor]
    ],
    grads: Sequence[torch.Tensor],
    adj_params: Sequence[torch.Tensor | None],
    adj_state: Sequence[torch.Tensor | None],
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[torch.Tensor | None], list[torch.Tensor]]:
    """Pull one step's output adjoints back to its inputs: ``(params, state, context, lr)`` adjoints."""
    step, layout = call.step, call.layout
    params, state_leaves, context, lr = saved
    n_p = len(params)
    adj_params = [_or_zeros(a, p) for a, p in zip(adj_params, params, strict=True)]

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
        new_params, new_state = step.update(
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

    # 2. Forward over reverse: H_pp v and the mixed term H_cp v in one dual-tensor backward pass.
    hvp_params, hvp_context = _hessian_vector_products(call, index, random, params, context, v)
    grad_params = [g + h for g, h in zip(grad_params, hvp_params, strict=True)]
    grad_state = [next(grad_float_state) if is_float else None for is_float in layout.state_is_float]
    return grad_params, grad_state, hvp_context, grad_lr


class _ForwardOverReverseStep(torch.autograd.Function):
    """One inner step whose backward forms Hessian-vector products by forward over reverse mode."""

    @staticmethod
    def forward(ctx, call: _Call, *flat: torch.Tensor):  # type: ignore[override]
        layout = call.layout
        params, state_leaves, context, lr = layout.split(flat)
        call.random = _RandomState(list(params) + list(context))
        new_params, new_leaves, grads, loss = _step_forward(
            call, call.index, params, state_leaves, context, lr
        )
        ctx.call = call
        ctx.save_for_backward(*params, *state_leaves, *context, *lr, *grads)
        ctx.mark_non_differentiable(
            loss,
            *(leaf for leaf, is_float in zip(new_leaves, layout.state_is_float, strict=True) if not is_float),
        )
        return (*new_params, *new_leaves, loss)

    @staticmethod
    def backward(ctx, *adjoints: torch.Tensor | None):  # type: ignore[override]
        call: _Call = ctx.call
        layout = call.layout
        n_p, n_s, n_c, n_lr = layout.sizes
        saved = ctx.saved_tensors
        inputs = layout.split(saved)
        grads = saved[n_p + n_s + n_c + n_lr :]
        assert call.random is not None
        grad_params, grad_state, grad_context, grad_lr = _step_backward(
            call, call.index, call.random, inputs, grads, adjoints[:n_p], list(adjoints[n_p : n_p + n_s])
        )
        return (None, *grad_params, *grad_state, *grad_context, *grad_lr)


class _ForwardOverReverseSegment(torch.autograd.Function):
    """``count`` forward-over-reverse steps that keep only the segment's inputs.

    The backward pass runs the segment's steps again, first order, keeping each step's inputs and
    gradient (``count`` of them, not S), then pulls the adjoints back step by step as
    `_ForwardOverReverseStep` does. Memory: S/k segment inputs + k steps' inputs and gradients + one
    step's forward-over-reverse pass.
    """

    @staticmethod
    def forward(ctx, call: _Call, *flat: torch.Tensor):  # type: ignore[override]
        layout = call.layout
        params, state_leaves, context, lr = layout.split(flat)
        call.random = _RandomState(list(flat))
        losses = []
        for index in range(call.index, call.index + call.count):
            params, state_leaves, _, loss = _step_forward(call, index, params, state_leaves, context, lr)
            losses.append(loss)
        losses = torch.stack(losses)
        ctx.call = call
        ctx.save_for_backward(*flat)
        ctx.mark_non_differentiable(
            losses,
            *(
                leaf
                for leaf, is_float in zip(state_leaves, layout.state_is_float, strict=True)
                if not is_float
            ),
        )
        return (*params, *state_leaves, losses)

    @staticmethod
    def backward(ctx, *adjoints: torch.Tensor | None):  # type: ignore[override]
        call: _Call = ctx.call
        layout = call.layout
        n_p, n_s, _, _ = layout.sizes
        first_params, first_state, context, lr = layout.split(ctx.saved_tensors)
        assert call.random is not None
        # Run the segment again, from the RNG state of its first run, keeping every step's inputs.
        steps = []
        params, state_leaves = list(first_params), list(first_state)
        with call.random.restored():
            for index in range(call.index, call.index + call.count):
                random = _RandomState(list(params) + list(context))
                new_params, new_leaves, grads, _ = _step_forward(
                    call, index, params, state_leaves, context, lr, replay=True
                )
                steps.append((index, random, params, state_leaves, grads))
                params, state_leaves = new_params, new_leaves
        adj_params, adj_state = list(adjoints[:n_p]), list(adjoints[n_p : n_p + n_s])
        grad_context: list[torch.Tensor] | None = None
        grad_lr: list[torch.Tensor] | None = None
        while steps:
            index, random, params, state_leaves, grads = steps.pop()
            adj_params, adj_state, step_context, step_lr = _step_backward(
                call, index, random, (params, state_leaves, context, lr), grads, adj_params, adj_state
            )
            grad_context = step_context if grad_context is None else _sum(grad_context, step_context)
            grad_lr = step_lr if grad_lr is None else _sum(grad_lr, step_lr)
        return (None, *adj_params, *adj_state, *(grad_context or []), *(grad_lr or []))


def _sum(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    return [y if x is None else x if y is None else x + y for x, y in zip(a, b, strict=True)]


def _hessian_vector_products(
    call: _Call,
    index: int,
    random: _RandomState,
    params: Sequence[torch.Tensor],
    context: Sequence[torch.Tensor],
    v: Sequence[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    layout = call.layout
    used = call.used if call.used is not None else [True] * len(context)
    live = {n: c.detach() for n, c, u in zip(layout.context_names, context, used, strict=True) if u}
    fixed = {n: c.detach() for n, c, u in zip(layout.context_names, context, used, strict=True) if not u}
    primals = layout.params([p.detach() for p in params])
    tangents = layout.params([t.detach() for t in v])
    try:
        with random.restored(), double_backward_safe():
            hvp_inner, hvp_outer = call.step.hessian_vector_products(index, primals, tangents, live, fixed)
    except (RuntimeError, NotImplementedError) as error:
        translated = forward_mode_error(error)
        if translated is None:
            raise
        raise translated from error
    return [hvp_inner[n] for n in layout.param_names], [hvp_outer.get(n) for n in layout.context_names]


def _or_zeros(adjoint: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if adjoint is None else adjoint


# -- recomputed segments --------------------------------------------------------------------------
def _run_segment(call: _Call, flat: Sequence[torch.Tensor], *, create_graph: bool):
    """``count`` steps from the segment's inputs through the one loop: (params, state leaves, losses)."""
    layout = call.layout
    params, state_leaves, context, lr = layout.split(flat)
    done = run_steps(
        call.step,
        layout.params(params),
        layout.state(state_leaves),
        layout.context(context),
        layout.lr_scales(lr),
        first=call.index,
        stop=FixedSteps(call.index + call.count),
        runner=Plain(create_graph=create_graph, replay=create_graph),
    )
    return list(done.params.values()), optree.tree_leaves(done.state), torch.stack(done.losses)


class _RecomputedSegment(torch.autograd.Function):
    """Inner steps whose forward keeps only the segment's inputs; the backward pass rebuilds the
    segment's reverse-over-reverse graph, pulls the adjoints through it and frees it."""

    @staticmethod
    def forward(ctx, call: _Call, *flat: torch.Tensor):  # type: ignore[override]
        call.random = _RandomState(list(flat))
        with torch.enable_grad(), double_backward_safe():  # the kernel the recomputation uses
            leaves = [x.detach().requires_grad_(True) if x.is_floating_point() else x for x in flat]
            params, state_leaves, losses = _run_segment(call, leaves, create_graph=False)
        params = [p.detach() for p in params]
        state_leaves = [leaf.detach() for leaf in state_leaves]
        ctx.call = call
        ctx.save_for_backward(*flat)
        ctx.mark_non_differentiable(losses, *(leaf for leaf in state_leaves if not leaf.is_floating_point()))
        return (*params, *state_leaves, losses)

    @staticmethod
    def backward(ctx, *adjoints: torch.Tensor | None):  # type: ignore[override]
        call: _Call = ctx.call
        flat = ctx.saved_tensors
        assert call.random is not None
        with torch.enable_grad(), call.random.restored(), double_backward_safe():
            inputs = [x.detach().requires_grad_(True) if x.is_floating_point() else x.detach() for x in flat]
            params, state_leaves, _ = _run_segment(call, inputs, create_graph=True)
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


# -- the runners ----------------------------------------------------------------------------------
class _OpRunner:
    """Runs ``chunk`` inner steps as one custom autograd op over the steps' flat tensors."""

    chunk = 1
    op: type[torch.autograd.Function]

    def run(self, step, index, count, params, state, live, lr, gradient=None):
        layout, state_leaves = _layout(params, state, live, lr)
        outputs = self.op.apply(
            _Call(step, layout, index, count),
            *params.values(),
            *state_leaves,
            *live.values(),
            *(lr or {}).values(),
        )
        n_p = len(layout.param_names)
        losses = list(outputs[-1].reshape(-1).unbind())
        return layout.params(outputs[:n_p]), layout.state(outputs[n_p:-1]), losses


class ForwardOverReverse(_OpRunner):
    """``SecondOrder(hvp="forward")``: each step one op keeping its inputs and gradient only.

    With ``segment`` (``SecondOrder(hvp="forward", checkpoint=k)``), segments of ``k`` steps keep only
    their inputs, and the backward pass runs a segment again before pulling its adjoints through.
    """

    op: type[torch.autograd.Function] = _ForwardOverReverseStep

    def __init__(self, segment: int | None = None):
        if segment is not None:
            self.chunk, self.op = segment, _ForwardOverReverseSegment


class Recomputed(_OpRunner):
    """``SecondOrder(checkpoint=k)``: segments of ``k`` steps, recomputed in the backward pass."""

    op = _RecomputedSegment

    def __init__(self, segment: int):
        self.chunk = segment
