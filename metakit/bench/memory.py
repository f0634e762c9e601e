"""Memory meters: bytes saved for backward, peak resident set size, peak CUDA allocation."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import TracebackType

import psutil
import torch

__all__ = ["PeakRSS", "SavedTensorCounter", "current_rss"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


class SavedTensorCounter:
    """Count the bytes of tensors autograd saves for backward while the context is active.

    Every tensor that an autograd node saves goes through the pack hook of
    `torch.autograd.graph.saved_tensors_hooks`; the counter records its storage, keyed by
    ``untyped_storage().data_ptr()``, so a storage saved by several nodes (or as several views) is
    counted once. The storages are kept alive until the context exits, so an address freed and
    reused within the context cannot hide a second storage; the extra memory this holds equals the
    number being measured, so measure peak memory in a separate step.

    Example:
        >>> with SavedTensorCounter() as saved:
        ...     loss = (x * w).sum()  # doctest: +SKIP
        >>> saved.nbytes  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._storages: dict[tuple[str, int], torch.UntypedStorage] = {}
        self._nbytes_at_exit: int | None = None
        self.tensors_saved = 0
        self.unaccounted = 0  # saved tensors without a plain storage (e.g. tensor subclasses)
        self.storages = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @property
    def nbytes(self) -> int:
        """Total bytes of the distinct storages saved (so far, or up to the context's exit)."""
        if self._nbytes_at_exit is not None:
            return self._nbytes_at_exit
        return sum(storage.nbytes() for storage in self._storages.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.tensors_saved += 1
        try:
            storage = tensor.untyped_storage()
            key = (str(storage.device), storage.data_ptr())
        except (RuntimeError, NotImplementedError):  # no plain storage (a dual tensor's tangent view...)
            self.unaccounted += 1
            return tensor
        if key not in self._storages and storage.nbytes() > 0:
            self._storages[key] = storage
        return tensor

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def __enter__(self) -> SavedTensorCounter:
        self._hooks.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._hooks.__exit__(kind, value, tb)
        self.storages = len(self._storages)
        self._nbytes_at_exit = self.nbytes
        self._storages.clear()  # release what the context kept alive


def current_rss() -> int:
    """Resident set size of this process, in bytes."""
    return psutil.Process().memory_info().rss


def _read_hwm() -> int | None:
    """The kernel's peak RSS of this process (``VmHWM``), in bytes, or ``None`` off Linux."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: write 5 to ``/proc/self/clear_refs``)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _read_hwm() is not None


class PeakRSS:
    """Peak increase of the resident set size over the RSS at entry, in bytes.

    On Linux the kernel's own high-water mark is reset at entry and read at exit (exact, no
    sampling). Elsewhere a thread samples RSS every ``interval`` seconds (may miss short peaks).
    ``method`` says which was used.
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def increase(self) -> int:
        """Peak RSS minus RSS at entry, in bytes (never negative)."""
        return max(0, self.peak - self.baseline)

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.baseline = current_rss()
        self.peak = self.baseline
        if _reset_hwm():
            self.method = "VmHWM (reset via /proc/self/clear_refs)"
        else:
            self.method = f"psutil sampling every {self.interval * 1e3:g} ms"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak = max(self.peak, _read_hwm() or 0)
        self.peak = max(self.peak, current_rss())
