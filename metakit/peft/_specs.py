"""Turn the list of parameters an insertion added into a short, exact `Spec`."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from metakit.spec import Spec, select


def exact_spec(model: nn.Module, added: Sequence[str], *globs: str) -> Spec:
    """``select(*globs)`` if it selects exactly ``added`` in ``model``, else a spec of the added modules.

    The short glob (``select('*.adapter.*')``) reads well in `metakit.explain`; it is used only
    when it is exact, e.g. not when the model already had parameters of that name before.
    """
    added_set = set(added)
    short = select(*globs)
    if set(short.names(model)) == added_set:
        return short
    return select(*sorted(added_set))
