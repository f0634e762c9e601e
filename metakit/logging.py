"""TensorBoard logging of meta-training: the inner-loop loss curve, query loss, gradient norms."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from metakit.extras import require

if TYPE_CHECKING:
    from metakit.learner import MetaLearner, MetaStepResult

__all__ = ["TensorBoardLogger"]


class TensorBoardLogger:
    """Writes each meta-step to TensorBoard; pass it as ``MetaLearner(..., logger=...)``.

    Scalars, by tag:
        ``inner_loss/step_{s}``: mean support loss over the tasks before inner step ``s`` (the last
        is after the final step); the custom-scalars tab shows them as one multi-line chart.
        ``inner_loss_task_{t}/step_{s}``: the same per task, if ``per_task``.
        ``meta/query_loss`` (after adaptation), ``adaptation/query_loss_before`` and
        ``adaptation/gain`` (before minus after: what the inner loop bought), ``grad_norm/{group}``
        (``total`` only when there is more than one group), ``inner_lr_scale/{param}`` (MetaSGD, mean scale).
        ``diagnostics/{name}/mean`` and ``.../max``: over the tasks, for every entry of the result's
        ``diagnostics`` (per-task tensors a strategy reports, e.g. ``Implicit``'s ``cg_residual``).
    Every ``curve_every`` meta-steps it also adds a figure of the inner-loss curve against the inner
    step (mean and per task), so the curve of one meta-step reads as a single picture.

    Args:
        log_dir: the run directory (created if missing).
        per_task: also log every task's inner-loss curve.
        curve_every: meta-steps between inner-curve figures; 0 disables them.
        hparams: hyper-parameters recorded in the HParams tab by `close`.

    Example:
        >>> logger = TensorBoardLogger("runs/sine-maml", hparams={"inner_lr": 0.01})  # doctest: +SKIP
        >>> learner = mk.MetaLearner(..., logger=logger)  # doctest: +SKIP
    """

    def __init__(
        self,
        log_dir: str | Path,
        *,
        per_task: bool = False,
        curve_every: int = 0,
        hparams: dict[str, Any] | None = None,
    ):
        self.log_dir = Path(log_dir)
        tensorboard = require("torch.utils.tensorboard", "tensorboard", "metakit.logging.TensorBoardLogger")
        self.writer = tensorboard.SummaryWriter(str(self.log_dir))
        self.per_task, self.curve_every = per_task, curve_every
        self.hparams = dict(hparams or {})
        self._last: dict[str, float] = {}
        self._layout_written = False
        self._last_step = 0
        self._tags: set[str] = set()

    def _write_layout(self, result: MetaStepResult) -> None:
        """The custom-scalars layout, from what the first meta-step has: no panel that stays empty."""
        # TensorBoard draws every line of one run in the run's colour, so before and after are not two
        # lines but one line (after) with a band up to before: the band is what the inner loop bought.
        # The Scalars tab has every inner step; curve_every adds a picture of the whole curve.
        last = result.inner_losses.shape[-1] - 1
        after, before = f"inner_loss/step_{last}", "inner_loss/step_0"
        inner = {
            f"support loss after the inner loop ({after}); the band reaches up to before it ({before})": [
                "Margin",
                [after, after, before],
            ]
        }
        if self.per_task:
            inner["support loss by inner step, per task"] = ["Multiline", [r"inner_loss_task_\d+/step_\d+"]]
        layout = {"inner loop": inner}
        if result.query_losses_before is not None:
            layout["adaptation"] = {
                "query loss after adaptation (meta/query_loss); the band reaches up to before it "
                "(adaptation/query_loss_before)": [
                    "Margin",
                    ["meta/query_loss", "meta/query_loss", "adaptation/query_loss_before"],
                ],
                "adaptation gain: query loss before minus after": ["Multiline", ["adaptation/gain"]],
            }
        outer = {"meta-gradient norm by group": ["Multiline", [r"grad_norm/.*"]]}
        if _diagnostics(result):
            outer["strategy diagnostics (mean and max over tasks)"] = ["Multiline", [r"diagnostics/.*"]]
        layout["outer loop"] = outer
        self.writer.add_custom_scalars(layout)
        self._layout_written = True

    def log_meta_step(self, step: int, result: MetaStepResult, learner: MetaLearner | None = None) -> None:
        """Record one `MetaStepResult` at global step ``step``."""
        if not self._layout_written:
            self._write_layout(result)
        self._last_step = step
        curve = result.inner_losses.float().mean(0)
        for inner_step, value in enumerate(curve.tolist()):
            self.writer.add_scalar(f"inner_loss/step_{inner_step}", value, step)
        if self.per_task:
            for task, losses in enumerate(result.inner_losses.tolist()):
                for inner_step, value in enumerate(losses):
                    self.writer.add_scalar(f"inner_loss_task_{task}/step_{inner_step}", value, step)
        query_loss = float(result.loss)
        self.writer.add_scalar("meta/query_loss", query_loss, step)
        if result.query_losses_before is not None:
            before = float(result.query_losses_before.float().mean())
            self.writer.add_scalar("adaptation/query_loss_before", before, step)
            self.writer.add_scalar("adaptation/gain", before - query_loss, step)
        groups = {group: norm for group, norm in result.grad_norms.items() if group != "total"}
        if len(groups) > 1 or "total" not in result.grad_norms:  # one group: the total is the same line
            groups = dict(result.grad_norms)
        for group, norm in groups.items():
            self.writer.add_scalar(f"grad_norm/{group}", norm, step)
        for name, values in _diagnostics(result).items():
            self.writer.add_scalar(f"diagnostics/{name}/mean", float(values.mean()), step)
            self.writer.add_scalar(f"diagnostics/{name}/max", float(values.max()), step)
        if learner is not None:
            for name, scale in learner.inner_lrs().items():
                self.writer.add_scalar(f"inner_lr_scale/{name}", float(scale.mean()), step)
        if self.curve_every and step % self.curve_every == 0:
            self.writer.add_figure("inner_loss/curve", _curve_figure(result.inner_losses, step), step)
        self._last = {"query_loss": query_loss, "inner_loss_after": float(curve[-1])}
        if result.query_losses_before is not None:
            self._last["adaptation_gain"] = float(result.query_losses_before.float().mean()) - query_loss

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """Log any other scalar (e.g. an evaluation metric) to the same run."""
        self._tags.add(tag)
        self.writer.add_scalar(tag, value, step)

    def close(self, metrics: dict[str, float] | None = None) -> None:
        """Write the hyper-parameters with final metrics (default: the last meta-step's) and close.

        A metric named like a tag this run already logs (``"test/mse"``, logged with `add_scalar`
        as training went) is that curve in the HParams tab, with no scalar written again; any other
        name is written once as ``hparam/{name}`` at the last meta-step.
        """
        if self.hparams:
            from torch.utils.tensorboard.summary import hparams as hparams_summary

            final = metrics if metrics is not None else self._last
            values = {
                k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.hparams.items()
            }
            tags = {
                (name if name in self._tags else f"hparam/{name}"): value for name, value in final.items()
            }
            for summary in hparams_summary(values, tags):
                self.writer.file_writer.add_summary(summary)
            for tag, value in tags.items():
                if tag not in self._tags:
                    self.writer.add_scalar(tag, value, self._last_step)
        self.writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _diagnostics(result: MetaStepResult) -> dict[str, torch.Tensor]:
    """The result's per-task diagnostics as float tensors with at least one element (empty if none)."""
    diagnostics = getattr(result, "diagnostics", None) or {}
    out = {}
    for name, value in diagnostics.items():
        values = torch.as_tensor(value).detach().float().reshape(-1)
        if values.numel():
            out[name] = values
    return out


def _curve_figure(inner_losses: torch.Tensor, step: int):
    matplotlib = require("matplotlib", "tensorboard", "TensorBoardLogger(curve_every=...)")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(4, 3))
    losses = inner_losses.float()
    steps = list(range(losses.shape[1]))
    for task_curve in losses:
        ax.plot(steps, task_curve.tolist(), color="0.75", linewidth=0.8)
    ax.plot(steps, losses.mean(0).tolist(), color="C0", linewidth=2, marker="o", label="mean over tasks")
    # Inner steps are whole numbers: no 0.0-1.0 fractions when there is a single step.
    if len(steps) <= 11:
        ax.set_xticks(steps)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="inner step (0 = before adapting)", ylabel="support loss", title=f"meta-step {step}")
    ax.legend()
    fig.tight_layout()
    return fig
