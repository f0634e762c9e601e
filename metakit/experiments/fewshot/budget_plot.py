"""The budget study's picture: accuracy gain over the baseline against meta-steps, and the dev-loss curves."""

from __future__ import annotations

from pathlib import Path

from metakit.experiments.fewshot.budget import study_from_folder
from metakit.experiments.report import read_results

__all__ = ["plot_budget_studies", "study_label"]


def study_label(study) -> str:
    """``meta_adapters`` plus what sets the study apart from the preset's meta-training."""
    extras = []
    if study.base.meta_strategy == "second":
        extras.append("2nd order")
    if study.base.meta_head_init != "euclidean":
        extras.append(f"{study.base.meta_head_init} head")
    return study.setting + (f" ({', '.join(extras)})" if extras else "")


def plot_budget_studies(folders: list[str | Path], out: str | Path) -> None:
    """Left: each study's paired accuracy gain (× 100, 95 % interval over tasks) against meta-steps;
    right: its dev query loss after the inner loop along meta-training, one line per outer rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (gain_ax, dev_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for index, folder in enumerate(folders):
        study = study_from_folder(folder)
        results = read_results(Path(folder) / "results.json")
        color, label = colors[index % len(colors)], study_label(study)
        steps, means, lows, highs = [], [], [], []
        for budget in study.budgets:
            gain = results.get("gains", {}).get(str(budget))
            if not gain:
                continue
            steps.append(budget)
            means.append(100 * gain["mean_difference"])
            low, high = gain["ci95_groups"] or gain["ci95"] or (gain["mean_difference"],) * 2
            lows.append(100 * gain["mean_difference"] - 100 * low)
            highs.append(100 * high - 100 * gain["mean_difference"])
        if steps:
            offset = [s * (1 + 0.03 * (index - (len(folders) - 1) / 2)) for s in steps]
            gain_ax.errorbar(
                offset, means, yerr=[lows, highs], color=color, marker="o", capsize=3, label=label
            )
        for rate_index, (rate, record) in enumerate(results.get("sweep", {}).items()):
            curve = record.get("dev", [])
            dev_ax.plot(
                [p["step"] for p in curve],
                [p["after"] for p in curve],
                color=color,
                linestyle=styles[rate_index % len(styles)],
                label=f"{label}, lr {rate}",
            )
    gain_ax.axhline(0, color="grey", linewidth=0.8)
    gain_ax.set_xscale("log")
    gain_ax.set_xlabel("meta-steps")
    gain_ax.set_ylabel("accuracy gain over from-scratch (points)")
    gain_ax.set_title("Targets: paired gain, 95 % interval over tasks")
    gain_ax.legend(fontsize=8)
    dev_ax.set_xlabel("meta-steps")
    dev_ax.set_ylabel("pool dev query loss after the inner loop")
    dev_ax.set_title("Pool dev episodes (rates are chosen here)")
    dev_ax.legend(fontsize=7)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
