"""Every path the pipeline writes, in one place (dvc.yaml declares the same ones as outs)."""

from __future__ import annotations

from pathlib import Path

DATA = Path("data")
METRICS = Path("metrics")
REPORTS = Path("reports")
LOGS = Path("logs")  # what runs write for people and their writer locks: never inside a DVC output


def teacher_checkpoint(name: str) -> Path:
    """Pretrained teacher: a plain dict saved with torch.save."""
    return DATA / "teachers" / f"{name}.pt"


def teacher_metrics(name: str) -> Path:
    """Per-epoch pretrain metrics and the final test accuracy, as JSON."""
    return METRICS / "pretrain" / f"{name}.json"


def view_plan() -> Path:
    """The augmentation parameters of every (sample, view), shared by all teachers."""
    return DATA / "views.zarr"


def cached_teacher_name(path: str | Path) -> str | None:
    """The teacher a store at the pipeline's own cache location is used as (data/cache/NAME.zarr -> NAME);
    None for a store anywhere else."""
    path = Path(path)
    if path.parent.resolve() != (DATA / "cache").resolve():
        return None
    return path.name.split(".")[0]


def teacher_cache(name: str, fmt: str = "zarr") -> Path:
    """One teacher's cached logits and aligned features (`zarr` or `h5`)."""
    return DATA / "cache" / f"{name}.{fmt}"


def unmixed_teacher_cache(name: str, fmt: str = "zarr") -> Path:
    """A teacher's outputs on the unmixed views of a mixing plan (`cache_teachers --unmixed`): what FKD's
    approximation mixes (distill.mix_targets: fkd). Not a DVC output: written on demand for that comparison."""
    return DATA / "cache" / "unmixed" / f"{name}.{fmt}"


def is_unmixed_cache(path: str | Path | None) -> bool:
    return path is not None and Path(path).parent.resolve() == (DATA / "cache" / "unmixed").resolve()


def student_dir(run: str) -> Path:
    """Every seed's student of one distill run (the `distill@<run>` stage's one output)."""
    return DATA / "student" / run


def student_checkpoint(run: str, seed: int = 0) -> Path:
    """One seed's student of a distill run: weights, optimizer state and history, resumable."""
    return student_dir(run) / f"seed{seed}.pt"


def student_seed_metrics(run: str, seed: int = 0) -> Path:
    """One seed's training metrics (per-epoch history), rewritten after every epoch while it trains."""
    return student_dir(run) / f"seed{seed}.json"


def student_log(run: str, seed: int = 0) -> Path:
    """A seed's console output when the stage trains its seeds in child processes."""
    return LOGS / "distill" / run / f"seed{seed}.log"


def student_lock(run: str, seed: int | None = None) -> Path:
    """The one-trainer lock of a distill run (seed None: the stage training all its seeds) or of one seed."""
    return LOGS / "distill" / (f"{run}.lock" if seed is None else f"{run}/seed{seed}.lock")


def student_metrics(run: str) -> Path:
    """A distill run's training metrics over its seeds (final-epoch accuracy per seed, mean, std)."""
    return METRICS / "distill" / f"{run}.json"


def evaluate_metrics() -> Path:
    """Every model's test accuracy, NLL, ECE, cost and per-class accuracy (`dvc metrics show`)."""
    return METRICS / "evaluate.json"


def summary_report() -> Path:
    """The evaluation as a markdown table, linking the plots."""
    return REPORTS / "summary.md"


def report_plot(name: str) -> Path:
    """One PNG plot of the evaluation report (pipeline.report.PLOTS names them)."""
    return REPORTS / "plots" / f"{name}.png"
