"""Stage 1: pretrain one teacher of the zoo.

    python -m stages.pretrain --teacher resnet18

Writes data/teachers/<name>.pt (a plain dict: weights, arch and kwargs, config, dataset fingerprint,
epoch, test accuracy) after every epoch, and metrics/pretrain/<name>.json at the end. Killed and rerun,
it resumes from the last finished epoch.

    torchrun --nproc_per_node N -m stages.pretrain --teacher resnet18    # N ranks (pipeline.dist)

Under torchrun every rank trains its shard of each global batch of `pretrain.batch_size` images; rank 0
evaluates and writes; a run resumes with any number of processes.
"""

from __future__ import annotations

import click
import torch

from pipeline import paths
from pipeline.checkpoints import load_resumable, save_checkpoint, write_json
from pipeline.config import DEFAULT_PARAMS, build, load_params, section, to_dict
from pipeline.data import DataConfig, load_split, scoring_split
from pipeline.device import resolve_device, setup_cpu
from pipeline.dist import DistConfig, World, check_shards, collective_errors, start, stop
from pipeline.models import build_model, count_parameters
from pipeline.pretraining import pretrain, teacher_spec


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
            train_teacher(teacher, spec, cfg, data_cfg, dev, restart, quiet, world, dist_cfg.sync_bn)
    finally:
        stop(world)


def train_teacher(teacher: str, spec, cfg, data_cfg: DataConfig, dev: torch.device, restart: bool, quiet: bool,
                  world: World, sync_bn: bool) -> None:
    """Train (or resume) the teacher into data/teachers/NAME.pt; rank 0 writes and reports."""
    setup_cpu()
    echo = click.echo if world.main else (lambda *_: None)
    train = load_split(data_cfg, "train")
    test = load_split(data_cfg, scoring_split(data_cfg))
    model_kwargs = {"num_classes": train.num_classes, "in_channels": train.in_channels, **spec.model}
    torch.manual_seed(cfg.seed)
    model = build_model(spec.arch, **model_kwargs)
    identity = {
        "teacher": teacher,
        "arch": spec.arch,
        "model_kwargs": model_kwargs,
        "config": to_dict(cfg),
        "data": to_dict(data_cfg),
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


if __name__ == "__main__":
    main()
