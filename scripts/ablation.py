"""The faithful-methods ablation on a validation split: each method's official recipe against the profile's
own run of it and against scratch, over several seeds, never on the test split.

    python scripts/ablation.py                                    # params.yaml, 10k validation images, seeds 0 1 2
    python scripts/ablation.py --baseline-code ../before          # + the rows of the code before the faithful forms

It works in `--work` (default ablation/, ignored by git): teachers pretrained on the training split less
the validation images, cached, then every run trained through the pipeline's own stages
(`python -m stages.distill --run NAME`, which trains each of `--seeds` in its own one-thread process). A run's
score per seed is its final-epoch accuracy on the validation split (`data.val_size`), which the distill stage
evaluates on instead of the test split when val_size > 0. Everything resumes: rerun it after a kill.

    python scripts/ablation.py --runs kd,meal_v2 --topk 1,2,3,5 --work ablation/topk \\
        --out bench/results/cpu-topk_val.json                     # the same runs from top-k caches (issue 30)

    python scripts/ablation.py --runs scratch,kd,meal_v2 --mix cutmix --fkd kd --work ablation/topk \\
        --out bench/results/cpu-mix_val.json                      # the same runs on CutMix views (issue 31)

    python scripts/ablation.py --params profiles/anc_fmnist.yaml --val-size 0 --work anc \\
        --runs scratch,anc_none,anc_l1,anc_l2,anc_adv --out bench/results/cpu-anc_fmnist.json

The rows: the profile's runs named by --runs (default: scratch and the faithful meal, meal_coop, meal_v2, anc);
`meal_v2_ft`, MEAL V2's whole official recipe (fine-tuning the same seed's scratch student, lr 0.01, no
weight decay, D's lr equal to the student's); and with `--baseline-code DIR` (a checkout of the code
before the faithful forms, e.g. `git worktree add ../before 8c6b1d4`) that checkout's own meal,
meal_coop, meal_v2 and anc runs, trained by its code, as the "before" rows. Writes
bench/results/cpu-ablation_val.json and prints the table the README shows.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import yaml

ROOT = Path(__file__).resolve().parents[1]
# the profile's runs trained here (kd has no faithful question), plus MEAL V2's whole official recipe: it
# fine-tunes a pretrained student (each seed's scratch student) at lr 0.01, no weight decay, D's lr = the
# student's ("{seed}" in student.init is the seed trained)
DEFAULT_RUNS = "scratch,meal,meal_coop,meal_v2,anc,meal_v2_ft,anc_lambda1,scratch_2x"
EXTRA_RUNS = {"meal_v2_ft": {"method": "meal_v2", "lr": 0.01, "weight_decay": 0.0, "meal_v2": {"d_lr": 0.01},
                             "student": {"init": "data/student/scratch/seed{seed}.pt"}},
              # ANC's faithful forms at lambda 1 (the paper's L_adv + lambda L_data, unweighted) and 0.1 (the old
              # averaged term's scale); params.yaml's anc took 0.1 from this comparison
              "anc_lambda1": {"method": "anc", "anc": {"logit_weight": 1.0}},
              "anc_lambda01": {"method": "anc", "anc": {"logit_weight": 0.1}},
              # meal_v2_ft's student has trained as long again as scratch: scratch for twice the epochs is its
              # fair baseline
              "scratch_2x": {"method": "scratch", "epochs": "2x"}}
BASELINE_RUNS = ("meal", "meal_coop", "meal_v2", "anc")  # the --baseline-code params.yaml's own runs


def stage(folder: Path, args: list[str], log: Path, pythonpath: str | None = None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    quiet = ["--quiet"] if args[0] != "stages.plan_views" else []
    with log.open("a") as out:
        done = subprocess.run([sys.executable, "-m", *args, *quiet], cwd=folder, env=env, stdout=out,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise click.ClickException(f"{' '.join(args)} in {folder} failed (exit {done.returncode}): see the end of {log}")


@click.command()
@click.option("--params", "params_path", default=str(ROOT / "params.yaml"), show_default=True)
@click.option("--work", default=str(ROOT / "ablation"), show_default=True)
@click.option("--val-size", default=10000, show_default=True,
              help="Validation images carved from train (0: score on the test split, for a fixed recipe).")
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--runs", "only", default=DEFAULT_RUNS, show_default=True,
              help="Runs of the profile's distill.runs, or of EXTRA_RUNS (meal_v2_ft, anc_lambda1, anc_lambda01, scratch_2x).")
@click.option("--baseline-code", default=None,
              help="A checkout of the code before the faithful forms: its params.yaml's meal, meal_v2, anc runs.")
@click.option("--topk", default="", help="Comma-separated k: each run also from top-k caches (cache.logits: topk) of "
                                         "the same teachers and views, one folder topk<k> each.")
@click.option("--mix", default="", help="A views.mix kind (mixup, cutmix, both; timm's default alphas): each run also "
                                         "on mixed views of the same teachers, in folder mix_<kind> (own plan, caches).")
@click.option("--fkd", default="", help="With --mix, comma-separated runs also trained with FKD's approximation "
                                        "(distill.mix_targets: fkd) from the profile's caches of the unmixed views.")
@click.option("--out", default=str(ROOT / "bench" / "results" / "cpu-ablation_val.json"), show_default=True)
def main(params_path, work, val_size, seeds, only, baseline_code, topk, mix, fkd, out):
    base = yaml.safe_load(Path(params_path).read_text())
    base["data"]["val_size"] = val_size
    seeds = [int(s) for s in seeds.split(",")]
    base["distill"].update(seeds=seeds, jobs=0)  # the distill stage trains every seed at once, one thread each
    runs = {**base["distill"]["runs"], **EXTRA_RUNS}
    chosen = only.split(",")
    unknown = [r for r in chosen if r not in runs]
    if unknown:
        raise click.ClickException(f"run {unknown[0]} is neither in {params_path}'s distill.runs nor in EXTRA_RUNS")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "ablation.log"
    named = {r: dict(runs[r]) for r in chosen}
    for run in named.values():
        if run.get("epochs") == "2x":
            run["epochs"] = 2 * base["distill"]["epochs"]
    if "meal_v2_ft" in chosen:  # it fine-tunes each seed's scratch student
        named = {"scratch": {"method": "scratch"}, **named}
    # folder -> (params, its runs)
    folders = {"profile": (base, named)}
    if baseline_code:
        # the same profile file as that code had it; that code trains one `seed` per run
        old = yaml.safe_load((Path(baseline_code) / Path(params_path).resolve().relative_to(ROOT)).read_text())
        old["data"]["val_size"] = val_size
        folders["baseline"] = (old, {f"{r}_s{s}": {**old["distill"]["runs"][r], "seed": s}
                                     for r in BASELINE_RUNS for s in seeds})
    for k in [int(v) for v in topk.split(",") if v]:  # the same runs from the compact form of the same teachers
        compact = json.loads(json.dumps(base))
        compact["cache"].update(logits="topk", topk=k)
        folders[f"topk{k}"] = (compact, dict(named))
    if mix:  # the same runs on mixed views; FKD's form reads the profile's caches: the same plan's views unmixed
        mixed = json.loads(json.dumps(base))
        mixed["views"]["mix"] = {**(mixed["views"].get("mix") or {}), "kind": mix}
        fkd_runs = {f"{r}_fkd": {**named[r], "mix_targets": "fkd"} for r in fkd.split(",") if r}
        unknown = [r[:-4] for r in fkd_runs if r[:-4] not in named]
        if unknown:
            raise click.ClickException(f"--fkd run {unknown[0]} is not one of --runs")
        folders[f"mix_{mix}"] = (mixed, {**named, **fkd_runs})
    elif fkd:
        raise click.ClickException("--fkd compares with mixed views: give --mix too")
    for name, (params, named) in folders.items():
        params = json.loads(json.dumps(params))
        params["distill"]["runs"] = named
        (work / name).mkdir(exist_ok=True)
        (work / name / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    main_dir = work / "profile"
    for teacher in base["teachers"]:  # resumable: a finished teacher is skipped
        click.echo(f"pretrain {teacher}")
        stage(main_dir, ["stages.pretrain", "--teacher", teacher], log)
    stage(main_dir, ["stages.plan_views"], log)
    for name in folders:  # the teachers and views are shared; the caches too where the cache params are the same
        if name == "profile":
            continue
        data = work / name / "data"
        data.mkdir(exist_ok=True)
        own_views = name.startswith("mix_")  # a mixing plan, own caches; the profile's caches are its unmixed views'
        shared = ["teachers"] + ([] if own_views else ["views.zarr"]) + (
            ["cache"] if folders[name][0]["cache"] == base["cache"] and not own_views else [])
        for item in shared:
            if not (data / item).exists():
                (data / item).symlink_to((main_dir / "data" / item).resolve())
        if own_views:
            stage(work / name, ["stages.plan_views"], log)
            (data / "cache").mkdir(exist_ok=True)
            if not (data / "cache" / "unmixed").exists():
                (data / "cache" / "unmixed").symlink_to((main_dir / "data" / "cache").resolve())
    for name in folders:
        if not (work / name / "data" / "cache").is_symlink():
            for teacher in base["teachers"]:  # resumable: a complete cache is kept
                click.echo(f"cache {teacher} ({name})")
                stage(work / name, ["stages.cache_teachers", "--teacher", teacher], log,
                      baseline_code if name == "baseline" else None)

    def train(folder, run):
        stage(work / folder, ["stages.distill", "--run", run], log, baseline_code if folder == "baseline" else None)
        click.echo(f"  {folder}/{run} done")

    for run in folders["profile"][1]:  # scratch first: meal_v2_ft starts from it
        train("profile", run)
    for name in (n for n in folders if n.startswith(("topk", "mix_"))):
        for run in folders[name][1]:
            train(name, run)
    if baseline_code:
        with ThreadPoolExecutor(2) as pool:  # that code trains one seed per process: two at a time
            list(pool.map(lambda run: train("baseline", run), folders["baseline"][1]))

    results = {}
    for run in folders["profile"][1]:
        metrics = json.loads((work / "profile" / "metrics" / "distill" / f"{run}.json").read_text())
        results[run] = dict(zip(metrics["seeds"], metrics["test_acc"]))  # the validation split's, final epoch
    for name in (n for n in folders if n.startswith(("topk", "mix_"))):
        for run in folders[name][1]:
            metrics = json.loads((work / name / "metrics" / "distill" / f"{run}.json").read_text())
            label = f"top-{name[4:]}" if name.startswith("topk") else name[4:]
            results[f"{run} ({label})"] = dict(zip(metrics["seeds"], metrics["test_acc"]))
    for run in folders.get("baseline", (None, {}))[1]:
        name, seed = run.rsplit("_s", 1)
        metrics = json.loads((work / "baseline" / "metrics" / "distill" / f"{run}.json").read_text())
        results.setdefault(f"{name} (before)", {})[int(seed)] = metrics["test_acc"]
    rows = []
    for label, by_seed in results.items():
        accs = [100 * by_seed[s] for s in sorted(by_seed)]
        rows.append({"run": label, "seeds": sorted(by_seed), "val_top1": accs, "mean": statistics.mean(accs),
                     "std": statistics.stdev(accs) if len(accs) > 1 else 0.0})
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    split = "validation" if val_size else "test"
    Path(out).write_text(json.dumps({"params": str(params_path), "val_size": val_size, "split": split, "rows": rows},
                                    indent=2) + "\n")
    click.echo(f"| run | {split} top-1 (%), mean ± std | per seed |\n|---|---:|---|")
    for r in rows:
        click.echo(f"| {r['run']} | {r['mean']:.2f} ± {r['std']:.2f} | {', '.join(f'{a:.2f}' for a in r['val_top1'])} |")


if __name__ == "__main__":
    main()
