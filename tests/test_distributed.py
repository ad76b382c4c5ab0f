"""Scale-out under torchrun: 2 CPU processes with gloo against one process, on the tiny pipeline.

Oracles: the store 2 ranks write equals the one-process store array by array, even through SIGKILLs at
random moments and reruns with another world size; distillation (MEAL, KD) and pretraining with 2 ranks at
the same global batch end with the one-process weights (float tolerance: only the reduction order differs),
SyncBatchNorm on; a run killed after its first epoch and resumed by one process ends as the uninterrupted
one. Batch 25 over 96 images: shards of 13 and 12 rows, the last batch of 21 rows in 11 and 10 (uneven).
Each torchrun start costs seconds, so every launch here counts.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml

from pipeline import paths
from pipeline.cache import open_cache
from pipeline.config import UserError
from pipeline.dist import (AllReduceBatchNorm, World, check_shards, epoch_rows, shard, shard_weight,
                           sync_batchnorm)
from helpers import build_tiny_pipeline, private_copy, tiny_distill_params, torchrun, torchrun_command

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
BATCH = 25
# when the kills that land in a 2-rank job's start land: torchrun, imports, rendezvous and the teacher take
# ~7 s on 2 cores (the others wait for the job's first chunk and then a random moment)
KILL_AFTER_S = (0.5, 7.0)


def read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def built(root: Path, params: dict) -> Path:
    """`root` holding the tiny pipeline of `params`: teachers, view plan, caches written by one process."""
    with contextlib.chdir(root):
        build_tiny_pipeline(params)
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory, fashion_root) -> Path:
    """A tiny pipeline (2 teachers cached by one process) with sync BatchNorm on: copied by each test."""
    params = tiny_distill_params(fashion_root, batch_size=BATCH, epochs=2)
    params["dist"] = {"sync_bn": True, "timeout_s": 60}
    params["teachers"]["t1"]["pretrain"] = {"epochs": 2, "batch_size": BATCH, "lr": 0.05}
    params["cache"]["chunk_rows"] = 8  # 12 chunks for the ranks to share
    return built(tmp_path_factory.mktemp("dist_base"), params)


@pytest.fixture(scope="module")
def big(tmp_path_factory, fashion_root) -> Path:
    """One teacher's store big enough (512 samples x 8 views, 32 chunks) for kills to land while it is written."""
    params = tiny_distill_params(fashion_root)
    params["data"]["limit"], params["views"]["num_views"], params["cache"]["chunk_rows"] = 512, 8, 16
    params["teachers"] = {"t1": params["teachers"]["t1"]}
    return built(tmp_path_factory.mktemp("dist_big"), params)


@pytest.fixture
def work(base, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the tiny pipeline as the working directory."""
    return private_copy(base, tmp_path, monkeypatch)


def plain(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in one process, one thread (as each torchrun rank gets)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    with open_cache(path) as c:
        out = {name: np.asarray(c.array(name)[...]) for name in ["logits", *c.blocks]}
        out["done"] = np.asarray(c._store.done())
        out["complete"] = np.asarray(c.complete)
    return out


def assert_same_store(path: Path, want: dict[str, np.ndarray]) -> None:
    got = store_arrays(path)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].tobytes() == want[name].tobytes(), name


def assert_same_weights(a: Path, b: Path) -> None:
    """Two checkpoints (student: its weights and its discriminators'; teacher: its weights) at the same epoch
    hold the same numbers to float tolerance."""
    ca, cb = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
    assert ca["epoch"] == cb["epoch"]
    for part in ("student", "discriminators", "model"):
        sa, sb = ca.get(part, {}), cb.get(part, {})
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k].float(), sb[k].float(), rtol=1e-4, atol=2e-5, msg=f"{part}.{k}")


# ---------------------------------------------------------------- pure rules (no process group)


@pytest.mark.parametrize("n,batch,size", [(96, 25, 2), (96, 25, 3), (100, 10, 4), (7, 7, 7)])
def test_shards_partition_every_global_batch_and_their_weights_average_to_one(n, batch, size):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    for start in range(0, n, batch):
        rows = order[start:start + batch]
        parts = [shard(rows, World(r, size)) for r in range(size)]
        assert torch.equal(torch.cat(parts), rows)  # contiguous, in order, nothing dropped or padded
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        w = [shard_weight(len(p), len(rows), World(r, size)) for r, p in enumerate(parts)]
        assert sum(w) / size == pytest.approx(1.0)  # DDP's mean of w_r * mean_r = the global batch's mean
    every = torch.cat([epoch_rows(order, batch, World(r, size)) for r in range(size)])
    assert torch.equal(every.sort().values, torch.arange(n))  # the ranks' slab rows partition the epoch
    assert torch.equal(epoch_rows(order, batch, World()), torch.arange(n))
    assert shard(order, World()) is order and shard_weight(3, 10, World()) == 1.0


def test_a_world_larger_than_the_last_batch_is_refused_in_one_line():
    check_shards(96, 25, World(0, 21), "distill")  # the last batch holds 21 rows: one for each of 21 ranks
    with pytest.raises(UserError) as err:
        check_shards(96, 95, World(0, 2), "distill")
    assert "last batch of an epoch holds 1 of the 96 rows" in err.value.message and "\n" not in err.value.message
    check_shards(96, 95, World(), "distill")  # one process: any batch


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one: the collectives run, their sums are the local values."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_allreduce_batchnorm_equals_batchnorm(one_process_group):
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(5, momentum=0.3)
    nn.init.normal_(ref.weight), nn.init.normal_(ref.bias)
    ours = sync_batchnorm(nn.Sequential(ref_copy := nn.BatchNorm2d(5, momentum=0.3)), World(0, 2), torch.device("cpu"))
    ref_copy.load_state_dict(ref.state_dict())
    assert isinstance(ours[0], AllReduceBatchNorm) and ours.state_dict().keys() == nn.Sequential(ref).state_dict().keys()
    for step in range(3):
        x = torch.randn(6, 5, 4, 3) * 3 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ref(xa), ours(xb)
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(ya)
        ya.backward(g), yb.backward(g)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[0].weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[0].bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(ours.state_dict()[f"0.{name}"], ref.state_dict()[name], rtol=1e-5, atol=1e-6)
    ours.eval(), ref.eval()
    x = torch.randn(2, 5, 4, 3)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_launch_runs_the_plain_command_with_one_process_and_torchrun_with_more(work, monkeypatch):
    from pipeline import launch

    seen = {}

    class Execd(Exception):
        pass

    def fake_exec(path, argv):
        seen["exec"] = argv
        raise Execd

    monkeypatch.setattr(os, "execv", fake_exec)
    params = read_yaml(Path("params.yaml"))
    params["dist"]["nproc_per_node"] = 1
    Path("one.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(Execd):
        launch.launch(["stages.distill", "--run", "kd", "--params", "one.yaml"])
    assert seen["exec"] == [sys.executable, "-m", "stages.distill", "--run", "kd", "--params", "one.yaml"]

    import torch.distributed.run as tdr

    monkeypatch.setattr(tdr, "run", lambda args: seen.setdefault("torchrun", args))
    params["dist"]["nproc_per_node"] = 2
    Path("two.yaml").write_text(yaml.safe_dump(params))
    assert launch.launch(["stages.pretrain", "--teacher", "t1", "--params=two.yaml"]) == 0
    args = seen["torchrun"]
    assert (args.nproc_per_node, args.module, args.training_script) == ("2", True, "stages.pretrain")
    assert args.training_script_args == ["--teacher", "t1", "--params=two.yaml"] and args.standalone
    with pytest.raises(UserError, match="STAGE one of stages.pretrain"):
        launch.launch(["stages.evaluate"])


def test_a_rank_loads_only_its_rows_of_the_slab_and_gets_the_same_targets(work):
    from pipeline.cache.slabs import CachedTargets, CacheSlabs, EpochReads, SlabLoader

    caches = {t: open_cache(paths.teacher_cache(t)) for t in ("t1", "t2")}
    full = CachedTargets(SlabLoader(CacheSlabs(caches), (0, 2), torch.device("cpu")))
    mine = CachedTargets(SlabLoader(CacheSlabs(caches), (0, 2), torch.device("cpu")))
    order = torch.randperm(96, generator=torch.Generator().manual_seed(3))
    rank = World(1, 2)
    rows = epoch_rows(order, BATCH, rank).numpy()
    full.start_epoch(EpochReads.whole(1))
    mine.start_epoch(EpochReads.whole(1, rows=rows))
    assert mine.slab.rows.shape[1] == len(rows) == 46 and full.slab.rows.shape[1] == 96  # rank 1: 12+12+12+10
    for start in range(0, 96, BATCH):
        idx = shard(order[start:start + BATCH], rank)
        for picked in ([0, 1], [1]):
            a, b = full(idx, None, picked), mine(idx, None, picked)
            assert torch.equal(a.logits, b.logits) and all(map(torch.equal, a.blocks, b.blocks))
    full.close(), mine.close()


# ---------------------------------------------------------------- the cache under 2 ranks


def test_two_ranks_write_the_one_process_store_and_refuse_h5(work):
    want = store_arrays(paths.teacher_cache("t1"))
    shutil.rmtree(paths.teacher_cache("t1"))
    result = torchrun(2, "stages.cache_teachers", "--teacher", "t1", "--device", "cpu", "--quiet")
    assert result.returncode == 0, result.stdout
    assert "x 2 processes, 12 chunks" in result.stdout and result.stdout.count("cache complete") == 1
    assert_same_store(paths.teacher_cache("t1"), want)

    params = read_yaml(Path("params.yaml"))
    params["dist"]["nproc_per_node"] = 2
    Path("two.yaml").write_text(yaml.safe_dump(params))
    h5 = subprocess.run([sys.executable, "-m", "pipeline.launch", "stages.cache_teachers", "--teacher", "t1",
                         "--format", "h5", "--device", "cpu", "--quiet", "--params", "two.yaml"],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert h5.returncode != 0 and "Traceback" not in h5.stdout
    lines = h5.stdout.strip().splitlines()
    assert "an HDF5 store cannot be written by 2 processes" in h5.stdout and "--format zarr" in h5.stdout
    assert lines[-1].startswith("Error: stages.cache_teachers rank") and "exited with status 2" in lines[-1]
    assert not paths.teacher_cache("t1", "h5").exists()


def _markers(store: Path) -> int:
    """How many chunks' `done` markers a zarr store has written (one file each)."""
    return len(list((store / "done" / "c").glob("*"))) if store.exists() else 0


def _rank_pids(agent: int) -> list[int]:
    try:
        children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    except OSError:
        return []
    return [int(p) for p in children]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_two_rank_cache_killed_at_random_moments_converges_to_the_one_process_store(big, tmp_path, monkeypatch):
    private_copy(big, tmp_path, monkeypatch)
    store = paths.teacher_cache("t1")
    want = store_arrays(store)
    shutil.rmtree(store)
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = torchrun_command(2, "stages.cache_teachers", "--teacher", "t1", "--device", "cpu", "--quiet")
    kills, landed, partial = 8, 0, 0
    for i in range(kills):
        before = _markers(store)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        if i % 4 == 0:  # somewhere in the start: launcher, imports, rendezvous, the store's preparation
            time.sleep(rng.uniform(*KILL_AFTER_S))
        else:  # while chunks are being written: once this run has marked one, a random moment later
            deadline = time.time() + 120
            while _markers(store) <= before and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.4))
        ranks = _rank_pids(proc.pid)
        landed += proc.poll() is None
        for pid in [proc.pid, *ranks] if i % 2 == 0 else [proc.pid]:  # the whole job, or the agent alone:
            with contextlib.suppress(ProcessLookupError):  # its ranks (sessions of their own) must not outlive it
                os.kill(pid, signal.SIGKILL)  # (pipeline.launch.die_with_agent)
        proc.wait()
        deadline = time.time() + 10
        while any(map(_alive, ranks)) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, ranks)), f"kill {i}: a rank outlived its agent"
        if store.exists():
            done = store_arrays(store)["done"]
            partial += 0 < done.sum() < len(done)
            if done.all():
                shutil.rmtree(store)  # finished before the kill: start over, so the next kills land in work
    print(f"cache kills: {landed} of {kills} landed in a run, {partial} left a partial store")  # pytest -s
    assert landed >= kills // 2 and partial >= kills // 2, f"{landed} of {kills} kills landed in a run, {partial} mid-write"
    # the rest with another world size: one process finishes what the two ranks left
    done = plain("stages.cache_teachers", "--teacher", "t1", "--device", "cpu", "--quiet")
    assert done.returncode == 0, done.stdout
    assert_same_store(store, want)


# ---------------------------------------------------------------- distillation and pretraining under 2 ranks


@pytest.mark.parametrize("method", ["meal", "kd"])
def test_two_ranks_distill_the_one_process_student(work, tmp_path, method):
    one = tmp_path / "one"
    shutil.copytree(work, one)
    two = torchrun(2, "stages.distill", "--method", method, "--device", "cpu", "--quiet")
    assert two.returncode == 0, two.stdout
    assert two.stdout.count(f"{method} seed 0: test accuracy") == 1  # rank 0 alone reports
    os.chdir(one)
    single = plain("stages.distill", "--method", method, "--device", "cpu", "--quiet")
    assert single.returncode == 0, single.stdout
    assert_same_weights(one / paths.student_checkpoint(method), work / paths.student_checkpoint(method))


def test_two_rank_distill_killed_after_its_first_epoch_resumes_in_one_process(work, tmp_path):
    params = read_yaml(Path("params.yaml"))
    params["distill"]["epochs"] = 10
    Path("params.yaml").write_text(yaml.safe_dump(params))
    reference = tmp_path / "ref"
    shutil.copytree(work, reference)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(torchrun_command(2, "stages.distill", "--method", "kd", "--device", "cpu", "--quiet"),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = paths.student_checkpoint("kd")
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(ckpt, weights_only=False)["epoch"]
    assert 1 <= killed_at < 10
    resumed = plain("stages.distill", "--method", "kd", "--device", "cpu", "--quiet")
    assert resumed.returncode == 0 and f"resuming after epoch {killed_at}" in resumed.stdout, resumed.stdout
    os.chdir(reference)
    assert plain("stages.distill", "--method", "kd", "--device", "cpu", "--quiet").returncode == 0
    assert_same_weights(reference / ckpt, work / ckpt)


def test_two_ranks_pretrain_the_one_process_teacher(work, tmp_path):
    one = tmp_path / "one"
    shutil.copytree(work, one)
    two = torchrun(2, "stages.pretrain", "--teacher", "t1", "--device", "cpu", "--quiet", "--restart")
    assert two.returncode == 0, two.stdout
    os.chdir(one)
    single = plain("stages.pretrain", "--teacher", "t1", "--device", "cpu", "--quiet", "--restart")
    assert single.returncode == 0, single.stdout
    assert_same_weights(one / paths.teacher_checkpoint("t1"), work / paths.teacher_checkpoint("t1"))


def test_a_rank_that_dies_ends_the_job_in_one_line(work):
    params = read_yaml(Path("params.yaml"))
    params["distill"]["epochs"] = 200
    params["dist"]["nproc_per_node"] = 2
    Path("params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.launch", "stages.distill", "--method", "kd",
                             "--device", "cpu", "--quiet"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not paths.student_checkpoint("kd").exists() and time.time() < deadline:
            time.sleep(0.05)
        ranks = _rank_pids(proc.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGKILL)  # one rank dies mid-run; the other must not wait for it forever
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and "Traceback" not in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("Error: stages.distill rank") and "was killed by SIGKILL" in last, out
    assert "Rerun the same command to resume" in last
    assert not any(map(_alive, ranks))


def test_a_batch_the_ranks_cannot_share_is_refused_in_one_line(work):
    params = read_yaml(Path("params.yaml"))
    params["distill"]["batch_size"] = 95  # 96 images: the last batch holds one row for two ranks
    params["dist"]["nproc_per_node"] = 2
    Path("params.yaml").write_text(yaml.safe_dump(params))
    out = plain("pipeline.launch", "stages.distill", "--method", "kd", "--device", "cpu", "--quiet")
    assert out.returncode != 0 and "Traceback" not in out.stdout
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("Error: stages.distill rank") and "exited with status 2" in lines[-1]
    refusals = set(lines[:-1])  # every rank checks the same numbers before any collective
    assert refusals == {"Error: distill: the last batch of an epoch holds 1 of the 96 rows (96 mod batch_size 95), "
                        "fewer than the 2 ranks, so a rank would have nothing to train on: change "
                        "distill.batch_size or run fewer processes"}, out.stdout
    assert not paths.student_checkpoint("kd").exists()


@pytest.fixture(scope="module")
def mixed_base(tmp_path_factory, fashion_root) -> Path:
    """The tiny pipeline on mixed views (mixup and CutMix), cached by one process."""
    params = tiny_distill_params(fashion_root, batch_size=BATCH, epochs=2)
    params["dist"] = {"sync_bn": True, "timeout_s": 60}  # BatchNorm over the global batch, as one process has it
    params["views"]["mix"] = {"kind": "both", "prob": 0.9}
    params["cache"]["chunk_rows"] = 8
    return built(tmp_path_factory.mktemp("dist_mixed"), params)


def test_two_ranks_cache_and_distill_mixed_views_as_one_process_does(mixed_base, tmp_path, monkeypatch):
    """The mixing is in the plan: two ranks write the one-process store byte for byte and train its student."""
    work = private_copy(mixed_base, tmp_path / "two", monkeypatch)
    want = store_arrays(paths.teacher_cache("t1"))
    shutil.rmtree(paths.teacher_cache("t1"))
    result = torchrun(2, "stages.cache_teachers", "--teacher", "t1", "--device", "cpu", "--quiet")
    assert result.returncode == 0, result.stdout
    assert_same_store(paths.teacher_cache("t1"), want)
    one = tmp_path / "one"
    shutil.copytree(work, one)
    two = torchrun(2, "stages.distill", "--method", "kd", "--device", "cpu", "--quiet")
    assert two.returncode == 0, two.stdout
    os.chdir(one)
    single = plain("stages.distill", "--method", "kd", "--device", "cpu", "--quiet")
    assert single.returncode == 0, single.stdout
    assert_same_weights(one / paths.student_checkpoint("kd"), work / paths.student_checkpoint("kd"))
