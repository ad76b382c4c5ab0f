"""The evaluation report: markdown tables and PNG plots (matplotlib, no display needed), from the payload alone.

    results_table()           the comparison table, one row per teacher, the ensemble and each run (the README's)
    summary_markdown()        reports/summary.md: that table, top-1 per seed, per-class accuracy, the plots
    plot_training_curves()    test accuracy and training loss per epoch of every run: seed mean, min-max band
    plot_accuracy_vs()        accuracy against parameters or CPU latency, the ensemble marked
    plot_accuracy_by_run()    every run's seed mean and std, its seeds as dots, the teachers and ensemble as lines
    plot_agreement_vs()       top-1 against agreement with the ensemble, per seed and per run mean
    plot_per_class()          per-class accuracy of every model as a heatmap

Everything is drawn from metrics/evaluate.json's payload (pipeline.evaluate.metrics_payload), plus the runs'
training histories for the curves, so the tables a reader copies (the README's results) can be checked
against the metrics file alone. `dvc plots show` renders HTML whose JavaScript comes from the internet, so
the plots are also drawn here as PNG files. Figures are built with `matplotlib.figure.Figure` (Agg canvas)
rather than pyplot, so no global backend or figure state is touched, and written atomically.
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

PLOTS = ("training_curves", "accuracy_vs_params", "accuracy_vs_latency", "per_class_accuracy", "accuracy_by_run",
         "agreement_vs_accuracy")
MARKERS = {"teacher": "o", "ensemble": "*", "student": "s"}
COLORS = {"teacher": "tab:blue", "ensemble": "tab:red", "student": "tab:green"}


# ---------------------------------------------------------------- the payload's models


def models(payload: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, kind, entry) of every model of the payload: teachers, the ensemble, then the student runs."""
    found = [(name, "teacher", e) for name, e in payload["teachers"].items()]
    if "ensemble" in payload:
        found.append(("ensemble", "ensemble", payload["ensemble"]))
    return found + [(name, "student", e) for name, e in payload["students"].items()]


def top1(entry: dict[str, Any]) -> float:
    """Top-1 in percent: a teacher's or the ensemble's, a run's seed mean."""
    return entry["top1_mean"] if "top1_mean" in entry else entry["top1"]


# ---------------------------------------------------------------- markdown


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def results_table(payload: dict[str, Any]) -> str:
    """The comparison table (markdown, no trailing newline) of metrics/evaluate.json's payload: cost, top-1
    (a run's as seed mean ± sample std), seeds, fidelity to the ensemble, share of the gap closed, NLL, ECE."""
    lines = [
        "| model | kind | arch | method | params | MFLOPs/img | latency ms | img/s | top-1 % | seeds | agreement % | "
        "KL | gap closed % | NLL | ECE % |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, kind, e in models(payload):
        run = kind == "student"
        acc = f"{e['top1_mean']:.2f} ± {e['top1_std']:.2f}" if run else f"{e['top1']:.2f}"
        agreement, kl = (e.get("agreement_mean"), e.get("kl_mean")) if run else (e.get("agreement"), e.get("kl"))
        gap = e.get("gap_closed_mean")
        lines.append(
            f"| {name} | {kind} | {e['arch']} | {e.get('method') or '-'} | {e['params']:,} | {e['flops'] / 1e6:.2f} | "
            f"{e['latency_ms']:.3f} | {e['throughput']:,.0f} | {acc} | {len(e['seeds']) if run else '-'} | "
            f"{_num(agreement, '.2f')} | {_num(kl, '.4f')} | {_num(None if gap is None else 100 * gap, '.1f')} | "
            f"{e['nll']:.4f} | {_pct(e['ece'])} |")
    return "\n".join(lines)


def seeds_table(payload: dict[str, Any]) -> str:
    """Top-1 % of every run (rows) and seed (columns: every seed any run has), then the run's mean ± std."""
    runs = payload["students"]
    seeds = list(dict.fromkeys(s["seed"] for e in runs.values() for s in e["seeds"]))  # first-seen order
    lines = ["| run | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    for name, e in runs.items():
        by_seed = {s["seed"]: s["top1"] for s in e["seeds"]}
        cells = [_num(by_seed.get(s), ".2f") for s in seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {e['top1_mean']:.2f} ± {e['top1_std']:.2f} |")
    return "\n".join(lines)


def summary_markdown(payload: dict[str, Any], plot_files: dict[str, Path], report_dir: Path) -> str:
    """The whole summary.md: header, the comparison table, top-1 per seed, per-class accuracy, the plots."""
    t = payload["timing"]
    members = payload.get("ensemble", {}).get("members")
    reference = payload.get("scratch_reference")
    fidelity = (f"Agreement: % of test images where a model's top-1 class is the ensemble's; KL: mean over test "
                f"images of KL(ensemble || model), nats." if members else
                "Agreement and KL: no ensemble (fewer than two distill teachers), so no fidelity to it.")
    gap = (f"Gap closed: (run - {reference}) / (ensemble - {reference}) in mean top-1." if reference and members
           else "Gap closed: needs a scratch run and an ensemble.")
    lines = [
        f"# Evaluation on {payload['dataset']} ({payload['split']} split, {payload['num_samples']:,} images)",
        "",
        "Teachers, the true ensemble (mean of the teachers' probabilities; it costs the sum of its members) and "
        "the student runs, each trained once per seed: top-1 is the seed mean ± sample std, the other run "
        f"numbers are seed means. {fidelity} {gap} Latency: CPU, batch {t['latency_batch']}, per image; "
        f"throughput: CPU, batch {t['throughput_batch']}; {t['threads']} thread(s), median of {t['repeats']} "
        "repeats. FLOPs per image count a multiply-add as 2 (torch FlopCounterMode). ECE: "
        f"{payload.get('ece_bins', 15)} equal-width bins.",
        "",
        results_table(payload),
    ]
    if payload["students"]:
        lines += ["", "## Top-1 % per seed", "", seeds_table(payload)]
    classes = payload["classes"]
    lines += ["", "## Per-class accuracy (%; runs: seed mean)", "",
              "| model | " + " | ".join(classes) + " |",
              "|---|" + "---:|" * len(classes)]
    for name, _, e in models(payload):
        lines.append(f"| {name} | " + " | ".join(_pct(a) for a in e["per_class_accuracy"]) + " |")
    lines += ["", "## Plots", ""]
    for name, path in plot_files.items():
        lines.append(f"![{name}]({os.path.relpath(path, report_dir)})")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def save_figure(fig: Figure, path: Path) -> None:
    """PNG written atomically, so a reader never sees half a file."""
    FigureCanvasAgg(fig)
    replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def per_epoch(histories: dict[int, list[dict[str, Any]]], key: str) -> tuple[list[int], list[list[float]]]:
    """(epochs, values per epoch over the seeds that recorded `key` at that epoch), epochs ascending."""
    by_epoch: dict[int, list[float]] = {}
    for history in histories.values():
        for r in history:
            if r.get(key) is not None:  # eval_every may skip epochs
                by_epoch.setdefault(r["epoch"], []).append(r[key])
    epochs = sorted(by_epoch)
    return epochs, [by_epoch[e] for e in epochs]


def plot_training_curves(histories: dict[str, dict[int, list[dict[str, Any]]]], path: Path) -> None:
    """Two panels: test accuracy and training loss per epoch, one line per run (the mean over its seeds)
    in a shaded band from the lowest to the highest seed. `histories`: run -> seed -> history rows."""
    fig = Figure(figsize=(11, 4))
    acc_ax, loss_ax = fig.subplots(1, 2)
    for i, (run, seeds) in enumerate(histories.items()):
        color = f"C{i % 10}"
        for ax, key, scale in ((acc_ax, "test_acc", 100.0), (loss_ax, "loss", 1.0)):
            epochs, values = per_epoch(seeds, key)
            if not epochs:
                continue
            ax.plot(epochs, [scale * sum(v) / len(v) for v in values], marker=".", color=color,
                    label=f"{run} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
            if len(seeds) > 1:
                ax.fill_between(epochs, [scale * min(v) for v in values], [scale * max(v) for v in values],
                                color=color, alpha=0.2, linewidth=0)
    acc_ax.set(xlabel="epoch", ylabel="test top-1 accuracy (%)", title="Test accuracy (seed mean, min-max band)")
    loss_ax.set(xlabel="epoch", ylabel="training loss (the run's objective)", title="Training loss (seed mean)")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        if histories:
            ax.legend(fontsize=8)
    if not histories:
        acc_ax.text(0.5, 0.5, "no distill run metrics", ha="center", va="center", transform=acc_ax.transAxes)
    save_figure(fig, path)


def plot_accuracy_vs(payload: dict[str, Any], key: str, xlabel: str, path: Path) -> None:
    """Accuracy against one cost (`params` or `latency_ms`), log x; teachers, ensemble (star), runs (seed mean,
    a bar of one std)."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    found = models(payload)
    for kind in ("teacher", "ensemble", "student"):
        chosen = [(name, e) for name, k, e in found if k == kind]
        if not chosen:
            continue
        xs, ys = [e[key] for _, e in chosen], [top1(e) for _, e in chosen]
        if kind == "student":
            ax.errorbar(xs, ys, yerr=[e["top1_std"] for _, e in chosen], fmt="none", ecolor="black",
                        elinewidth=0.8, capsize=3, zorder=2)
        ax.scatter(xs, ys, marker=MARKERS[kind], s=180 if kind == "ensemble" else 50, c=COLORS[kind], label=kind,
                   edgecolors="black", linewidths=0.5, zorder=3)
        for (name, _), x, y in zip(chosen, xs, ys):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    _log_x(ax, [e[key] for _, _, e in found])
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


def plot_accuracy_by_run(payload: dict[str, Any], path: Path) -> None:
    """One column per run: its seed mean with a bar of one sample std, each seed a small dot beside it; every
    teacher a dashed line across, the ensemble a solid red one."""
    runs = list(payload["students"].items())
    fig = Figure(figsize=(max(6.5, 1.0 + 0.9 * len(runs)), 4.5))
    ax = fig.subplots()
    for i, (name, e) in enumerate(runs):
        ax.errorbar([i], [e["top1_mean"]], yerr=[e["top1_std"]], fmt="s", color=COLORS["student"], ecolor="black",
                    markeredgecolor="black", markersize=8, capsize=5, zorder=3, label="run: seed mean ± std" if i == 0
                    else None)
        accs = [s["top1"] for s in e["seeds"]]
        ax.scatter([i + 0.15] * len(accs), accs, s=12, c="black", alpha=0.6, zorder=4,
                   label="one seed" if i == 0 else None)  # beside the mean, so a seed at the mean stays visible
    for j, (name, e) in enumerate(payload["teachers"].items()):
        ax.axhline(e["top1"], color=f"C{j % 10}", linestyle="--", linewidth=1, label=f"teacher {name}")
    if "ensemble" in payload:
        ax.axhline(payload["ensemble"]["top1"], color=COLORS["ensemble"], linewidth=1.5, label="ensemble")
    ax.set_xticks(range(len(runs)), [name for name, _ in runs], rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.6, max(0.6, len(runs) - 0.4))
    ax.set(ylabel="test top-1 accuracy (%)", title="Accuracy by run over seeds")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="best")
    if not runs:
        ax.text(0.5, 0.5, "no student run evaluated", ha="center", va="center", transform=ax.transAxes)
    save_figure(fig, path)


def plot_agreement_vs(payload: dict[str, Any], path: Path) -> None:
    """Top-1 against agreement with the ensemble (%): a small marker per seed, a large one per run mean
    (labelled); the teachers as circles for reference."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    runs = [(name, e) for name, e in payload["students"].items() if e.get("agreement_mean") is not None]
    for i, (name, e) in enumerate(runs):
        color = f"C{i % 10}"
        ax.scatter([s["agreement"] for s in e["seeds"]], [s["top1"] for s in e["seeds"]], s=14, color=color,
                   alpha=0.6, zorder=3)
        ax.scatter([e["agreement_mean"]], [e["top1_mean"]], s=90, marker="s", color=color, edgecolors="black",
                   linewidths=0.5, zorder=4)
        ax.annotate(name, (e["agreement_mean"], e["top1_mean"]), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    teachers = [(name, e) for name, e in payload["teachers"].items() if e.get("agreement") is not None]
    for name, e in teachers:
        ax.scatter([e["agreement"]], [e["top1"]], s=50, marker=MARKERS["teacher"], facecolors="none",
                   edgecolors=COLORS["teacher"], zorder=3)
        ax.annotate(name, (e["agreement"], e["top1"]), textcoords="offset points", xytext=(6, -10), fontsize=7,
                    color=COLORS["teacher"])
    ax.set(xlabel="agreement with the ensemble's top-1 (% of test images)", ylabel="test top-1 accuracy (%)",
           title="Accuracy against fidelity to the ensemble")
    ax.grid(alpha=0.3)
    if not runs and not teachers:
        ax.text(0.5, 0.5, "no ensemble (fewer than two distill teachers): no fidelity", ha="center", va="center",
                transform=ax.transAxes)
    save_figure(fig, path)


def plot_per_class(payload: dict[str, Any], path: Path) -> None:
    """Heatmap: models (rows) x classes (columns), per-class accuracy in % (runs: seed mean), values in the cells."""
    found = models(payload)
    classes = payload["classes"]
    values = [[float("nan") if a is None else 100 * a for a in e["per_class_accuracy"]] for _, _, e in found]
    fig = Figure(figsize=(1.0 + 0.75 * len(classes), 1.2 + 0.4 * len(found)))
    ax = fig.subplots()
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(found)), [f"{name} ({kind})" for name, kind, _ in found], fontsize=8)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if v == v:  # not NaN: a class with test samples
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 60 else "black")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    ax.set_title("Per-class test accuracy (runs: seed mean)")
    save_figure(fig, path)


def write_plots(payload: dict[str, Any], histories: dict[str, dict[int, list[dict[str, Any]]]],
                files: dict[str, Path]) -> None:
    """Every plot of PLOTS into `files[name]`; `histories`: run -> seed -> training history rows."""
    plot_training_curves(histories, files["training_curves"])
    plot_accuracy_vs(payload, "params", "parameters (count)", files["accuracy_vs_params"])
    plot_accuracy_vs(payload, "latency_ms", "CPU latency per image (ms, batch 1)", files["accuracy_vs_latency"])
    plot_per_class(payload, files["per_class_accuracy"])
    plot_accuracy_by_run(payload, files["accuracy_by_run"])
    plot_agreement_vs(payload, files["agreement_vs_accuracy"])
