"""Collectives with timeouts, shared by the ``Distributed`` executor and the experiments' ranks.

Every collective waits at most a timeout and raises `DistributedError` naming what the ranks
were doing; tensors travel flattened per (dtype, device); per-task records travel pickled as NumPy
arrays.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistributedError",
    "all_gather_object",
    "differing_names",
    "fingerprint",
    "flatten",
    "pack",
    "unflatten",
    "unpack",
    "wait",
]


class DistributedError(RuntimeError):
    """Another rank failed, or a collective waited longer than the executor's timeout.

    Attributes:
        failed_ranks: the ranks whose own error this one reports (each of them raised that error
            itself); empty when a collective timed out.
    """

    def __init__(self, message: str, failed_ranks: Sequence[int] = ()):
        super().__init__(message)
        self.failed_ranks = list(failed_ranks)


def wait(work: Any, what: str, *, group: Any = None, timeout: timedelta) -> None:
    """Wait for an ``async_op=True`` collective at most ``timeout``, else raise `DistributedError`.

    Args:
        work: what the collective returned.
        what: what the ranks were doing, for the message (e.g. "all-reducing the meta-gradient").
    """
    try:
        work.wait(timeout=timeout)
    except RuntimeError as error:
        raise DistributedError(
            f"rank {dist.get_rank(group)} waited more than {timeout} for the other ranks "
            f"while {what}: a rank failed, died or stopped taking part "
            f"({type(error).__name__}: {str(error).strip()[:200]}). Check the other ranks' logs; "
            "raise the timeout if a rank is only slow."
        ) from error


def all_gather_object(
    obj: Any,
    what: str,
    *,
    group: Any = None,
    timeout: timedelta,
    device: torch.device | str = "cpu",
) -> list[Any]:
    """``dist.all_gather_object`` that waits at most ``timeout`` (`wait`); every rank's ``obj``.

    Example:
        >>> statuses = all_gather_object(None, "finishing a unit", timeout=timedelta(minutes=5))  # doctest: +SKIP
    """
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    world = dist.get_world_size(group)
    size = torch.tensor([payload.numel()], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    wait(dist.all_gather(sizes, size, group=group, async_op=True), what, group=group, timeout=timeout)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    gathered = [torch.empty_like(padded) for _ in range(world)]
    wait(dist.all_gather(gathered, padded, group=group, async_op=True), what, group=group, timeout=timeout)
    # The payloads are this job's own ranks' records (as in dist.all_gather_object).
    return [pickle.loads(g[: int(s)].cpu().numpy().tobytes()) for g, s in zip(gathered, sizes, strict=True)]


def fingerprint(params: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    """Per tensor: shape, dtype, and float64 sum, weighted sum and absolute sum of its values.

    The weighted sum (weights ``1 + i / n`` over the flattened positions) also tells permuted values
    apart. Returns:
        ``{name: (shape, dtype, sum, weighted_sum, abs_sum)}``.
    """
    out = {}
    with torch.no_grad():
        for name, value in params.items():
            flat = value.detach().reshape(-1).to(torch.float64)
            weights = 1 + torch.arange(flat.numel(), dtype=torch.float64, device=flat.device) / max(
                flat.numel(), 1
            )
            out[name] = (
                tuple(value.shape),
                str(value.dtype),
                float(flat.sum()),
                float(flat @ weights),
                float(flat.abs().sum()),
            )
    return out


def same_fingerprint(a: Mapping[str, tuple], b: Mapping[str, tuple]) -> bool:
    return not differing_names(a, b)


def differing_names(a: Mapping[str, tuple], b: Mapping[str, tuple]) -> list[str]:
    names = [n for n in a if n not in b] + [n for n in b if n not in a]
    for name in a:
        if name not in b:
            continue
        (shape_a, dtype_a, *sums_a), (shape_b, dtype_b, *sums_b) = a[name], b[name]
        # Sums in float64 of the same values agree to rounding whatever the reduction order.
        scale = 1e-9 * (sums_a[2] + sums_b[2]) + 1e-30
        if (shape_a, dtype_a) != (shape_b, dtype_b) or any(
            abs(x - y) > scale for x, y in zip(sums_a, sums_b, strict=True)
        ):
            names.append(name)
    return names


def flatten(tensors: Mapping[str, torch.Tensor]) -> list[tuple[list[str], torch.Tensor]]:
    """One contiguous buffer per (dtype, device), so each group needs a single collective."""
    groups: dict[tuple, list[str]] = {}
    for name, value in tensors.items():
        groups.setdefault((value.dtype, value.device), []).append(name)
    return [(names, torch.cat([tensors[n].reshape(-1) for n in names])) for names in groups.values()]


def unflatten(tensors: dict[str, torch.Tensor], names: list[str], flat: torch.Tensor) -> None:
    offset = 0
    for name in names:
        numel = tensors[name].numel()
        tensors[name] = flat[offset : offset + numel].view_as(tensors[name])
        offset += numel


def pack(tensor: torch.Tensor) -> tuple:
    """A tensor as a NumPy array and its dtype: pickled some 30 times faster than a tensor."""
    tensor = tensor.detach().cpu()
    numpy_ready = tensor.dtype in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.int64,
        torch.int32,
        torch.bool,
    )
    return (tensor if numpy_ready else tensor.double()).numpy(), tensor.dtype


def unpack(packed: tuple, device: torch.device) -> torch.Tensor:
    array, dtype = packed
    return torch.from_numpy(array).to(device=device, dtype=dtype)
