"""Evaluation: students against their teachers and the true ensemble, on accuracy, calibration and cost.

    check_checkpoints()        refuse missing, unfinished or mismatched checkpoints before any work
    evaluate_models()          every teacher, the true ensemble, every student: one `Row` each
    classification_metrics()   top-1 accuracy, NLL, expected calibration error, per-class accuracy
    model_cost()               parameters, FLOPs per image, CPU latency (batch 1) and throughput (batch 256)

The true ensemble averages the teachers' probabilities (not logits) and costs what running every
teacher costs: its parameters, FLOPs and latency are the sums over the teachers, its throughput the
harmonic combination (images/s when the teachers run one after another). Timing runs on the CPU in
fp32 eval mode whatever device computed the accuracies, so numbers compare across machines of one
kind; each timing is the median of a few repeats after untimed warm-up forwards.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pipeline.checkpoints import check_fits_data, load_checkpoint, load_teacher
from pipeline.config import UserError, check
from pipeline.data import ImageData
from pipeline.models import build_model, count_parameters
from pipeline.pretraining import predict_logits


@dataclass
class EvaluateConfig:
    # distill runs to evaluate; [] = every run under distill.runs (or every method name when there are no
    # runs) whose checkpoint exists, the others skipped with a message. A listed run must have one.
    runs: list[str] = field(default_factory=list)
    batch_size: int = 1024  # images per forward pass for the accuracy metrics
    ece_bins: int = 15  # equal-width confidence bins of the expected calibration error
    latency_batch: int = 1  # images per forward when timing latency (reported per image)
    throughput_batch: int = 256  # images per forward when timing throughput (images/s)
    warmup: int = 2  # untimed forwards before each timing (allocator, caches, lazy init)
    repeats: int = 5  # timed repeats per measurement; the median is reported
    latency_iters: int = 10  # forwards per latency repeat (a repeat's value is their mean)
    throughput_iters: int = 1  # forwards per throughput repeat
    threads: int = 0  # CPU threads while timing; 0 = the process setting (all cores unless OMP_NUM_THREADS)

    def __post_init__(self) -> None:
        check(len(set(self.runs)) == len(self.runs), f"evaluate.runs = {self.runs} lists a run twice")
        for key in ("batch_size", "ece_bins", "latency_batch", "throughput_batch", "repeats", "latency_iters",
                    "throughput_iters"):
            check(getattr(self, key) >= 1, f"evaluate.{key} = {getattr(self, key)} must be at least 1")
        check(self.warmup >= 0, f"evaluate.warmup = {self.warmup} must be >= 0")
        check(self.threads >= 0, f"evaluate.threads = {self.threads} must be >= 0 (0 = the process setting)")


@dataclass
class Row:
    """One evaluated model: what it is, how good, how costly."""

    name: str  # teacher name, "ensemble", or distill run name
    kind: str  # teacher | ensemble | student
    arch: str  # architecture (ensemble: the members' joined with '+')
    method: str | None  # distillation method of a student (scratch included); None otherwise
    metrics: dict[str, Any]  # accuracy, nll, ece, per_class_accuracy
    cost: dict[str, float]  # params, flops, latency_ms, throughput


# ---------------------------------------------------------------- accuracy and calibration


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): sum over equal-width confidence bins of |accuracy - mean confidence| x bin share.

    probs (N, C) rows summing to 1, labels (N,). Confidence is the top probability; bin b holds
    confidences in (b/bins, (b+1)/bins].
    """
    conf, pred = probs.max(1)  # (N,), (N,)
    correct = (pred == labels).double()
    index = (torch.ceil(conf.double() * bins).long() - 1).clamp(0, bins - 1)  # (N,)
    conf_sum = torch.bincount(index, weights=conf.double(), minlength=bins)  # (bins,)
    correct_sum = torch.bincount(index, weights=correct, minlength=bins)
    return float((conf_sum - correct_sum).abs().sum() / max(1, len(labels)))


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    """Accuracy within each true class (None for a class absent from `labels`)."""
    total = torch.bincount(labels, minlength=num_classes)  # (C,)
    hits = torch.bincount(labels[pred == labels], minlength=num_classes)  # (C,)
    return [hits[c].item() / total[c].item() if total[c] > 0 else None for c in range(num_classes)]


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict[str, Any]:
    """Top-1 accuracy (fraction), NLL (nats), ECE (fraction) and per-class accuracy of probs (N, C)."""
    pred = probs.argmax(1)  # (N,)
    picked = probs.gather(1, labels[:, None]).squeeze(1)  # (N,) probability of the true class
    return {
        "accuracy": (pred == labels).float().mean().item(),
        "nll": -picked.double().clamp_min(1e-12).log().mean().item(),
        "ece": expected_calibration_error(probs, labels, bins),
        "per_class_accuracy": per_class_accuracy(pred, labels, probs.shape[1]),
    }


def ensemble_probs(probs: list[torch.Tensor]) -> torch.Tensor:
    """The true ensemble: the mean of the members' probabilities, (k x (N, C)) -> (N, C)."""
    return torch.stack(probs).mean(0)


# ---------------------------------------------------------------- cost


def count_flops(model: nn.Module, image_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward of one image (C, H, W), as torch's FlopCounterMode counts them.

    A multiply-add is 2 FLOPs (nn.Linear(i, o): 2 i o); only matmuls and convolutions count, so
    BatchNorm, activations, pooling and biases add nothing.
    """
    model.eval()
    x = torch.zeros(1, *image_shape)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return int(counter.get_total_flops())


def time_forward(model: nn.Module, x: torch.Tensor, warmup: int, repeats: int, iters: int) -> float:
    """Median over `repeats` of the mean wall time of `iters` forwards of x, in seconds."""
    model.eval()
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(iters):
                model(x)
            times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def model_cost(model: nn.Module, image_shape: tuple[int, ...], cfg: EvaluateConfig) -> dict[str, float]:
    """Parameters, FLOPs per image, CPU latency per image (ms) and throughput (images/s) of a model."""
    model = model.float().cpu().eval()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        g = torch.Generator().manual_seed(0)
        small = torch.randn(cfg.latency_batch, *image_shape, generator=g)  # (b, C, H, W)
        big = torch.randn(cfg.throughput_batch, *image_shape, generator=g)  # (B, C, H, W)
        latency = time_forward(model, small, cfg.warmup, cfg.repeats, cfg.latency_iters) / cfg.latency_batch
        throughput = cfg.throughput_batch / time_forward(model, big, cfg.warmup, cfg.repeats, cfg.throughput_iters)
    finally:
        torch.set_num_threads(threads)
    return {
        "params": count_parameters(model),
        "flops": count_flops(model, image_shape),
        "latency_ms": latency * 1e3,
        "throughput": throughput,
    }


def ensemble_cost(costs: list[dict[str, float]]) -> dict[str, float]:
    """Running every member: summed parameters, FLOPs and latency; throughput 1 / sum of 1 / throughput."""
    return {
        "params": sum(c["params"] for c in costs),
        "flops": sum(c["flops"] for c in costs),
        "latency_ms": sum(c["latency_ms"] for c in costs),
        "throughput": 1.0 / sum(1.0 / c["throughput"] for c in costs),
    }


# ---------------------------------------------------------------- loading the models


def check_checkpoints(teachers: dict[str, Path], students: dict[str, Path], train: ImageData) -> None:
    """Refuse, before any work, a checkpoint that is missing, unfinished, or made for other data.

    A model trained on another training split than the `data` params give (other dataset, limit,
    validation carve-out) would be compared unfairly, and one with another class count cannot be.
    """
    found = [("teacher", name, path, f"python -m stages.pretrain --teacher {name}") for name, path in teachers.items()]
    found += [("student", run, path, f"python -m stages.distill --run {run}") for run, path in students.items()]
    for kind, name, path, command in found:
        what = f"{kind} checkpoint"
        ckpt = load_checkpoint(path, what, f"run {command} first")
        if not ckpt.get("finished", False):
            raise UserError(f"{what} {path} is from an unfinished run (epoch {ckpt.get('epoch')}): "
                            f"rerun {command} to finish it")
        fingerprint = ckpt.get("dataset_fingerprint") if kind == "teacher" else \
            ckpt.get("identity", {}).get("dataset_fingerprint")
        check_fits_data(what, path, fingerprint, ckpt.get("model_kwargs", {}), train,
                        f"retrain it with {command} --restart")


def load_student(path: Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """A distilled (or scratch) student in eval mode, and its checkpoint dict (see stages.distill)."""
    ckpt = load_checkpoint(path, "student checkpoint")
    model = build_model(ckpt["arch"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["student"])
    model.eval().requires_grad_(False).to(device)
    return model, ckpt


# ---------------------------------------------------------------- the whole comparison


def evaluate_models(
    teachers: dict[str, Path],
    members: list[str],
    students: dict[str, Path],
    test: ImageData,
    cfg: EvaluateConfig,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Rows for every teacher, the true ensemble of `members` (a subset of the teachers), every student.

    Models are loaded one at a time; only their test probabilities (N, C) are kept for the ensemble.
    Call `check_checkpoints` first: this assumes every checkpoint is there, finished and fits the data.
    """
    image_shape = tuple(test.images.shape[1:])  # (C, H, W)
    rows: list[Row] = []
    member_probs, member_costs = [], []

    def add(name: str, kind: str, arch: str, method: str | None, model: nn.Module) -> torch.Tensor:
        probs = F.softmax(predict_logits(model, test, device, cfg.batch_size), dim=1)  # (N, C)
        metrics = classification_metrics(probs, test.labels, cfg.ece_bins)
        cost = model_cost(model, image_shape, cfg)
        rows.append(Row(name, kind, arch, method, metrics, cost))
        log(f"{name}: accuracy {metrics['accuracy']:.4f}  nll {metrics['nll']:.4f}  ece {metrics['ece']:.4f}  "
            f"{cost['params']:,} params  {cost['flops'] / 1e6:.2f} MFLOPs  {cost['latency_ms']:.3f} ms  "
            f"{cost['throughput']:.0f} img/s")
        return probs

    for name, path in teachers.items():
        model, ckpt = load_teacher(path, device)
        probs = add(name, "teacher", ckpt["arch"], None, model)
        if name in members:
            member_probs.append(probs)
            member_costs.append(rows[-1].cost)
        del model

    if len(member_probs) == 1:
        log(f"ensemble: one teacher ({members[0]}) is no ensemble, skipped")
    if len(member_probs) > 1:
        probs = ensemble_probs(member_probs)
        metrics = classification_metrics(probs, test.labels, cfg.ece_bins)
        arch = "+".join(r.arch for r in rows if r.kind == "teacher" and r.name in members)
        rows.append(Row("ensemble", "ensemble", arch, None, metrics, ensemble_cost(member_costs)))
        log(f"ensemble of {', '.join(members)}: accuracy {metrics['accuracy']:.4f}  nll {metrics['nll']:.4f}  "
            f"ece {metrics['ece']:.4f}")

    for run, path in students.items():
        model, ckpt = load_student(path, device)
        add(run, "student", ckpt["arch"], ckpt.get("method"), model)
        del model
    return rows


def metrics_payload(rows: list[Row], test: ImageData, cfg: EvaluateConfig, members: list[str]) -> dict[str, Any]:
    """metrics/evaluate.json: numbers per model (`dvc metrics show` lists the scalars, skips the lists)."""

    def entry(row: Row) -> dict[str, Any]:
        return {**{k: row.metrics[k] for k in ("accuracy", "nll", "ece")}, **row.cost,
                "per_class_accuracy": row.metrics["per_class_accuracy"]}

    payload: dict[str, Any] = {
        "dataset": test.name,
        "split": test.split,
        "num_samples": len(test),
        "classes": list(test.classes),
        "timing": {"device": "cpu", "threads": cfg.threads or torch.get_num_threads(),
                   "latency_batch": cfg.latency_batch, "throughput_batch": cfg.throughput_batch,
                   "repeats": cfg.repeats},
        "teachers": {r.name: entry(r) for r in rows if r.kind == "teacher"},
    }
    ensemble = [r for r in rows if r.kind == "ensemble"]
    if ensemble:
        payload["ensemble"] = {**entry(ensemble[0]), "members": members}
    payload["students"] = {r.name: entry(r) for r in rows if r.kind == "student"}
    return payload
