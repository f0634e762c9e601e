"""Worker: measure one configuration in its own process and write its JSON record.

The runner starts one process per configuration, forked from a server process that has already
imported torch and metakit (``multiprocessing``'s ``forkserver``), so each configuration starts
with a clean heap without paying ~10 s of imports. For debugging, one configuration can also be
run by hand::

    python -m metakit.bench.worker CONFIG.json RECORD.json

The record is always written, also when the configuration fails: ``status`` is ``"ok"``,
``"oom"`` (out of memory), ``"unsupported"`` (the learner rejects the combination) or ``"error"``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import torch

from metakit.bench.config import Config
from metakit.bench.measure import measure

__all__ = ["PRELOAD", "classify_failure", "main", "run_in_child"]

#: Modules the fork server imports once, so that forked workers start warm.
PRELOAD = ["metakit.bench.worker", "transformers.models.bert.modeling_bert"]

_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "std::bad_alloc")
# Under an address-space cap, oneDNN reports a failed workspace allocation only as this.
_CAPPED_OOM_MARKERS = ("could not create a primitive",)


def classify_failure(error: BaseException, memory_capped: bool = False) -> str:
    """``"oom"`` for an out-of-memory error (CUDA, CPU allocator, ``MemoryError``), else ``"error"``.

    Args:
        error: what the configuration raised.
        memory_capped: the worker ran under ``memory_limit_gib``, so native libraries' allocation
            failures (which some report without saying "memory") count as out of memory too.
    """
    if isinstance(error, MemoryError | torch.OutOfMemoryError):
        return "oom"
    text = str(error).lower()
    markers = _OOM_MARKERS + (_CAPPED_OOM_MARKERS if memory_capped else ())
    return "oom" if any(marker in text for marker in markers) else "error"


def _limit_memory(gib: float) -> None:
    """Cap the address space at its current size plus ``gib``, so allocations beyond fail cleanly."""
    if gib <= 0:
        return
    current = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            current = int(line.split()[1]) * 1024
    limit = current + int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def measure_to_record(config: Config) -> dict:
    """Measure ``config`` in this process; failures become records with a status and the error."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    try:
        if config.device == "cpu":
            _limit_memory(config.memory_limit_gib)
        record = measure(config)
    except BaseException as error:  # a failed configuration is a result, not a crash of the run
        record = {
            "status": classify_failure(
                error, memory_capped=config.device == "cpu" and config.memory_limit_gib > 0
            ),
            "error": f"{type(error).__name__}: {error}"[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
    record.update(
        config=json.loads(config.to_json()),
        threads=torch.get_num_threads(),
        wall_s=time.perf_counter() - started,
        load_average=list(os.getloadavg()),
    )
    return record


def run_in_child(config_json: str, record_path: str, log_path: str) -> None:
    """Entry point of a forked worker: output goes to ``log_path``, the record to ``record_path``."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    record = measure_to_record(Config.from_json(config_json))
    Path(record_path).write_text(json.dumps(record, indent=1))


def main(argv: list[str] | None = None) -> int:
    """``python -m metakit.bench.worker CONFIG.json RECORD.json``."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    record = measure_to_record(Config.from_json(Path(args[0]).read_text()))
    Path(args[1]).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
