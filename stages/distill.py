"""Stage: train the student from the teacher caches (MEAL, MEAL V2, ANC, KD) or from scratch.

    python -m stages.distill                       # distill.method from params.yaml
    python -m stages.distill --method kd --epochs 5
    python -m stages.distill --run meal_coop       # a named run of distill.runs (pipeline.runs)
    python -m stages.distill --online              # teachers run live on the same views (baseline, oracle)

Reads data/views.zarr and data/cache/<teacher>.zarr (never a teacher, except with --online) and writes
data/student/<method>.pt after every epoch and metrics/distill/<method>.json (`<run>` instead of
`<method>` with --run, and `_online` appended with --online). Killed and rerun, it resumes from the last finished epoch; a checkpoint made with other
settings is refused unless --restart is given. Every option and params value is checked before any
data is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from pipeline import paths
from pipeline.align import AlignConfig
from pipeline.cache import CacheConfig, open_cache, validate_caches
from pipeline.checkpoints import (check_fits_data, load_checkpoint, load_resumable, load_teacher, save_checkpoint,
                                  sha256_file, write_json)
from pipeline.config import DEFAULT_PARAMS, UserError, build, load_params, section, to_dict
from pipeline.data import DataConfig, load_split
from pipeline.device import resolve_device, setup_cpu
from pipeline.distill import DistillConfig, StudentConfig, TrainSet, build_trainer, distill
from pipeline.methods import distill_teachers, make_method, method_configs
from pipeline.models import build_model, count_parameters
from pipeline.runs import check_runs, deep_merge, run_section, student_overrides
from pipeline.slabs import CachedTargets, CacheSlabs, NoTargets, OnlineTargets, SlabLoader
from pipeline.views import open_view_plan

# settings that change neither the student nor the metrics' meaning: a resume may differ in them
NOT_IDENTITY = ("log_every", "eval_batch_size", "compile")


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
        build_model(student.arch, 10, 1, **student.model)
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
              help="A named run of distill.runs: its overrides apply, it writes data/student/RUN.pt.")
@click.option("--params", "params_path", default=DEFAULT_PARAMS, show_default=True, help="Params file (a profile).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
@click.option("--online", is_flag=True, help="Run the teachers live on the same views instead of reading the caches.")
@click.option("--epochs", type=int, default=None, help="Override distill.epochs.")
@click.option("--seed", type=int, default=None, help="Override distill.seed.")
@click.option("--restart", is_flag=True, help="Discard an existing checkpoint made with other settings and start over.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def main(method: str | None, run: str | None, params_path: str, device: str, online: bool, epochs: int | None,
         seed: int | None, restart: bool, quiet: bool) -> None:
    """Train the student with `distill.method` (or a named run) from the cached teacher outputs; resumable."""
    s = read_settings(load_params(params_path), method, epochs, seed, online, run)
    dev = resolve_device(device)
    setup_cpu()

    train = load_split(s.data, "train")
    test = load_split(s.data, "val" if s.data.val_size > 0 else "test")
    plan_views = open_view_plan(paths.view_plan())
    check_plan(plan_views, train)
    method = make_method(s.method, s.options, s.teachers)
    targets, align_cfg, blocks, hashes = open_targets(s, plan_views, train, method.feature_blocks, dev)
    method = make_method(s.method, s.options, s.teachers, blocks)  # the caches' block names

    model_kwargs = {"num_classes": train.num_classes, "in_channels": train.in_channels, **s.student.model}
    if s.method == "anc":  # ANC's noise is dropout in the student, so the method sets it
        model_kwargs["dropout"] = s.options.dropout
    torch.manual_seed(s.distill.seed)
    student = build_model(s.student.arch, **model_kwargs)
    init_sha = load_student_init(student, s.student, model_kwargs) if s.student.init else None
    trainer = build_trainer(method, s.distill, student, train.num_classes, align_cfg, dev)
    distill_dict = {k: v for k, v in to_dict(s.distill).items() if k not in NOT_IDENTITY and k not in
                    ("meal", "meal_v2", "anc", "kd", "scratch", "runs")}
    identity = {
        "method": s.method,
        "online": s.online and s.method != "scratch",
        "distill": distill_dict,
        "options": to_dict(s.options),
        "student": to_dict(s.student),
        "student_init_sha256": init_sha,
        "model_kwargs": model_kwargs,
        "data": to_dict(s.data),
        "dataset_fingerprint": train.fingerprint,
        "view_plan": plan_views.fingerprint,
        "teachers": hashes,
        "align": to_dict(align_cfg) if s.teachers else None,  # scratch compares no features
    }

    path = paths.student_checkpoint(s.run_name)
    state = load_resumable(path, identity, restart, "student checkpoint", stored="identity")
    params_count = count_parameters(student)
    resumed = f", resuming after epoch {state['epoch']}" if state else ""
    click.echo(f"{s.run_name}: {s.student.arch} {s.student.model} ({params_count:,} parameters) on {dev}, "
               f"{len(train):,} images x {plan_views.num_views} views, teachers {', '.join(s.teachers) or 'none'}, "
               f"adversarial {method.adversarial}{resumed}")
    if s.method == "anc" and not s.options.dropout:
        click.echo("anc: distill.anc.dropout is 0, so the student gets no noise (ANC's z is dropout)")
    if state is not None and state.get("finished"):
        click.echo(f"{s.run_name}: already trained ({state['epoch']} epochs, test accuracy {state['test_acc']:.4f})")

    base = {"method": s.method, "run": s.run_name, "arch": s.student.arch, "model_kwargs": model_kwargs,
            "params": params_count, "identity": identity}

    def save(ckpt: dict[str, Any]) -> None:
        save_checkpoint(path, {**base, **ckpt})
        write_json(paths.student_metrics(s.run_name), metrics(s, base, ckpt, str(dev)))

    data = TrainSet(train.images.to(dev), train.labels.to(dev), plan_views.aug, plan_views.augment,
                    train.mean, train.std)
    targets = targets or NoTargets()
    try:
        ckpt = distill(trainer, data, test, targets, state, save, progress=not quiet)
    finally:
        targets.close()
    if state is not None and state.get("finished"):
        # refresh the metrics file only: rewriting a finished checkpoint would change its bytes, and the sha256
        # another run's student.init recorded for it
        write_json(paths.student_metrics(s.run_name), metrics(s, base, ckpt, str(dev)))
    click.echo(f"{s.run_name}: test accuracy {ckpt['test_acc']:.4f} (best {ckpt['best_acc']:.4f} at epoch "
               f"{ckpt['best_epoch']}) after {ckpt['epoch']} epochs, {ckpt['wall_time_s']:.0f}s -> {path}")


def load_student_init(student: torch.nn.Module, cfg: StudentConfig, model_kwargs: dict[str, Any]) -> str:
    """`student.init` into `student`: the weights of a student checkpoint (data/student/RUN.pt) or a teacher
    checkpoint of the same architecture and kwargs (dropout aside). Returns the file's sha256."""
    path = Path(cfg.init)
    ckpt = load_checkpoint(path, "student.init checkpoint", "train that run first, or fix student.init")
    weights = ckpt.get("student", ckpt.get("model"))
    theirs = {k: v for k, v in (ckpt.get("model_kwargs") or {}).items() if k != "dropout"}
    ours = {k: v for k, v in model_kwargs.items() if k != "dropout"}
    if weights is None or ckpt.get("arch") != cfg.arch or theirs != ours:
        raise UserError(f"student.init {path} holds {ckpt.get('arch')} {theirs}, not the student {cfg.arch} {ours}: "
                        f"point student.init at a checkpoint of this student")
    student.load_state_dict(weights)
    return sha256_file(path)


def metrics(s: Settings, base: dict[str, Any], ckpt: dict[str, Any], device: str) -> dict[str, Any]:
    history = ckpt["history"]
    return {
        "method": s.method,
        "run": s.run_name,
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
