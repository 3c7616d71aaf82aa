"""PNG figures (matplotlib, Agg backend; main process only): learning curves, confusion matrices and
the spread of a metric across seeds/folds. Every function writes one file atomically."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from ..log import logger


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str, layout: bool = True) -> None:
    plt = _plt()
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    if layout:
        fig.tight_layout()
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def _curves(history: Sequence[dict], metric: str):
    loss = [(r["step"], r["loss"]) for r in history if r.get("loss") is not None]
    key = "eval_" + metric
    ev = [(r["step"], r[key]) for r in history if r.get(key) is not None]
    return loss, ev


def _label(metric: str) -> str:
    return metric.replace("_", " ")


def learning_curve_figure(history: Sequence[dict], metric: str, title: str, final: Optional[tuple] = None,
                          restored_step: Optional[int] = None):
    """The figure of `learning_curve` (None when there is nothing to draw). `final`: (step, value) of the
    evaluation made at the end, drawn as its own point when no evaluation in `history` shows those weights
    (the only evaluation was the final one, or the last step was not evaluated); `restored_step`: the best
    step whose weights were restored and saved, marked on both panels."""
    loss, ev = _curves(history, metric)
    if final is not None and (final[1] is None or restored_step is not None or any(s == final[0] for s, _ in ev)):
        final = None  # the saved weights' evaluation is already a point of the curve (restored: the best one)
    if not loss and not ev and final is None:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    axes[0].plot(*zip(*loss), marker="o", ms=3) if loss else axes[0].text(0.5, 0.5, "no training loss logged",
                                                                         ha="center", transform=axes[0].transAxes)
    axes[0].set(xlabel="optimizer step", ylabel="training loss", title="Training loss")
    if ev:
        axes[1].plot(*zip(*ev), marker="o", ms=4, color="tab:orange", label="during training")
    if final is not None:
        axes[1].plot([final[0]], [final[1]], marker="*", ms=12, ls="none", color="tab:red",
                     label=f"final evaluation (step {final[0]})")
    if not ev and final is None:
        axes[1].text(0.5, 0.5, "no evaluation data", ha="center", transform=axes[1].transAxes)
    if restored_step is not None:
        best = [p for p in ev if p[0] == restored_step][-1:]
        if best:
            axes[1].plot(*zip(*best), marker="o", ms=10, ls="none", mfc="none", mec="tab:green", mew=1.5,
                         label="_best point")
        for ax in axes:
            ax.axvline(restored_step, ls="--", lw=1.2, color="tab:green",
                       label=f"best, restored (step {restored_step})")
    axes[1].set(xlabel="optimizer step", ylabel=f"validation {_label(metric)}", title=f"Validation {_label(metric)}")
    if axes[1].get_legend_handles_labels()[0] and (final is not None or restored_step is not None):
        axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    return fig


def learning_curve(history: Sequence[dict], metric: str, path: str, title: str, final: Optional[tuple] = None,
                   restored_step: Optional[int] = None) -> Optional[str]:
    """Training loss and the evaluation metric against the optimizer step, one run (learning_curve_figure)."""
    fig = learning_curve_figure(history, metric, title, final, restored_step)
    if fig is None:
        return None
    _save(fig, path)
    return path


def learning_curves_overlay(histories: dict, metric: str, path: str, title: str,
                            finals: Optional[dict] = None) -> Optional[str]:
    """All runs' curves on shared axes (one colour per run). `finals`: run -> (step, value) of its final
    evaluation, drawn as a star for a run evaluated only at the end."""
    if not histories:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("tab10")
    for i, (name, history) in enumerate(histories.items()):
        loss, ev = _curves(history, metric)
        color = cmap(i % 10)
        if loss:
            axes[0].plot(*zip(*loss), color=color, alpha=0.8, lw=1.2, label=name)
        if ev:
            axes[1].plot(*zip(*ev), color=color, marker="o", ms=3, lw=1.2, label=name)
        elif (finals or {}).get(name) and finals[name][1] is not None:
            axes[1].plot([finals[name][0]], [finals[name][1]], color=color, marker="*", ms=10, ls="none",
                         label=f"{name} (final)")
    axes[0].set(xlabel="optimizer step", ylabel="training loss", title="Training loss")
    axes[1].set(xlabel="optimizer step", ylabel=f"validation {_label(metric)}", title=f"Validation {_label(metric)}")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    if len(handles) < len(axes[0].get_legend_handles_labels()[0]):
        handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle(title, fontsize=11)
    rows = 0
    if handles:
        ncol = min(len(handles), 6)
        rows = -(-len(handles) // ncol)
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.045 * rows + 0.01, 1, 1))
    _save(fig, path, layout=False)
    return path


def confusion_matrix(matrix, labels: Sequence[str], path: str, title: str) -> Optional[str]:
    """Counts with row-normalised shading (rows: gold, columns: predicted)."""
    m = np.asarray(matrix, dtype=np.int64)
    if m.ndim != 2 or m.size == 0:
        return None
    plt = _plt()
    k = len(labels)
    size = max(3.8, 0.55 * k + 2.5)
    fig, ax = plt.subplots(figsize=(size + 0.8, size))
    rows = m.sum(1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m, dtype=float), where=rows > 0)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the gold row")
    short = [str(x) if len(str(x)) <= 14 else str(x)[:13] + "…" for x in labels]
    ax.set_xticks(range(k), short, rotation=45 if k > 4 or max(map(len, short)) > 6 else 0,
                  ha="right" if k > 4 else "center")
    ax.set_yticks(range(k), short)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{m[i, j]}", ha="center", va="center", fontsize=9 if k <= 10 else 7,
                        color="white" if share[i, j] > 0.6 else "black")
    ax.set(xlabel="predicted label", ylabel="gold label", title=title)
    _save(fig, path)
    return path


def metric_spread(per_run: dict, metrics: Sequence[str], path: str, title: str) -> Optional[str]:
    """One panel per metric: a box plot of the runs with every run as a point, and the mean ± 95% CI."""
    from ..stats import summarize

    metrics = [m for m in metrics if any(r.get(m) is not None for r in per_run.values())]
    if not metrics:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics) + 0.6, 4.0), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, metric in zip(axes[0], metrics):
        values = np.asarray([r[metric] for r in per_run.values() if r.get(metric) is not None], dtype=float)
        ax.boxplot(values, widths=0.5, showfliers=False)
        ax.scatter(1 + rng.uniform(-0.12, 0.12, len(values)), values, s=22, color="tab:blue", zorder=3, alpha=0.8)
        s = summarize(values)
        if s["ci95"]:
            ax.errorbar(1.42, s["mean"], yerr=s["ci95_halfwidth"], fmt="D", color="tab:red", ms=5, capsize=4)
        ax.set_xticks([1, 1.42], ["runs", "mean±CI"], fontsize=8)
        ax.set_xlim(0.6, 1.65)
        ax.set_title(_label(metric), fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=11)
    _save(fig, path)
    return path


def safely(fn, *args, **kwargs) -> Optional[str]:
    """Plots are a convenience: a plotting failure is logged, never fatal to a finished training."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001
        logger.warning("could not draw %s: %s: %s", fn.__name__, type(err).__name__, err)
        return None
