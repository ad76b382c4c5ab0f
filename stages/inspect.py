"""Stage: summarise teacher caches: accuracy over the views, entropy, per-class accuracy, agreement.

    python -m stages.inspect data/cache/resnet18.zarr data/cache/vgg16.zarr --temperature 4 --plots reports/cache

With no paths it inspects the caches of every teacher listed in the params that has one. Labels come
from the view plan (data/views.zarr unless --plan). Plots are PNG files (matplotlib, Agg backend). A mixing
plan's caches (views.mix) also show each view's partner, its label and lambda, and --plots draws a few mixed
views, replayed from the params' data, with every teacher's top class on them (mixed_views.png).
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline import paths
from pipeline.cache import CacheConfig
from pipeline.config import DEFAULT_PARAMS, UserError, build, load_params, section
from pipeline.cache.frame import format_summary, plot_mixed_views, plot_summary, soft_labels, summary


@click.command()
@click.argument("caches", nargs=-1, type=click.Path(path_type=Path))
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Softmax temperature.")
@click.option("--top-k", type=int, default=3, show_default=True, help="Top classes kept per row.")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), default=None,
              help="View plan the caches were made from [default: data/views.zarr].")
@click.option("--plots", "plots_dir", type=click.Path(path_type=Path), default=None, help="Write PNG plots into DIR.")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), default=None,
              help="Also write the per-(sample, view, teacher) table as CSV.")
@click.option("--params", "params_path", default=DEFAULT_PARAMS, show_default=True,
              help="Params file, used to find the caches when no path is given.")
def main(caches: tuple[Path, ...], temperature: float, top_k: int, plan_path: Path | None,
         plots_dir: Path | None, csv_path: Path | None, params_path: str) -> None:
    """Print a summary of the soft labels in teacher caches (CACHES: .zarr or .h5 paths)."""
    targets = list(caches) or _default_caches(params_path)
    df = soft_labels(targets, temperature=temperature, top_k=top_k, plan=plan_path or paths.view_plan())
    tables = summary(df)
    n_teachers = df.teacher.nunique()
    click.echo(f"{len(df):,} rows: {len(df) // n_teachers:,} (sample, view) pairs x {n_teachers} teacher(s), "
               f"temperature {temperature:g}\n")
    click.echo(format_summary(tables))
    if csv_path is not None:
        df.to_csv(csv_path, index=False)
        click.echo(f"\ntable -> {csv_path}")
    if plots_dir is not None:
        written = plot_summary(df, tables, plots_dir)
        if "lam" in df:
            written.append(_plot_mixed(df, plan_path or paths.view_plan(), params_path, plots_dir))
        click.echo(f"\nplots -> {', '.join(str(p) for p in written)}")


def _plot_mixed(df, plan_path: Path, params_path: str, plots_dir: Path, count: int = 8) -> Path:
    """mixed_views.png: the first `count` mixed (sample, view) pairs, replayed from the params' data."""
    import numpy as np
    import torch

    from pipeline.data import DataConfig, load_split, pair_views
    from pipeline.views import open_view_plan

    plan = open_view_plan(plan_path)
    train = load_split(build(DataConfig, section(load_params(params_path), "data"), "data"), "train")
    if train.fingerprint != plan.dataset_fingerprint:
        raise UserError(f"the data of {params_path} is not what view plan {plan_path} was made from: pass the params "
                        f"of that plan (--params) to draw its mixed views")
    pairs = np.argwhere(plan.mix.partner >= 0)[:count]  # (n, 2) sample, view: the first mixed ones
    pixels = torch.cat(list(pair_views(train, plan, pairs, torch.device("cpu"), count))).numpy()
    return plot_mixed_views(df, pixels, pairs, getattr(train, "classes", None), plots_dir / "mixed_views.png")


def _default_caches(params_path: str) -> list[Path]:
    params = load_params(params_path)
    fmt = build(CacheConfig, section(params, "cache"), "cache").format
    found = [paths.teacher_cache(name, fmt) for name in (params.get("teachers") or {})]
    found = [p for p in found if p.exists()]
    if not found:
        raise UserError("no teacher caches found for the teachers in the params: pass cache paths, "
                        "or run python -m stages.cache_teachers --teacher NAME first")
    return found


if __name__ == "__main__":
    main()
