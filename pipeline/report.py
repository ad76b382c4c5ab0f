"""The evaluation report: a markdown table and PNG plots (matplotlib, no display needed).

    summary_markdown()        reports/summary.md: one row per model, then per-class accuracy
    plot_training_curves()    test accuracy and training loss per epoch of every distill run
    plot_accuracy_vs()        accuracy against parameters or CPU latency, the ensemble marked
    plot_per_class()          per-class accuracy of every model as a heatmap

`dvc plots show` renders HTML whose JavaScript comes from the internet, so the plots are also drawn
here as PNG files. Figures are built with `matplotlib.figure.Figure` (Agg canvas) rather than pyplot,
so no global backend or figure state is touched, and written atomically.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from pipeline.checkpoints import replace_atomically
from pipeline.evaluate import EvaluateConfig, Row

PLOTS = ("training_curves", "accuracy_vs_params", "accuracy_vs_latency", "per_class_accuracy")
MARKERS = {"teacher": "o", "ensemble": "*", "student": "s"}
COLORS = {"teacher": "tab:blue", "ensemble": "tab:red", "student": "tab:green"}


# ---------------------------------------------------------------- markdown


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def summary_markdown(rows: list[Row], payload: dict[str, Any], cfg: EvaluateConfig, plot_files: dict[str, Path],
                     report_dir: Path) -> str:
    """The whole summary.md: header, the comparison table, per-class accuracy, links to the plots."""
    t = payload["timing"]
    lines = [
        f"# Evaluation on {payload['dataset']} ({payload['split']} split, {payload['num_samples']:,} images)",
        "",
        "Teachers, the true ensemble (mean of the teachers' probabilities; it costs the sum of its members) and "
        f"the students. Latency: CPU, batch {t['latency_batch']}, per image; throughput: CPU, batch "
        f"{t['throughput_batch']}; {t['threads']} thread(s), median of {t['repeats']} repeats. FLOPs per image "
        f"count a multiply-add as 2 (torch FlopCounterMode). ECE: {cfg.ece_bins} equal-width bins.",
        "",
        "| model | kind | arch | method | params | MFLOPs/img | latency ms | img/s | top-1 % | NLL | ECE % |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c, m = r.cost, r.metrics
        lines.append(f"| {r.name} | {r.kind} | {r.arch} | {r.method or '-'} | {c['params']:,} | "
                     f"{c['flops'] / 1e6:.2f} | {c['latency_ms']:.3f} | {c['throughput']:,.0f} | "
                     f"{_pct(m['accuracy'])} | {m['nll']:.4f} | {_pct(m['ece'])} |")
    classes = payload["classes"]
    lines += ["", "## Per-class accuracy (%)", "",
              "| model | " + " | ".join(classes) + " |",
              "|---|" + "---:|" * len(classes)]
    for r in rows:
        lines.append(f"| {r.name} | " + " | ".join(_pct(a) for a in r.metrics["per_class_accuracy"]) + " |")
    lines += ["", "## Plots", ""]
    for name, path in plot_files.items():
        lines.append(f"![{name}]({os.path.relpath(path, report_dir)})")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def save_figure(fig: Figure, path: Path) -> None:
    """PNG written atomically, so a reader never sees half a file."""
    FigureCanvasAgg(fig)
    replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def plot_training_curves(histories: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Two panels: test accuracy and training loss per epoch, one line per distill run."""
    fig = Figure(figsize=(11, 4))
    acc_ax, loss_ax = fig.subplots(1, 2)
    for run, history in histories.items():
        evals = [r for r in history if r.get("test_acc") is not None]  # eval_every may skip epochs
        acc_ax.plot([r["epoch"] for r in evals], [100 * r["test_acc"] for r in evals], marker=".", label=run)
        losses = [r for r in history if "loss" in r]
        loss_ax.plot([r["epoch"] for r in losses], [r["loss"] for r in losses], marker=".", label=run)
    acc_ax.set(xlabel="epoch", ylabel="test top-1 accuracy (%)", title="Test accuracy")
    loss_ax.set(xlabel="epoch", ylabel="training loss (the run's objective)", title="Training loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        if histories:
            ax.legend(fontsize=8)
    if not histories:
        acc_ax.text(0.5, 0.5, "no distill run metrics", ha="center", va="center", transform=acc_ax.transAxes)
    save_figure(fig, path)


def plot_accuracy_vs(rows: list[Row], key: str, xlabel: str, path: Path) -> None:
    """Accuracy against one cost (`params` or `latency_ms`), log x; teachers, ensemble (star), students."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    for kind in ("teacher", "ensemble", "student"):
        chosen = [r for r in rows if r.kind == kind]
        if not chosen:
            continue
        ax.scatter([r.cost[key] for r in chosen], [100 * r.metrics["accuracy"] for r in chosen],
                   marker=MARKERS[kind], s=180 if kind == "ensemble" else 50, c=COLORS[kind], label=kind,
                   edgecolors="black", linewidths=0.5, zorder=3)
        for r in chosen:
            ax.annotate(r.name, (r.cost[key], 100 * r.metrics["accuracy"]), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
    _log_x(ax, [r.cost[key] for r in rows])
    ax.set(xlabel=xlabel, ylabel="test top-1 accuracy (%)", title=f"Accuracy against {xlabel.split(' (')[0]}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _log_x(ax, values: list[float]) -> None:
    """Log x axis with plain-number labels, denser when the values span few decades (costs of models
    range from a fraction of a decade, students alike, to several, teachers vs students)."""
    ax.set_xscale("log")
    span = math.log10(max(values) / min(values)) if values and min(values) > 0 else 0.0
    subs = (1.0, 2.0, 3.0, 5.0) if span < 1.5 else (1.0, 2.0, 5.0) if span < 3 else (1.0,)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_per_class(rows: list[Row], classes: list[str], path: Path) -> None:
    """Heatmap: models (rows) x classes (columns), per-class accuracy in %, values written in the cells."""
    values = [[float("nan") if a is None else 100 * a for a in r.metrics["per_class_accuracy"]] for r in rows]
    fig = Figure(figsize=(1.0 + 0.75 * len(classes), 1.2 + 0.4 * len(rows)))
    ax = fig.subplots()
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{r.name} ({r.kind})" for r in rows], fontsize=8)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if v == v:  # not NaN: a class with test samples
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 60 else "black")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    ax.set_title("Per-class test accuracy")
    save_figure(fig, path)


def write_plots(rows: list[Row], histories: dict[str, list[dict[str, Any]]], classes: list[str],
                files: dict[str, Path]) -> None:
    """Every plot of PLOTS into `files[name]`."""
    plot_training_curves(histories, files["training_curves"])
    plot_accuracy_vs(rows, "params", "parameters (count)", files["accuracy_vs_params"])
    plot_accuracy_vs(rows, "latency_ms", "CPU latency per image (ms, batch 1)", files["accuracy_vs_latency"])
    plot_per_class(rows, classes, files["per_class_accuracy"])
