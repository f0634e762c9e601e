"""Measure one configuration in this process: time, memory, meta-gradient and (sine) outcome.

Order matters: the first meta-step is the warm-up and the one whose peak memory is reported (a
fresh process's first step is when the allocator grows); the saved-tensor count gets its own step
because the counter keeps storages alive; timing alternates metakit and the hand-written loop so
that load from other processes on a shared machine affects both alike.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from metakit.bench.config import UNSOLVED, Config
from metakit.bench.memory import PeakRSS, SavedTensorCounter
from metakit.bench.outcome import meta_train_and_evaluate
from metakit.bench.reference import proximal_reference_gradient, reference_meta_step
from metakit.bench.strategies import build_learner, entry
from metakit.bench.workloads import WORKLOADS

__all__ = ["cosine_and_relative_error", "mean_diagnostics", "measure"]

MIB = 2**20


def measure(config: Config) -> dict:
    """Run ``config`` and return its record (without fidelity, which needs SecondOrder's gradient)."""
    device = torch.device(config.device)
    built = WORKLOADS[config.workload].build(device)
    try:
        learner = build_learner(built, config.strategy, config.steps)
    except (ValueError, TypeError) as error:
        return {"status": "unsupported", "error": str(error), "workload_info": built.info}
    model = built.model
    outer_names = built.outer.names(model)
    inner_names = built.inner.names(model)
    initial = _snapshot(model)
    sync = _synchronizer(device)
    record: dict = {"status": "ok", "workload_info": built.info, "outer_tensors": len(outer_names)}

    diagnostics: list[dict[str, float]] = []

    def metakit_step() -> torch.Tensor:
        result = learner.meta_step(built.tasks)
        diagnostics.append(mean_diagnostics(result))
        return result.loss

    strategy = entry(config.strategy)
    run_reference = None
    if config.reference and strategy.hand_written is not None:

        def run_reference() -> torch.Tensor:
            return reference_meta_step(
                model,
                built.loss_fn,
                built.tasks,
                inner_names,
                outer_names,
                lr=built.inner_lr,
                steps=config.steps,
                second_order=strategy.hand_written == "second-order",
                head_from_first_task=built.priming,
            )

    # 1. warm-up step: peak memory and the meta-gradient on the initial weights
    _zero_grads(model)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)
    with PeakRSS() as rss:
        started = time.perf_counter()
        loss = metakit_step()
        sync()
        record["first_step_ms"] = 1e3 * (time.perf_counter() - started)
    record["meta_loss"] = float(loss)
    record["peak_rss_increase_mib"] = rss.increase / MIB
    record["rss_method"] = rss.method
    if device.type == "cuda":
        record["cuda_peak_mib"] = (torch.cuda.max_memory_allocated(device) - allocated_before) / MIB
    grads = _grads(model, outer_names)
    if config.grad_path:
        torch.save(grads, config.grad_path)

    record.update(diagnostics[0])  # the warm-up step's: on the initial weights, like the gradient
    record.update(_unsolved(learner.strategy, record))
    if strategy.proximal:
        _restore(model, initial)
        record.update(_proximal_fidelity(config, built, learner.strategy, grads, inner_names, outer_names))

    # 2. bytes saved for backward during one meta-step
    _restore(model, initial)
    _zero_grads(model)
    try:
        with SavedTensorCounter() as saved:
            metakit_step()
        record["saved_mib"] = saved.nbytes / MIB
        record["saved_storages"] = saved.storages
    except (RuntimeError, ValueError, MemoryError) as error:  # Vmap: a VmapError (a ValueError)
        from metakit.bench.worker import classify_failure  # the worker imports this module

        record["saved_mib"] = None
        if classify_failure(error, memory_capped=config.device == "cpu") == "oom":
            # The counter holds every saved storage until the step ends: a total, which for a mode that
            # recomputes (forward over reverse, segments) can exceed what its step holds at once.
            record["saved_note"] = (
                "not measurable here: holding every storage the meta-step saves (each recomputation's "
                f"too) until the step ends ran out of memory ({str(error).splitlines()[0][:120]})"
            )
        elif "saved tensor hooks" in str(error):
            # torch.func transforms (torchopt's implicit differentiation, the Vmap executor) refuse these hooks
            record["saved_note"] = (
                "not measurable: the step runs under a torch.func transform, which refuses the saved-tensor "
                f"hooks that count saved bytes ({str(error).splitlines()[0][:120]})"
            )
        else:
            raise
        gc.collect()

    # 3. the hand-written loop on the same weights and batch: its gradient and saved bytes
    if run_reference is not None:
        _restore(model, initial)
        _zero_grads(model)
        with SavedTensorCounter() as reference_saved:
            run_reference()
        cosine, relative_error = cosine_and_relative_error(grads, _grads(model, outer_names))
        record["reference_cosine"], record["reference_rel_error"] = cosine, relative_error
        record["reference_saved_mib"] = reference_saved.nbytes / MIB

    # 4. timing: metakit and the hand-written loop alternate
    times, cpu_times, reference_times = [], [], []
    for _ in range(config.repeats):
        wall, cpu = _timed(metakit_step, model, sync)
        times.append(wall)
        cpu_times.append(cpu)
        if run_reference is not None:
            reference_times.append(_timed(run_reference, model, sync)[0])
    record["times_ms"] = times
    record["time_ms"] = statistics.median(times)
    record["cpu_times_ms"] = cpu_times
    record["cpu_time_ms"] = statistics.median(cpu_times)
    # One process; a distributed executor's run adds "tasks_per_s_2_processes" beside it.
    record["tasks_per_s"] = len(built.tasks) / (record["time_ms"] / 1e3)
    if reference_times:
        record["reference_times_ms"] = reference_times
        record["reference_time_ms"] = statistics.median(reference_times)
        record["overhead_ratio"] = record["time_ms"] / record["reference_time_ms"]

    # 5. outcome: query loss after adaptation, after a fixed meta-training budget
    if config.outcome_steps and built.sample_tasks is not None:
        _restore(model, initial)
        record["outcome"] = meta_train_and_evaluate(learner, built, config.outcome_steps)
    return record


def _unsolved(strategy, record: dict) -> dict:
    """``status`` and a note when Implicit's optimality or CG residual is above its ``residual_tol``."""
    tol = getattr(strategy, "residual_tol", None)
    if tol is None:
        return {}
    above = {
        name: record[key]
        for key, name in (("optimality_residual", "optimality"), ("cg_residual", "CG"))
        if record.get(key) is not None and record[key] > tol
    }
    if not above:
        return {"residual_tol": tol}
    residuals = ", ".join(f"{name} residual {value:.2g}" for name, value in above.items())
    return {
        "status": UNSOLVED,
        "residual_tol": tol,
        "unsolved_note": f"{residuals} above residual_tol={tol:g}: the implicit gradient's premise "
        "(an inner problem solved to its tolerance) does not hold here",
    }


def mean_diagnostics(result) -> dict[str, float]:
    """Mean over tasks of each per-task diagnostic a meta-step reports (Implicit's residuals), if any."""
    reported = getattr(result, "diagnostics", None) or {}
    return {key: float(torch.as_tensor(values).double().mean()) for key, values in reported.items()}


def _proximal_fidelity(config: Config, built, strategy, grads, inner_names, outer_names) -> dict:
    """Cosine and relative error to the proximal problem's exact gradient (hand-written), if affordable."""
    if not (config.proximal_reference and WORKLOADS[config.workload].proximal_reference):
        return {
            "fidelity_note": "no proximal reference in this run or on this workload (too costly); "
            "the cosine to SecondOrder() is in cosine_to_second_order"
        }
    # The reference does not depend on S: the first Implicit configuration of a run computes it.
    cache = (
        Path(config.grad_path).with_name(f"{config.workload}__proximal-{strategy.lam:g}.pt")
        if config.grad_path
        else None
    )
    if cache is not None and cache.exists():
        saved = torch.load(cache)
    else:
        reference = proximal_reference_gradient(
            built.model,
            built.loss_fn,
            built.tasks,
            inner_names,
            outer_names,
            lam=strategy.lam,
            max_step_size=built.inner_lr,
        )
        saved = {
            "grads": reference.grads,
            "summary": {
                "lam": strategy.lam,
                "optimality_residual": reference.optimality_residual,
                "solver_steps": reference.solver_steps,
                "adjoint_steps": reference.adjoint_steps,
                "converged": reference.converged,
            },
        }
        if cache is not None:
            torch.save(saved, cache)
    cosine, relative_error = cosine_and_relative_error(grads, saved["grads"])
    summary = saved["summary"]
    if not summary["converged"]:  # a cosine to an unconverged reference would mean nothing
        return {
            "proximal_reference": summary,
            "fidelity_note": "the proximal reference did not converge (optimality residual "
            f"{summary['optimality_residual']:.2g}); its cosine {cosine:.3f} is not a fidelity",
        }
    return {
        "cosine": cosine,
        "rel_error": relative_error,
        "fidelity_reference": "proximal inner problem solved to convergence (benchmarks/reference.py)",
        "proximal_reference": summary,
    }


def cosine_and_relative_error(
    grads: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]
) -> tuple[float, float]:
    """Cosine similarity and ``‖g − g*‖ / ‖g*‖`` of two gradients, flattened over shared names.

    A name missing from ``grads`` (no ``.grad``) counts as zero there.
    """
    names = sorted(exact)
    exact_flat = torch.cat([exact[n].flatten().double() for n in names])
    flat = torch.cat(
        [
            grads[n].flatten().double() if n in grads else torch.zeros_like(exact[n]).flatten().double()
            for n in names
        ]
    )
    norm, exact_norm = flat.norm(), exact_flat.norm()
    cosine = float(flat @ exact_flat / (norm * exact_norm)) if norm > 0 and exact_norm > 0 else float("nan")
    relative = float((flat - exact_flat).norm() / exact_norm) if exact_norm > 0 else float("nan")
    return cosine, relative


def _timed(
    step: Callable[[], torch.Tensor], model: nn.Module, sync: Callable[[], None]
) -> tuple[float, float]:
    """Wall-clock and CPU milliseconds of one meta-step.

    The process's CPU time does not count the time it waited for a core, so on a shared machine it is
    the steadier measure of what a one-thread CPU configuration costs (on CUDA it says little).
    """
    _zero_grads(model)
    sync()
    started, cpu_started = time.perf_counter(), time.process_time()
    step()
    sync()
    return 1e3 * (time.perf_counter() - started), 1e3 * (time.process_time() - cpu_started)


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _zero_grads(model: nn.Module) -> None:
    for param in model.parameters():
        param.grad = None


def _grads(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].grad.detach().cpu().clone() for n in names if params[n].grad is not None}


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _restore(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Undo what a meta-step changes in the module (priming's head carried over from the first task)."""
    model.load_state_dict(snapshot)
