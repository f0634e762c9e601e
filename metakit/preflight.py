"""Pre-flight: what would go wrong in meta-training, found before it does.

`check` inspects the module tree and runs the learner's loss once on a batch (a traced
forward, one double backward, and a forward-over-reverse pass when the strategy uses forward-mode
Hessian-vector products). Each `Finding` says where (module path), what follows and the fix.
The model is left as it was: buffers are restored and the global RNG state is untouched.

Example:
    >>> report = mk.check(model, learner, tasks[0].support)  # doctest: +SKIP
    >>> print(report)  # doctest: +SKIP
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import TorchDispatchMode

from metakit.capabilities import composition_problems, needs
from metakit.functional import bind, double_backward_safe
from metakit.task import Task

if TYPE_CHECKING:
    from metakit.learner import MetaLearner

__all__ = ["Finding", "Report", "check"]

Severity = Literal["error", "warning", "info"]
_ORDER = {"error": 0, "warning": 1, "info": 2}

# Every function wrapped by once_differentiable shares this code object.
_ONCE_DIFFERENTIABLE_CODE = once_differentiable(lambda ctx, *grads: None).__code__
_FUSED_ATTENTION = re.compile(r"_scaled_dot_product_(flash|efficient|cudnn|fused)\w*")
_RANDOM_OPS = {
    "native_dropout",
    "bernoulli",
    "bernoulli_",
    "rand",
    "rand_like",
    "randn",
    "randn_like",
    "randint",
    "randint_like",
    "randperm",
    "normal",
    "normal_",
    "uniform_",
    "exponential_",
    "multinomial",
    "rrelu_with_noise",
}
_NO_DERIVATIVE = re.compile(r"derivative for (?:aten::)?'?(\w+)'? is not implemented")
_NO_FORWARD_AD = re.compile(r"Trying to use forward AD with (\w+) that does not support it")


@dataclass(frozen=True)
class Finding:
    """One problem (or one thing handled for you) that `check` found.

    Attributes:
        kind: a stable key, e.g. ``"no-double-backward"``, ``"buffer-update"``, ``"dropout"``.
        severity: ``"error"`` (meta-training fails or its gradient is wrong), ``"warning"``
            (it runs, but not as you likely expect) or ``"info"`` (handled automatically).
        where: the module path (``"encoder.layer.0.attention.self"``), parameter or batch entry.
        what: what follows from it.
        fix: what to do.
    """

    kind: str
    severity: Severity
    where: str
    what: str
    fix: str


class Report:
    """The findings of `check`; ``print(report)`` shows them as a table, like ``explain()``.

    Attributes:
        findings: every finding, errors first.
        title: what was checked (model, strategy).

    Example:
        >>> from metakit.preflight import Finding, Report
        >>> report = Report("Net", [Finding("dropout", "warning", "1", "the gradient is random.", "model.eval().")])
        >>> report.ok, report.kinds()
        (True, {'dropout'})
        >>> print(report)
        check: Net: 1 warning
        [warning] dropout at 1
            what follows: the gradient is random.
            fix: model.eval().
    """

    def __init__(self, title: str, findings: Sequence[Finding]):
        self.title = title
        self.findings = sorted(findings, key=lambda f: _ORDER[f.severity])

    @property
    def ok(self) -> bool:
        """Whether no finding is an error."""
        return not any(f.severity == "error" for f in self.findings)

    def kinds(self) -> set[str]:
        """The kinds of every finding, e.g. ``{"dropout", "fused-attention"}``."""
        return {f.kind for f in self.findings}

    def of_kind(self, kind: str) -> list[Finding]:
        """The findings of one kind."""
        return [f for f in self.findings if f.kind == kind]

    def __iter__(self) -> Iterator[Finding]:
        return iter(self.findings)

    def __len__(self) -> int:
        return len(self.findings)

    def __str__(self) -> str:
        counts = {s: sum(f.severity == s for f in self.findings) for s in _ORDER}
        summary = (
            ", ".join(f"{n} {s}{'s' if n != 1 else ''}" for s, n in counts.items() if n) or "nothing found"
        )
        lines = [f"check: {self.title}: {summary}"]
        for f in self.findings:
            lines.append(f"[{f.severity}] {f.kind} at {f.where}")
            lines.append(f"    what follows: {f.what}")
            lines.append(f"    fix: {f.fix}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)


def check(model: nn.Module, learner: MetaLearner, batch: Any) -> Report:
    """Find what would go wrong when ``learner`` meta-trains ``model`` on batches like ``batch``.

    Looks for: operations without double backward (custom ``autograd.Function``s marked
    ``once_differentiable``, cuDNN RNNs, anything a real double backward on the batch trips over);
    operations without forward-mode rules when the strategy has ``hvp="forward"``; fused SDPA
    attention (handled, said so); buffers such as BatchNorm statistics that the inner loop's forwards
    would update in place; active dropout; ``requires_grad=False`` parameters inside the inner or
    outer spec; tied weights that the specs split; dtype and device mismatches between the model and
    the batch; and a forward that fails outright.

    Args:
        model: the model (must be ``learner.model``).
        learner: the `MetaLearner` whose loss, specs and strategy are checked.
        batch: one batch as the loss function takes it (a support batch), or a `Task`
            (its support batch is used).

    Returns:
        A `Report`; ``report.ok`` is ``False`` when any finding is an error.

    Example:
        >>> import torch, torchopt, metakit as mk
        >>> from metakit.preflight import check
        >>> model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1))
        >>> learner = mk.MetaLearner(model, mk.tasks.mse_loss,
        ...     inner=mk.InnerLoop(mk.select("2.*"), torchopt.sgd(lr=0.1), steps=1),
        ...     outer_params=mk.everything(), strategy=mk.SecondOrder())
        >>> report = check(model, learner, (torch.randn(4, 1), torch.randn(4, 1)))
        >>> sorted(report.kinds())
        ['dropout']
    """
    if learner.model is not model:
        raise ValueError(
            "check(model, learner, batch): learner.model is not this model; pass the model the learner "
            f"was built on ({type(learner.model).__name__})."
        )
    loss_fn = learner.loss_fn
    if isinstance(batch, Task):
        loss_fn = batch.loss_fn if batch.loss_fn is not None else loss_fn
        batch = batch.support
    if loss_fn is None:
        raise ValueError(
            "check(): the learner has loss_fn=None, so its tasks carry their own losses; pass one of them, "
            "check(model, learner, mk.Task(support, query, loss_fn=...)), so the batch can be run."
        )
    second_order = _differentiates_inner_gradients(learner)
    forward_hvp = needs(learner.strategy, learner.executor).forward_mode
    findings = _composition_findings(model, learner)
    findings += _spec_findings(model, learner)
    findings += _batch_findings(model, batch)
    findings += _rnn_findings(model, second_order)
    # A batch on another device cannot run; a dtype mismatch may (promotion), so it is tried.
    if not any(f.kind == "device-mismatch" for f in findings):
        findings += _run_findings(model, learner, loss_fn, batch, second_order, forward_hvp)
        findings += _vmap_findings(model, learner, loss_fn, batch)
    title = (
        f"{type(model).__name__} with {learner.strategy!r} on {learner.executor!r}, "
        f"InnerLoop(buffers={learner.inner.buffers!r}), precision={learner.precision!r}"
    )
    return Report(title, _unique(findings))


# -- static checks ------------------------------------------------------------------------------------


def _differentiates_inner_gradients(learner: MetaLearner) -> bool:
    """Whether the strategy, as the executor runs it, differentiates through inner gradients."""
    runs = needs(learner.strategy, learner.executor)
    return runs.double_backward or runs.forward_mode


def _composition_findings(model: nn.Module, learner: MetaLearner) -> list[Finding]:
    """What the learner would refuse (from the declared capabilities), should its parts have changed."""
    problems = composition_problems(
        learner.strategy,
        learner.executor,
        model=model,
        buffers=learner.inner.buffers,
        learn_lr=learner.inner.learn_lr,
        outer_only=learner.outer_only_names,
        cut=learner.cut is not None,
        precision=learner.precision,
    )
    return [
        Finding(
            "composition",
            "error",
            "(learner)",
            f"{asked}: the meta-gradient would not be exact.",
            f"use {instead}.",
        )
        for asked, instead in problems
    ]


def _vmap_findings(model: nn.Module, learner: MetaLearner, loss_fn: Any, batch: Any) -> list[Finding]:
    """Under a batching executor: does the support gradient run under ``torch.func.vmap``?"""
    if not learner.executor.capabilities.functional:
        return []
    import optree

    from metakit.buffers import TaskBuffers, eval_statistics

    params = {n: p.detach() for n, p in model.named_parameters()}
    inner = {n: params[n] for n in learner.shared_names + learner.inner_only_names}
    leaves, spec = optree.tree_flatten(batch)
    if not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
        return []  # Vmap's own error names a batch it cannot stack
    stacked = optree.tree_unflatten(spec, [torch.stack([leaf, leaf]) for leaf in leaves])

    def support_gradient(one_batch):
        zero = optree.tree_leaves(one_batch)[0].flatten()[0].detach() * 0
        buffers, running = TaskBuffers(model, learner.inner.buffers, zero.float()).for_forward(
            adapting=True, replay=True
        )

        def loss(values):
            with eval_statistics(model, running):
                return loss_fn(
                    bind(model, {**params, **values}, check_names=False, buffers=buffers), one_batch
                )

        return torch.func.grad(loss)(inner)

    try:
        with torch.random.fork_rng(devices=_cuda_devices(model)):
            torch.func.vmap(support_gradient, randomness="different")(stacked)
    except Exception as err:
        return [
            Finding(
                "vmap",
                "error",
                "(forward)",
                f"{learner.executor!r} batches tasks with torch.func.vmap, which fails on this model and batch: "
                f"{type(err).__name__}: {_first_line(err)}",
                "use executors.Sequential(); data-dependent control flow and .item() calls cannot be batched, and "
                "a forward that writes a tensor in place needs InnerLoop(buffers='task') or 'frozen'.",
            )
        ]
    return []


def _spec_findings(model: nn.Module, learner: MetaLearner) -> list[Finding]:
    findings = []
    for role, spec in (("inner", learner.inner.params), ("outer", learner.outer_spec)):
        frozen = [
            n for n, p in model.named_parameters() if not p.requires_grad and spec._matches_in(model, n, p)
        ]
        if frozen:
            findings.append(
                Finding(
                    "frozen-in-spec",
                    "warning",
                    _listed(frozen),
                    f"the {role} spec {spec!r} selects {len(frozen)} parameter(s) with requires_grad=False; "
                    f"the learner leaves them out, so they are not {'adapted' if role == 'inner' else 'meta-learned'}.",
                    "call .requires_grad_(True) on them if they should be, or subtract them from the spec "
                    "so that it says what happens (e.g. spec - mk.select('...')).",
                )
            )
    inner_set = set(learner.shared_names) | set(learner.inner_only_names)
    outer_set = set(learner.shared_names) | set(learner.outer_only_names)
    for names in _tied_groups(model):
        first = names[0]
        roles = []
        for role, spec, chosen in (
            ("inner", learner.inner.params, inner_set),
            ("outer", learner.outer_spec, outer_set),
        ):
            by_alias = {n: spec.matches(n, model.get_parameter(first), None) for n in names}
            if not spec.needs_module and len(set(by_alias.values())) > 1:
                picked = [n for n, hit in by_alias.items() if hit]
                verdict = "in" if first in chosen else "not in"
                roles.append(f"the {role} spec selects it as {picked} only; it is {verdict} the {role} set")
        if roles:
            findings.append(
                Finding(
                    "tied-split",
                    "warning",
                    " = ".join(names),
                    f"one tied tensor under {len(names)} names: {'; '.join(roles)} (metakit decides by the "
                    f"first name, {first!r}), so the other name's selection is ignored.",
                    "select every name of a tied weight together (e.g. mk.select('a.weight', 'b.weight')), "
                    "or untie the weights if the two roles should differ.",
                )
            )
    return findings


def _tied_groups(model: nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _batch_findings(model: nn.Module, batch: Any) -> list[Finding]:
    params = [p for p in model.parameters()]
    if not params:
        return []
    float_dtypes = {p.dtype for p in params if p.is_floating_point()}
    model_dtype = next(iter(float_dtypes)) if len(float_dtypes) == 1 else None
    devices = {p.device for p in params}
    model_device = next(iter(devices)) if len(devices) == 1 else None
    findings = []
    for where, tensor in _tensors(batch, "batch"):
        if model_device is not None and tensor.device != model_device:
            findings.append(
                Finding(
                    "device-mismatch",
                    "error",
                    where,
                    f"the batch tensor is on {tensor.device} but the model is on {model_device}; the forward fails.",
                    f"move the batch to the model's device (tensor.to({str(model_device)!r})) in your data loader.",
                )
            )
        if model_dtype is not None and tensor.is_floating_point() and tensor.dtype != model_dtype:
            findings.append(
                Finding(
                    "dtype-mismatch",
                    "warning",
                    where,
                    f"the batch tensor is {tensor.dtype} but the model's parameters are {model_dtype}; the "
                    "forward fails or promotes silently, and gradients are not in the precision you chose.",
                    f"convert the batch (tensor.to({model_dtype})) or the model (model.to({tensor.dtype})).",
                )
            )
    return findings


def _tensors(value: Any, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _tensors(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{where}[{index}]")


def _uses_cudnn(module: nn.RNNBase) -> bool:
    """Whether this RNN runs cuDNN's kernel (CUDA parameters, cuDNN available and enabled)."""
    on_cuda = any(p.is_cuda for p in module.parameters())
    return on_cuda and torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled


def _rnn_findings(model: nn.Module, second_order: bool) -> list[Finding]:
    findings = []
    for path, module in model.named_modules():
        if isinstance(module, nn.RNNBase) and _uses_cudnn(module):
            findings.append(
                Finding(
                    "no-double-backward",
                    "error" if second_order else "info",
                    path or "(model)",
                    f"{type(module).__name__} on CUDA runs cuDNN's RNN kernel, whose backward has no derivative "
                    "(derivative for _cudnn_rnn_backward is not implemented), so differentiating through inner "
                    "gradients fails" + ("." if second_order else "; fine for this first-order strategy."),
                    "wrap meta_step in `with torch.backends.cudnn.flags(enabled=False):` (the native kernel is "
                    "twice differentiable), or use mk.FirstOrder() / mk.Reptile().",
                )
            )
    return findings


# -- checks that run the loss ---------------------------------------------------------------------------


class _Trace(TorchDispatchMode):
    """Records which aten ops ran inside which module, and which custom autograd Functions."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.paths = {id(m): name or "(model)" for name, m in model.named_modules(remove_duplicate=False)}
        self.stack: list[str] = []
        # (op name, module path, random?): no tensors are kept, so the trace holds no activations.
        self.ops: list[tuple[str, str, bool]] = []
        self.functions: dict[type, str] = {}  # custom autograd.Function class -> module path
        self._seen: set[int] = set()
        self._handles = []
        for module in {id(m): m for _, m in model.named_modules()}.values():
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._leave, always_call=True))

    def _enter(self, module: nn.Module, args: Any) -> None:
        self.stack.append(self.paths.get(id(module), type(module).__name__))

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        path = self.stack.pop() if self.stack else "(model)"
        self.collect_functions(output, path)

    def collect_functions(self, output: Any, path: str) -> None:
        """Attribute custom Function nodes reachable from ``output`` to the innermost module first."""
        todo = [t.grad_fn for _, t in _tensors(output, "") if t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node is None or id(node) in self._seen:
                continue
            self._seen.add(id(node))
            cls = getattr(node, "_forward_cls", None)
            if cls is not None:
                self.functions.setdefault(cls, path)
            todo.extend(next_node for next_node, _ in node.next_functions)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def where(self, op: str) -> str:
        paths = list(dict.fromkeys(path for name, path, _ in self.ops if name == op))
        return ", ".join(paths[:3]) + (f" (+{len(paths) - 3} more)" if len(paths) > 3 else "") or op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        random = name in _RANDOM_OPS or (bool(_FUSED_ATTENTION.fullmatch(name)) and _sdpa_dropout(args) > 0)
        self.ops.append((name, self.stack[-1] if self.stack else "(loss)", random))
        return func(*args, **(kwargs or {}))


def _run_findings(
    model: nn.Module, learner: MetaLearner, loss_fn: Any, batch: Any, second_order: bool, forward_hvp: bool
) -> list[Finding]:
    all_params = dict(model.named_parameters())
    inner = {n: all_params[n] for n in learner.shared_names + learner.inner_only_names}
    outer_only = {n: all_params[n] for n in learner.outer_only_names}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    versions = {name: b._version for name, b in model.named_buffers()}
    findings: list[Finding] = []
    with torch.random.fork_rng(devices=_cuda_devices(model)):
        try:
            trace = _Trace(model)
            try:
                with trace, torch.enable_grad():
                    loss = loss_fn(bind(model, inner, check_names=False), batch)
                trace.collect_functions(loss, "(loss function)")
                differentiable = loss.requires_grad
                del loss  # free the traced forward's graph before the probes build theirs
            finally:
                trace.remove()
        except Exception as err:  # the user's forward failed: that is the finding
            _restore(model, buffers)
            return [
                Finding(
                    "forward-failed",
                    "error",
                    "(forward)",
                    f"the loss function raised {type(err).__name__}: {_first_line(err)}",
                    "make loss_fn(mk.bind(model, {}), batch) run on this batch before meta-training.",
                )
            ]
        findings += _buffer_findings(model, versions, buffers, learner.inner.buffers)
        _restore(model, buffers)
        findings += _trace_findings(trace, model, second_order, forward_hvp)
        # Forward-over-reverse replaces the reverse double backward under hvp="forward".
        if second_order and not forward_hvp and differentiable:
            findings += _double_backward_probe(model, loss_fn, batch, inner, outer_only, trace)
            _restore(model, buffers)
        if forward_hvp:
            findings += _forward_ad_probe(model, loss_fn, batch, inner, trace, findings)
            _restore(model, buffers)
    return findings


def _buffer_findings(
    model: nn.Module, versions: Mapping[str, int], before: Mapping[str, torch.Tensor], policy: str
) -> list[Finding]:
    # Kernels such as batch_norm write running statistics without bumping the version counter.
    changed = [
        name
        for name, b in model.named_buffers()
        if b._version != versions.get(name) or name not in before or not torch.equal(b, before[name])
    ]
    by_module: dict[str, list[str]] = {}
    for name in changed:
        path, _, leaf = name.rpartition(".")
        by_module.setdefault(path or "(model)", []).append(leaf)
    findings = []
    for path, leaves in by_module.items():
        module = model.get_submodule(path) if path != "(model)" else model
        is_norm = isinstance(module, nn.modules.batchnorm._NormBase)
        if policy == "update":
            findings.append(
                Finding(
                    "buffer-update",
                    "warning",
                    path,
                    f"{type(module).__name__} updates its buffers {leaves} in place on every forward, and "
                    "InnerLoop(buffers='update') lets it: each inner step changes the module (even under "
                    "FirstOrder), and statistics leak across tasks and between support and query batches.",
                    "InnerLoop(buffers='task') gives each task its own copy (the same meta-gradient; the module "
                    "is untouched); InnerLoop(buffers='frozen') adapts on the running statistics and never "
                    "changes them"
                    + (
                        "; or build it with track_running_stats=False (batch statistics everywhere, as MAML does)."
                        if is_norm
                        else "; or keep the state outside the module."
                    ),
                )
            )
        elif not is_norm:
            findings.append(
                Finding(
                    "buffer-update",
                    "warning",
                    path,
                    f"{type(module).__name__} writes its buffers {leaves} in place on every forward. Under "
                    f"InnerLoop(buffers={policy!r}) metakit runs it on a copy, and a step that is run again "
                    "(recomputed, or inside torch.func) on a throw-away copy: exact for statistics that the "
                    "forward does not read, as BatchNorm's in training mode, but not for state that changes "
                    "the output.",
                    "keep such state outside the module, or make it a constant during meta-training.",
                )
            )
    return findings


def _trace_findings(trace: _Trace, model: nn.Module, second_order: bool, forward_hvp: bool) -> list[Finding]:
    findings = []
    fused = sorted({name for name, _, _ in trace.ops if _FUSED_ATTENTION.fullmatch(name)})
    for op in fused:
        findings.append(
            Finding(
                "fused-attention",
                "info",
                trace.where(op),
                f"fused SDPA attention (aten::{op}) has no double backward; "
                + (
                    "metakit runs the math kernel by itself wherever this strategy differentiates through "
                    "inner gradients (slower, more memory, the same function)."
                    if second_order
                    else "this strategy does not differentiate through inner gradients, so it stays fused."
                ),
                "nothing to do.",
            )
        )
    random_paths = list(dict.fromkeys(path for _, path, random in trace.ops if random))
    if random_paths:
        findings.append(
            Finding(
                "dropout",
                "warning",
                ", ".join(random_paths[:5])
                + (f" (+{len(random_paths) - 5} more)" if len(random_paths) > 5 else ""),
                "dropout (or another random op) is active: every inner step and query loss draws a new mask, so "
                "the meta-gradient is random and two meta-steps on the same tasks differ; gradient fidelity "
                "comparisons are noisy.",
                "call model.eval() (or set the dropout probabilities to 0) for comparisons and checks, or seed "
                "torch.manual_seed(...) before each meta-step; for regularised training it may be what you want.",
            )
        )
    for cls, path in trace.functions.items():
        backward = getattr(cls, "backward", None)
        if second_order and getattr(backward, "__code__", None) is _ONCE_DIFFERENTIABLE_CODE:
            findings.append(_no_double_backward(path, f"custom autograd.Function {cls.__name__}", once=True))
        if forward_hvp and getattr(cls, "jvp", None) is torch.autograd.Function.jvp:
            findings.append(_no_forward_ad(path, f"custom autograd.Function {cls.__name__} (no jvp)"))
    return findings


def _sdpa_dropout(args: tuple) -> float:
    value = args[3] if len(args) > 3 else 0.0
    return float(value) if isinstance(value, (int, float)) else 0.0


def _no_double_backward(where: str, what: str, *, once: bool = False) -> Finding:
    detail = (
        "its backward is marked @once_differentiable, so "
        if once
        else "its backward cannot be differentiated, so "
    )
    return Finding(
        "no-double-backward",
        "error",
        where,
        f"{what}: {detail}differentiating through inner gradients (this strategy) fails or silently drops "
        "the second-order term.",
        "give the Function a backward written in differentiable torch ops (drop @once_differentiable), "
        "replace the op with one that has a double backward, or use mk.FirstOrder() / mk.Reptile().",
    )


def _no_forward_ad(where: str, what: str) -> Finding:
    return Finding(
        "no-forward-ad",
        "error",
        where,
        f"{what} has no forward-mode (jvp) rule, so SecondOrder(hvp='forward') cannot compute its "
        "forward-over-reverse Hessian-vector products.",
        "use SecondOrder() (reverse over reverse), replace the op, or give the custom Function a jvp "
        "staticmethod (and setup_context) — see torch.autograd.Function's docs on forward-mode AD.",
    )


def _double_backward_probe(model, loss_fn, batch, inner, outer_only, trace: _Trace) -> list[Finding]:
    targets = list(inner.values())
    detached: set[type] = set()  # custom Functions whose backward returned a graph-less gradient
    handles = []
    try:
        with torch.enable_grad(), double_backward_safe():
            loss = loss_fn(bind(model, inner, check_names=False), batch)
            for node in _custom_nodes(loss):
                handles.append(node.register_hook(_watch_backward(node, detached)))
            grads = torch.autograd.grad(loss, targets, create_graph=True, allow_unused=True)
            # The second backward passes these nodes again, without create_graph: stop watching.
            for handle in handles:
                handle.remove()
            live = [g for g in grads if g is not None and g.requires_grad]
            if live:
                total = sum((g * g).sum() for g in live)
                torch.autograd.grad(total, targets + list(outer_only.values()), allow_unused=True)
    except RuntimeError as err:
        match = _NO_DERIVATIVE.search(str(err))
        if match:
            op = match.group(1)
            forward_op = op[: -len("_backward")] if op.endswith("_backward") else op
            return [_no_double_backward(trace.where(forward_op), f"aten::{forward_op}")]
        if "once_differentiable" in str(err) and trace.functions:
            return []  # already reported by name from the trace
        return [_no_double_backward("(unknown op)", f"the double backward failed ({_first_line(err)})")]
    finally:
        for handle in handles:
            handle.remove()
    return [
        _no_double_backward(
            trace.functions.get(cls, "(unknown module)"), f"custom autograd.Function {cls.__name__}"
        )
        for cls in detached
    ]


def _custom_nodes(output: torch.Tensor) -> list[Any]:
    """The custom autograd.Function nodes in ``output``'s graph."""
    found, seen, todo = [], set(), [output.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if getattr(node, "_forward_cls", None) is not None:
            found.append(node)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return found


def _watch_backward(node: Any, detached: set[type]):
    """A node hook noting a backward that, under create_graph, returns gradients with no graph.

    That is a backward written outside autograd (``.detach()``, NumPy, ``no_grad``): its gradient is
    right, but the second-order term through it is silently zero. It only counts when the gradient
    could have had a graph: an incoming gradient or a saved tensor requires grad.
    """

    def hook(grad_inputs, grad_outputs):
        if any(g is not None and g.requires_grad for g in grad_inputs):
            return
        saved = getattr(node, "saved_tensors", ())
        if any(g is not None and g.requires_grad for g in grad_outputs) or any(
            t is not None and t.requires_grad for t in saved
        ):
            detached.add(node._forward_cls)

    return hook


def _forward_ad_probe(model, loss_fn, batch, inner, trace: _Trace, found: list[Finding]) -> list[Finding]:
    try:
        with torch.enable_grad(), double_backward_safe(), fwAD.dual_level(), warnings.catch_warnings():
            # make_dual's first call loads torch's jvp decompositions through torch.jit.script.
            warnings.filterwarnings(
                "ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning
            )
            duals = {name: fwAD.make_dual(p, torch.randn_like(p)) for name, p in inner.items()}
            loss = loss_fn(bind(model, duals, check_names=False), batch)
            torch.autograd.grad(loss, list(inner.values()), create_graph=True, allow_unused=True)
    except (RuntimeError, NotImplementedError) as err:
        match = _NO_FORWARD_AD.search(str(err))
        if match:
            op = match.group(1)
            return [_no_forward_ad(trace.where(op), f"aten::{op}")]
        if "autograd.Function" in str(err) and any(f.kind == "no-forward-ad" for f in found):
            return []  # the custom Function is already named from the trace
        if "ZeroTensors are immutable" in str(err) and any(name == "mse_loss" for name, _, _ in trace.ops):
            # torch's mse_loss backward writes into the zero tangent of a target that has none.
            return [
                Finding(
                    "no-forward-ad",
                    "error",
                    trace.where("mse_loss"),
                    "aten::mse_loss's backward cannot run under forward-mode AD when the target has no "
                    "tangent (ZeroTensors are immutable), so SecondOrder(hvp='forward') fails on this loss.",
                    "write the loss out as ((prediction - target) ** 2).mean(), which has every rule, or use "
                    "SecondOrder() (reverse over reverse).",
                )
            ]
        return [
            Finding(
                "no-forward-ad",
                "error",
                "(forward-over-reverse)",
                f"a forward-over-reverse pass (forward-mode AD through the loss gradient), as SecondOrder(hvp='forward') "
                f"runs, failed: {_first_line(err)}",
                "use SecondOrder() (reverse over reverse), or fix the operation the message names.",
            )
        ]
    return []


# -- helpers --------------------------------------------------------------------------------------------


def _restore(model: nn.Module, buffers: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in buffers and not torch.equal(buffer, buffers[name]):
                buffer.copy_(buffers[name])


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})


def _listed(names: Sequence[str]) -> str:
    return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _unique(findings: list[Finding]) -> list[Finding]:
    """One finding per (kind, where): the module-tree check's wording wins over a probe's."""
    first: dict[tuple[str, str], Finding] = {}
    for finding in findings:
        first.setdefault((finding.kind, finding.where), finding)
    return list(first.values())
