"""Assertions shared by the stage tests."""

import contextlib
from pathlib import Path


def one_line_error(result, exit_code: int = 2) -> str:
    """A click result that failed the way users must see failures: one `Error:` line, no traceback."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    return lines[0]


# ---------------------------------------------------------------- a tiny cached pipeline (distill, evaluate)

TINY_TEACHERS = ("t1", "t2")


def tiny_distill_params(root, student_dropout: float = 0.0, **distill) -> dict:
    """Params for 96 tiny Fashion-MNIST images under `root`, two width-0.25 student_cnn teachers, V = 2."""
    return {
        "data": {"name": "fashion_mnist", "root": str(root), "limit": 96},
        "teachers": {t: {"arch": "student_cnn", "model": {"width": 0.25}, "pretrain": {}} for t in TINY_TEACHERS},
        "views": {"num_views": 2, "seed": 0, "augment": {"kind": "crop_flip", "pad": 2, "flip": True}},
        "cache": {"format": "zarr", "align": {"kind": "channel", "length": 8}, "batch_size": 64, "chunk_rows": 32},
        "student": {"arch": "student_cnn", "model": {"width": 0.25, "dropout": student_dropout}},
        "distill": {"method": "meal", "epochs": 1, "batch_size": 32, "lr": 0.05, "eval_batch_size": 256, "seeds": [0],
                    **distill},
    }


def build_tiny_pipeline(params: dict) -> None:
    """In the working directory: params.yaml, untrained teacher checkpoints (per the contract schema:
    targets only need to be fixed), the view plan and every teacher's cache, through the real stages."""
    import yaml
    from click.testing import CliRunner

    from bench.cache_io import fake_teacher
    from pipeline import paths
    from pipeline.config import build
    from pipeline.data import DataConfig, load_split
    from stages import cache_teachers, plan_views

    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    train = load_split(build(DataConfig, params["data"], "data"), "train")
    for i, name in enumerate(params["teachers"]):
        fake_teacher(paths.teacher_checkpoint(name), train, seed=100 + i, name=name)
    runner = CliRunner()
    assert runner.invoke(plan_views.main, []).exit_code == 0
    for name in params["teachers"]:
        result = runner.invoke(cache_teachers.main, ["--teacher", name, "--quiet", "--device", "cpu"])
        assert result.exit_code == 0, result.output


def tiny_targets(method, align_cfg, device, online: bool):
    """The target source of `method` on `device` in the tiny pipeline's directory: its teachers run live
    (online) or the epoch slabs of their caches."""
    from pipeline import paths
    from pipeline.cache import open_cache
    from pipeline.models import load_teacher
    from pipeline.cache.slabs import CachedTargets, CacheSlabs, OnlineTargets, SlabLoader

    teachers = list(TINY_TEACHERS)
    if online:
        return OnlineTargets([load_teacher(paths.teacher_checkpoint(t))[0] for t in teachers], align_cfg,
                             method.feature_blocks, device)
    caches = {t: open_cache(paths.teacher_cache(t)) for t in teachers}
    return CachedTargets(SlabLoader(CacheSlabs(caches), method.feature_blocks, device))


class Recorder:
    """Wraps a target source and keeps every step's teacher draw and targets (`seen`) and input batch (`inputs`)."""

    def __init__(self, inner):
        self.inner, self.seen, self.inputs = inner, [], []

    def start_epoch(self, reads):
        self.inner.start_epoch(reads)

    def at_step(self, step):
        self.inner.at_step(step)

    def __call__(self, idx, x, picked):
        tgt = self.inner(idx, x, picked)
        self.seen.append((list(picked), tgt))
        self.inputs.append(x.clone())
        return tgt


def ends_in_one_error_line(result, exit_code: int = 2) -> str:
    """A click result that stopped partway (after its start-up line, say) the way users must see it: the
    last line one `Error:` line, no traceback, no other error line."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("Error:") and sum(line.startswith("Error:") for line in lines) == 1, result.output
    return lines[-1]


# ---------------------------------------------------------------- several processes (torchrun, gloo)


def torchrun_command(nproc: int, module: str, *args: str) -> list[str]:
    """`torchrun --standalone --nproc_per_node N -m MODULE ARGS` for the current interpreter."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", module, *args]


def torchrun(nproc: int, module: str, *args: str, timeout: float = 300):
    """Run MODULE under torchrun in the working directory, N CPU processes with gloo, one thread each;
    returns the CompletedProcess (stdout and stderr together, as text)."""
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(torchrun_command(nproc, module, *args), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def private_copy(built, tmp_path, monkeypatch):
    """A copy of the module-wide folder `built` as the working directory, for a test to change at will."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(built, work)
    monkeypatch.chdir(work)
    return work


# ---------------------------------------------------------------- a full disk (the `full_disk` fixture, conftest.py)


def fill_disk(directory: Path) -> Path:
    """Append to `directory/.fill` until its file system has not one byte left (ENOSPC); returns that file.

    To put something on the `full_disk` fixture's disk: delete `.fill`, write it, then call this again."""
    import errno

    filler = directory / ".fill"
    with open(filler, "ab", buffering=0) as f:
        for size in (1 << 16, 4096, 1):  # big blocks, then whatever is left of the last page
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return filler


@contextlib.contextmanager
def full_disk_at(where: Path, keep=()):
    """`where` as its own 1 MiB tmpfs holding the empty files `keep`, then filled to the last byte (`fill_disk`):
    any write there fails with ENOSPC (tmpfs counts inodes apart, so creating an empty file or folder still
    works). Unmounted afterwards; the test is skipped where mounting is not permitted (root or CAP_SYS_ADMIN)."""
    import subprocess

    import pytest

    where.mkdir(parents=True, exist_ok=True)
    try:
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                               capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command: a full disk needs a tmpfs mounted for the test")
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a full disk (needs root or CAP_SYS_ADMIN): {mount.stderr.strip()}")
    try:
        for name in keep:  # before filling: creating a file with content needs space
            (where / name).touch()
        fill_disk(where)
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(where)], check=True)  # a file still open there (a killed writer)
