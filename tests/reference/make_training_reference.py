"""Writes tests/reference/training_reference.pt: a few training steps of every method and game, made
with the code at commit 6d329f2 (before the one-method-one-module refactor), the oracle that
tests/test_training_reference.py holds the refactored step to.

    python tests/reference/make_training_reference.py      # only at 6d329f2: the API it calls is gone since

Each case: a width-0.25 student_cnn (dropout as the stage sets it), seeded batches of 16 Fashion-MNIST-
shaped images, seeded fake targets of three teachers, `STEPS` steps of the production step (the
closed-form CPU step where it applied). Stored: the stat names and the last step's stats, and every
student and discriminator weight after the last step.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from pipeline.align import AlignConfig
from pipeline.config import build
from pipeline.distill import build_run, train_step
from pipeline.methods import DistillConfig, Targets, make_plan, method_configs
from pipeline.models import build_model

TEACHERS = ["t1", "t2", "t3"]
ALIGN = AlignConfig("channel", 8)
STEPS = 4
CASES = {
    "meal": ("meal", {"logit_similarity": "kl", "temperature": 4.0}),
    "meal_l2": ("meal", {}),
    "meal_weighted": ("meal", {"logit_similarity": "kl", "temperature": 2.0, "similarity": "l1", "logit_weight": 0.5,
                               "block_weights": [0.0, 2.0, 1.0], "ce_weight": 0.3}),
    "meal_sgd_d": ("meal", {"d_optimizer": "sgd", "d_weight_decay": 1e-3, "adv_weight": 0.5}),
    "meal_reversal": ("meal", {"adversarial": "reversal"}),
    "meal_coop": ("meal", {"adversarial": "cooperative", "logit_similarity": "kl", "temperature": 4.0}),
    "meal_none": ("meal", {"adversarial": "none", "similarity": "kl", "block_weights": [1.0, 0.0, 0.5], "ce_weight": 0.5}),
    "meal_v2": ("meal_v2", {}),
    "meal_v2_logits": ("meal_v2", {"d_input": "logits", "temperature": 2.0}),
    "meal_v2_reversal": ("meal_v2", {"adversarial": "reversal"}),
    "meal_v2_coop": ("meal_v2", {"adversarial": "cooperative"}),
    "meal_v2_none": ("meal_v2", {"adversarial": "none"}),
    "anc": ("anc", {}),
    "anc_reversal": ("anc", {"adversarial": "reversal", "teacher": "mean"}),
    "anc_coop": ("anc", {"adversarial": "cooperative", "teacher": "t2"}),
    "kd": ("kd", {}),
    "kd_named": ("kd", {"teacher": "t3", "temperature": 2.0, "alpha": 0.5}),
    "scratch": ("scratch", {"label_smoothing": 0.1}),
}


def batches(steps: int = STEPS):
    """The seeded inputs of every case: (x (16, 1, 28, 28) channels_last, y (16,), every teacher's targets)."""
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 1, 28, 28, generator=g).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (16,), generator=g)
        yield x, y, torch.randn(3, 16, 10, generator=g) * 2, torch.rand(3, 3, 16, 8, generator=g) * 2


def run_case(method: str, values: dict) -> dict:
    torch.manual_seed(0)
    cfg = build(DistillConfig, {"method": method, "lr": 0.2, method: values}, "distill")
    opts = method_configs(cfg, TEACHERS)[method]
    plan = make_plan(method, opts, TEACHERS)
    student = build_model("student_cnn", 10, 1, width=0.25, dropout=opts.dropout if method == "anc" else 0.0)
    run = build_run(plan, cfg, student, 10, ALIGN, torch.device("cpu"))
    rng = random.Random(0)
    for x, y, logits, blocks in batches():
        picked = plan.pick(rng)
        tgt = Targets(logits[picked], blocks[picked][:, list(plan.feature_blocks)]) if picked else None
        names, stats = train_step(run, x, y, tgt)
    params = {f"student.{k}": v for k, v in run.student.named_parameters()}
    if run.discs is not None:  # one flat parameter: store it per layer, which any layout can compare to
        for i, (w, b) in enumerate(run.discs.layers()):
            params[f"disc.w{i}"], params[f"disc.b{i}"] = w, b
    return {"names": names, "stats": stats.detach().clone(), "params": {k: v.detach().clone() for k, v in params.items()}}


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = {name: run_case(method, values) for name, (method, values) in CASES.items()}
    path = Path(__file__).with_name("training_reference.pt")
    torch.save({"commit": "6d329f2", "cases": {k: (CASES[k][0], CASES[k][1]) for k in CASES}, "results": out}, path)
    print(f"{len(out)} cases -> {path} ({path.stat().st_size:,} bytes)")
