"""Issue 28's distill faults, each on a tiny pipeline, and the method plugin contract: a finished run's files under
data/student/RUN are never written again (its seed logs live under logs/distill/RUN/, outside the DVC output);
a second trainer of a run that one process is training stops at once in one `Error:` line naming that process,
and the run then resumes; a full disk makes checkpoint and JSON writes, and the distill stage, end in one line
with no temporary file left, while the one-trainer lock still works there; and a method of your own is one .py
module listed under `distill.plugins`, trained through the real stage, its options type-checked and its name
among the known methods only where it is listed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline import paths
from pipeline.config import UserError
from stages import distill as distill_stage
from helpers import build_tiny_pipeline, full_disk_at, ends_in_one_error_line, one_line_error, tiny_distill_params

REPO = Path(__file__).resolve().parents[1]  # the tree under test: child processes must import this one, not
# whatever checkout the editable install points at


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny steps: one thread each (tests/conftest.py)


@pytest.fixture
def tiny_pipeline(tmp_path, fashion_root, monkeypatch) -> dict:
    """tmp_path as the working directory, with params.yaml, teachers, view plan and caches in place; child
    processes (the seed pool's included) import the tree under test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    params = tiny_distill_params(fashion_root, epochs=1, log_every=1)
    build_tiny_pipeline(params)
    return params


def write_params(params: dict, path: str = "params.yaml") -> None:
    Path(path).write_text(yaml.safe_dump(params, sort_keys=False))


def run(*args: str):
    return CliRunner().invoke(distill_stage.main, ["--quiet", "--device", "cpu", *args])


def child_env() -> dict[str, str]:
    """A stage subprocess's environment: the repo under test alone on PYTHONPATH, one thread, unbuffered."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def stage(*args: str, cwd: Path, timeout: float = 300):
    """`python -m stages.distill ARGS --quiet --device cpu` in `cwd` as a real process, seen as a click result
    (exit_code, output: stdout and stderr together) so that the helpers' one-line checks apply."""
    done = subprocess.run([sys.executable, "-m", "stages.distill", *args, "--quiet", "--device", "cpu"], cwd=cwd,
                          env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    return SimpleNamespace(exit_code=done.returncode, output=done.stdout)


# ---------------------------------------------------------------- 1. a finished run is never written again


def files_of(folder: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Every file under `folder`: (inode, mtime_ns, size, bytes) by relative path."""
    out = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = f.stat()
        out[str(f.relative_to(folder))] = (st.st_ino, st.st_mtime_ns, st.st_size, f.read_bytes())
    return out


def test_a_finished_run_is_never_written_again(tiny_pipeline):
    """DVC hard-links a finished output into its cache: a rerun that rewrote (or added) a file there would change
    a committed output; two seeds in child processes, as `jobs: 0` trains them on the CPU."""
    params = tiny_pipeline
    params["distill"].update(seeds=[0, 1])
    params["distill"]["runs"] = {"done": {"method": "kd", "jobs": 0}}
    write_params(params)
    first = run("--run", "done")
    assert first.exit_code == 0, first.output
    assert "in 2 processes at once" in first.output  # the seed pool, not this process
    before = files_of(paths.student_dir("done"))
    assert {"seed0.pt", "seed1.pt", "seed0.json", "seed1.json"} <= set(before)
    time.sleep(0.05)  # a rewrite within the same mtime tick would still show in the inode (atomic replace)
    again = run("--run", "done")
    assert again.exit_code == 0, again.output
    after = files_of(paths.student_dir("done"))
    assert set(after) == set(before), "files added to or removed from the finished run's folder"
    rewritten = [name for name, was in before.items() if after[name] != was]
    assert not rewritten, f"the rerun rewrote {rewritten} of the finished run"
    for seed in (0, 1):  # the children's logs, outside the DVC output; the rerun's found the seed finished
        log = paths.student_log("done", seed)
        assert log.is_file() and "already trained" in log.read_text(), log


# ---------------------------------------------------------------- 2. two trainers of one run at once


def test_a_second_trainer_of_a_run_stops_in_one_line_and_the_run_resumes(tiny_pipeline, tmp_path):
    """Two writers of one checkpoint would interleave epochs: the second must stop before any work, naming the
    process that holds the run; once that one is killed, a rerun resumes where it stopped."""
    params = tiny_pipeline
    epochs = 200  # seconds of training here: still running when the second trainer starts, however fast
    params["distill"].update(epochs=epochs, seeds=[0])
    params["distill"]["runs"] = {"busy": {"method": "kd"}}
    write_params(params)
    checkpoint, metrics = paths.student_checkpoint("busy"), paths.student_seed_metrics("busy")
    with open(tmp_path / "first.out", "w") as out:
        first = subprocess.Popen([sys.executable, "-m", "stages.distill", "--run", "busy", "--quiet", "--device",
                                  "cpu"], cwd=tmp_path, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        def wait_for(ready, what: str) -> None:  # generous: the machine may be loaded by other test runs
            deadline = time.time() + 300
            while not ready():
                ended = first.poll() is not None
                assert not ended, f"the first trainer ended before {what}:\n{(tmp_path / 'first.out').read_text()}"
                assert time.time() < deadline, f"timed out waiting for {what}"
                time.sleep(0.1)

        lock = Path("logs/distill/busy.lock")  # paths.student_lock("busy"), spelled out: checked below, after the
        # refusal, so that a tree without the lock fails on the refusal itself
        holds = lambda: lock.is_file() and lock.read_text().startswith(f"process {first.pid} ")  # noqa: E731
        wait_for(lambda: holds() or metrics.is_file(), "the first trainer to take the run")
        line = one_line_error(run("--run", "busy"))
        assert "distill run busy" in line and f"is being written by process {first.pid}" in line, line
        assert lock == paths.student_lock("busy")
        wait_for(metrics.is_file, "the first trainer's first epoch")  # something to resume from
        assert first.poll() is None, "the first trainer finished before it could be stopped: raise `epochs`"
    finally:
        first.terminate()
        first.wait(timeout=60)
    done = torch.load(checkpoint, weights_only=False)["epoch"]
    assert 0 < done < epochs
    rerun = run("--run", "busy")
    assert rerun.exit_code == 0, rerun.output
    assert f"resuming after epoch {done}" in rerun.output, rerun.output
    ckpt = torch.load(checkpoint, weights_only=False)
    assert ckpt["finished"] and ckpt["epoch"] == epochs


# ---------------------------------------------------------------- 3. a full disk


# the OS's words for ENOSPC, or torch.save's (its C++ writer drops the errno: measured with torch 2.14 on tmpfs)
NO_SPACE = ("No space left on device", "unexpected pos", "iostream error", "file write failed")


def one_line_no_space(message: str) -> str:
    """A full disk's refusal: one line, the reason, and what to do about it."""
    assert "\n" not in message and any(words in message for words in NO_SPACE), message
    assert "free space" in message, message
    return message


def test_two_processes_replacing_one_file_never_share_a_temporary(tmp_path):
    """The seed pool's children all rewrite metrics/distill/RUN.json: a second process that writes the file while
    the first is between writing its temporary and renaming it must not take the first's temporary away (CI once
    failed with "cannot write metrics/distill/par.json (No such file or directory)")."""
    from pipeline.checkpoints import replace_atomically

    target = tmp_path / "summary.json"
    other = (f"from pipeline.checkpoints import write_json; write_json({str(target)!r}, {{'by': 'other'}})")

    def write_then_let_another_process_write(tmp: Path) -> None:
        tmp.write_text(json.dumps({"by": "this"}))
        subprocess.run([sys.executable, "-c", other], env=child_env(), check=True)
        assert json.loads(target.read_text()) == {"by": "other"}

    replace_atomically(target, write_then_let_another_process_write)
    assert json.loads(target.read_text()) == {"by": "this"}  # the last rename wins, and nothing is left over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_writes_on_a_full_disk_end_in_one_line_and_leave_no_temporary_file(tmp_path):
    from pipeline.checkpoints import save_checkpoint, write_json

    with full_disk_at(tmp_path / "full") as full:
        with pytest.raises(UserError) as err:
            save_checkpoint(full / "x.pt", {"student": {"w": torch.randn(64, 64)}, "epoch": 3})
        assert "x.pt" in one_line_no_space(err.value.message)
        with pytest.raises(UserError) as err:
            write_json(full / "m.json", {"history": [{"loss": 1.0}] * 100})
        assert "No space left on device" in one_line_no_space(err.value.message)  # the OS says it here
        assert "m.json" in err.value.message
        left = sorted(p.name for p in full.iterdir())
        assert not [n for n in left if n.endswith(".tmp")] and "x.pt" not in left and "m.json" not in left, left


def test_the_run_lock_works_on_afull_disk_at(tmp_path):
    """A run that fills the disk must still be lockable, or no rerun could even start to report the full disk."""
    from pipeline.checkpoints import exclusive_lock

    with full_disk_at(tmp_path / "full", keep=("r.lock",)) as full:
        with exclusive_lock(full / "r.lock", "distill run r"):  # no room for the holder's note: the lock alone
            with pytest.raises(UserError) as err:  # and it still excludes a second writer
                with exclusive_lock(full / "r.lock", "distill run r"):
                    pass
            assert "distill run r is being written by" in err.value.message and "\n" not in err.value.message
        try:  # a lock file not there yet: taken, or refused in one line
            with exclusive_lock(full / "new.lock", "distill run new"):
                pass
        except UserError as exc:
            assert "\n" not in exc.message and "new.lock" in exc.message


@pytest.mark.parametrize("on_full_disk", [("data/student",), ("data/student", "logs")])
def test_the_distill_stage_on_a_full_disk_ends_in_one_line(tiny_pipeline, tmp_path, on_full_disk):
    """A fresh run's checkpoints on a full disk, alone or with the run's lock and logs beside them (one disk)."""
    with full_disk_at(tmp_path / "full") as full:
        for folder in on_full_disk:
            (full / folder).mkdir(parents=True)  # an empty folder needs no space on tmpfs
            Path(folder).symlink_to(full / folder, target_is_directory=True)
        result = run("--method", "kd")
        assert not isinstance(result.exception, Exception), repr(result.exception)  # CliRunner hides the traceback
        assert "seed0" in one_line_no_space(ends_in_one_error_line(result))
        assert not list(full.rglob("*.tmp"))


# ---------------------------------------------------------------- 4. a method of your own, as one module

TOY_METHOD = '''
from dataclasses import dataclass

from pipeline.methods import Method, register
from pipeline.methods.losses import soft_cross_entropy, soften


@dataclass
class ToyConfig:
    weight: float = 1.0  # weight of the soft cross-entropy to the teachers' mean softmax


@register
class Toy(Method):
    name = "toy"
    Config = ToyConfig

    def losses(self, out, tgt, labels):
        return {"toy_soft": self.cfg.weight * soft_cross_entropy(out.logits.float(), soften(tgt.logits, 1.0).mean(0))}
'''


def test_a_method_of_your_own_is_one_module_listed_under_plugins(tiny_pipeline, tmp_path):
    """The contract of docs and pipeline.methods: a .py file (path relative to the working directory) registering
    a Method trains through the stage like a built-in one; its options are checked like theirs. Real processes:
    a plugin registers itself for the life of its process."""
    params = tiny_pipeline
    (tmp_path / "toy_method.py").write_text(TOY_METHOD)
    params["distill"]["plugins"] = ["toy_method.py"]
    params["distill"]["runs"] = {"toy": {"method": "toy", "toy": {"weight": 0.5}}}
    write_params(params)
    trained = stage("--run", "toy", cwd=tmp_path)
    assert trained.exit_code == 0, trained.output
    ckpt = torch.load(paths.student_checkpoint("toy"), weights_only=False)
    assert ckpt["finished"] and ckpt["method"] == "toy" and ckpt["identity"]["options"] == {"weight": 0.5}
    assert "toy_soft" in ckpt["history"][-1], ckpt["history"][-1]
    assert "toy_soft" in json.loads(paths.student_seed_metrics("toy").read_text())["history"][-1]

    params["distill"]["runs"]["toy"]["toy"] = {"weight": "x"}
    write_params(params, "bad_weight.yaml")
    line = one_line_error(stage("--run", "toy", "--params", "bad_weight.yaml", cwd=tmp_path))
    assert "distill.toy.weight" in line and "'x'" in line, line

    def known_methods(listed: bool) -> list[str]:  # the methods an unknown method's refusal offers
        distill = {k: v for k, v in params["distill"].items() if k not in ("plugins", "runs")}
        distill["runs"] = {"nope": {"method": "nosuch"}}
        if listed:
            distill["plugins"] = ["toy_method.py"]
        write_params({**params, "distill": distill}, "unknown.yaml")
        line = one_line_error(stage("--run", "nope", "--params", "unknown.yaml", cwd=tmp_path))
        assert "'nosuch' is not one of " in line, line
        return line.split("is not one of ", 1)[1].split(", ")

    offered = known_methods(listed=True)
    assert "toy" in offered and "kd" in offered, offered
    assert "toy" not in known_methods(listed=False)
