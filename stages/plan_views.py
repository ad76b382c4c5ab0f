"""Stage: plan the augmented views every teacher is cached on and the student replays.

    python -m stages.plan_views

Writes data/views.zarr: the int16 augmentation parameters of V views of every training sample (a pure
function of the seed, the sample and the view), with `views.mix` each view's mixup/CutMix partner, lambda and
box (pipeline.mix), the labels and the plan's fingerprint (pipeline.views).
Rerun with the same data and `views` params it leaves the existing plan untouched; with other params it
replaces it, and every teacher cache made from the old plan must then be rebuilt (the distill stage
refuses stale caches).
"""

from __future__ import annotations

import click

from pipeline import paths
from pipeline.config import DEFAULT_PARAMS, build, load_params, section
from pipeline.data import DataConfig, load_split, skipped_note
from pipeline.views import ViewsConfig, make_view_plan, write_view_plan


@click.command()
@click.option("--params", "params_path", default=DEFAULT_PARAMS, show_default=True, help="Params file (a profile).")
def main(params_path: str) -> None:
    """Plan V augmented views per training sample (params `views`) into data/views.zarr."""
    params = load_params(params_path)
    data_cfg = build(DataConfig, section(params, "data"), "data")
    cfg = build(ViewsConfig, section(params, "views"), "views")
    train = load_split(data_cfg, "train")
    plan = make_view_plan(cfg, train)
    path = paths.view_plan()
    changed = write_view_plan(plan, path)
    state = "written" if changed else "unchanged (already up to date)"
    mixed = f" + {plan.mix_config.kind} ({(plan.mix.partner >= 0).mean():.0%} mixed)" if plan.mix is not None else ""
    click.echo(f"view plan {path}: {plan.num_samples} {train.name} samples x {plan.num_views} views "
               f"({plan.attrs['augment']['kind']}{mixed}, seed {cfg.seed}) {state}; fingerprint {plan.fingerprint[:12]}")
    if skipped_note(train):
        click.echo(skipped_note(train))


if __name__ == "__main__":
    main()
