"""The distill stage on tiny data: cached == online, every method end to end, resume, one-line refusals.

Setup (`tiny_pipeline`): 96 synthetic 1x28x28 images, two untrained student_cnn (width 0.25) teachers
saved as teacher checkpoints per the contract schema, a view plan with V = 2, and both teachers cached
through the real stages (plan_views, cache_teachers).
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
import torch
import yaml
from click.testing import CliRunner

import pipeline.distill
from pipeline import paths
from pipeline.cache import open_cache
from pipeline.config import UserError, build
from pipeline.data import DataConfig, load_split
from pipeline.distill import DistillConfig, TrainSet, build_trainer, train_one_epoch
from pipeline.methods import make_method, method_configs
from pipeline.models import build_model
from pipeline.cache.slabs import CacheSlabs, EpochReads, SlabLoader
from pipeline.align import AlignConfig
from pipeline.views import open_view_plan
from stages import distill as distill_stage
from bench.cache_io import fake_teacher as make_teacher
from helpers import (TINY_TEACHERS, Recorder, build_tiny_pipeline, ends_in_one_error_line, one_line_error, tiny_distill_params,
                     tiny_targets)

TEACHERS = TINY_TEACHERS


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny steps: one thread each (tests/conftest.py)


def params_for(root: Path) -> dict:
    return tiny_distill_params(root, student_dropout=0.1, epochs=2, log_every=1, meal={"adversarial": "alternating"})


def write_params(params: dict) -> None:
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def tiny_pipeline(tmp_path, fashion_root, monkeypatch) -> dict:
    """tmp_path as the working directory, with params.yaml, teachers, view plan and caches in place."""
    monkeypatch.chdir(tmp_path)
    params = params_for(fashion_root)
    build_tiny_pipeline(params)
    return params


def run(*args: str):
    return CliRunner().invoke(distill_stage.main, ["--quiet", "--device", "cpu", *args])


# ---------------------------------------------------------------- cached == online


@pytest.mark.parametrize("method", ["meal", "kd"])
def test_cached_and_online_training_see_the_same_targets(tiny_pipeline, method):
    params = tiny_pipeline
    train = load_split(build(DataConfig, params["data"], "data"), "train")
    plan_views = open_view_plan(paths.view_plan())
    cfg = build(DistillConfig, {**params["distill"], "method": method}, "distill")
    options = method_configs(cfg, list(TEACHERS))[method]
    align_cfg = AlignConfig(**params["cache"]["align"])
    dev = torch.device("cpu")
    data = TrainSet(train.images, train.labels, plan_views.aug, plan_views.augment, train.mean, train.std)

    def train_with(online: bool):
        distiller = make_method(method, options, list(TEACHERS))
        source = tiny_targets(distiller, align_cfg, dev, online)
        torch.manual_seed(cfg.seed)
        student = build_model("student_cnn", 10, 1, width=0.25, dropout=0.1)
        trainer = build_trainer(distiller, cfg, student, 10, align_cfg, dev)
        recorder = Recorder(source)
        history = []
        for epoch in range(cfg.epochs):
            recorder.start_epoch(EpochReads.whole(epoch % 2, (epoch + 1) % 2))
            history.append(train_one_epoch(trainer, epoch, data, recorder, progress=False))
        return recorder.seen, history, student

    cached_seen, cached_hist, cached_student = train_with(False)
    online_seen, online_hist, online_student = train_with(True)
    assert len(cached_seen) == len(online_seen) == 2 * 3  # 2 epochs x 3 steps of 32
    for (pc, tc), (po, to) in zip(cached_seen, online_seen):
        assert pc == po  # the same teacher draws
        # both went through fp16: equal up to one fp16 rounding step of a value near 1e1
        torch.testing.assert_close(tc.logits, to.logits, rtol=1e-3, atol=2e-3)
        assert (tc.blocks is None) == (to.blocks is None)
        if tc.blocks is not None:  # [(k, B, L)] each
            assert len(tc.blocks) == len(to.blocks)
            for a, b in zip(tc.blocks, to.blocks):
                assert a.shape == b.shape and a.shape[0] == len(pc) and a.shape[1] == 32
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    # the losses agree to 1e-4 relative over all steps (measured: identical on the CPU)
    for hc, ho in zip(cached_hist, online_hist):
        assert hc.keys() == ho.keys()
        for key in hc:
            assert hc[key] == pytest.approx(ho[key], rel=1e-4, abs=1e-6), key
    for (name, a), b in zip(cached_student.state_dict().items(), online_student.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------- every method through the stage


@pytest.mark.parametrize("method,extra", [
    ("meal", []), ("meal_v2", []), ("anc", []), ("kd", []), ("scratch", []), ("kd", ["--online"]),
])
def test_every_method_runs_end_to_end(tiny_pipeline, method, extra):
    result = run("--method", method, *extra)
    assert result.exit_code == 0, result.output
    name = f"{method}_online" if extra else method
    ckpt = torch.load(paths.student_checkpoint(name), weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["finished"] and ckpt["method"] == method
    assert set(ckpt) >= {"student", "discriminators", "optimizer", "d_optimizer", "identity", "history", "best_acc"}
    metrics = json.loads(paths.student_seed_metrics(name, 0).read_text())
    assert len(metrics["history"]) == 2 and 0 <= metrics["test_acc"] <= 1 and metrics["seed"] == 0
    summary = json.loads(paths.student_metrics(name).read_text())  # over the run's seeds (here one)
    assert summary["seeds"] == [0] and summary["test_acc"] == [metrics["test_acc"]] and summary["finished"]
    assert summary["test_acc_mean"] == metrics["test_acc"] and summary["test_acc_std"] == 0.0
    row = metrics["history"][-1]
    assert {"loss", "test_acc", "epoch_time_s", "images_per_s"} <= set(row)
    d_acc = [k for k in row if k.startswith("d_acc_")]
    expected = {"meal": 4, "meal_v2": 1, "anc": 1}.get(method, 0)  # meal: the three blocks and the logits
    assert len(d_acc) == expected and all(0 <= row[k] <= 1 for k in d_acc)
    # the rerun finds the finished checkpoint and trains nothing more
    again = run("--method", method, *extra)
    assert again.exit_code == 0 and "already trained" in again.output


@pytest.mark.parametrize("method,game", [("meal", "reversal"), ("meal", "cooperative"), ("anc", "reversal"),
                                         ("meal_v2", "none")])
def test_games_run_through_the_stage(tiny_pipeline, method, game):
    params = tiny_pipeline
    params["distill"][method] = {"adversarial": game}
    if method == "meal":
        params["distill"]["meal"].update(similarity="kl", logit_similarity="kl")
    params["distill"]["epochs"] = 1
    write_params(params)
    result = run("--method", method)
    assert result.exit_code == 0, result.output
    ckpt = torch.load(paths.student_checkpoint(method), weights_only=False)
    # cooperative: D trains inside the student's SGD, as a third param group; none: no D at all
    assert (ckpt["d_optimizer"] is None) == (game in ("cooperative", "none"))
    assert len(ckpt["optimizer"]["param_groups"]) == (3 if game == "cooperative" else 2)
    assert bool(ckpt["discriminators"]) == (game != "none")


def test_changed_settings_refuse_without_restart(tiny_pipeline):
    params = tiny_pipeline
    params["distill"]["epochs"] = 1
    write_params(params)
    assert run().exit_code == 0
    before = paths.student_checkpoint("meal").read_bytes()
    line = one_line_error(run("--epochs", "2"))
    assert "--restart" in line and "distill" in line
    assert paths.student_checkpoint("meal").read_bytes() == before  # nothing destroyed
    assert run("--epochs", "2", "--restart").exit_code == 0


# ---------------------------------------------------------------- one-line refusals


@pytest.mark.parametrize("args,edit,needle", [
    (["--method", "fitnets"], None, "distill.method"),
    ([], ("meal", {"adversarial": "wgan"}), "distill.meal.adversarial"),
    ([], ("meal", {"similarity": "cosine"}), "distill.meal.similarity"),
    ([], ("meal", {"block_weights": [1.0]}), "block_weights"),
    ([], ("kd", {"alpha": 1.5}), "distill.kd.alpha"),  # another method's options are checked too
    ([], ("kd", {"teacher": "nobody"}), "distill.kd.teacher"),
    ([], ("anc", {"lambda": 1.0}), "unknown key"),
    ([], ("student", {"arch": "nonet"}), "unknown architecture"),
    ([], ("student", {"arch": "student_cnn", "model": {"depth": 3}}), "does not take"),
    (["--device", "tpu"], None, "--device"),
])
def test_bad_methods_and_options_fail_in_one_line_before_any_work(tmp_path, monkeypatch, args, edit, needle):
    monkeypatch.chdir(tmp_path)
    params = params_for(tmp_path / "no-such-data")  # nothing to read: only the checks can run
    if edit is not None:
        where, value = edit
        if where == "student":
            params["student"] = value
        else:
            params["distill"][where] = value
    write_params(params)
    monkeypatch.setattr(distill_stage, "load_split", lambda *a, **k: pytest.fail("work started"))
    line = one_line_error(run(*args))
    assert needle in line
    assert not Path("data").exists()


def test_stale_teacher_checkpoint_is_refused(tiny_pipeline):
    train = load_split(build(DataConfig, tiny_pipeline["data"], "data"), "train")
    make_teacher(paths.teacher_checkpoint("t2"), train, seed=999, name="t2")  # retrained after its cache was made
    line = one_line_error(run())
    assert "t2" in line and "changed" in line


def test_incomplete_cache_is_refused(tiny_pipeline):
    import zarr

    zarr.open_group(str(paths.teacher_cache("t1")), mode="r+").attrs["complete"] = False
    line = one_line_error(run())
    assert "incomplete" in line


def test_view_plan_of_other_data_is_refused(tiny_pipeline):
    params = tiny_pipeline
    params["data"]["limit"] = 64
    write_params(params)
    line = one_line_error(run("--method", "scratch"))
    assert "view plan" in line


def test_slab_loader_reads_whole_views_and_prefetches(tiny_pipeline):
    import numpy as np

    from pipeline.cache.slabs import ArraySlabs

    caches = {t: open_cache(paths.teacher_cache(t)) for t in TEACHERS}
    loader = SlabLoader(CacheSlabs(caches), (0, 2), torch.device("cpu"))
    slab = loader.get(1)
    assert slab.view == 1 and slab.logits.shape == (2, 96, 10) and slab.logits.dtype == torch.float16
    assert set(slab.features) == {0, 2} and slab.features[2].shape == (2, 96, 8)
    for k, cache in enumerate(caches.values()):
        np.testing.assert_array_equal(slab.logits[k].numpy(), np.asarray(cache.array("logits")[:, 1]))
        np.testing.assert_array_equal(slab.features[0][k].numpy(), np.asarray(cache.array("block1")[:, 1]))
    loader.prefetch(0)
    assert 0 in loader.pending  # read in the background thread meanwhile
    again = loader.get(0)
    assert again.view == 0 and not loader.pending and loader.get(0) is again
    # an in-memory source gives the same slabs (what benchmarks use without a store)
    arrays = [{name: np.asarray(c.array(name)[...]) for name in ("logits", "block1", "block3")}
              for c in caches.values()]
    memory = SlabLoader(ArraySlabs(list(TEACHERS), arrays, ["block1", "block2", "block3"]), (0, 2), torch.device("cpu"))
    assert torch.equal(memory.get(0).logits, again.logits) and torch.equal(memory.get(0).features[2], again.features[2])
    loader.close()
    memory.close()


def test_student_init_fine_tunes_from_a_checkpoint(tiny_pipeline):
    """student.init (MEAL V2's official recipe fine-tunes a pretrained student): a run's `student` overrides
    point it at another run's checkpoint; the student starts from those weights and records the file's hash;
    a checkpoint of another student is a one-line refusal."""
    params = tiny_pipeline
    params["distill"]["epochs"] = 1
    params["distill"]["runs"] = {"scratch": {"method": "scratch"},
                                 "ft": {"method": "meal_v2", "lr": 1e-9, "momentum": 0.0,
                                        "student": {"init": "data/student/scratch/seed{seed}.pt"}}}
    write_params(params)
    assert run("--run", "scratch").exit_code == 0
    result = run("--run", "ft")
    assert result.exit_code == 0, result.output
    start = torch.load(paths.student_checkpoint("scratch"), weights_only=False)["student"]
    tuned = torch.load(paths.student_checkpoint("ft"), weights_only=False)
    assert tuned["identity"]["student_init_sha256"] is not None
    for k, v in start.items():  # lr 1e-9: the weights are the scratch student's, BatchNorm statistics aside
        if "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(tuned["student"][k], v, rtol=0, atol=1e-6, msg=k)
    # a finished run rerun keeps its checkpoint's bytes, so the fine-tuned run it initialised still resumes
    before = paths.student_checkpoint("scratch").read_bytes()
    assert "already trained" in run("--run", "scratch").output
    assert paths.student_checkpoint("scratch").read_bytes() == before
    assert "already trained" in run("--run", "ft").output
    params["distill"]["runs"]["ft"]["student"] = {"init": "data/teachers/t1.pt"}  # a teacher of the same arch
    write_params(params)
    assert run("--run", "ft", "--restart").exit_code == 0
    params["distill"]["runs"]["ft"]["student"] = {"init": "data/teachers/t1.pt", "model": {"width": 0.5}}
    write_params(params)
    line = one_line_error(run("--run", "ft", "--restart"))  # a wider student than the checkpoint's
    assert "student.init" in line and "point student.init at a checkpoint of this student" in line
    params["distill"]["runs"]["ft"]["student"] = {"init": "data/student/none.pt"}
    write_params(params)
    assert "student.init checkpoint data/student/none.pt not found" in one_line_error(run("--run", "ft", "--restart"))


# ---------------------------------------------------------------- seeds: one student each, in parallel processes


def test_seeds_train_in_parallel_processes_as_they_would_one_after_another(tiny_pipeline):
    """distill.seeds [0, 1] with jobs 0: two `--seed S` child processes; each seed's student equals the one the
    same run trains in this process (jobs 1), and the run's summary holds both final-epoch accuracies."""
    params = tiny_pipeline
    params["distill"].update(epochs=1, seeds=[0, 1])
    params["distill"]["runs"] = {"par": {"method": "kd", "jobs": 0}, "seq": {"method": "kd", "jobs": 1}}
    write_params(params)
    par = run("--run", "par")
    assert par.exit_code == 0, par.output
    assert "in 2 processes at once" in par.output
    assert run("--run", "seq").exit_code == 0
    for seed in (0, 1):
        a = torch.load(paths.student_checkpoint("par", seed), weights_only=False)
        b = torch.load(paths.student_checkpoint("seq", seed), weights_only=False)
        assert a["finished"] and a["identity"]["distill"]["seed"] == seed
        for k, v in b["student"].items():  # one thread each side here; float tolerance for more cores
            torch.testing.assert_close(a["student"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    first, second = (torch.load(paths.student_checkpoint("par", s), weights_only=False)["student"] for s in (0, 1))
    assert any(not torch.equal(first[k], second[k]) for k in first)  # the seeds do differ
    summary = json.loads(paths.student_metrics("par").read_text())
    assert summary["seeds"] == [0, 1] and summary["finished"] and len(summary["per_seed"]) == 2
    accs = [m["test_acc"] for m in summary["per_seed"]]
    assert summary["test_acc"] == accs and abs(summary["test_acc_mean"] - sum(accs) / 2) < 1e-12


def test_a_failing_seed_process_ends_the_stage_in_one_line(tiny_pipeline):
    """Seed 1's student.init is missing: its child fails, the stage stops and says why in one line."""
    params = tiny_pipeline
    params["distill"].update(epochs=1, seeds=[0, 1])
    params["distill"]["runs"] = {"scratch": {"method": "scratch", "seeds": [0]},
                                 "ft": {"method": "kd", "student": {"init": "data/student/scratch/seed{seed}.pt"}}}
    write_params(params)
    assert run("--run", "scratch").exit_code == 0
    line = ends_in_one_error_line(run("--run", "ft"))
    assert "ft seed 1 failed" in line and "data/student/scratch/seed1.pt not found" in line


def test_a_params_seed_key_is_refused_in_one_line(tiny_pipeline):
    params = tiny_pipeline
    params["distill"]["seed"] = 3
    write_params(params)
    assert "write seeds: [3] instead" in one_line_error(run())
    del params["distill"]["seed"]
    params["distill"]["runs"] = {"a": {"method": "kd", "seed": 1}}
    write_params(params)
    assert "distill.runs.a sets `seed`" in one_line_error(run("--run", "a"))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from Linux /proc")
def test_killing_the_stage_kills_its_seed_processes_and_each_seed_resumes(tiny_pipeline):
    """SIGKILL on the stage (no handler runs) still ends its two seed children (PR_SET_PDEATHSIG), so nothing keeps
    writing the checkpoints; the rerun resumes each seed after its last finished epoch."""
    import os
    import signal
    import subprocess
    import sys
    import time

    params = tiny_pipeline
    params["distill"].update(epochs=400, seeds=[0, 1])  # long enough to be killed midway
    write_params(params)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stage = subprocess.Popen([sys.executable, "-m", "stages.distill", "--method", "kd", "--quiet"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def alive(pid: int) -> bool:  # a killed child may linger as a zombie until something reaps it
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def children() -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == stage.pid:
                found.append(int(stat.parent.name))
        return found

    deadline = time.time() + 120
    while time.time() < deadline and not all(paths.student_seed_metrics("kd", s).is_file() for s in (0, 1)):
        time.sleep(0.2)
    kids = children()
    assert len(kids) == 2 and all(paths.student_seed_metrics("kd", s).is_file() for s in (0, 1))
    stage.send_signal(signal.SIGKILL)
    stage.wait()
    def locked(seed: int) -> bool:  # the seed's writer lock is still held by a process (or one of its threads)
        import fcntl

        with open(paths.student_lock("kd", seed), "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    # a killed process shows as a zombie while its other threads still exit (a loaded CI machine): until the last
    # thread is gone its files, and so the lock, stay open; the rerun waits for that, as a user would
    deadline = time.time() + 20
    while time.time() < deadline and (any(alive(pid) for pid in kids) or any(locked(s) for s in (0, 1))):
        time.sleep(0.2)
    assert not any(alive(pid) for pid in kids) and not any(locked(s) for s in (0, 1))
    done = {s: torch.load(paths.student_checkpoint("kd", s), weights_only=False)["epoch"] for s in (0, 1)}
    assert all(0 < e < 400 for e in done.values())
    resumed = run("--method", "kd", "--seed", "0")
    assert resumed.exit_code == 0 and f"resuming after epoch {done[0]}" in resumed.output, resumed.output


# ---------------------------------------------------------------- shuffle: chunks (targets larger than memory)


def test_the_chunk_order_is_a_seeded_permutation_whose_windows_are_whole_chunks():
    from pipeline.training import epoch_order

    n, r, w = 1000, 64, 3
    uniform = torch.randperm(n, generator=torch.Generator().manual_seed(5 * 100_003 + 2))
    assert torch.equal(epoch_order(5, 2, n), uniform)  # block 0: the order of before, bit for bit
    order = epoch_order(5, 2, n, r, w)
    assert torch.equal(order.sort().values, torch.arange(n)) and torch.equal(order, epoch_order(5, 2, n, r, w))
    assert not torch.equal(order, epoch_order(5, 3, n, r, w))
    pos, windows = 0, 0
    while pos < n:  # each window: every sample of `w` whole chunks (the last chunk, 1000 - 960 rows, is short)
        start, seen = pos, set()
        while True:
            seen.add(int(order[pos]) // r)
            pos += 1
            assert len(seen) <= w
            if pos - start == sum(min(n, (k + 1) * r) - k * r for k in seen) and (len(seen) == w or pos == n):
                break
        windows += 1
    assert windows == -(-(-(-n // r)) // w)
    first = order[:w * r]
    assert not torch.equal(first, first.sort().values)  # shuffled within the window


def chunk_reads_setup(n=1000, r=64, window=3, batch=50, world=None):
    import numpy as np

    from pipeline.cache.slabs import ArraySlabs, CachedTargets
    from pipeline.dist import World
    from pipeline.distill import Trainer, epoch_reads, order_of

    rng = np.random.default_rng(0)
    arrays = [{"logits": rng.standard_normal((n, 2, 10)).astype(np.float16),
               "b1": rng.standard_normal((n, 2, 4)).astype(np.float16)} for _ in range(2)]
    cfg = DistillConfig(shuffle="chunks", shuffle_window=window, batch_size=batch, epochs=3)
    data = TrainSet(None, torch.zeros(n, dtype=torch.int64), np.zeros((n, 2, 5), np.int16), None, (0.0,), (1.0,),
                    chunk_rows=r)
    tr = Trainer(None, cfg, None, None, None, None, torch.device("cpu"), None, None, world or World())
    source = ArraySlabs(["a", "b"], arrays, ["b1"], chunk_rows=r)
    loader = SlabLoader(source, (0,), torch.device("cpu"), by_chunk=True)
    return arrays, cfg, data, tr, loader, CachedTargets(loader), epoch_reads, order_of


def test_reading_by_parts_gives_each_step_its_targets_reading_each_chunk_once_in_bounded_memory():
    """shuffle: chunks: every step gets exactly the whole view's targets for its samples, each cache chunk is read
    once per epoch (the chunks a part shares with the next are kept), and no slab holds more than a window and a
    batch of rows, whatever N."""
    from pipeline.dist import World, shard

    n, r, window, batch = 1000, 64, 3, 50
    arrays, cfg, data, tr, loader, targets, epoch_reads, order_of = chunk_reads_setup(n, r, window, batch)
    for epoch in range(3):
        view = epoch % 2
        targets.start_epoch(epoch_reads(tr, epoch, data))
        order, held = order_of(cfg, epoch, data), 0
        for i in range(-(-n // batch)):
            targets.at_step(i)
            idx = order[i * batch:(i + 1) * batch]
            got = targets(idx, None, [0, 1])
            for k in range(2):
                assert torch.equal(got.logits[k].half(), torch.from_numpy(arrays[k]["logits"][idx.numpy(), view]))
                assert torch.equal(got.blocks[0][k].half(), torch.from_numpy(arrays[k]["b1"][idx.numpy(), view]))
            held = max(held, targets.slab.rows.shape[1])
            assert len(loader.kept) <= 2 * window + 1
        assert held <= window * r + batch
    assert loader.chunk_reads == 3 * -(-n // r)  # each chunk once an epoch (epoch 2 read nothing ahead)
    loader.close()
    # under torchrun a rank's parts hold only its shares, with the same targets
    _, _, _, tr1, loader1, mine, _, _ = chunk_reads_setup(n, r, window, batch, World(1, 2))
    mine.start_epoch(epoch_reads(tr1, 1, data))
    order = order_of(cfg, 1, data)
    for i in range(-(-n // batch)):
        mine.at_step(i)
        idx = shard(order[i * batch:(i + 1) * batch], World(1, 2))
        assert torch.equal(mine(idx, None, [1]).logits[0].half(), torch.from_numpy(arrays[1]["logits"][idx.numpy(), 1]))
        assert mine.slab.rows.shape[1] <= (window * r + batch) // 2 + 1
    loader1.close()


def test_student_init_takes_a_plain_weights_file_made_elsewhere(tmp_path):
    """MEAL V2 starts from a pretrained student: student.init may be a state dict (wrapped, DDP-prefixed, as
    training scripts leave them) or a safetensors file, checked key by key; a file of another model is one line."""
    from safetensors.torch import save_file

    from pipeline.distill import load_student_init
    from pipeline.models import build_model

    torch.manual_seed(1)
    trained = build_model("student_cnn", 10, 1, width=0.25)
    state = {f"module.{k}": v for k, v in trained.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp_path / "w.safetensors"))
    kwargs = {"num_classes": 10, "in_channels": 1, "width": 0.25}
    for name in ("w.pth", "w.safetensors"):
        torch.manual_seed(2)
        student = build_model("student_cnn", 10, 1, width=0.25)
        sha = load_student_init(student, "student_cnn", str(tmp_path / name), kwargs)
        assert len(sha) == 64 and all(torch.equal(a, b) for a, b in zip(student.state_dict().values(),
                                                                          trained.state_dict().values()))
    torch.save(build_model("student_cnn", 10, 1, width=0.5).state_dict(), tmp_path / "other.pth")
    with pytest.raises(UserError, match="does not fit student_cnn: .*mis-shaped"):
        load_student_init(build_model("student_cnn", 10, 1, width=0.25), "student_cnn", str(tmp_path / "other.pth"),
                          kwargs)
