"""The GPU path's invariants, checked where a GPU is lent (scripts/device_check.sh runs this file there).

Every test needs CUDA and is skipped without it (CI has none). Their CPU twins run everywhere
(test_cache, test_align, test_methods, test_distill); here the same invariants must hold on the GPU
path: bf16 autocast, channels_last, the training split and the epoch's slab resident on the device,
and no host synchronisation inside a training step.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bench.cache_io import fake_teacher, synthetic_data
from helpers import TINY_TEACHERS, build_tiny_pipeline, tiny_distill_params, tiny_targets
from pipeline import paths
from pipeline.align import AlignConfig
from pipeline.augment import apply_views, normalize
from pipeline.cache import CacheConfig, open_cache
from pipeline.cache.write import cache_teacher
from pipeline.config import build
from pipeline.data import DataConfig, load_split
from pipeline.distill import DistillConfig, TrainSet, build_trainer, epoch_steps
from pipeline.methods import make_method, method_configs
from pipeline.models import build_model
from pipeline.cache.slabs import EpochReads, NoTargets
from pipeline.views import ViewsConfig, make_view_plan, open_view_plan
from stages import distill as distill_stage
from test_methods import assert_trains_alike, trained_steps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


def close_to(got: np.ndarray, want: np.ndarray, rel: float) -> bool:
    """Every entry within `rel` of the array's largest magnitude (reduced-precision sums differ entry-wise)."""
    got, want = got.astype(np.float32), want.astype(np.float32)
    return bool(np.abs(got - want).max() <= rel * np.abs(want).max())


# ---------------------------------------------------------------- the cache


@pytest.mark.parametrize("autocast,rel", [(False, 1e-2), (True, 5e-2)])
def test_cache_written_on_cuda_equals_the_cpu_cache(tmp_path, autocast, rel):
    """The cache stage on the GPU (the data resident there, views replayed by batched GPU ops, fp32 with
    TF32 convolutions or bf16 autocast) stores what the CPU stage stores, to that precision."""
    data = synthetic_data(64, seed=0)
    plan = make_view_plan(ViewsConfig(num_views=2), data)
    ckpt = fake_teacher(tmp_path / "t.pt", data, width=0.25, seed=0)
    cfg = CacheConfig(format="zarr", chunk_rows=32, batch_size=40, autocast=autocast)
    cache_teacher(ckpt, tmp_path / "cpu.zarr", plan, data, cfg, "cpu", progress=False)
    cache_teacher(ckpt, tmp_path / "cuda.zarr", plan, data, cfg, CUDA, progress=False)
    with open_cache(tmp_path / "cpu.zarr") as cpu, open_cache(tmp_path / "cuda.zarr") as gpu:
        assert gpu.complete and gpu.attrs["compute"] == ("bf16-autocast" if autocast else "fp32")
        for name in ["logits", *cpu.blocks]:
            got, want = np.asarray(gpu.array(name)[...]), np.asarray(cpu.array(name)[...])
            assert got.shape == want.shape and np.isfinite(got).all(), name
            assert close_to(got, want, rel), name


def test_views_and_normalisation_on_cuda_equal_the_cpu():
    data = synthetic_data(32, seed=1)
    plan = make_view_plan(ViewsConfig(num_views=3), data)
    params = torch.from_numpy(plan.aug[:, 2])
    cpu = normalize(apply_views(data.images, params, plan.augment), data.mean, data.std)
    gpu = normalize(apply_views(data.images.to(CUDA), params.to(CUDA), plan.augment), data.mean, data.std)
    torch.testing.assert_close(gpu.cpu(), cpu)


# ---------------------------------------------------------------- the student's step


@pytest.mark.parametrize("method,values", [("meal", {}), ("meal", {"similarity": "kl", "ce_weight": 0.5}), ("anc", {}),
                                           ("meal_v2", {"adversarial": "reversal"})])
def test_step_on_cuda_trains_as_on_the_cpu(method, values, monkeypatch):
    """bf16 autocast and channels_last on the GPU against the float32 CPU step: within 3% of each weight's scale."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    gpu, cpu = trained_steps(method, values, device="cuda"), trained_steps(method, values)
    assert gpu[0] == cpu[0] and torch.isfinite(gpu[1]).all()
    for k, w in cpu[2].items():
        assert (gpu[2][k] - w).abs().max() <= 3e-2 * w.abs().max(), k


def test_compiled_step_on_cuda_trains_as_eager_does():
    """distill.compile on the GPU (Triton kernels under bf16 autocast) against the eager step."""
    compiled = trained_steps("meal", {}, device="cuda", compile=True)
    assert torch.isfinite(compiled[1]).all()
    assert_trains_alike(compiled, trained_steps("meal", {}, device="cuda"), 2e-2, 2e-3, 2e-3)


@pytest.fixture
def tiny_pipeline(tmp_path, fashion_root, monkeypatch) -> dict:
    """tmp_path as the working directory with the tiny params, teachers, view plan and caches (written on the CPU)."""
    monkeypatch.chdir(tmp_path)
    params = tiny_distill_params(fashion_root, epochs=2, log_every=1)
    build_tiny_pipeline(params)
    return params


def cuda_trainer(params: dict, method: str, options: dict, online: bool = False):
    """(trainer, train set, targets) of `method` with `options` on the GPU, as the distill stage builds them."""
    train = load_split(build(DataConfig, params["data"], "data"), "train")
    views = open_view_plan(paths.view_plan())
    cfg = build(DistillConfig, {**params["distill"], "method": method, method: options}, "distill")
    teachers = [] if method == "scratch" else list(TINY_TEACHERS)
    distiller = make_method(method, method_configs(cfg, teachers)[method], teachers)
    align_cfg = AlignConfig(**params["cache"]["align"])
    targets = tiny_targets(distiller, align_cfg, CUDA, online) if teachers else NoTargets()
    torch.manual_seed(0)
    student = build_model("student_cnn", 10, 1, width=0.25, dropout=0.1)
    trainer = build_trainer(distiller, cfg, student, 10, align_cfg, CUDA)
    data = TrainSet(train.images.to(CUDA), train.labels.to(CUDA), views.aug, views.augment, train.mean, train.std)
    return trainer, data, targets


@pytest.mark.parametrize("method,options", [
    ("meal", {}), ("meal", {"block_weights": [1.0, 0.5, 2.0], "ce_weight": 0.5}), ("meal", {"adversarial": "reversal"}),
    ("meal", {"adversarial": "cooperative"}), ("meal_v2", {}), ("anc", {}), ("kd", {}), ("scratch", {}),
])
def test_training_steps_never_wait_for_the_gpu(tiny_pipeline, method, options):
    """No host synchronisation inside a step (no .item(), no host-to-device copy of a fresh tensor, no
    data-dependent shape): CUDA's sync debug mode turns any into an error. The epoch's setup (its batch
    order and view parameters copied to the device) happens on the first step, before the check."""
    trainer, data, targets = cuda_trainer(tiny_pipeline, method, options)
    targets.start_epoch(EpochReads.whole(0, 1))
    steps = epoch_steps(trainer, 0, data, targets)
    next(steps)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        names, values, _ = next(steps)
        next(steps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert values.device.type == "cuda" and len(names) == len(values) and torch.isfinite(values).all()


def test_cached_targets_on_cuda_equal_the_live_teachers(tiny_pipeline):
    """The epoch's slab pinned and copied to the GPU gives, for a batch, what the teachers compute live
    on the GPU from the same view (the cache was written on the CPU: equal to fp16 rounding and TF32)."""
    _, data, cached = cuda_trainer(tiny_pipeline, "kd", {})
    _, _, online = cuda_trainer(tiny_pipeline, "kd", {}, online=True)
    _, data, cached_meal = cuda_trainer(tiny_pipeline, "meal", {})
    _, _, online_meal = cuda_trainer(tiny_pipeline, "meal", {}, online=True)
    idx = torch.arange(5, 37, device=CUDA)
    params = torch.from_numpy(np.ascontiguousarray(data.aug[:, 1])).to(CUDA)
    x = normalize(apply_views(data.images[idx], params[idx], data.augment), data.mean, data.std)
    x = x.contiguous(memory_format=torch.channels_last)
    for source_c, source_o, picked in ((cached, online, [0, 1]), (cached_meal, online_meal, [1])):
        source_c.start_epoch(EpochReads.whole(1))
        tc, to = source_c(idx, x, picked), source_o(idx, x, picked)
        torch.testing.assert_close(tc.logits, to.logits, rtol=1e-2, atol=1e-2)
        if tc.blocks is not None:
            for a, b in zip(tc.blocks, to.blocks):
                torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
        source_c.close()


@pytest.mark.parametrize("method,extra", [("meal", []), ("meal", ["--online"]), ("meal_v2", []), ("scratch", [])])
def test_distill_stage_runs_on_cuda(tiny_pipeline, method, extra):
    result = CliRunner().invoke(distill_stage.main, ["--quiet", "--device", "cuda", "--method", method, *extra])
    assert result.exit_code == 0, result.output
    name = f"{method}_online" if extra else method
    metrics = json.loads(paths.student_seed_metrics(name, 0).read_text())
    assert metrics["device"] == "cuda" and len(metrics["history"]) == 2
    row = metrics["history"][-1]
    assert np.isfinite(row["loss"]) and 0 <= row["test_acc"] <= 1
    ckpt = torch.load(paths.student_checkpoint(name), weights_only=False)
    assert all(v.device.type == "cpu" for v in ckpt["student"].values())


# ---------------------------------------------------------------- torchrun on GPUs (NCCL)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("stage,args", [("stages.distill", ["--method", "meal"]),
                                        ("stages.cache_teachers", ["--teacher", "t1", "--overwrite"])])
def test_two_gpus_under_torchrun_match_one_gpu(tiny_pipeline, tmp_path, stage, args):
    """2 ranks with NCCL and SyncBatchNorm against 1 GPU: the cache to bf16 rounding, the student to the drift
    of bf16 autocast over a few steps (the CPU twins in test_distributed.py hold to float tolerance)."""
    import shutil
    import subprocess
    from pathlib import Path

    import yaml

    from helpers import torchrun

    params = yaml.safe_load(Path("params.yaml").read_text())
    params["dist"] = {"sync_bn": True}
    params["distill"]["batch_size"] = 25
    Path("params.yaml").write_text(yaml.safe_dump(params))
    one = tmp_path.with_name(tmp_path.name + "_one")
    shutil.copytree(".", one)
    two = torchrun(2, stage, *args, "--device", "cuda", "--quiet")
    assert two.returncode == 0, two.stdout
    single = subprocess.run([sys.executable, "-m", stage, *args, "--device", "cuda", "--quiet"], cwd=one,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert single.returncode == 0, single.stdout
    if stage == "stages.cache_teachers":
        with open_cache(paths.teacher_cache("t1")) as a, open_cache(one / paths.teacher_cache("t1")) as b:
            for name in ["logits", *a.blocks]:
                assert close_to(np.asarray(a.array(name)[...]), np.asarray(b.array(name)[...]), 1e-2), name
        return
    wa = torch.load(paths.student_checkpoint("meal"), weights_only=False)["student"]
    wb = torch.load(one / paths.student_checkpoint("meal"), weights_only=False)["student"]
    for k in wa:
        if wa[k].is_floating_point():
            assert close_to(wa[k].numpy(), wb[k].numpy(), 5e-2), k
