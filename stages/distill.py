"""Stage: train the student from the teacher caches (any registered method) or from scratch.

    python -m stages.distill                       # distill.method from params.yaml
    python -m stages.distill --method kd --epochs 5
    python -m stages.distill --run meal_coop       # a named run of distill.runs (pipeline.runs)
    python -m stages.distill --online              # teachers run live on the same views (baseline, oracle)

Reads data/views.zarr and data/cache/<teacher>.zarr (never a teacher, except with --online) and trains the
student once per seed of `distill.seeds`: data/student/<run>/seed<S>.pt and its training metrics seed<S>.json,
rewritten after every epoch and never again once the seed is finished, then metrics/distill/<run>.json over the
seeds (final-epoch accuracy of each, mean, std). <run> is the --run name, or the method's with --method, with
`_online` appended with --online. On the CPU the seeds train at once, one process each (`distill.jobs`, logs in
logs/distill/<run>/); `--seed S` trains that seed alone, in this process. One process trains a run at a time
(logs/distill/<run>.lock): a second one stops in one line naming the first. Killed and rerun, every seed resumes
from its last finished epoch; a checkpoint made with other settings is refused unless --restart is given.
Every option and params value is checked before any data is read.

    torchrun --nproc_per_node N -m stages.distill --run kd    # N ranks (pipeline.dist); dvc.yaml: pipeline.launch

Under torchrun the seeds train one after another, each over all the ranks: every rank trains its shard of
every global batch of `distill.batch_size` images, rank 0 evaluates and writes; a run resumes with any
number of processes.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import replace

import click
import torch

from pipeline import paths
from pipeline.checkpoints import exclusive_lock, load_resumable, save_checkpoint, write_json
from pipeline.config import DEFAULT_PARAMS, build, load_params, section
from pipeline.data import load_split, resident, scoring_split
from pipeline.device import resolve_device, setup_cpu
from pipeline.dist import DistConfig, World, check_shards, collective_errors, start, stop
from pipeline.distill import TrainSet, build_trainer, check_plan, distill, load_student_init, open_sources
from pipeline.launch import forwarded_options, seed_jobs, train_seeds_in_processes
from pipeline.methods import METHODS, make_method
from pipeline.models import build_model, constructor_kwargs, count_parameters
from pipeline.runs import Settings, read_settings, run_identity, seed_metrics, write_summary
from pipeline.views import open_view_plan


@click.command()
@click.option("--method", default=None,
              help=f"A registered method: {' | '.join(METHODS)}, or a plugin's  [default: params distill.method]")
@click.option("--run", "run", default=None,
              help="A named run of distill.runs: its overrides apply, it writes data/student/RUN/seedS.pt.")
@click.option("--params", "params_path", default=DEFAULT_PARAMS, show_default=True, help="Params file (a profile).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
@click.option("--online", is_flag=True, help="Run the teachers live on the same views instead of reading the caches.")
@click.option("--epochs", type=int, default=None, help="Override distill.epochs.")
@click.option("--seed", type=int, default=None, help="Train only this seed  [default: every seed of distill.seeds]")
@click.option("--restart", is_flag=True, help="Discard an existing checkpoint made with other settings and start over.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def main(method: str | None, run: str | None, params_path: str, device: str, online: bool, epochs: int | None,
         seed: int | None, restart: bool, quiet: bool) -> None:
    """Train the student with `distill.method` (or a named run) from the cached teacher outputs, once per seed of
    `distill.seeds` (several at once in parallel processes on the CPU); resumable."""
    params = load_params(params_path)
    s = read_settings(params, method, epochs, seed, online, run)
    dist_cfg = build(DistConfig, section(params, "dist"), "dist")
    world, dev = start(dist_cfg, resolve_device(device))
    seeds = [seed] if seed is not None else list(s.distill.seeds)
    jobs = 1 if world.distributed else seed_jobs(s.distill.jobs, len(seeds), dev.type)
    try:
        with collective_errors(world), _lock(world, paths.student_lock(s.run_name), f"distill run {s.run_name}",
                                             seed is None):
            if jobs > 1:
                forwarded = forwarded_options(click.get_current_context(), drop=("seed", "quiet"))
                train_seeds_in_processes(
                    s.run_name, seeds, jobs,
                    command=lambda one: [sys.executable, "-m", "stages.distill", *forwarded, "--seed", str(one),
                                         "--quiet"],
                    log_of=lambda one: paths.student_log(s.run_name, one),
                    epochs_done=lambda: sum(_epochs_done(s.run_name, one) for one in seeds),
                    total_epochs=len(seeds) * s.distill.epochs, quiet=quiet)
            else:
                train_here(s, seeds, world, dev, restart, quiet, dist_cfg.sync_bn)
    finally:
        stop(world)
    if world.main:
        report(s, seed)


def _lock(world: World, path, what: str, wanted: bool = True):
    """The one-trainer lock, held by rank 0 alone (the other ranks follow it)."""
    return exclusive_lock(path, what) if world.main and wanted else contextlib.nullcontext()


def _epochs_done(run: str, seed: int) -> int:
    try:
        return int(json.loads(paths.student_seed_metrics(run, seed).read_text())["epochs"])
    except (OSError, ValueError, KeyError):  # not written yet, or being replaced
        return 0


def train_here(s: Settings, seeds: list[int], world: World, dev: torch.device, restart: bool, quiet: bool,
               sync_bn: bool) -> None:
    """The seeds one after another in this process (under torchrun: over all the ranks)."""
    setup_cpu(files=s.data.source == "files")
    train = load_split(s.data, "train")
    test = load_split(s.data, scoring_split(s.data))
    plan = open_view_plan(paths.view_plan())
    check_plan(plan, train)
    check_shards(len(train), s.distill.batch_size, world, "distill")
    for one in seeds:
        with _lock(world, paths.student_lock(s.run_name, one), f"distill run {s.run_name} seed {one}"):
            train_seed(s, one, dev, train, test, plan, restart, quiet, world, sync_bn)


def train_seed(s: Settings, seed: int, dev: torch.device, train, test, plan, restart: bool, quiet: bool,
               world: World = World(), sync_bn: bool = False) -> dict:
    """Train (or resume, or only report) one seed of the run into data/student/RUN/seedS.pt (rank 0 writes)."""
    echo = click.echo if world.main else (lambda *_: None)
    cfg = replace(s.distill, seed=seed)
    sources = open_sources(s.teachers, s.online, s.cache, plan, train, dev, cfg.mix_targets)
    method = make_method(s.method, s.options, s.teachers, sources.blocks)  # the caches' block names
    targets = sources.targets(method.feature_blocks, dev, by_chunk=cfg.shuffle == "chunks",
                              temperature=method.temperature)
    align_cfg = sources.align_cfg
    model_kwargs = method.student_kwargs(constructor_kwargs(s.student.arch, s.student.model, train))
    torch.manual_seed(cfg.seed)
    student = build_model(s.student.arch, **model_kwargs)
    init = s.student.init.replace("{seed}", str(seed))
    init_sha = load_student_init(student, s.student.arch, init, model_kwargs) if init else None
    trainer = build_trainer(method, cfg, student, train.num_classes, align_cfg, dev, world, sync_bn)
    identity = run_identity(s, cfg, model_kwargs, init, init_sha, train, plan, sources.hashes, align_cfg)
    path = paths.student_checkpoint(s.run_name, seed)
    state = load_resumable(path, identity, restart, "student checkpoint", stored="identity")
    base = {"method": s.method, "run": s.run_name, "seed": seed, "arch": s.student.arch,
            "model_kwargs": model_kwargs, "params": count_parameters(student), "identity": identity}
    echo(f"{s.run_name} seed {seed}: {s.student.arch} {s.student.model} ({base['params']:,} parameters) on {dev}, "
         f"{len(train):,} images x {plan.num_views} views, teachers {', '.join(s.teachers) or 'none'}, adversarial "
         f"{method.adversarial}" + (f", resuming after epoch {state['epoch']}" if state else ""))
    for note in method.notes():
        echo(note)
    finished = state is not None and state.get("finished")
    if finished:
        echo(f"{s.run_name} seed {seed}: already trained ({state['epoch']} epochs, test accuracy "
             f"{state['test_acc']:.4f})")

    def save(ckpt: dict) -> None:
        save_checkpoint(path, {**base, **ckpt})
        write_json(paths.student_seed_metrics(s.run_name, seed), seed_metrics(s, base, ckpt, str(dev)))

    data = TrainSet(resident(train, dev), train.labels.to(dev), plan.aug, plan.augment, train.mean, train.std,
                    files=train if train.source == "files" else None, chunk_rows=sources.chunk_rows, mix=plan.mix,
                    num_classes=train.num_classes)
    try:
        ckpt = distill(trainer, data, test, targets, state, save, progress=not quiet)
    finally:
        targets.close()
    if world.main and finished and not paths.student_seed_metrics(s.run_name, seed).is_file():
        # a finished seed's files are never rewritten (DVC hard-links them into its cache): only a lost one returns
        write_json(paths.student_seed_metrics(s.run_name, seed), seed_metrics(s, base, ckpt, str(dev)))
    if world.main:  # the other ranks hold no evaluation
        echo(f"{s.run_name} seed {seed}: test accuracy {ckpt['test_acc']:.4f} (best {ckpt['best_acc']:.4f} at epoch "
             f"{ckpt['best_epoch']}) after {ckpt['epoch']} epochs, {ckpt['wall_time_s']:.0f}s -> {path}")
    return ckpt


def report(s: Settings, seed: int | None) -> None:
    """metrics/distill/RUN.json over the seeds, and its line (a `--seed` child leaves the line to its parent)."""
    summary = write_summary(s)
    if seed is None and len(summary["test_acc"]) > 1:
        accs = ", ".join(f"{100 * a:.2f}" for a in summary["test_acc"])
        click.echo(f"{s.run_name}: test accuracy {summary['test_acc_mean'] * 100:.2f} +- "
                   f"{summary['test_acc_std'] * 100:.2f} % over seeds {summary['seeds']} ({accs}) -> "
                   f"{paths.student_metrics(s.run_name)}")


if __name__ == "__main__":
    main()
