"""Reliability: every fault found in the cache and the training loop, each with the behaviour a user must
meet (a resume to the same result, or one `Error:` line naming the problem and its fix, and nothing
already written destroyed). Add a case here for every fault found.

Kills and resumes: the cache stage killed after a chunk, between a chunk's rows and its marker, and
halfway through a swap; the distill stage killed mid-epoch.
Damaged stores: a truncated chunk, a flipped byte (zarr and HDF5), a lost chunk file, another
teacher's store under this teacher's name. Writers: a second writer on the same store, a stale lock.
A full disk: a run with nothing to write still succeeds; one that must write ends in one line.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import pipeline.distill
from pipeline import paths
from pipeline.cache import store as cache_store
from pipeline.cache import open_cache, validate_caches
from pipeline.cache.store import writer_lock
from pipeline.config import UserError
from stages import cache_teachers as cache_stage
from stages import distill as distill_stage
from stages import inspect as inspect_stage
from bench.cache_io import fake_teacher
from helpers import ends_in_one_error_line, fill_disk, one_line_error
from test_cache import Boom, arrays, build_cache, setup, tree_digest  # noqa: F401  (setup: a fixture)
from test_distill import run, tiny_pipeline  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny steps: one thread each (tests/conftest.py)


# ---------------------------------------------------------------- kills and resumes


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_a_killed_run_resumes_to_the_same_bytes(setup, tmp_path, fmt):
    reference = tmp_path / f"ref.{fmt}"
    build_cache(setup, reference, fmt)
    out = tmp_path / f"t.{fmt}"

    def fail_after_first(k):
        raise Boom(f"killed after chunk {k}")

    with pytest.raises(Boom):
        build_cache(setup, out, fmt, on_chunk=fail_after_first)
    half = open_cache(out)
    assert not half.complete and half.attrs["complete"] is False
    assert 1 <= half.done_chunks < half.num_chunks
    with pytest.raises(UserError, match="is incomplete.*rerun python -m stages.cache_teachers --teacher t"):
        half.check_complete()
    with pytest.raises(UserError, match="incomplete"):
        validate_caches([half], setup["plan"], setup["data"].fingerprint, 10)
    already = half.done_chunks
    half.close()

    written = []
    summary = build_cache(setup, out, fmt, on_chunk=written.append)
    assert summary["chunks_written"] == 3 - already and len(written) == 3 - already  # done chunks skipped
    assert open_cache(out).complete
    got, want = arrays(out), arrays(reference)
    for name in want:
        assert got[name].tobytes() == want[name].tobytes(), name


def test_a_chunk_interrupted_between_rows_and_marker_is_rewritten(setup, tmp_path, monkeypatch):
    reference = tmp_path / "ref.zarr"
    build_cache(setup, reference)
    out = tmp_path / "t.zarr"
    original = cache_store.ZarrStore.write_rows

    def half_write(self, start, chunk):
        if start == 32:  # chunk 1: only the logits land, then the process "dies"
            original(self, start, {"logits": chunk["logits"] * 0})
            raise Boom("died mid-chunk")
        original(self, start, chunk)

    monkeypatch.setattr(cache_store.ZarrStore, "write_rows", half_write)
    with pytest.raises(Boom):
        build_cache(setup, out)
    monkeypatch.setattr(cache_store.ZarrStore, "write_rows", original)
    assert not open_cache(out).complete
    build_cache(setup, out)
    got, want = arrays(out), arrays(reference)
    for name in want:
        assert got[name].tobytes() == want[name].tobytes(), name


def test_a_swap_killed_halfway_is_finished_or_undone(setup, tmp_path):
    out = tmp_path / "t.zarr"
    build_cache(setup, out)
    good = tree_digest(out)
    # killed after the old store was moved aside, before the new one took its place
    out.rename(tmp_path / "t.zarr.old")
    written = []
    build_cache(setup, out, on_chunk=written.append)
    assert written == [] and tree_digest(out) == good  # the old store came back, nothing recomputed
    assert not (tmp_path / "t.zarr.old").exists()
    # killed the same way during an --overwrite whose new store was complete: the new one is kept
    other = fake_teacher(tmp_path / "o" / "t.pt", setup["data"], seed=5)
    build_cache(setup, tmp_path / "t.zarr.new", ckpt=other)
    out.rename(tmp_path / "t.zarr.old")
    build_cache(setup, out, ckpt=other, on_chunk=written.append)
    assert written == [] and not (tmp_path / "t.zarr.old").exists() and not (tmp_path / "t.zarr.new").exists()
    from pipeline.checkpoints import sha256_file

    assert open_cache(out).attrs["checkpoint_sha256"] == sha256_file(other)


def test_killed_run_resumes_from_the_saved_epoch(tiny_pipeline, monkeypatch):
    assert run().exit_code == 0
    reference = torch.load(paths.student_checkpoint("meal"), weights_only=False)
    paths.student_checkpoint("meal").unlink()

    real = pipeline.distill.train_one_epoch

    def dies_in_epoch_two(run_, epoch, *args, **kwargs):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(run_, epoch, *args, **kwargs)

    monkeypatch.setattr(pipeline.distill, "train_one_epoch", dies_in_epoch_two)
    with pytest.raises((KeyboardInterrupt, click.exceptions.Abort)):  # click turns ^C into Abort
        distill_stage.main(["--quiet", "--device", "cpu"], standalone_mode=False)
    partial = torch.load(paths.student_checkpoint("meal"), weights_only=False)
    assert partial["epoch"] == 1 and not partial["finished"]

    monkeypatch.setattr(pipeline.distill, "train_one_epoch", real)
    resumed = run()
    assert resumed.exit_code == 0 and "resuming after epoch 1" in resumed.output
    final = torch.load(paths.student_checkpoint("meal"), weights_only=False)
    assert final["epoch"] == 2 and len(final["history"]) == 2
    for key in ("student", "discriminators"):
        for name, value in reference[key].items():
            torch.testing.assert_close(final[key][name], value, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------- damaged stores (the tiny pipeline: t1, t2)


def cache(*args: str):
    return CliRunner().invoke(cache_stage.main, ["--quiet", "--device", "cpu", *args])


def inspect(*args: str):
    return CliRunner().invoke(inspect_stage.main, list(args))


def chunk_file(teacher: str, array: str, k: int, view: int = 0) -> Path:
    """The zarr v3 file of chunk (k, view) of `array` in teacher's cache (chunks are (R, 1, W))."""
    return paths.teacher_cache(teacher) / array / "c" / str(k) / str(view) / "0"


def test_a_truncated_chunk_is_one_line_naming_it_and_repair_rebuilds_just_it(tiny_pipeline):
    want = arrays(paths.teacher_cache("t1"))
    f = chunk_file("t1", "logits", 1)
    f.write_bytes(f.read_bytes()[:50])  # a crashed copy, a full disk
    line = ends_in_one_error_line(run("--method", "meal"))
    assert "data/cache/t1.zarr" in line and "chunk 1 of logits" in line and "--teacher t1 --repair" in line
    line = one_line_error(cache("--teacher", "t1", "--verify"))
    assert "1 damaged chunk(s) (chunk 1: logits)" in line and "--repair" in line
    other = {p: p.read_bytes() for p in paths.teacher_cache("t1").rglob("*") if p.is_file() and "/c/1/" not in str(p)
             and p.name != "zarr.json" and "done" not in p.parts}
    result = cache("--teacher", "t1", "--repair")
    assert result.exit_code == 0, result.output
    assert "1 damaged chunk(s) to rebuild" in result.output and "1 of 3 chunks written" in result.output
    assert all(p.read_bytes() == b for p, b in other.items())  # the sound chunks were not rewritten
    got = arrays(paths.teacher_cache("t1"))
    for name in want:
        assert got[name].tobytes() == want[name].tobytes(), name
    assert cache("--teacher", "t1", "--verify").exit_code == 0
    assert run("--method", "meal").exit_code == 0


def flip_a_bit(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit, inside the values: still a plausible float16
    f.write_bytes(bytes(data))


def test_a_flipped_byte_is_caught_by_the_checksum_in_every_reader(tiny_pipeline):
    want = arrays(paths.teacher_cache("t2"))
    flip_a_bit(chunk_file("t2", "logits", 2, view=1))  # read by distill and inspect
    flip_a_bit(chunk_file("t2", "features/block3", 0, view=0))  # read by distill
    for result, where in ((run("--method", "meal"), "chunk 0 of features/block3"), (run("--method", "kd"), "chunk 2 of logits"),
                          (inspect("data/cache/t2.zarr"), "chunk 2 of logits")):
        line = ends_in_one_error_line(result)
        assert where in line and "damaged" in line and "--teacher t2 --repair" in line, line
    result = cache("--teacher", "t2", "--repair")
    assert result.exit_code == 0 and "2 damaged chunk(s) to rebuild" in result.output, result.output
    got = arrays(paths.teacher_cache("t2"))
    for name in want:
        assert got[name].tobytes() == want[name].tobytes(), name


def test_a_flipped_byte_in_an_h5_store_is_caught(setup, tmp_path):
    out = tmp_path / "t.h5"
    build_cache(setup, out, "h5")
    want = arrays(out)
    import h5py

    with h5py.File(out, "r") as f:
        info = f["logits"].id.get_chunk_info_by_coord((32, 0, 0))  # chunk 1, view 0
    data = bytearray(out.read_bytes())
    data[info.byte_offset + info.size // 2] ^= 0x10
    out.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"chunk 1 of logits \(rows 32-63\) is damaged"):
        open_cache(out).view_slab(0)
    from pipeline.cache.recompute import recompute_check

    with pytest.raises(UserError, match=r"chunk 1 of logits \(rows 32-63\) is damaged.*--repair"):  # every pair
        recompute_check(out, setup["ckpt"], setup["plan"], setup["data"], 10_000, torch.device("cpu"))
    summary = build_cache(setup, out, "h5", repair=True)
    assert summary["repaired"] == [1] and summary["chunks_written"] == 1
    got = arrays(out)
    for name in want:
        assert got[name].tobytes() == want[name].tobytes(), name


def test_a_lost_chunk_file_reads_as_unwritten_not_as_numbers(tiny_pipeline):
    chunk_file("t1", "features/block1", 0, view=1).unlink()  # zarr would read the fill value, NaN
    line = ends_in_one_error_line(run("--method", "meal"))
    assert "chunk 0 of features/block1" in line and "unwritten" in line and "--repair" in line
    assert cache("--teacher", "t1", "--repair").exit_code == 0
    assert run("--method", "meal").exit_code == 0


def test_another_teachers_store_under_this_teachers_name_is_refused(tiny_pipeline):
    shutil.rmtree(paths.teacher_cache("t1"))
    shutil.copytree(paths.teacher_cache("t2"), paths.teacher_cache("t1"))
    for result in (run("--method", "meal"), run("--method", "kd"), inspect("data/cache/t1.zarr")):
        line = one_line_error(result)
        assert "data/cache/t1.zarr holds teacher 't2'" in line and "--teacher t1 --overwrite" in line
    # the same teacher's cache, but its checkpoint retrained since: refused by distill and inspect alike
    result = cache("--teacher", "t1", "--overwrite")
    assert result.exit_code == 0, result.output
    fake_teacher(paths.teacher_checkpoint("t1"), _train_split(), seed=77, name="t1")  # retrained
    for result in (run("--method", "meal"), inspect("data/cache/t1.zarr")):
        assert "changed since cache data/cache/t1.zarr" in one_line_error(result)


def _train_split():
    import yaml

    from pipeline.config import build
    from pipeline.data import DataConfig, load_split

    return load_split(build(DataConfig, yaml.safe_load(Path("params.yaml").read_text())["data"], "data"), "train")


def test_validate_caches_binds_each_cache_to_the_name_it_is_used_as(setup, tmp_path):
    out = tmp_path / "t.zarr"
    build_cache(setup, out)
    validate_caches([out], setup["plan"], setup["data"].fingerprint, 10, check_checkpoints=False, teachers=["t"])
    with pytest.raises(UserError, match="holds teacher 't'.s outputs, not 'u'.s"):
        validate_caches([out], setup["plan"], setup["data"].fingerprint, 10, check_checkpoints=False, teachers=["u"])


# ---------------------------------------------------------------- one writer per store


def test_a_second_writer_ends_at_once_naming_the_first(tiny_pipeline):
    shutil.rmtree(paths.teacher_cache("t1"))
    with writer_lock(paths.teacher_cache("t1")):  # this process is the first writer
        line = one_line_error(cache("--teacher", "t1"))
        assert f"data/cache/t1.zarr is being written by process {os.getpid()}" in line
    assert not paths.teacher_cache("t1").exists()  # the refused writer created nothing
    assert cache("--teacher", "t1").exit_code == 0


def _holder(lock_path: Path) -> subprocess.Popen:
    """A process that takes `lock_path`'s store lock and sleeps, once it holds it."""
    code = ("import sys, time; from pathlib import Path; from pipeline.cache.store import writer_lock\n"
            "with writer_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock_path)], stdout=subprocess.PIPE, text=True,
                            cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_stale_lock_from_a_killed_writer_does_not_block_a_rerun(tiny_pipeline):
    shutil.rmtree(paths.teacher_cache("t1"))
    holder = _holder(paths.teacher_cache("t1"))
    try:
        assert f"being written by process {holder.pid}" in one_line_error(cache("--teacher", "t1"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert Path(str(paths.teacher_cache("t1")) + ".lock").exists()  # the file stays; the kernel dropped the lock
    result = cache("--teacher", "t1")
    assert result.exit_code == 0, result.output


def test_two_writers_started_at_once_leave_one_complete_store(tiny_pipeline):
    shutil.rmtree(paths.teacher_cache("t1"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "stages.cache_teachers", "--teacher", "t1", "--quiet", "--device", "cpu"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(2)]
    outputs = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
    for code, output in outputs:
        assert "Traceback" not in output, output
        assert code == 0 or (code == 2 and "is being written by process" in output), output
    assert any(code == 0 for code, _ in outputs)
    assert open_cache(paths.teacher_cache("t1")).complete
    assert run("--method", "meal").exit_code == 0


# ---------------------------------------------------------------- a full disk


def cache_on_a_full_disk(full_disk: Path, teacher: str = "t1") -> Path:
    """Move the tiny pipeline's cache of `teacher` (its lock file too) onto the full disk, data/cache becoming a
    link to it, and fill that disk again; returns the store's path."""
    (full_disk / ".fill").unlink()
    folder = paths.teacher_cache(teacher).parent
    for path in folder.glob(f"{teacher}.*"):
        shutil.move(path, full_disk / path.name)
    shutil.rmtree(folder)
    folder.symlink_to(full_disk, target_is_directory=True)
    fill_disk(full_disk)
    return paths.teacher_cache(teacher)


def test_a_full_disk_does_not_stop_a_run_with_nothing_to_write(tiny_pipeline, full_disk):
    store = cache_on_a_full_disk(full_disk)
    assert Path(f"{store}.lock").exists()  # left by the run that wrote the store
    before = tree_digest(store)
    result = cache("--teacher", "t1")  # the lock's holder text cannot be written: the lock works without it
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "already complete" in result.output
    assert cache("--teacher", "t1", "--verify").exit_code == 0
    with writer_lock(store):  # still one writer at a time, even with no space for the holder's name
        assert "is being written by another process" in one_line_error(cache("--teacher", "t1"))
    assert tree_digest(store) == before


def _incomplete(store: Path) -> None:
    s = cache_store.open_store(store, writable=True)
    s.mark_done(2, 0)
    s.update_attrs({"complete": False})
    s.close()


@pytest.mark.parametrize("case", ["resume", "repair", "new zarr", "new h5"])
def test_writing_a_cache_on_a_full_disk_is_one_line_naming_it(tiny_pipeline, full_disk, case):
    store = paths.teacher_cache("t1")
    if case == "resume":
        _incomplete(store)
    elif case == "repair":
        chunk_file("t1", "logits", 1).unlink()
    elif case == "new zarr":
        shutil.rmtree(store)
    store = cache_on_a_full_disk(full_disk)
    args = {"repair": ["--repair"], "new h5": ["--format", "h5"]}.get(case, [])
    line = ends_in_one_error_line(cache("--teacher", "t1", *args))
    # refused up front by the room check, or (a repair, whose chunks count as written) when the write fails
    assert ("No space left on device" in line or "filesystem has 0 B free" in line) and "free space" in line, line
    assert "data/cache/t1." in line and "rerun" in line, line
    if case == "new h5":
        assert not paths.teacher_cache("t1", "h5").exists()  # nothing half made is left
    (full_disk / ".fill").unlink()  # space again: the rerun finishes the job
    result = cache("--teacher", "t1", *args)
    assert result.exit_code == 0, result.output
    assert open_cache(paths.teacher_cache("t1", "h5" if case == "new h5" else "zarr")).complete
