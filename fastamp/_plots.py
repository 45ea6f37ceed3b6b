"""Plots: the training dashboard, and the one matplotlib import guard every plot in fastamp uses."""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["plot_dashboard", "pyplot"]


def pyplot(feature: str) -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or an ImportError saying what needs it and
    how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # depends on the environment
        raise ImportError(f"{feature} needs matplotlib: pip install 'fastamp[plot]'") from e
    return plt


def plot_dashboard(path: str, runs: Mapping[str, Mapping[str, Any]]) -> str:
    """A 6-panel training dashboard as a PNG: loss (skipped steps marked); loss scale (log) with overflow markers; gradient
    norm; step and optimizer-phase time; memory; and a comparison of the runs (mean step time,
    optimizer-phase time and final loss), e.g. fastamp vs stock or fp16 vs bf16.

    ``runs`` maps a label to :meth:`fastamp.FusedMixedPrecisionTrainer.get_training_statistics` output (or any
    dict with the same per-step lists). Needs matplotlib (``pip install fastamp[plot]``). Returns ``path``.
    """
    plt = pyplot("plot_dashboard")

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    (ax_loss, ax_scale, ax_norm), (ax_time, ax_mem, ax_cmp) = axes
    for label, stats in runs.items():
        steps = list(range(1, len(stats.get("loss_values", [])) + 1))
        loss_line = ax_loss.plot(steps, stats.get("loss_values", []), label=label)[0]
        skipped = [i for i in stats.get("overflow_step_indices", []) if i < len(stats.get("loss_values", []))]
        if skipped:
            ax_loss.scatter([i + 1 for i in skipped], [stats["loss_values"][i] for i in skipped], marker="x",
                            color=loss_line.get_color(), zorder=3)
        scales = stats.get("scale_values", [])
        if scales:
            line = ax_scale.plot(steps[: len(scales)], scales, label=label)[0]
            overflow = stats.get("overflow_step_indices", [])
            ax_scale.scatter([i + 1 for i in overflow], [scales[i] for i in overflow], marker="x",
                             color=line.get_color(), zorder=3)
        norms = [n if n is not None else float("nan") for n in stats.get("gradient_norms", [])]
        ax_norm.plot(steps[: len(norms)], norms, label=label)
        ax_time.plot(steps, [t * 1e3 for t in stats.get("step_times", [])], label=f"{label} step")
        if stats.get("optimizer_times"):
            ax_time.plot(steps, [t * 1e3 for t in stats["optimizer_times"]], linestyle="--",
                         label=f"{label} optimizer phase")
        ax_mem.plot(steps[: len(stats.get("memory_usage", []))], stats.get("memory_usage", []), label=label)
    ax_loss.set(title="loss (x: skipped step)", xlabel="step")
    ax_scale.set(title="loss scale (x: skipped step)", xlabel="step", yscale="log")
    ax_norm.set(title="gradient norm (unscaled, before clipping)", xlabel="step")
    ax_time.set(title="time per step (ms)", xlabel="step")
    ax_mem.set(title="memory (MB)", xlabel="step")
    for ax in (ax_loss, ax_scale, ax_norm, ax_time, ax_mem):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)

    labels = list(runs)
    if len(labels) > 1:
        width = 0.25
        xs = range(len(labels))
        step_ms = [runs[k].get("avg_step_time", 0.0) * 1e3 for k in labels]
        opt_ms = [runs[k].get("avg_optimizer_time", 0.0) * 1e3 for k in labels]
        ax_cmp.bar([x - width / 2 for x in xs], step_ms, width, label="step ms")
        ax_cmp.bar([x + width / 2 for x in xs], opt_ms, width, label="optimizer phase ms")
        ax_cmp.set_xticks(list(xs), labels, fontsize=8)
        final = [runs[k]["loss_values"][-1] if runs[k].get("loss_values") else float("nan") for k in labels]
        ax_cmp.set_title("comparison (final loss: " + ", ".join(f"{v:.3f}" for v in final) + ")")
        ax_cmp.legend(fontsize=8)
    else:
        ax_cmp.text(0.5, 0.5, "no comparison run given", ha="center", va="center", transform=ax_cmp.transAxes)
        ax_cmp.set_title("comparison")
        ax_cmp.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
