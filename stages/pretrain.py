"""Stage 1: pretrain one teacher of the zoo.

    python -m stages.pretrain --teacher resnet18

Writes data/teachers/<name>.pt (a plain dict: weights, arch and kwargs, config, dataset fingerprint,
epoch, test accuracy) after every epoch, and metrics/pretrain/<name>.json at the end. Killed and rerun,
it resumes from the last finished epoch.

    torchrun --nproc_per_node N -m stages.pretrain --teacher resnet18    # N ranks (pipeline.dist)

A teacher with `weights:` (a torchvision, timm or zoo model trained elsewhere) is imported instead of trained:
its weights file is checked against its architecture (one line naming the keys that do not fit), its test
accuracy measured, and the same data/teachers/<name>.pt written, so the cache and evaluate stages treat it
like any other teacher. Rerun, it re-imports only when the file's bytes or the teacher's entry changed.

Under torchrun every rank trains its shard of each global batch of `pretrain.batch_size` images; rank 0
evaluates and writes; a run resumes with any number of processes.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import torch

from pipeline import paths
from pipeline.checkpoints import check_fits_data, load_resumable, save_checkpoint, sha256_file, write_json
from pipeline.config import DEFAULT_PARAMS, build, load_params, section, to_dict, without_defaults
from pipeline.data import DataConfig, load_split, scoring_split
from pipeline.device import resolve_device, setup_cpu
from pipeline.dist import DistConfig, World, check_shards, collective_errors, start, stop
from pipeline.models.external import load_weights
from pipeline.models import build_model, constructor_kwargs, count_parameters
from pipeline.optim import LATER_KEYS
from pipeline.pretraining import pretrain, teacher_spec
from pipeline.training import evaluate


@click.command()
@click.option("--teacher", required=True, help="Teacher name, a key of `teachers` in the params file.")
@click.option("--params", "params_path", default=DEFAULT_PARAMS, show_default=True, help="Params file (a profile).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--restart", is_flag=True, help="Discard an existing checkpoint made with other settings and start over.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def main(teacher: str, params_path: str, device: str, restart: bool, quiet: bool) -> None:
    """Train one teacher with cross-entropy, pad-and-crop + flip and SGD; resumable."""
    params = load_params(params_path)
    data_cfg = build(DataConfig, section(params, "data"), "data")
    spec, cfg = teacher_spec(params, teacher)
    dist_cfg = build(DistConfig, section(params, "dist"), "dist")
    world, dev = start(dist_cfg, resolve_device(device))
    try:
        with collective_errors(world):
            if spec.weights:
                if world.main:  # reading a file needs no help
                    import_teacher(teacher, spec, cfg, data_cfg, dev)
            else:
                train_teacher(teacher, spec, cfg, data_cfg, dev, restart, quiet, world, dist_cfg.sync_bn)
    finally:
        stop(world)


def train_teacher(teacher: str, spec, cfg, data_cfg: DataConfig, dev: torch.device, restart: bool, quiet: bool,
                  world: World, sync_bn: bool) -> None:
    """Train (or resume) the teacher into data/teachers/NAME.pt; rank 0 writes and reports."""
    setup_cpu(files=data_cfg.source == "files")
    echo = click.echo if world.main else (lambda *_: None)
    train = load_split(data_cfg, "train")
    test = load_split(data_cfg, scoring_split(data_cfg))
    model_kwargs = constructor_kwargs(spec.arch, spec.model, train)
    torch.manual_seed(cfg.seed)
    model = build_model(spec.arch, **model_kwargs)
    identity = {
        "teacher": teacher,
        "arch": spec.arch,
        "model_kwargs": model_kwargs,
        "config": without_defaults(to_dict(cfg), LATER_KEYS),  # a checkpoint from before those keys resumes
        "data": data_cfg.identity(),
        "dataset_fingerprint": train.fingerprint,
    }

    path = paths.teacher_checkpoint(teacher)
    state = load_resumable(path, identity, restart, "teacher checkpoint")  # identity keys stored top-level
    check_shards(len(train), cfg.batch_size, world, "pretrain")
    if state is not None and state.get("finished"):
        echo(f"{teacher}: already trained ({state['epoch']} epochs, test accuracy {state['test_acc']:.4f})")
    echo(f"{teacher}: {spec.arch} {spec.model} with {count_parameters(model):,} parameters on {dev}, "
         f"{len(train):,} training images" + (f", resuming after epoch {state['epoch']}" if state else ""))

    base = {**identity, "params": count_parameters(model)}
    ckpt = pretrain(model, train, test, cfg, dev, state and {**base, **state},
                    lambda c: save_checkpoint(path, {**base, **c}), not quiet, world, sync_bn)
    if not world.main:  # the other ranks hold no evaluation
        return
    write_json(paths.teacher_metrics(teacher), {
        "teacher": teacher,
        "arch": spec.arch,
        "params": count_parameters(model),
        "test_acc": ckpt["test_acc"],
        "epochs": ckpt["epoch"],
        "wall_time_s": round(ckpt["wall_time_s"], 2),
        "history": ckpt["history"],
    })
    click.echo(f"{teacher}: test accuracy {ckpt['test_acc']:.4f} after {ckpt['epoch']} epochs, "
               f"{ckpt['wall_time_s']:.0f}s of training -> {path}")


def import_teacher(teacher: str, spec, cfg, data_cfg: DataConfig, dev: torch.device) -> None:
    """A teacher trained elsewhere into data/teachers/NAME.pt: its weights checked, its test accuracy measured."""
    setup_cpu(files=data_cfg.source == "files")
    train = load_split(data_cfg, "train")
    test = load_split(data_cfg, scoring_split(data_cfg))
    model_kwargs = constructor_kwargs(spec.arch, spec.model, train)
    identity = {
        "teacher": teacher,
        "arch": spec.arch,
        "model_kwargs": model_kwargs,
        "weights": spec.weights,
        "weights_sha256": sha256_file(spec.weights) if Path(spec.weights).is_file() else None,
        "data": data_cfg.identity(),
        "dataset_fingerprint": train.fingerprint,
    }
    check_fits_data("teacher", teacher, train.fingerprint, model_kwargs, train,
                    f"set teachers.{teacher}.model.num_classes to {train.num_classes}, or remove it")
    path = paths.teacher_checkpoint(teacher)
    # the same file and entry: keep the checkpoint (rewriting it would change the sha256 its caches recorded);
    # anything else is replaced, as nothing trained is lost
    state = load_resumable(path, identity, True, "teacher checkpoint")
    if state is not None:
        click.echo(f"{teacher}: already imported from {spec.weights} (test accuracy {state['test_acc']:.4f})")
        return
    t0 = time.perf_counter()
    model = build_model(spec.arch, **model_kwargs)
    load_weights(model, spec.weights, spec.arch)
    acc = evaluate(model.to(dev), test, dev, cfg.eval_batch_size)["accuracy"]
    params, wall = count_parameters(model), time.perf_counter() - t0
    save_checkpoint(path, {**identity, "model": {k: v.cpu() for k, v in model.state_dict().items()}, "params": params,
                           "epoch": 0, "finished": True, "test_acc": acc, "history": [], "imported": True,
                           "wall_time_s": wall})
    write_json(paths.teacher_metrics(teacher), {"teacher": teacher, "arch": spec.arch, "params": params,
                                                "test_acc": acc, "epochs": 0, "imported_from": spec.weights,
                                                "wall_time_s": round(wall, 2), "history": []})
    click.echo(f"{teacher}: {spec.arch} ({params:,} parameters) imported from {spec.weights}, test accuracy "
               f"{acc:.4f} -> {path}")


if __name__ == "__main__":
    main()
