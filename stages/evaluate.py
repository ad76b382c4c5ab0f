"""Stage: compare the students with their teachers and the true ensemble on the test split.

    python -m stages.evaluate [--params PATH] [--device auto|cpu|cuda]

For every teacher of `teachers`, the true ensemble of the distill teachers (mean of their
probabilities) and every seed of every distill run with checkpoints (the scratch student included;
params `evaluate.runs` may name them): top-1 accuracy, NLL, expected calibration error, per-class
accuracy, fidelity to the ensemble (top-1 agreement, KL), parameters, FLOPs per image and CPU latency /
throughput (pipeline.evaluate). A run is reported as the mean and spread over its seeds
(`distill.seeds`, or the run's own), with the share of the scratch -> ensemble gap it closes. Writes
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
from pipeline.data import DataConfig, load_split, skipped_note
from pipeline.device import resolve_device, setup_cpu
from pipeline.evaluate import EvaluateConfig, check_checkpoints, evaluate_models, metrics_payload
from pipeline.distill import DistillConfig
from pipeline.methods import METHODS, distill_teachers
from pipeline.report import PLOTS, summary_markdown, write_plots
from pipeline.runs import run_config, run_names


def train_command(name: str, runs: list[str]) -> str:
    return f"python -m stages.distill {'--run' if name in runs else '--method'} {name}"


def run_seeds(distill_section: dict, name: str, teachers: list[str]) -> list[int]:
    """The seeds run `name` trains: its own config's for a run of distill.runs, the section's otherwise."""
    if name in run_names(distill_section):
        cfg = run_config(distill_section, name, teachers)
    else:  # a plain method name (`stages.distill --method NAME`) trains the section's seeds
        cfg = build(DistillConfig, distill_section, "distill")
    return list(cfg.seeds)


def select_students(cfg: EvaluateConfig, distill_section: dict,
                    teachers: list[str]) -> tuple[dict[str, dict[int, Path]], list[str]]:
    """(run name -> seed -> student checkpoint, messages about skipped runs). A run of `evaluate.runs` must have
    every seed's checkpoint; otherwise every run of `distill.runs` (or every method name, without runs) with
    any checkpoint is taken, and must then have all of them."""
    runs = run_names(distill_section)
    explicit = bool(cfg.runs)
    names = cfg.runs if explicit else (runs or list(METHODS))
    chosen: dict[str, dict[int, Path]] = {}
    skipped: list[str] = []
    for name in names:
        seeds = run_seeds(distill_section, name, teachers)
        checkpoints = {seed: paths.student_checkpoint(name, seed) for seed in seeds}
        missing = [path for path in checkpoints.values() if not path.is_file()]
        train = train_command(name, runs)
        if not missing:
            chosen[name] = checkpoints
        elif len(missing) < len(checkpoints):  # half a run's seeds would report a mean over other seeds
            raise UserError(f"run '{name}' has no checkpoint {missing[0]} (seeds {list(checkpoints)}): train the "
                            f"missing seeds with {train}")
        elif explicit:
            raise UserError(f"evaluate.runs lists '{name}' but {missing[0]} does not exist: train it with {train}, "
                            f"or remove it from evaluate.runs")
        elif runs:  # a declared run not trained yet: worth saying; absent plain methods are not
            skipped.append(f"{name}: no student checkpoint under {paths.student_dir(name)}, skipped "
                           f"(train it with {train})")
    return chosen, skipped


def read_histories(students: dict[str, dict[int, Path]]) -> tuple[dict[str, dict[int, list]], list[str]]:
    """(run -> seed -> training history from data/student/RUN/seedS.json, messages about missing files)."""
    histories: dict[str, dict[int, list]] = {}
    missing: list[str] = []
    for run, checkpoints in students.items():
        for seed in checkpoints:
            metrics_path = paths.student_seed_metrics(run, seed)
            if metrics_path.is_file():
                histories.setdefault(run, {})[seed] = json.loads(metrics_path.read_text()).get("history", [])
            else:
                missing.append(f"{run} seed {seed}: no training metrics {metrics_path}, left out of the training "
                               f"curves")
    return histories, missing


@click.command()
@click.option("--params", "params_path", default=DEFAULT_PARAMS, show_default=True, help="Params file (a profile).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where accuracies are computed (timings always run on the CPU).")
def main(params_path: str, device: str) -> None:
    """Evaluate teachers, the true ensemble and every seed of the students; write metrics, summary and plots."""
    params = load_params(params_path)
    data_cfg = build(DataConfig, section(params, "data"), "data")
    cfg = build(EvaluateConfig, section(params, "evaluate"), "evaluate")
    listed = list(section(params, "teachers"))
    distill_section = section(params, "distill")
    members = distill_teachers(build(DistillConfig, distill_section, "distill"), listed)
    students, skipped = select_students(cfg, distill_section, listed)
    if not listed and not students:
        raise UserError("nothing to evaluate: no `teachers` in the params and no student checkpoint under "
                        f"{paths.student_dir('x').parent}; run the pipeline first (dvc repro)")
    dev = resolve_device(device)
    setup_cpu(files=data_cfg.source == "files")

    test = load_split(data_cfg, "test")
    if skipped_note(test):
        click.echo(skipped_note(test))
    train = load_split(data_cfg, "train")  # its fingerprint says which data every model was trained on
    teachers = {name: paths.teacher_checkpoint(name) for name in listed}
    runs = run_names(distill_section)
    check_checkpoints(teachers, students, train, {name: train_command(name, runs) for name in students})
    for line in skipped:  # every refusal is behind us: only now any output
        click.echo(line)
    seeds = sum(len(s) for s in students.values())
    click.echo(f"evaluating {len(teachers)} teacher(s), the ensemble of {', '.join(members) or 'none'} and "
               f"{len(students)} student run(s) ({seeds} seed checkpoints) on {len(test):,} {test.name} "
               f"{test.split} images ({dev})")
    rows = evaluate_models(teachers, members, students, test, cfg, dev, click.echo)
    payload = metrics_payload(rows, test, cfg, members)

    histories, missing = read_histories(students)
    for line in missing:
        click.echo(line)
    plot_files = {name: paths.report_plot(name) for name in PLOTS}
    write_plots(payload, histories, plot_files)
    summary = paths.summary_report()
    write_text(summary, summary_markdown(payload, plot_files, summary.parent))
    write_json(paths.evaluate_metrics(), payload)
    click.echo(f"wrote {paths.evaluate_metrics()}, {summary} and {len(plot_files)} plots under "
               f"{plot_files[PLOTS[0]].parent}")


if __name__ == "__main__":
    main()
