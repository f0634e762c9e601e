"""Devices a plan is made for: memory and the rates that turn FLOPs and bytes into seconds.

The GPU figures are the vendors' datasheet numbers for dense math (no structured sparsity):

| name | memory | FP32 | BF16/FP16 tensor | memory bandwidth | source |
|---|---|---|---|---|---|
| t4 | 15 GiB (16 GB card) | 8.1 TFLOPS | 65 (FP16; no BF16) | 320 GB/s | NVIDIA T4 datasheet |
| v100-16gb / v100-32gb | 16 / 32 GiB | 15.7 | 125 (FP16; no BF16) | 900 GB/s | V100 SXM2 datasheet |
| a10 | 22.5 GiB (24 GB card) | 31.2 | 125 | 600 GB/s | A10 datasheet |
| l4 | 22.5 GiB (24 GB card) | 30.3 | 121 | 300 GB/s | L4 datasheet |
| rtx4090 | 24 GiB | 82.6 | 165 (FP32 accumulate) | 1008 GB/s | Ada (AD102) whitepaper |
| a100-40gb / a100-80gb | 40 / 80 GiB | 19.5 | 312 | 1555 / 2039 GB/s | A100 SXM datasheet |
| h100 | 79.6 GiB (80 GB card) | 67 | 989 | 3350 GB/s | H100 SXM datasheet |
| h200 | 140.4 GiB (141 GB card) | 67 | 989 | 4800 GB/s | H200 SXM datasheet |

Memory is the total that ``nvidia-smi`` reports (the usable part is lower: see ``reserved_gib``).
A float32 step runs at the FP32 rate: PyTorch does not use TF32 for float32 matmuls unless
``torch.backends.cuda.matmul.allow_tf32`` is set (give ``Device(..., tflops=<TF32 rate>)`` then).
``"cpu"`` is this machine, measured when first asked for (matmul rate, copy bandwidth, per-op cost
at the current number of torch threads).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import torch

__all__ = ["DEVICES", "Device", "UnknownDeviceError", "get_device", "measure_cpu"]

GIB = 2**30


class UnknownDeviceError(ValueError):
    """A device name that is not in the table."""


@dataclass(frozen=True)
class Device:
    """A device to plan for.

    Args:
        memory_gib: memory, in GiB.
        tflops: dense float32 matmul rate, in TFLOPS (10^12 FLOP/s).
        half_tflops: dense bfloat16/float16 tensor-core rate for ``precision="bf16"``/``"fp16"``
            learners (``None``: ``tflops``).
        bandwidth_gbs: memory bandwidth in GB/s (``None``: time counts FLOPs only).
        efficiency: the share of the peak rates a step reaches (0.6: large matmuls in eager PyTorch).
        overhead_us: fixed cost of each operation, in microseconds (Python, dispatch, kernel launch).
        reserved_gib: memory the step cannot use (CUDA context, library workspaces).
        fragmentation: extra share of the step's bytes lost to the allocator's rounding and caching.
        name: how tables call it.

    Example:
        >>> mk.Device(memory_gib=24, tflops=80, bandwidth_gbs=1000, name="my-gpu")  # doctest: +SKIP
    """

    memory_gib: float
    tflops: float
    half_tflops: float | None = None
    bandwidth_gbs: float | None = None
    efficiency: float = 0.6
    overhead_us: float = 8.0
    reserved_gib: float = 1.0
    fragmentation: float = 0.1
    name: str = "custom"

    def __post_init__(self) -> None:
        for field in ("memory_gib", "tflops"):
            value = getattr(self, field)
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"Device({field}=...) must be a positive number, got {value!r}.")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"Device(efficiency=...) must be in (0, 1], got {self.efficiency!r}.")

    @property
    def usable_bytes(self) -> float:
        """Bytes a step may use: memory minus ``reserved_gib``."""
        return (self.memory_gib - self.reserved_gib) * GIB

    def fits(self, nbytes: float) -> bool:
        """Whether ``nbytes`` of tensors (plus ``fragmentation``) fit in the usable memory."""
        return nbytes * (1 + self.fragmentation) <= self.usable_bytes

    def seconds(self, flops: float, moved: float, low_precision: bool = False) -> float:
        """Time of one operation: the slower of its math and its memory traffic, plus the fixed cost."""
        rate = (self.half_tflops or self.tflops) if low_precision else self.tflops
        compute = flops / (rate * 1e12 * self.efficiency)
        memory = moved / (self.bandwidth_gbs * 1e9 * self.efficiency) if self.bandwidth_gbs else 0.0
        return max(compute, memory) + self.overhead_us * 1e-6


def _gpu(name, memory_gib, tflops, half_tflops, bandwidth_gbs) -> Device:
    return Device(memory_gib, tflops, half_tflops, bandwidth_gbs, name=name)


#: The known GPUs by name (datasheet figures, dense; see the module's table).
DEVICES: dict[str, Device] = {
    d.name: d
    for d in (
        _gpu("t4", 15.0, 8.1, 65.0, 320),
        _gpu("v100-16gb", 16.0, 15.7, 125.0, 900),
        _gpu("v100-32gb", 32.0, 15.7, 125.0, 900),
        _gpu("a10", 22.5, 31.2, 125.0, 600),
        _gpu("l4", 22.5, 30.3, 121.0, 300),
        _gpu("rtx4090", 24.0, 82.6, 165.2, 1008),
        _gpu("a100-40gb", 40.0, 19.5, 312.0, 1555),
        _gpu("a100-80gb", 80.0, 19.5, 312.0, 2039),
        _gpu("h100", 79.6, 67.0, 989.4, 3350),
        _gpu("h200", 140.4, 67.0, 989.4, 4800),
    )
}
_ALIASES = {"a100": "a100-80gb", "v100": "v100-32gb", "4090": "rtx4090", "h100-80gb": "h100"}


def get_device(device: str | Device) -> Device:
    """A `Device` by name (``"a100-80gb"``, ``"cpu"``...), or ``device`` itself.

    Raises:
        UnknownDeviceError: the name is not known; the message lists the known ones and how to give
            memory and FLOP rate.
    """
    if isinstance(device, Device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be a name or a metakit.Device, got {type(device).__name__}.")
    key = device.strip().lower().replace("_", "-").replace(" ", "-")
    key = _ALIASES.get(key, key)
    if key == "cpu":
        return measure_cpu()
    if key not in DEVICES:
        raise UnknownDeviceError(
            f"unknown device {device!r}; known: {', '.join([*DEVICES, 'cpu'])}. For another, give its memory "
            "and FLOP rate: mk.Device(memory_gib=..., tflops=...) (CLI: --memory-gib GIB --tflops TFLOPS)."
        )
    return DEVICES[key]


@functools.cache
def measure_cpu() -> Device:
    """This machine at the current torch thread count: matmul rate, copy bandwidth, per-op cost, RAM.

    Rates are measured (so ``efficiency`` is 1); memory is the physical RAM; nothing is reserved.
    """
    threads = torch.get_num_threads()
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    flops_per_s = _rate(lambda: torch.mm(a, b), 2 * 512**3)
    source, target = torch.randn(2**23), torch.empty(2**23)  # 32 MiB each: past the caches
    bytes_per_s = _rate(lambda: target.copy_(source), 2 * source.nbytes)
    small = torch.ones(8)
    overhead = 1 / _rate(lambda: small.add(1.0), 1)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return Device(
        memory_gib=memory,
        tflops=flops_per_s / 1e12,
        bandwidth_gbs=bytes_per_s / 1e9,
        efficiency=1.0,
        overhead_us=overhead * 1e6,
        reserved_gib=0.0,
        fragmentation=0.0,
        name=f"cpu ({threads} thread{'s' if threads > 1 else ''}, measured)",
    )


def _rate(work, amount: float, seconds: float = 0.2) -> float:
    """``amount`` per call of ``work`` divided by its best time per call over about ``seconds``."""
    work()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        for _ in range(10):
            work()
        best = min(best, (time.perf_counter() - started) / 10)
    return amount / best
