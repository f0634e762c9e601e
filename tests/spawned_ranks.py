"""Start a test's worker on several CPU processes (gloo) and collect what each rank saved.

A worker is ``worker(rank, init_file, out_dir)``: it joins the group through ``file://{init_file}``,
measures, and saves a dict to ``{out_dir}/rank{rank}.pt``, with ``"crash"`` holding the traceback of
anything it raised.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable

import torch
import torch.multiprocessing as mp


def spawn_ranks(
    worker: Callable[[int, str, str], None], world: int, collect: Callable[[str], dict] | None = None
) -> list[dict]:
    """Run ``worker`` on ``world`` processes; every rank's saved dict, in rank order.

    Args:
        collect: reads further files the workers wrote (given the output folder) into rank 0's dict,
            before the folder is deleted.
    """
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, args=(f"{out}/init", out), nprocs=world, join=True)
        saved = [torch.load(f"{out}/rank{r}.pt", weights_only=False) for r in range(world)]
        if collect is not None:
            saved[0].update(collect(out))
    for rank, measured in enumerate(saved):
        assert "crash" not in measured, f"rank {rank} crashed:\n{measured.get('crash')}"
    return saved
