"""Stage: run one pretrained teacher over every (sample, view) of the view plan and cache its outputs.

    python -m stages.cache_teachers --teacher resnet18 [--format zarr|h5|...] [--device auto|cpu|cuda]
    python -m stages.cache_teachers --teacher resnet18 --verify     # check every chunk's checksum, write nothing
    python -m stages.cache_teachers --teacher resnet18 --repair     # rebuild only the chunks that fail it
    python -m stages.cache_teachers --teacher resnet18 --verify --recompute 64   # + rerun the teacher on 64 pairs
    python -m stages.cache_teachers --plan                          # every store's size and the free space
    python -m stages.cache_teachers --teacher resnet18 --unmixed    # a mixing plan's unmixed views (FKD's form)

Reads data/teachers/<name>.pt and data/views.zarr, writes data/cache/<name>.zarr (or .h5): raw fp16
logits (N, V, C) and the aligned block features (N, V, L) (pipeline.cache). Killed and rerun, it
resumes from the first chunk not yet written; a cache made from another checkpoint, view plan or
align spec is refused unless --overwrite is given (the old one is replaced only once the new one is
complete). Every chunk is checksummed; one process writes a store at a time (`<store>.lock`). A store that
does not fit on its filesystem is refused before anything is written.

With `views.mix` the teacher runs on each mixed view (pipeline.mix). `--unmixed` caches it on the same plan's
views unmixed instead, into data/cache/unmixed/<name>.zarr: the soft labels FKD's approximation mixes
(distill.mix_targets: fkd). That store is not a DVC output; the pipeline does not need it.

    torchrun --nproc_per_node N -m stages.cache_teachers --teacher resnet18    # N ranks share the chunks

Under torchrun the job is the one writer: rank 0 holds the lock, rank r writes pending chunks r, r + N, ...,
rank 0 marks the store complete; killed, it resumes with any number of processes. Only in a format that
declares parallel writers (zarr): an h5 store under several processes is refused (h5py has no parallel
writer without MPI). The --format choices are the registered store formats (pipeline.cache.store.FORMATS).
"""

from __future__ import annotations

import click
import torch

from pipeline import paths
from pipeline.cache.read import CacheConfig, rerun_hint
from pipeline.cache.store import FORMATS
from pipeline.cache.plan import free_bytes, plan_lines, store_plan
from pipeline.cache.recompute import recompute_check
from pipeline.cache.write import block_channels, cache_teacher, verify_cache
from pipeline.config import DEFAULT_PARAMS, UserError, build, load_params, section
from pipeline.data import DataConfig, load_split
from pipeline.device import resolve_device, setup_cpu
from pipeline.dist import DistConfig, collective_errors, start, stop
from pipeline.models import build_model, constructor_kwargs, load_teacher
from pipeline.views import ViewsConfig, open_view_plan


@click.command()
@click.option("--teacher", default=None, help="Teacher name: reads data/teachers/NAME.pt (--plan: every teacher).")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default=None,
              help="Store format [default: params cache.format].")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--batch-size", type=int, default=None, help="(sample, view) pairs per forward [default: params cache.batch_size].")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache made from another checkpoint, plan or align spec.")
@click.option("--verify", is_flag=True, help="Check every chunk of the existing cache against its checksum; write nothing.")
@click.option("--recompute", type=click.IntRange(min=1), default=None,
              help="With --verify: rerun the teacher on this many random cached (sample, view) pairs, replaying their "
                   "views, and compare with the store (pipeline.cache.recompute).")
@click.option("--repair", is_flag=True, help="Verify every chunk and rebuild the damaged ones (the rest is kept).")
@click.option("--plan", "show_plan", is_flag=True,
              help="Print each store's bytes per array, per (sample, view) and in all, and the free space; write nothing.")
@click.option("--unmixed", is_flag=True,
              help="Cache the plan's views unmixed (views.mix) into data/cache/unmixed/NAME: for distill.mix_targets: fkd.")
@click.option("--params", "params_path", default=DEFAULT_PARAMS, show_default=True, help="Params file (a profile).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(teacher: str | None, fmt: str | None, device: str, batch_size: int | None, overwrite: bool, verify: bool,
         recompute: int | None, repair: bool, show_plan: bool, unmixed: bool, params_path: str, quiet: bool) -> None:
    """Cache one teacher's logits and aligned features over the planned views; resumable."""
    params = load_params(params_path)
    data_cfg = build(DataConfig, section(params, "data"), "data")
    overrides = {k: v for k, v in (("format", fmt), ("batch_size", batch_size)) if v is not None}
    cfg = build(CacheConfig, {**section(params, "cache"), **overrides}, "cache")
    if show_plan:
        return print_plan(params, cfg, data_cfg, [teacher] if teacher else list(params.get("teachers") or {}))
    if teacher is None:
        raise UserError("give --teacher NAME (a teacher of the params), or --plan to size every teacher's store")
    if recompute is not None and not verify:
        raise UserError("--recompute N checks a written store: give it with --verify")
    dist_cfg = build(DistConfig, section(params, "dist"), "dist")
    out = (paths.unmixed_teacher_cache if unmixed else paths.teacher_cache)(teacher, cfg.format)
    if unmixed and not build(ViewsConfig, section(params, "views"), "views").mix_config.active:
        raise UserError(f"--unmixed caches a mixing plan's views unmixed, but views.mix.kind is none: the views of "
                        f"{paths.teacher_cache(teacher, cfg.format)} are already unmixed")
    world, dev = start(dist_cfg, resolve_device(device))
    try:
        with collective_errors(world):
            if verify:
                if world.main:  # reading needs no help
                    verify_store(teacher, out, cfg.format)
                    if recompute:
                        recompute_store(teacher, out, cfg.format, data_cfg, recompute, dev, unmixed)
                return
            setup_cpu(files=data_cfg.source == "files")
            plan = _plan(unmixed)
            train = load_split(data_cfg, "train")
            summary = cache_teacher(paths.teacher_checkpoint(teacher), out, plan, train, cfg, dev, overwrite=overwrite,
                                    progress=not quiet, log=click.echo, teacher=teacher, repair=repair, world=world)
    finally:
        stop(world)
    if world.main:
        click.echo(f"{summary['teacher']}: {summary['chunks_written']} of {summary['chunks']} chunks written, "
                   f"cache complete -> {out}")


def print_plan(params: dict, cfg: CacheConfig, data_cfg: DataConfig, teachers: list[str]) -> None:
    """--plan: each teacher's store sized from the data, the views and the teacher's blocks (its checkpoint, or
    the model its spec builds before it is trained), and the free space where the stores go."""
    train = load_split(data_cfg, "train")
    views = build(ViewsConfig, section(params, "views"), "views").num_views
    plans = []
    for name in teachers:
        blocks = block_channels(_model_of(params, name, train), train, torch.device("cpu"))
        lengths = dict(zip(blocks, cfg.align_config.lengths(len(blocks))))
        plans.append(store_plan(name, paths.teacher_cache(name, cfg.format), len(train), views, train.num_classes,
                                lengths, cfg.topk if cfg.logits == "topk" else 0))
    for line in plan_lines(plans, free_bytes(paths.teacher_cache(teachers[0], cfg.format)) if plans else 0):
        click.echo(line)


def _model_of(params: dict, name: str, train):
    """The teacher from its checkpoint if pretrained, else as its params entry builds it (the shapes are what
    matter; the pretrain stage checks the entry in full)."""
    path = paths.teacher_checkpoint(name)
    if path.is_file():
        return load_teacher(path)[0]
    spec = (params.get("teachers") or {}).get(name)
    if not isinstance(spec, dict) or "arch" not in spec:
        raise UserError(f"teacher '{name}' has no entry with an arch under `teachers` in the params: add one")
    return build_model(spec["arch"], **constructor_kwargs(spec["arch"], spec.get("model") or {}, train)).eval()


def _plan(unmixed: bool):
    """The view plan, or with --unmixed its views unmixed (the plan views.mix.kind: none gives)."""
    plan = open_view_plan(paths.view_plan())
    if unmixed and plan.mix is None:
        raise UserError(f"--unmixed: the view plan {plan.path} mixes no views: rerun python -m stages.plan_views "
                        f"(views.mix changed since)")
    return plan.unmixed() if unmixed else plan


def recompute_store(teacher: str, out, fmt: str, data_cfg: DataConfig, count: int, dev, unmixed: bool = False) -> None:
    """--verify --recompute N: the teacher rerun on N random cached pairs; one line per array, exit 1 on a mismatch."""
    setup_cpu(files=data_cfg.source == "files")
    report = recompute_check(out, paths.teacher_checkpoint(teacher), _plan(unmixed), load_split(data_cfg, "train"),
                             count, dev)
    for name, error in report.worst.items():
        click.echo(f"  {name:24s} largest relative error {error:.2e} (tolerance {report.tolerance:.0e})")
    if not report.ok:
        worst: dict[tuple[int, int], tuple[str, float]] = {}  # each differing pair's worst array
        for i, v, name, e in report.bad:
            if e > worst.get((i, v), ("", -1.0))[1]:
                worst[(i, v)] = (name, e)
        shown = "; ".join(f"sample {i} view {v} ({name} off by {e:.0%})"
                          for (i, v), (name, e) in list(worst.items())[:5])
        raise UserError(f"cache {out} does not hold what teacher {teacher} computes on the planned views: "
                        f"{len(worst)} of {len(report.pairs)} pairs differ, e.g. {shown}: rebuild it with "
                        f"{rerun_hint(teacher, fmt, overwrite=True, path=out)}")
    click.echo(f"{teacher}: {len(report.pairs)} random cached (sample, view) pairs recomputed, all within tolerance")


def verify_store(teacher: str, out, fmt: str) -> None:
    """--verify: every written chunk against its checksum; one line either way."""
    bad = verify_cache(out)
    if bad:
        listed = "; ".join(f"chunk {k}: {', '.join(names)}" for k, names in sorted(bad.items()))
        raise UserError(f"cache {out} has {len(bad)} damaged chunk(s) ({listed}): run "
                        f"{rerun_hint(teacher, fmt, repair=True, path=out)} to rebuild them")
    click.echo(f"{teacher}: every written chunk of {out} verified")


if __name__ == "__main__":
    main()
