"""Evaluation: students against their teachers and the true ensemble, on accuracy, fidelity, calibration and cost.

    check_checkpoints()        refuse missing, unfinished or mismatched checkpoints before any work
    evaluate_models()          every teacher, the true ensemble, every student run over its seeds: one `Row` each
    classification_metrics()   top-1 accuracy, NLL, expected calibration error, per-class accuracy
    fidelity()                 agreement with the ensemble's top-1 and KL(ensemble || model)
    model_cost()               parameters, FLOPs per image, CPU latency (batch 1) and throughput (batch 256)
    metrics_payload()          metrics/evaluate.json: teachers, ensemble, runs with their seed means and spread

The true ensemble averages the teachers' probabilities (not logits) and costs what running every
teacher costs: its parameters, FLOPs and latency are the sums over the teachers, its throughput the
harmonic combination (images/s when the teachers run one after another). Timing runs on the CPU in
fp32 eval mode whatever device computed the accuracies, so numbers compare across machines of one
kind; each timing is the median of a few repeats after untimed warm-up forwards. A student run is
trained once per seed: every seed is evaluated, its cost measured once (on the run's first seed: the
seeds share the architecture) and the run reported as the mean and sample std over its seeds.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pipeline.checkpoints import check_fits_data, load_checkpoint
from pipeline.models import load_teacher
from pipeline.config import UserError, check
from pipeline.data import ImageData
from pipeline.models import build_model, count_parameters
from pipeline.training import predict_logits


@dataclass
class EvaluateConfig:
    # distill runs to evaluate; [] = every run under distill.runs (or every method name when there are no
    # runs) with checkpoints, the others skipped with a message. A listed run must have one per seed.
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
    """One evaluated model (a teacher, the ensemble) or one student run over its seeds."""

    name: str  # teacher name, "ensemble", or distill run name
    kind: str  # teacher | ensemble | student
    arch: str  # architecture (ensemble: the members' joined with '+')
    method: str | None  # distillation method of a student (scratch included); None otherwise
    metrics: dict[str, Any]  # accuracy, nll, ece, per_class_accuracy, top1 (%), agreement (%), kl; students: seed means
    cost: dict[str, float]  # params, flops, latency_ms, throughput
    seeds: list[dict[str, Any]] = field(default_factory=list)  # students: one metrics dict per seed, in seed order


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


def top1(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent of scores (N, C) (logits, probabilities or their logs)."""
    return percent(scores.argmax(1) == labels)


def percent(hits: torch.Tensor) -> float:
    """100 x the share of True in `hits` (N,), as hits * 100 / N: 8943 of 10000 is 89.43, not 89.42999999999999."""
    return int(hits.sum().item()) * 100 / hits.numel()


def ensemble_probs(probs: list[torch.Tensor]) -> torch.Tensor:
    """The true ensemble: the mean of the members' probabilities, (k x (N, C)) -> (N, C)."""
    return torch.stack(probs).mean(0)


def ensemble_log_probs(log_probs: list[torch.Tensor]) -> torch.Tensor:
    """log of the true ensemble's probabilities from the members' log-probabilities, (k x (N, C)) -> (N, C):
    log mean_i p_i = logsumexp_i log p_i - log k, exact where a probability underflows."""
    return torch.logsumexp(torch.stack(log_probs), 0) - math.log(len(log_probs))


# ---------------------------------------------------------------- fidelity to the ensemble


def fidelity(log_probs: torch.Tensor, reference: torch.Tensor | None) -> dict[str, float | None]:
    """How closely a model follows a reference (the true ensemble), both given as log-probabilities (N, C).

    agreement: percent of images where the two top-1 classes are the same; kl: the mean over images of
    KL(reference || model) = sum_c p_ref (log p_ref - log p_model), in nats (terms with p_ref = 0 add 0).
    Both None without a reference (fewer than two distill teachers: no ensemble).
    """
    if reference is None:
        return {"agreement": None, "kl": None}
    agreement = percent(log_probs.argmax(1) == reference.argmax(1))
    ref_log, log_probs = reference.double(), log_probs.double()
    ref = ref_log.exp()  # (N, C)
    terms = torch.where(ref > 0, ref * (ref_log - log_probs), torch.zeros_like(ref))  # (N, C)
    return {"agreement": agreement, "kl": terms.sum(1).mean().item()}


def gap_closed(student_top1: float, scratch_top1: float | None, ensemble_top1: float | None) -> float | None:
    """The share of the scratch -> ensemble accuracy gap a student closes: (top1 - scratch) / (ensemble - scratch).

    0 for the scratch student, 1 for a student as accurate as the ensemble (negative below scratch). None
    without a scratch run or an ensemble, or when the two are equally accurate (there is no gap).
    """
    if scratch_top1 is None or ensemble_top1 is None or ensemble_top1 == scratch_top1:
        return None
    if student_top1 == scratch_top1:  # exactly 0.0, not -0.0 (an ensemble below scratch: a negative denominator)
        return 0.0
    return (student_top1 - scratch_top1) / (ensemble_top1 - scratch_top1)


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


def check_checkpoints(teachers: dict[str, Path], students: dict[str, dict[int, Path]], train: ImageData,
                      commands: dict[str, str] | None = None) -> None:
    """Refuse, before any work, a checkpoint that is missing, unfinished, or made for other data.

    `students` maps a run to its checkpoint per seed; `commands` a run to the command that trains it
    (default `python -m stages.distill --run RUN`). A model trained on another training split than the
    `data` params give (other dataset, limit, validation carve-out) would be compared unfairly, and one
    with another class count cannot be.
    """
    commands = commands or {}
    found = [("teacher", path, f"python -m stages.pretrain --teacher {name}") for name, path in teachers.items()]
    for run, seeds in students.items():
        command = commands.get(run, f"python -m stages.distill --run {run}")
        found += [("student", path, command) for path in seeds.values()]
    for kind, path, command in found:
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


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0.0 for a single value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def seed_mean(seeds: list[dict[str, Any]], key: str) -> float | None:
    """The mean of `key` over the seeds, None when any seed has none (no ensemble to compare with)."""
    values = [s[key] for s in seeds]
    return None if any(v is None for v in values) else statistics.mean(values)


def run_metrics(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's metrics over its seeds: means of every per-seed number, the spread of top-1, per-class means."""
    top1_mean, top1_std = mean_std([s["top1"] for s in seeds])
    per_class = [None if any(v is None for v in column) else statistics.mean(column)
                 for column in zip(*(s["per_class_accuracy"] for s in seeds))]  # a class absent from the split: None
    return {"top1_mean": top1_mean, "top1_std": top1_std, "agreement_mean": seed_mean(seeds, "agreement"),
            "kl_mean": seed_mean(seeds, "kl"), **{k: seed_mean(seeds, k) for k in ("accuracy", "nll", "ece")},
            "per_class_accuracy": per_class}


def evaluate_models(
    teachers: dict[str, Path],
    members: list[str],
    students: dict[str, dict[int, Path]],
    test: ImageData,
    cfg: EvaluateConfig,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Rows for every teacher, the true ensemble of `members` (a subset of the teachers), every student run.

    `students` maps a run to its checkpoint per seed. Models are loaded one at a time; only the members'
    test log-probabilities (N, C) are kept, for the ensemble and the students' fidelity to it.
    Call `check_checkpoints` first: this assumes every checkpoint is there, finished and fits the data.
    """
    image_shape = tuple(test.view_shape)  # (C, H, W) of what the models see
    rows: list[Row] = []
    member_log_probs, member_costs = [], []

    def predict(model: nn.Module) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = predict_logits(model, test, device, cfg.batch_size)  # (N, C) float32 on the CPU
        metrics = {**classification_metrics(F.softmax(logits, dim=1), test.labels, cfg.ece_bins),
                   "top1": top1(logits, test.labels)}
        return F.log_softmax(logits.double(), dim=1), metrics  # double: KL of near-equal distributions

    def describe(cost: dict[str, float]) -> str:
        return (f"{cost['params']:,} params  {cost['flops'] / 1e6:.2f} MFLOPs  {cost['latency_ms']:.3f} ms  "
                f"{cost['throughput']:.0f} img/s")

    teacher_log_probs = {}
    for name, path in teachers.items():
        model, ckpt = load_teacher(path, device)
        teacher_log_probs[name], metrics = predict(model)
        cost = model_cost(model, image_shape, cfg)
        rows.append(Row(name, "teacher", ckpt["arch"], None, metrics, cost))
        log(f"{name}: top-1 {metrics['top1']:.2f} %  nll {metrics['nll']:.4f}  ece {metrics['ece']:.4f}  "
            f"{describe(cost)}")
        if name in members:
            member_log_probs.append(teacher_log_probs[name])
            member_costs.append(cost)
        del model

    reference = None  # the ensemble's log-probabilities (N, C): what fidelity compares with
    if len(member_log_probs) == 1:
        log(f"ensemble: one teacher ({members[0]}) is no ensemble, skipped (so is the students' fidelity)")
    if len(member_log_probs) > 1:
        reference = ensemble_log_probs(member_log_probs)
        metrics = {**classification_metrics(reference.exp(), test.labels, cfg.ece_bins),
                   "top1": top1(reference, test.labels)}
        arch = "+".join(r.arch for r in rows if r.kind == "teacher" and r.name in members)
        rows.append(Row("ensemble", "ensemble", arch, None, metrics, ensemble_cost(member_costs)))
        log(f"ensemble of {', '.join(members)}: top-1 {metrics['top1']:.2f} %  nll {metrics['nll']:.4f}  "
            f"ece {metrics['ece']:.4f}")
    for row in rows:  # a teacher's own fidelity to the ensemble: what a student's is measured against
        if row.kind == "teacher":
            row.metrics.update(fidelity(teacher_log_probs[row.name], reference))
    del teacher_log_probs, member_log_probs

    for run, checkpoints in students.items():
        seeds, cost, arch, method = [], None, None, None
        for seed, path in checkpoints.items():
            model, ckpt = load_student(path, device)
            log_probs, metrics = predict(model)
            metrics.update(fidelity(log_probs, reference))
            seeds.append({"seed": seed, **metrics})
            if cost is None:  # the seeds share the architecture: measured once, on the first
                cost, arch, method = model_cost(model, image_shape, cfg), ckpt["arch"], ckpt.get("method")
            fid = "" if reference is None else f"  agreement {metrics['agreement']:.2f} %  kl {metrics['kl']:.4f}"
            log(f"{run} seed {seed}: top-1 {metrics['top1']:.2f} %{fid}  nll {metrics['nll']:.4f}  "
                f"ece {metrics['ece']:.4f}")
            del model
        row = Row(run, "student", arch, method, run_metrics(seeds), cost, seeds)
        rows.append(row)
        log(f"{run}: top-1 {row.metrics['top1_mean']:.2f} +- {row.metrics['top1_std']:.2f} % over "
            f"{len(seeds)} seed(s)  {describe(cost)}")
    return rows


def scratch_reference(rows: list[Row]) -> str | None:
    """The run gap_closed is measured from: the one named "scratch", else the first whose method is scratch."""
    runs = [r for r in rows if r.kind == "student"]
    named = [r.name for r in runs if r.name == "scratch"] + [r.name for r in runs if r.method == "scratch"]
    return named[0] if named else None


def metrics_payload(rows: list[Row], test: ImageData, cfg: EvaluateConfig, members: list[str]) -> dict[str, Any]:
    """metrics/evaluate.json: numbers per model (`dvc metrics show` lists the scalars, skips the lists).

    Teachers and the ensemble: top1 (%), accuracy, nll, ece (fractions, nats), cost, per-class accuracy;
    teachers also their agreement (%) and kl to the ensemble. A student run: top1_mean and top1_std (%, sample
    std over seeds), agreement_mean (%), kl_mean (nats), gap_closed_mean, accuracy / nll / ece as seed means,
    its cost (first seed), per-class accuracy (seed means) and `seeds`, one entry per seed.
    """
    by_name = {r.name: r for r in rows if r.kind == "student"}
    reference = scratch_reference(rows)
    ensemble = [r for r in rows if r.kind == "ensemble"]
    scratch_top1 = by_name[reference].metrics["top1_mean"] if reference else None
    ensemble_top1 = ensemble[0].metrics["top1"] if ensemble else None

    def entry(row: Row, keys: tuple[str, ...]) -> dict[str, Any]:
        return {"arch": row.arch, **{k: row.metrics[k] for k in keys}, **row.cost,
                "per_class_accuracy": row.metrics["per_class_accuracy"]}

    def student(row: Row) -> dict[str, Any]:
        m = row.metrics
        return {"arch": row.arch, "method": row.method,
                **{k: m[k] for k in ("top1_mean", "top1_std", "agreement_mean", "kl_mean")},
                "gap_closed_mean": gap_closed(m["top1_mean"], scratch_top1, ensemble_top1),
                **{k: m[k] for k in ("accuracy", "nll", "ece")}, **row.cost,
                "seeds": [{k: s[k] for k in ("seed", "top1", "agreement", "kl", "nll", "ece")} for s in row.seeds],
                "per_class_accuracy": m["per_class_accuracy"]}

    payload: dict[str, Any] = {
        "dataset": test.name,
        "split": test.split,
        "num_samples": len(test),
        "classes": list(test.classes),
        "timing": {"device": "cpu", "threads": cfg.threads or torch.get_num_threads(),
                   "latency_batch": cfg.latency_batch, "throughput_batch": cfg.throughput_batch,
                   "repeats": cfg.repeats},
        "ece_bins": cfg.ece_bins,
        "scratch_reference": reference,  # the run gap_closed_mean is measured from (None: no scratch run)
        "teachers": {r.name: entry(r, ("top1", "accuracy", "nll", "ece", "agreement", "kl"))
                     for r in rows if r.kind == "teacher"},
    }
    if ensemble:
        payload["ensemble"] = {**entry(ensemble[0], ("top1", "accuracy", "nll", "ece")), "members": members}
    payload["students"] = {r.name: student(r) for r in rows if r.kind == "student"}
    return payload
