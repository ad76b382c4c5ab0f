"""Stage: train the student from the teacher caches (MEAL, MEAL V2, ANC, KD) or from scratch.

    python -m stages.distill                       # distill.method from params.yaml
    python -m stages.distill --method kd --epochs 5
    python -m stages.distill --run meal_coop       # a named run of distill.runs (pipeline.runs)
    python -m stages.distill --online              # teachers run live on the same views (baseline, oracle)

Reads data/views.zarr and data/cache/<teacher>.zarr (never a teacher, except with --online) and trains the
student once per seed of `distill.seeds`: data/student/<run>/seed<S>.pt and its training metrics seed<S>.json,
rewritten after every epoch, then metrics/distill/<run>.json over the seeds (final-epoch accuracy of each, mean,
std). <run> is the --run name, or the method's with --method, with `_online` appended with --online. On the
CPU the seeds train at once, one process each (`distill.jobs`); `--seed S` trains that seed alone, in this
process. Killed and rerun, every seed resumes from its last finished epoch; a checkpoint made with other
settings is refused unless --restart is given. Every option and params value is checked before any data is read.

    torchrun --nproc_per_node N -m stages.distill --run kd    # N ranks (pipeline.dist); dvc.yaml: pipeline.launch

Under torchrun the seeds train one after another, each over all the ranks: every rank trains its shard of
every global batch of `distill.batch_size` images, rank 0 evaluates and writes; a run resumes with any
number of processes.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from tqdm import tqdm

from pipeline import paths
from pipeline.align import AlignConfig
from pipeline.cache import CacheConfig, open_cache, validate_caches
from pipeline.checkpoints import (check_fits_data, load_checkpoint, load_resumable, load_teacher, save_checkpoint,
                                  sha256_file, write_json)
from pipeline.config import DEFAULT_PARAMS, UserError, build, load_params, section, to_dict
from pipeline.data import DataConfig, load_split, scoring_split, shape_of
from pipeline.device import resolve_device, setup_cpu
from pipeline.dist import DistConfig, World, check_shards, collective_errors, start, stop
from pipeline.distill import DistillConfig, StudentConfig, TrainSet, build_trainer, distill
from pipeline.methods import distill_teachers, make_method, method_configs
from pipeline.models import build_model, constructor_kwargs, count_parameters
from pipeline.runs import check_runs, deep_merge, run_section, student_overrides
from pipeline.cache.slabs import CachedTargets, CacheSlabs, NoTargets, OnlineTargets, SlabLoader
from pipeline.views import open_view_plan

# settings that change neither the student nor the metrics' meaning: a resume may differ in them
NOT_IDENTITY = ("log_every", "eval_batch_size", "compile", "seeds", "jobs")  # seeds/jobs: which and how many
# seeds a run trains; one seed's identity has its own `seed`


@dataclass
class Settings:
    """Every config of the run, built and checked before any work."""

    data: DataConfig
    student: StudentConfig
    distill: DistillConfig
    options: Any  # the chosen method's config dataclass
    cache: CacheConfig
    teachers: list[str]
    online: bool
    run: str | None = None  # the distill.runs entry trained, or None for plain `distill.method`

    @property
    def method(self) -> str:
        return self.distill.method

    @property
    def run_name(self) -> str:
        """The name of the checkpoint and metrics: the run's (or the method's); online runs keep their own
        (they are the speed baseline)."""
        name = self.run or self.method
        return f"{name}_online" if self.online and self.method != "scratch" else name


def read_settings(params: dict[str, Any], method: str | None, epochs: int | None, seed: int | None,
                  online: bool, run: str | None = None) -> Settings:
    """All configs from the params plus command-line overrides; one-line UserError on anything wrong.

    Every named run under `distill.runs` is checked too, whichever run (or none) is trained.
    """
    data_cfg = build(DataConfig, section(params, "data"), "data")
    listed = list(section(params, "teachers"))
    distill_section = section(params, "distill")
    check_runs(distill_section, listed)
    if run is not None and method is not None:
        raise UserError(f"--run {run} and --method {method} both given: a run names its own method "
                        f"(distill.runs.{run}.method), so pass only one")
    base = run_section(distill_section, run) if run is not None else distill_section
    student_section = section(params, "student")
    if run is not None:
        student_section = deep_merge(student_section, student_overrides(base, run))
    student = build(StudentConfig, student_section, "student")
    overrides = {k: v for k, v in (("method", method), ("epochs", epochs), ("seed", seed)) if v is not None}
    cfg = build(DistillConfig, {**base, **overrides}, "distill")
    teachers = distill_teachers(cfg, listed)
    options = method_configs(cfg, teachers)[cfg.method]  # builds (and checks) every method's options
    cache_cfg = build(CacheConfig, section(params, "cache"), "cache")
    with torch.device("meta"):  # checks arch and kwargs without allocating anything
        build_model(student.arch, **constructor_kwargs(student.arch, student.model, shape_of(data_cfg)))
    return Settings(data_cfg, student, cfg, options, cache_cfg, teachers if cfg.method != "scratch" else [], online,
                    run)


def check_plan(plan, train) -> None:
    """The view plan must index this very training split, sample by sample."""
    if plan.dataset_fingerprint != train.fingerprint or plan.num_samples != len(train):
        raise UserError(f"view plan {plan.path} was made from other training data ({plan.num_samples} samples) "
                        f"than the `data` params give ({len(train)}): rerun python -m stages.plan_views, "
                        f"then the teacher caches")
    if not np.array_equal(plan.labels.astype(np.int64), train.labels.numpy()):
        raise UserError(f"view plan {plan.path} holds other labels than the training data: "
                        f"rerun python -m stages.plan_views")


def open_targets(s: Settings, plan, train, feature_blocks, device):
    """(target source, align spec, block names, per-teacher identity) for cached or online training."""
    if not s.teachers:  # scratch
        return None, s.cache.align_config, None, {}
    if s.online:
        models, hashes = [], {}
        for name in s.teachers:
            path = paths.teacher_checkpoint(name)
            model, ckpt = load_teacher(path, device)
            check_fits_data("teacher checkpoint", path, ckpt.get("dataset_fingerprint"), ckpt["model_kwargs"], train,
                            f"retrain it with python -m stages.pretrain --teacher {name} --restart")
            models.append(model)
            hashes[name] = sha256_file(path)
        align_cfg = s.cache.align_config
        return OnlineTargets(models, align_cfg, feature_blocks, device, s.cache.autocast), align_cfg, None, hashes
    caches = validate_caches([open_cache(paths.teacher_cache(t, s.cache.format)) for t in s.teachers], plan,
                             train.fingerprint, train.num_classes, check_checkpoints=True, teachers=s.teachers)
    align_cfg = build(AlignConfig, caches[0].align, f"align spec of {caches[0].path}")
    source = CacheSlabs(dict(zip(s.teachers, caches)))
    hashes = {t: c.attrs.get("checkpoint_sha256") for t, c in zip(s.teachers, caches)}
    return CachedTargets(SlabLoader(source, feature_blocks, device)), align_cfg, caches[0].blocks, hashes


@click.command()
@click.option("--method", default=None, help="meal | meal_v2 | anc | kd | scratch  [default: params distill.method]")
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
    try:
        with collective_errors(world):
            train_run(s, world, dev, dist_cfg, seed, params_path, device, run, method, online, epochs, restart,
                      quiet)
    finally:
        stop(world)


def train_run(s: Settings, world: World, dev: torch.device, dist_cfg: DistConfig, seed: int | None,
              params_path: str, device: str, run: str | None, method: str | None, online: bool, epochs: int | None,
              restart: bool, quiet: bool) -> None:
    """Every seed asked for, in child processes, in this one, or (under torchrun) over all the ranks; then the
    run's summary (rank 0)."""
    seeds = [seed] if seed is not None else list(s.distill.seeds)
    jobs = 1 if world.distributed else seed_jobs(s.distill.jobs, len(seeds), dev)
    if jobs > 1:
        forwarded = ["--params", params_path, "--device", device, *(["--run", run] if run else []),
                     *(["--method", method] if method else []), *(["--online"] if online else []),
                     *(["--epochs", str(epochs)] if epochs is not None else []), *(["--restart"] if restart else [])]
        train_in_processes(s, seeds, jobs, forwarded, quiet)
    else:
        setup_cpu()
        train = load_split(s.data, "train")
        test = load_split(s.data, scoring_split(s.data))
        plan_views = open_view_plan(paths.view_plan())
        check_plan(plan_views, train)
        check_shards(len(train), s.distill.batch_size, world, "distill")
        for one in seeds:
            train_seed(s, one, dev, train, test, plan_views, restart, quiet, world, dist_cfg.sync_bn)
    if not world.main:
        return
    summary = write_summary(s)
    if seed is None and len(summary["test_acc"]) > 1:  # a `--seed` child leaves the run's line to its parent
        accs = [100 * a for a in summary["test_acc"]]
        click.echo(f"{s.run_name}: test accuracy {summary['test_acc_mean'] * 100:.2f} +- "
                   f"{summary['test_acc_std'] * 100:.2f} % over seeds {summary['seeds']} "
                   f"({', '.join(f'{a:.2f}' for a in accs)}) -> {paths.student_metrics(s.run_name)}")


def seed_jobs(jobs: int, num_seeds: int, device: torch.device) -> int:
    """How many seeds train at once. On this kind of CPU two one-thread processes do about twice the work of
    one two-thread process (small convolutions scale poorly across threads), so `0` runs every seed at once
    there; on a GPU the seeds queue (one process already fills it)."""
    if jobs == 0:
        jobs = num_seeds if device.type == "cpu" else 1
    return max(1, min(jobs, num_seeds))


def _die_with_parent() -> None:
    """In a seed's child process: the kernel sends it SIGTERM when the stage dies, even by SIGKILL, so no
    orphan keeps writing a checkpoint that a rerun resumes (Linux prctl PR_SET_PDEATHSIG; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (AttributeError, OSError):
        pass


def train_in_processes(s: Settings, seeds: list[int], jobs: int, forwarded: list[str], quiet: bool) -> None:
    """Each seed in its own `python -m stages.distill ... --seed S` process, `jobs` at a time, the CPU's threads
    split between them. A failed seed stops the others and ends the stage with that seed's last line."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    folder = paths.student_dir(s.run_name)
    folder.mkdir(parents=True, exist_ok=True)
    click.echo(f"{s.run_name}: seeds {', '.join(map(str, seeds))} in {min(jobs, len(seeds))} processes at once, "
               f"{threads} thread(s) each (logs {folder}/seedS.log)")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}  # logs readable while it trains
    pending, running = list(seeds), {}
    bar = tqdm(total=len(seeds) * s.distill.epochs, desc=f"{s.run_name} epochs (all seeds)", disable=quiet)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                one = pending.pop(0)
                log = (folder / f"seed{one}.log").open("w")
                command = [sys.executable, "-m", "stages.distill", *forwarded, "--seed", str(one), "--quiet"]
                running[one] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                 preexec_fn=_die_with_parent), log)
            time.sleep(0.5)
            finished = [one for one, (proc, _) in running.items() if proc.poll() is not None]
            ends = {}
            for one in finished:
                proc, log = running.pop(one)
                log.close()
                lines = (folder / f"seed{one}.log").read_text(errors="replace").strip().splitlines()
                ends[one] = (proc.returncode, lines[-1] if lines else "no output")
            for one, (code, last) in ends.items():  # a failure first: it is the stage's last word
                if code != 0:
                    raise UserError(f"{s.run_name} seed {one} failed (exit {code}): {last.removeprefix('Error: ')} "
                                    f"(whole log: {folder}/seed{one}.log)")
            for one, (_, last) in ends.items():
                tqdm.write(f"seed {one}: {last}")
                sys.stdout.flush()  # before any later error line, which click writes (and flushes) at once
            bar.n = sum(_epochs_done(s.run_name, one) for one in seeds)
            bar.refresh()
    finally:
        for proc, log in running.values():  # a failure or ^C: no seed keeps training on its own
            proc.terminate()
            proc.wait()
            log.close()
        bar.close()


def _epochs_done(run: str, seed: int) -> int:
    try:
        return int(json.loads(paths.student_seed_metrics(run, seed).read_text())["epochs"])
    except (OSError, ValueError, KeyError):  # not written yet, or being replaced
        return 0


def train_seed(s: Settings, seed: int, dev: torch.device, train, test, plan_views, restart: bool,
               quiet: bool, world: World = World(), sync_bn: bool = False) -> dict[str, Any]:
    """Train (or resume, or only re-report) one seed of the run into data/student/RUN/seedS.pt (rank 0 writes)."""
    echo = click.echo if world.main else (lambda *_: None)
    cfg = replace(s.distill, seed=seed)
    method = make_method(s.method, s.options, s.teachers)
    targets, align_cfg, blocks, hashes = open_targets(s, plan_views, train, method.feature_blocks, dev)
    method = make_method(s.method, s.options, s.teachers, blocks)  # the caches' block names

    model_kwargs = constructor_kwargs(s.student.arch, s.student.model, train)
    if s.method == "anc":  # ANC's noise is dropout in the student, so the method sets it
        model_kwargs["dropout"] = s.options.dropout
    torch.manual_seed(cfg.seed)
    student = build_model(s.student.arch, **model_kwargs)
    init = s.student.init.replace("{seed}", str(seed))
    init_sha = load_student_init(student, s.student.arch, init, model_kwargs) if init else None
    trainer = build_trainer(method, cfg, student, train.num_classes, align_cfg, dev, world, sync_bn)
    distill_dict = {k: v for k, v in to_dict(cfg).items() if k not in NOT_IDENTITY and k not in
                    ("meal", "meal_v2", "anc", "kd", "scratch", "runs")}
    identity = {
        "method": s.method,
        "online": s.online and s.method != "scratch",
        "distill": distill_dict,
        "options": to_dict(s.options),
        "student": {**to_dict(s.student), "init": init},
        "student_init_sha256": init_sha,
        "model_kwargs": model_kwargs,
        "data": to_dict(s.data),
        "dataset_fingerprint": train.fingerprint,
        "view_plan": plan_views.fingerprint,
        "teachers": hashes,
        "align": to_dict(align_cfg) if s.teachers else None,  # scratch compares no features
    }

    path = paths.student_checkpoint(s.run_name, seed)
    state = load_resumable(path, identity, restart, "student checkpoint", stored="identity")
    params_count = count_parameters(student)
    resumed = f", resuming after epoch {state['epoch']}" if state else ""
    echo(f"{s.run_name} seed {seed}: {s.student.arch} {s.student.model} ({params_count:,} parameters) on "
         f"{dev}, {len(train):,} images x {plan_views.num_views} views, teachers "
         f"{', '.join(s.teachers) or 'none'}, adversarial {method.adversarial}{resumed}")
    if s.method == "anc" and not s.options.dropout:
        echo("anc: distill.anc.dropout is 0, so the student gets no noise (ANC's z is dropout)")
    if state is not None and state.get("finished"):
        echo(f"{s.run_name} seed {seed}: already trained ({state['epoch']} epochs, test accuracy "
             f"{state['test_acc']:.4f})")

    base = {"method": s.method, "run": s.run_name, "seed": seed, "arch": s.student.arch,
            "model_kwargs": model_kwargs, "params": params_count, "identity": identity}

    def save(ckpt: dict[str, Any]) -> None:
        save_checkpoint(path, {**base, **ckpt})
        write_json(paths.student_seed_metrics(s.run_name, seed), metrics(s, base, ckpt, str(dev)))

    data = TrainSet(train.images.to(dev), train.labels.to(dev), plan_views.aug, plan_views.augment,
                    train.mean, train.std)
    targets = targets or NoTargets()
    try:
        ckpt = distill(trainer, data, test, targets, state, save, progress=not quiet)
    finally:
        targets.close()
    if world.main and state is not None and state.get("finished"):
        # refresh the metrics file only: rewriting a finished checkpoint would change its bytes, and the sha256
        # another run's student.init recorded for it
        write_json(paths.student_seed_metrics(s.run_name, seed), metrics(s, base, ckpt, str(dev)))
    if world.main:  # the other ranks hold no evaluation
        click.echo(f"{s.run_name} seed {seed}: test accuracy {ckpt['test_acc']:.4f} (best {ckpt['best_acc']:.4f} "
                   f"at epoch {ckpt['best_epoch']}) after {ckpt['epoch']} epochs, {ckpt['wall_time_s']:.0f}s -> {path}")
    return ckpt


def write_summary(s: Settings) -> dict[str, Any]:
    """metrics/distill/RUN.json: every listed seed's final-epoch accuracy, their mean and sample std, and each
    seed's own metrics (history included). Seeds not trained yet are left out and the run is not finished."""
    per_seed = []
    for seed in s.distill.seeds:
        metrics_path = paths.student_seed_metrics(s.run_name, seed)
        if metrics_path.is_file():
            per_seed.append(json.loads(metrics_path.read_text()))
    done = [m for m in per_seed if m["finished"]]
    accs = [m["test_acc"] for m in done]
    first = per_seed[0] if per_seed else {}
    summary = {
        "method": s.method, "run": s.run_name, "online": s.online and s.method != "scratch",
        "arch": s.student.arch, "params": first.get("params"), "teachers": s.teachers,
        "seeds": [m["seed"] for m in done],
        "finished": len(done) == len(s.distill.seeds),
        "test_acc": accs,  # final epoch, never the best: the split is the test split (or val with val_size)
        "test_acc_mean": statistics.mean(accs) if accs else None,
        "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "wall_time_s": round(sum(m["wall_time_s"] for m in per_seed), 3),
        "per_seed": per_seed,
    }
    write_json(paths.student_metrics(s.run_name), summary)
    return summary


def load_student_init(student: torch.nn.Module, arch: str, init: str, model_kwargs: dict[str, Any]) -> str:
    """`student.init` into `student`: the weights of a student checkpoint (data/student/RUN/seedS.pt) or a teacher
    checkpoint of the same architecture and kwargs (dropout aside). Returns the file's sha256."""
    path = Path(init)
    ckpt = load_checkpoint(path, "student.init checkpoint", "train that run first, or fix student.init")
    weights = ckpt.get("student", ckpt.get("model"))
    theirs = {k: v for k, v in (ckpt.get("model_kwargs") or {}).items() if k != "dropout"}
    ours = {k: v for k, v in model_kwargs.items() if k != "dropout"}
    if weights is None or ckpt.get("arch") != arch or theirs != ours:
        raise UserError(f"student.init {path} holds {ckpt.get('arch')} {theirs}, not the student {arch} {ours}: "
                        f"point student.init at a checkpoint of this student")
    student.load_state_dict(weights)
    return sha256_file(path)


def metrics(s: Settings, base: dict[str, Any], ckpt: dict[str, Any], device: str) -> dict[str, Any]:
    history = ckpt["history"]
    return {
        "method": s.method,
        "run": s.run_name,
        "seed": base["seed"],
        "online": s.online and s.method != "scratch",
        "arch": base["arch"],
        "params": base["params"],
        "teachers": s.teachers,
        "device": device,
        "epochs": ckpt["epoch"],
        "finished": ckpt["finished"],
        "test_acc": ckpt["test_acc"],
        "best_acc": ckpt["best_acc"],
        "best_epoch": ckpt["best_epoch"],
        "wall_time_s": round(ckpt["wall_time_s"], 3),
        "images_per_s": sum(r["images_per_s"] for r in history) / max(1, len(history)),
        "options": to_dict(s.options),
        "history": history,
    }


if __name__ == "__main__":
    main()
