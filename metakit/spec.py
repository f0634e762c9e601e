"""Parameter-partition specs: composable predicates that say which parameters belong to a group.

A `Spec` is a pure predicate over a parameter's ``(name, tensor, owning module)``. Specs
compose with ``|`` (union), ``&`` (intersection), ``-`` (difference) and ``~`` (complement), so
"which parameters adapt in the inner loop" and "which are meta-learned" are small values that can
be printed, combined and checked with `explain` before any training starts.

Example:
    >>> import metakit as mk
    >>> head = mk.select("classifier.*")
    >>> inner = mk.select("*.adapter.*") | head
    >>> inner.names(model)  # doctest: +SKIP
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "Spec",
    "combine",
    "everything",
    "explain",
    "module_type",
    "nothing",
    "regex",
    "require_nonempty",
    "select",
]


class Spec:
    """A predicate over ``(name, parameter, owning module)``; compose with ``| & - ~``."""

    #: Whether `matches` looks at the owning module (then `split` needs the model).
    needs_module: bool = False
    #: Binding strength used by ``repr`` (Python's: ``~`` > ``-`` > ``&`` > ``|``) to place parentheses.
    _precedence: int = 100

    def matches(self, name: str, param: torch.Tensor | None, module: nn.Module | None) -> bool:
        """Whether the parameter called ``name`` belongs to this spec."""
        raise NotImplementedError

    # -- queries over a model or a params dict -------------------------------------------------
    def names(self, model: nn.Module) -> list[str]:
        """Names of the selected parameters, in ``model.named_parameters()`` order.

        Tied (shared) parameters appear once, under their first name, as in ``named_parameters()``.
        A spec that matches nothing returns ``[]``; APIs that need a non-empty group check that
        with `require_nonempty`.
        """
        return [name for name, param in model.named_parameters() if self._matches_in(model, name, param)]

    def split(
        self, params: Mapping[str, torch.Tensor], model: nn.Module | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Split a params dict into ``(selected, rest)``, keeping the same tensor objects.

        Args:
            params: a flat ``{dotted name: tensor}`` dict, e.g. ``dict(model.named_parameters())``.
            model: the module the names refer to; needed only by specs built on
                `module_type`, which must know the module that owns each parameter.
        """
        if self.needs_module and model is None:
            raise ValueError(
                f"{self!r} selects by module type, so split() needs the model the names refer to: "
                "call spec.split(params, model=model)."
            )
        selected: dict[str, torch.Tensor] = {}
        rest: dict[str, torch.Tensor] = {}
        for name, param in params.items():
            if self._matches_in(model, name, param):
                selected[name] = param
            else:
                rest[name] = param
        return selected, rest

    def _matches_in(self, model: nn.Module | None, name: str, param: torch.Tensor) -> bool:
        module = _owner(model, name) if (self.needs_module and model is not None) else None
        return self.matches(name, param, module)

    # -- algebra ---------------------------------------------------------------------------------
    def __or__(self, other: Spec) -> Spec:
        return _Union(self, _check_spec(other, "|"))

    def __and__(self, other: Spec) -> Spec:
        return _Intersection(self, _check_spec(other, "&"))

    def __sub__(self, other: Spec) -> Spec:
        return _Difference(self, _check_spec(other, "-"))

    def __invert__(self) -> Spec:
        return _Complement(self)

    def _repr_child(self, child: Spec, *, right: bool = False) -> str:
        text = repr(child)
        weaker = child._precedence < self._precedence
        # a - (b - c) and a - (b | c) need parentheses on the right even at equal precedence.
        if weaker or (right and child._precedence == self._precedence and not _associative(self)):
            return f"({text})"
        return text


def _associative(spec: Spec) -> bool:
    return isinstance(spec, (_Union, _Intersection))


def _check_spec(other: Any, op: str) -> Spec:
    if not isinstance(other, Spec):
        raise TypeError(
            f"Spec {op} expects another Spec, got {type(other).__name__} {other!r}; "
            "build one with metakit.select(...), regex(...), module_type(...), everything() or nothing()."
        )
    return other


def _owner(model: nn.Module, name: str) -> nn.Module:
    module_path, _, _ = name.rpartition(".")
    return model.get_submodule(module_path) if module_path else model


class _Select(Spec):
    def __init__(self, globs: tuple[str, ...]):
        if not globs:
            raise ValueError("select() needs at least one glob, e.g. select('classifier.*').")
        for glob in globs:
            if not isinstance(glob, str):
                raise TypeError(
                    f"select() expects glob strings such as 'encoder.layer.*.adapter.*', "
                    f"got {type(glob).__name__} {glob!r}."
                )
        self.globs = globs
        self._patterns = [re.compile(fnmatch.translate(glob)) for glob in globs]

    def matches(self, name, param, module):
        return any(pattern.match(name) for pattern in self._patterns)

    def __repr__(self):
        return f"select({', '.join(repr(g) for g in self.globs)})"


class _Regex(Spec):
    def __init__(self, pattern: str):
        if not isinstance(pattern, str):
            raise TypeError(f"regex() expects a pattern string, got {type(pattern).__name__} {pattern!r}.")
        try:
            self._compiled = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"regex() got an invalid regular expression {pattern!r}: {err}.") from err
        self.pattern = pattern

    def matches(self, name, param, module):
        return self._compiled.fullmatch(name) is not None

    def __repr__(self):
        return f"regex({self.pattern!r})"


class _ModuleType(Spec):
    needs_module = True

    def __init__(self, types: tuple[type, ...]):
        if not types:
            raise ValueError(
                "module_type() needs at least one nn.Module subclass, e.g. module_type(nn.LayerNorm)."
            )
        for t in types:
            if not (isinstance(t, type) and issubclass(t, nn.Module)):
                raise TypeError(
                    f"module_type() expects nn.Module subclasses such as nn.Linear, got {t!r} "
                    f"({type(t).__name__})."
                )
        self.types = types

    def matches(self, name, param, module):
        if module is None:
            raise ValueError(f"{self!r} needs the module that owns {name!r}; pass the model.")
        return isinstance(module, self.types)

    def __repr__(self):
        return f"module_type({', '.join(t.__name__ for t in self.types)})"


class _Constant(Spec):
    def __init__(self, value: bool):
        self.value = value

    def matches(self, name, param, module):
        return self.value

    def __repr__(self):
        return "everything()" if self.value else "nothing()"


class _Binary(Spec):
    symbol = "?"

    def __init__(self, left: Spec, right: Spec):
        self.left, self.right = left, right
        self.needs_module = left.needs_module or right.needs_module

    def __repr__(self):
        return f"{self._repr_child(self.left)} {self.symbol} {self._repr_child(self.right, right=True)}"


class _Union(_Binary):
    symbol, _precedence = "|", 10

    def matches(self, name, param, module):
        return self.left.matches(name, param, module) or self.right.matches(name, param, module)


class _Intersection(_Binary):
    symbol, _precedence = "&", 30

    def matches(self, name, param, module):
        return self.left.matches(name, param, module) and self.right.matches(name, param, module)


class _Difference(_Binary):
    symbol, _precedence = "-", 40

    def matches(self, name, param, module):
        return self.left.matches(name, param, module) and not self.right.matches(name, param, module)


class _Complement(Spec):
    _precedence = 50

    def __init__(self, inner: Spec):
        self.inner = inner
        self.needs_module = inner.needs_module

    def matches(self, name, param, module):
        return not self.inner.matches(name, param, module)

    def __repr__(self):
        return (
            f"~{self._repr_child(self.inner)}"
            if self.inner._precedence > self._precedence
            else f"~({self.inner!r})"
        )


# -- constructors -------------------------------------------------------------------------------
def select(*globs: str) -> Spec:
    """Parameters whose dotted name matches any of the ``fnmatch`` globs (``*`` crosses dots)."""
    return _Select(globs)


def regex(pattern: str) -> Spec:
    """Parameters whose dotted name fully matches the regular expression ``pattern``."""
    return _Regex(pattern)


def module_type(*types: type[nn.Module]) -> Spec:
    """Parameters owned directly by a module of one of ``types`` (e.g. ``nn.LayerNorm``)."""
    return _ModuleType(types)


def everything() -> Spec:
    """Every parameter."""
    return _Constant(True)


def nothing() -> Spec:
    """No parameter."""
    return _Constant(False)


# -- helpers over params dicts ------------------------------------------------------------------
def combine(*dicts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Merge params dicts (e.g. the two halves of `Spec.split`) back into one.

    Raises ``ValueError`` if a name appears in more than one dict: the halves of a split never
    overlap, so an overlap means two groups claim the same parameter.
    """
    merged: dict[str, torch.Tensor] = {}
    for part in dicts:
        overlap = merged.keys() & part.keys()
        if overlap:
            raise ValueError(
                f"combine() got the same parameter in several dicts: {sorted(overlap)[:5]}; "
                "split the params with disjoint specs (a - b) before combining."
            )
        merged.update(part)
    return merged


def require_nonempty(spec: Spec, model: nn.Module, role: str) -> list[str]:
    """Return ``spec.names(model)``, raising a ``ValueError`` that helps if it is empty."""
    names = spec.names(model)
    if not names:
        sample = [name for name, _ in model.named_parameters()][:6]
        raise ValueError(
            f"The {role} spec {spec!r} matches no parameter of {type(model).__name__}. "
            f"Some real parameter names: {sample}. Check the globs against model.named_parameters() "
            "or print metakit.explain(model, ...)."
        )
    return names


def explain(model: nn.Module, **groups: Spec) -> str:
    """A table of each named group (tensors, elements, share of the model) and of conflicts.

    Parameters selected by several groups, and parameters in none, are listed after the table.

    Example:
        >>> print(mk.explain(model, inner=adapter | head, outer=backbone | adapter))  # doctest: +SKIP
    """
    for key, spec in groups.items():
        _check_spec(spec, f"explain({key}=...)")
    params = list(model.named_parameters())
    total = sum(p.numel() for _, p in params) or 1
    membership: dict[str, list[str]] = {name: [] for name, _ in params}
    rows = []
    for group, spec in groups.items():
        names = set(spec.names(model))
        for name in names:
            membership[name].append(group)
        tensors = [p for n, p in params if n in names]
        elements = sum(p.numel() for p in tensors)
        rows.append((group, repr(spec), len(tensors), elements, 100.0 * elements / total))
    lines = [f"{type(model).__name__}: {len(params)} tensors, {total:,} elements"]
    width = max([len(r[0]) for r in rows] + [5])
    lines.append(f"{'group':<{width}}  {'tensors':>7}  {'elements':>12}  {'share':>8}  spec")
    for group, text, n_tensors, elements, share in rows:
        lines.append(f"{group:<{width}}  {n_tensors:>7}  {elements:>12,}  {share:>7.3f}%  {text}")
    shared = {name: gs for name, gs in membership.items() if len(gs) > 1}
    unused = [name for name, gs in membership.items() if not gs]
    if shared:
        lines.append(f"in several groups ({len(shared)}):")
        lines.extend(f"  {name}: {', '.join(gs)}" for name, gs in _head(shared.items()))
        lines.extend(_more(len(shared)))
    aliases = _tied_aliases(model)
    if aliases:
        lines.append(f"tied (counted once, under the first name) ({len(aliases)}):")
        lines.extend(f"  {alias} = {name}" for alias, name in _head(aliases.items()))
        lines.extend(_more(len(aliases)))
    if unused:
        lines.append(f"in no group ({len(unused)}):")
        lines.extend(f"  {name}" for name in _head(unused))
        lines.extend(_more(len(unused)))
    return "\n".join(lines)


_LISTED = 20


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """Names under which an already-listed parameter appears again, mapped to its first name."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _head(items: Iterable) -> list:
    return list(items)[:_LISTED]


def _more(count: int) -> list[str]:
    return [f"  ... and {count - _LISTED} more"] if count > _LISTED else []
