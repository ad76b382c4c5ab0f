"""Looking at teacher caches in pandas: soft labels per (sample, view, teacher), a summary, PNG plots.

    from pipeline.cache import soft_labels               # (re-exported from here)
    df = soft_labels(["data/cache/resnet18.zarr", "data/cache/vgg16.zarr"], temperature=4)
    df.groupby("label").entropy.mean()
    summary(df)["agreement"]

Labels come from the view plan the caches were made from (`paths.view_plan()` unless `plan` says
otherwise); a cache made from another plan is refused, since its rows would pair with wrong labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.cache.read import TeacherCache, open_cache
from pipeline.config import UserError
from pipeline.views import ViewPlan, open_view_plan


def soft_labels(
    caches: str | Path | TeacherCache | Iterable[str | Path | TeacherCache],
    temperature: float = 1.0,
    top_k: int = 3,
    plan: ViewPlan | str | Path | None = None,
) -> pd.DataFrame:
    """One row per (sample, view, teacher), ordered that way, with the softmax of logits / temperature.

    Columns: sample, view, teacher, label, pred, p_label, p_max, entropy (nats), margin (top-1 minus
    top-2 probability), correct, top1_class, top1_prob, ... top{k}_class, top{k}_prob, and with several
    teachers ensemble_pred (argmax of the mean teacher probabilities on that (sample, view)) and
    agrees_with_ensemble. A mixing plan's views (pipeline.mix) add partner (-1: a plain view), partner_label
    (-1), lam (the sample's weight) and p_partner (the probability of the partner's label); `label`, `p_label` and
    `correct` stay the sample's own. Caches of its unmixed views (cache_teachers --unmixed) read as plain views.
    """
    if temperature <= 0:
        raise UserError(f"temperature = {temperature} must be > 0")
    if top_k < 1:
        raise UserError(f"top_k = {top_k} must be at least 1")
    opened, plan = _open_checked(caches, plan)
    names = _teacher_names(opened)
    n, v, c, t = plan.num_samples, plan.num_views, opened[0].num_classes, len(opened)
    k = min(top_k, c)
    logp = _log_probs(opened, v, temperature)  # (N, V, T, C)
    prob = np.exp(logp)  # (N, V, T, C)
    order = np.argsort(-prob, axis=-1, kind="stable")[..., :max(k, 2)]  # (N, V, T, k'), ties -> lower class
    top = np.take_along_axis(prob, order, axis=-1)
    labels = plan.labels.astype(np.int64)[:, None, None]  # (N, 1, 1)
    pred = order[..., 0]  # (N, V, T)

    columns = {
        "sample": np.broadcast_to(np.arange(n, dtype=np.int32)[:, None, None], (n, v, t)),
        "view": np.broadcast_to(np.arange(v, dtype=np.int16)[None, :, None], (n, v, t)),
        "teacher": pd.Categorical.from_codes(np.tile(np.arange(t), n * v), categories=names),
        "label": np.broadcast_to(labels.astype(np.int16), (n, v, t)),
        "pred": pred.astype(np.int16),
        "p_label": np.take_along_axis(prob, np.broadcast_to(labels[..., None], (n, v, t, 1)), axis=-1)[..., 0],
        "p_max": top[..., 0],
        "entropy": -(prob * logp).sum(axis=-1),
        "margin": top[..., 0] - (top[..., 1] if c > 1 else 0.0),
        "correct": pred == labels,
    }
    if plan.mix is not None:  # the pair each view mixes: partner, its label and lambda, the partner label's probability
        partner = plan.mix.partner.astype(np.int64)[:, :, None]  # (N, V, 1)
        other = np.where(partner >= 0, plan.labels.astype(np.int64)[np.maximum(partner, 0)], -1)  # (N, V, 1)
        columns.update(
            partner=np.broadcast_to(partner.astype(np.int32), (n, v, t)),
            partner_label=np.broadcast_to(other.astype(np.int16), (n, v, t)),
            lam=np.broadcast_to(plan.mix.lam[:, :, None], (n, v, t)),
            p_partner=np.where(other >= 0, np.take_along_axis(
                prob, np.broadcast_to(np.maximum(other, 0)[..., None], (n, v, t, 1)), axis=-1)[..., 0], np.nan))
    for i in range(k):
        columns[f"top{i + 1}_class"] = order[..., i].astype(np.int16)
        columns[f"top{i + 1}_prob"] = top[..., i]
    if t > 1:
        ensemble = prob.mean(axis=2).argmax(axis=-1)[:, :, None]  # (N, V, 1)
        columns["ensemble_pred"] = np.broadcast_to(ensemble.astype(np.int16), (n, v, t))
        columns["agrees_with_ensemble"] = pred == ensemble
    return pd.DataFrame({name: (col if isinstance(col, pd.Categorical) else np.ascontiguousarray(col).reshape(-1))
                         for name, col in columns.items()})


def _open_checked(caches, plan) -> tuple[list[TeacherCache], ViewPlan]:
    """The caches, opened, and the view plan (`plan`, or the pipeline's), once they are known to fit together:
    the teacher each is used as, the plan, one class count, complete."""
    given = [caches] if isinstance(caches, (str, Path, TeacherCache)) else list(caches)
    opened = [c if isinstance(c, TeacherCache) else open_cache(c) for c in given]
    if not opened:
        raise UserError("no caches given: pass one path or a list of paths")
    for cache in opened:  # a store at data/cache/NAME.zarr (or data/cache/unmixed/) must hold teacher NAME's outputs
        name = paths.cached_teacher_name(cache.path)
        if name is not None:
            cache.check_identity(name, paths.teacher_checkpoint(name))
    plan = plan if isinstance(plan, ViewPlan) else open_view_plan(plan or paths.view_plan())
    unmixed = plan.unmixed()  # a mixing plan's views unmixed (cache_teachers --unmixed); hashed once
    if all(c.attrs.get("view_plan_fingerprint") == unmixed.fingerprint for c in opened):
        plan = unmixed
    for cache in opened:
        if cache.attrs.get("view_plan_fingerprint") != plan.fingerprint:
            raise UserError(f"cache {cache.path} was made from another view plan than {plan.path}: "
                            f"pass the plan it was made from (plan=...), or rebuild the cache")
        if cache.num_classes != opened[0].num_classes:
            raise UserError(f"caches {opened[0].path} and {cache.path} have different class counts")
        cache.check_complete()
    return opened, plan


def _log_probs(caches: list[TeacherCache], views: int, temperature: float) -> np.ndarray:
    """(N, V, T, C) float32: every teacher's log-softmax of logits / temperature, read one view slab at a time."""
    first = caches[0]
    logp = np.empty((first.num_samples, views, len(caches), first.num_classes), dtype=np.float32)
    for j, cache in enumerate(caches):
        for view in range(views):
            z = cache.view_slab(view, ["logits"])["logits"].astype(np.float32) / temperature  # (N, C)
            z -= z.max(axis=1, keepdims=True)
            logp[:, view, j] = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return logp


def _teacher_names(caches: list[TeacherCache]) -> list[str]:
    """Teacher names, or the file names where two caches hold the same teacher (e.g. its zarr and h5)."""
    names = [c.teacher for c in caches]
    if len(set(names)) < len(names):
        names = [c.path.name for c in caches]
    if len(set(names)) < len(names):
        names = [str(c.path) for c in caches]
    return names


# ---------------------------------------------------------------- summary


def summary(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Tables over all views: per teacher (accuracy, entropy, confidence), per view, per class, agreement."""
    g = df.groupby("teacher", observed=True)
    teachers = pd.DataFrame({
        "accuracy": g.correct.mean(),
        "mean_entropy": g.entropy.mean(),
        "mean_p_max": g.p_max.mean(),
        "mean_p_label": g.p_label.mean(),
        "mean_margin": g.margin.mean(),
        "rows": g.size(),
    })
    teachers.index = teachers.index.astype(str)
    if "agrees_with_ensemble" in df:
        teachers["agrees_with_ensemble"] = g.agrees_with_ensemble.mean()
        first = df.drop_duplicates(["sample", "view"])
        teachers.loc["ensemble", "accuracy"] = float((first.ensemble_pred == first.label).mean())
        teachers.loc["ensemble", "rows"] = len(first)
    teachers["rows"] = teachers["rows"].astype("Int64")
    per_view = df.pivot_table(index="view", columns="teacher", values="correct", aggfunc="mean", observed=True)
    per_class = df.pivot_table(index="label", columns="teacher", values="correct", aggfunc="mean", observed=True)
    wide = df.pivot_table(index=["sample", "view"], columns="teacher", values="pred", observed=True).to_numpy()
    names = list(df.teacher.cat.categories)
    agreement = pd.DataFrame([[float((wide[:, i] == wide[:, j]).mean()) for j in range(len(names))]
                              for i in range(len(names))], index=names, columns=names)
    return {"teachers": teachers, "per_view": per_view, "per_class": per_class, "agreement": agreement}


def format_summary(tables: dict[str, pd.DataFrame]) -> str:
    titles = {
        "teachers": "per teacher, over all samples and views (entropy in nats)",
        "per_view": "accuracy per view",
        "per_class": "accuracy per class (label)",
        "agreement": "teacher agreement (fraction of (sample, view) with the same prediction)",
    }
    parts = []
    for key, title in titles.items():
        parts.append(f"{title}\n{tables[key].to_string(float_format=lambda x: f'{x:.4f}', na_rep='-')}")
    return "\n\n".join(parts)


def plot_summary(df: pd.DataFrame, tables: dict[str, pd.DataFrame], out_dir: str | Path) -> list[Path]:
    """PNG plots of the summary (matplotlib, Agg backend) into `out_dir`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the plot folder {out_dir} ({exc.strerror or exc}): choose another --plots") from None
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    teachers = tables["teachers"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(teachers), 3.5))
    ax.bar(teachers.index.astype(str), teachers.accuracy, color="tab:blue")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy over all (sample, view) pairs", fontsize=10)
    ax.set_ylim(max(0.0, teachers.accuracy.min() - 0.1), 1.0)
    ax.tick_params(axis="x", rotation=30)
    save(fig, "accuracy.png")

    per_class = tables["per_class"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in per_class.columns:
        ax.plot(per_class.index, per_class[name], marker="o", label=str(name))
    ax.set_xticks(list(per_class.index))
    ax.set_xlabel("class (label)")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy per class, over all views", fontsize=10)
    ax.legend(fontsize=8)
    save(fig, "per_class_accuracy.png")

    agreement = tables["agreement"]
    fig, ax = plt.subplots(figsize=(1.5 + 0.8 * len(agreement), 1.2 + 0.8 * len(agreement)))
    im = ax.imshow(agreement.to_numpy(), vmin=max(0.0, agreement.to_numpy().min() - 0.05), vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(agreement)), agreement.columns, rotation=30)
    ax.set_yticks(range(len(agreement)), agreement.index)
    for i in range(len(agreement)):
        for j in range(len(agreement)):
            value = agreement.iat[i, j]
            shade = im.norm(value)  # light text on the dark end of viridis, dark text on the bright end
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="k" if shade > 0.6 else "w", fontsize=8)
    fig.colorbar(im, ax=ax)
    ax.set_title("same prediction (fraction)", fontsize=10)
    save(fig, "agreement.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, part in df.groupby("teacher", observed=True):
        ax.hist(part.entropy, bins=50, histtype="step", label=str(name))
    ax.set_xlabel("entropy of the soft label (nats)")
    ax.set_ylabel("(sample, view) rows")
    ax.set_title("soft-label entropy per teacher", fontsize=10)
    ax.legend(fontsize=8)
    save(fig, "entropy.png")
    return written


def plot_mixed_views(df: pd.DataFrame, pixels: np.ndarray, pairs: np.ndarray, classes: list[str],
                     path: str | Path) -> Path:
    """A grid of mixed views `pixels` (n, C, H, W) uint8, the (sample, view) `pairs` (n, 2) of `df` (soft_labels of a
    mixing plan), each titled with its two samples' labels, lambda and every teacher's top class on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(pairs))
    rows = -(-len(pairs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 4.0 * rows), squeeze=False)
    at = df.set_index(["sample", "view"]).sort_index()
    name = (lambda c: classes[c][:12]) if classes else str
    for ax, image, (i, v) in zip(axes.flat, pixels, pairs.tolist()):
        rows_here = at.loc[(i, v)]
        first = rows_here.iloc[0]
        ax.imshow(image.transpose(1, 2, 0) if image.shape[0] == 3 else image[0], cmap=None if image.shape[0] == 3 else "gray")
        lines = [f"#{i} v{v}: {name(int(first.label))} {first.lam:.2f}",
                 f"+ #{int(first.partner)} {name(int(first.partner_label))} {1 - first.lam:.2f}"]
        lines += [f"{t}: {name(int(r.top1_class))} {r.top1_prob:.2f}" for t, r in zip(rows_here.teacher, rows_here.itertuples())]
        ax.set_title("\n".join(lines), fontsize=7)
        ax.axis("off")
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    fig.suptitle("mixed views the teachers were cached on (sample label, weight; partner; each teacher's top-1)",
                 fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97), h_pad=1.5)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
