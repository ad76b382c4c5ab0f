"""Stage: compare the students with their teachers and the true ensemble on the test split.

    python -m stages.evaluate [--params PATH] [--device auto|cpu|cuda]

For every teacher of `teachers`, the true ensemble of the distill teachers (mean of their
probabilities) and every distill run with a checkpoint (the scratch student included; params
`evaluate.runs` may name them): top-1 accuracy, NLL, expected calibration error, per-class accuracy,
parameters, FLOPs per image and CPU latency / throughput (pipeline.evaluate). Writes
metrics/evaluate.json (`dvc metrics show`), reports/summary.md and the PNG plots under reports/plots/
(pipeline.report). Accuracies are computed on --device; timings always on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
import click

from pipeline import paths
from pipeline.checkpoints import write_json, write_text
from pipeline.config import DEFAULT_PARAMS, UserError, build, load_params, section
from pipeline.data import DataConfig, load_split
from pipeline.device import resolve_device, setup_cpu
from pipeline.evaluate import EvaluateConfig, check_checkpoints, evaluate_models, metrics_payload
from pipeline.distill import DistillConfig
from pipeline.methods import METHODS, distill_teachers
from pipeline.report import PLOTS, summary_markdown, write_plots
from pipeline.runs import run_names


def select_students(cfg: EvaluateConfig, distill_section: dict) -> tuple[dict[str, Path], list[str]]:
    """(run name -> student checkpoint, messages about skipped runs). `evaluate.runs` must all exist;
    otherwise every run of `distill.runs` (or every method name, without runs) that has a checkpoint."""
    runs = run_names(distill_section)
    explicit = bool(cfg.runs)
    names = cfg.runs if explicit else (runs or list(METHODS))
    chosen: dict[str, Path] = {}
    skipped: list[str] = []
    for name in names:
        path = paths.student_checkpoint(name)
        train = f"python -m stages.distill {'--run' if name in runs else '--method'} {name}"
        if path.is_file():
            chosen[name] = path
        elif explicit:
            raise UserError(f"evaluate.runs lists '{name}' but {path} does not exist: train it with {train}, "
                            f"or remove it from evaluate.runs")
        elif runs:  # a declared run not trained yet: worth saying; absent plain methods are not
            skipped.append(f"{name}: no student checkpoint {path}, skipped (train it with {train})")
    return chosen, skipped


@click.command()
@click.option("--params", "params_path", default=DEFAULT_PARAMS, show_default=True, help="Params file (a profile).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where accuracies are computed (timings always run on the CPU).")
def main(params_path: str, device: str) -> None:
    """Evaluate teachers, the true ensemble and the students; write metrics, summary table and plots."""
    params = load_params(params_path)
    data_cfg = build(DataConfig, section(params, "data"), "data")
    cfg = build(EvaluateConfig, section(params, "evaluate"), "evaluate")
    listed = list(section(params, "teachers"))
    distill_section = section(params, "distill")
    members = distill_teachers(build(DistillConfig, distill_section, "distill"), listed)
    students, skipped = select_students(cfg, distill_section)
    if not listed and not students:
        raise UserError("nothing to evaluate: no `teachers` in the params and no student checkpoint under "
                        f"{paths.student_checkpoint('x').parent}; run the pipeline first (dvc repro)")
    dev = resolve_device(device)
    setup_cpu()

    test = load_split(data_cfg, "test")
    train = load_split(data_cfg, "train")  # its fingerprint says which data every model was trained on
    teachers = {name: paths.teacher_checkpoint(name) for name in listed}
    check_checkpoints(teachers, students, train)  # every refusal before any output or work
    for line in skipped:
        click.echo(line)
    click.echo(f"evaluating {len(teachers)} teacher(s), the ensemble of {', '.join(members) or 'none'} and "
               f"{len(students)} student(s) on {len(test):,} {test.name} {test.split} images ({dev})")
    rows = evaluate_models(teachers, members, students, test, cfg, dev, click.echo)
    payload = metrics_payload(rows, test, cfg, members)

    histories = {}
    for run in students:
        metrics_path = paths.student_metrics(run)
        if metrics_path.is_file():
            histories[run] = json.loads(metrics_path.read_text()).get("history", [])
        else:
            click.echo(f"{run}: no training metrics {metrics_path}, left out of the training curves")
    plot_files = {name: paths.report_plot(name) for name in PLOTS}
    write_plots(rows, histories, list(test.classes), plot_files)
    summary = paths.summary_report()
    write_text(summary, summary_markdown(rows, payload, cfg, plot_files, summary.parent))
    write_json(paths.evaluate_metrics(), payload)
    click.echo(f"wrote {paths.evaluate_metrics()}, {summary} and {len(plot_files)} plots under "
               f"{plot_files[PLOTS[0]].parent}")


if __name__ == "__main__":
    main()
