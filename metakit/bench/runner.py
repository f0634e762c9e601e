"""Run a grid of configurations, one fresh process each, and collect their records.

A worker that dies (killed by the kernel's OOM killer, a segfault) or runs past the time limit
still yields a record, with status ``"oom"``, ``"crashed"`` or ``"timeout"``; the run goes on.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from metakit.bench.config import Config
from metakit.bench.fidelity import add_fidelity

__all__ = ["run_configs"]

_SIGKILL = 9


def run_configs(
    configs: Sequence[Config], timeout_s: float = 900.0, progress: bool = True, checkpoint: Path | None = None
) -> list[dict]:
    """Measure each configuration in its own process; return one record per configuration, in order.

    Records of successful configurations also get ``cosine`` and ``rel_error`` to SecondOrder's
    meta-gradient on the same workload and S (when SecondOrder is part of the grid).

    Args:
        configs: the grid.
        timeout_s: a configuration running longer is killed and recorded as ``"timeout"``.
        progress: show a tqdm bar over configurations.
        checkpoint: if set, every record is appended to this JSON-lines file as soon as it exists,
            so an interrupted run keeps what it measured.
    """
    threads = max((config.threads for config in configs), default=1)
    for env in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the fork server's environment, before torch loads
        os.environ.setdefault(env, str(threads))
    from metakit.bench.worker import PRELOAD

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="metakit-bench-") as scratch:
        grad_paths: dict[str, Path] = {}
        bar = tqdm(configs, desc="metakit bench", unit="config", disable=not progress, dynamic_ncols=True)
        for config in bar:
            bar.set_postfix_str(f"{config.workload} {config.strategy} S={config.steps}")
            grad_path = Path(scratch) / f"{config.key}.grad.pt"
            config = replace(config, grad_path=str(grad_path))
            record = _run_one(context, config, Path(scratch), timeout_s)
            if record["status"] == "ok" and grad_path.exists():
                grad_paths[config.key] = grad_path
            record["config"].pop("grad_path", None)  # a scratch path, gone after the run
            add_fidelity([record], grad_paths)
            records.append(record)
            if checkpoint is not None:
                with checkpoint.open("a") as stream:
                    stream.write(json.dumps(record) + "\n")
        add_fidelity(records, grad_paths)  # for any run that finished before its SecondOrder run
    return records


def _run_one(context, config: Config, scratch: Path, timeout_s: float) -> dict:
    from metakit.bench.worker import run_in_child

    record_path, log_path = scratch / f"{config.key}.json", scratch / f"{config.key}.log"
    process = context.Process(target=run_in_child, args=(config.to_json(), str(record_path), str(log_path)))
    process.start()
    try:
        process.join(timeout_s)
    except BaseException:  # Ctrl-C or SIGTERM: the worker goes with the run
        process.kill()
        process.join()
        raise
    if process.is_alive():
        process.kill()
        process.join()
        return _failed(config, "timeout", f"no result after {timeout_s:.0f} s", log_path)
    if record_path.exists():
        return json.loads(record_path.read_text())
    if process.exitcode == -_SIGKILL:
        return _failed(
            config, "oom", "worker killed by SIGKILL (most likely the kernel's OOM killer)", log_path
        )
    return _failed(config, "crashed", f"worker exited with code {process.exitcode} and no record", log_path)


def _failed(config: Config, status: str, error: str, log_path: Path) -> dict:
    log = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    return {"status": status, "error": error, "log_tail": log, "config": json.loads(config.to_json())}
