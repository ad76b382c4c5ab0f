"""Evaluation: calibration, FLOPs and ensemble arithmetic on toys; the stage end to end on tiny data.

Setup (`built`, once per module): 96 synthetic 1x28x28 images, two untrained student_cnn (width 0.25)
teachers saved per the contract schema, a view plan with V = 2, both teachers cached, and two named
distill runs (`scratch`, and `meal_coop`: MEAL with the official cooperative game) trained for one
epoch through `stages.distill --run`. Each test works in its own copy of that directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from click.testing import CliRunner

from pipeline import paths
from pipeline.checkpoints import load_checkpoint, save_checkpoint
from pipeline.config import UserError, build
from pipeline.data import DataConfig, load_split
from pipeline.evaluate import (
    EvaluateConfig, classification_metrics, count_flops, ensemble_cost, ensemble_probs,
    expected_calibration_error, model_cost, per_class_accuracy,
)
from pipeline.models import build_model
from pipeline.report import PLOTS
from stages import distill as distill_stage
from stages import evaluate as evaluate_stage
from helpers import TINY_TEACHERS, build_tiny_pipeline, one_line_error, tiny_distill_params

TEACHERS = TINY_TEACHERS
TRAINED_RUNS = ("scratch", "meal_coop")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One intra-op thread: two spinning OpenMP threads on a loaded 2-core machine slow tiny steps a lot."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- metrics on toys


def two_class_probs(confidence: list[float], correct: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """probs (N, 2) predicting class 0 with the given confidence; labels 0 where correct, else 1."""
    conf = torch.tensor(confidence, dtype=torch.float64)
    probs = torch.stack([conf, 1 - conf], dim=1)  # (N, 2)
    labels = torch.tensor([0 if c else 1 for c in correct])
    return probs, labels


def test_ece_of_a_perfectly_calibrated_toy_is_zero():
    # 80% confident and right 80% of the time; 60% confident and right 60% of the time
    probs, labels = two_class_probs([0.8] * 10 + [0.6] * 10, [True] * 8 + [False] * 2 + [True] * 6 + [False] * 4)
    assert expected_calibration_error(probs, labels, 15) == pytest.approx(0.0, abs=1e-12)
    # sampled: correctness drawn with probability equal to the confidence
    g = torch.Generator().manual_seed(0)
    conf = 0.5 + 0.5 * torch.rand(200_000, generator=g, dtype=torch.float64)
    correct = torch.rand(200_000, generator=g, dtype=torch.float64) < conf
    probs, labels = two_class_probs(conf.tolist(), correct.tolist())
    assert expected_calibration_error(probs, labels, 15) < 0.01


def test_ece_of_an_overconfident_toy_is_its_gap():
    probs, labels = two_class_probs([0.99] * 10, [True] * 5 + [False] * 5)
    assert expected_calibration_error(probs, labels, 15) == pytest.approx(0.49)


def test_classification_metrics_and_per_class_accuracy():
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0], [0.3, 0.7, 0.0]])
    labels = torch.tensor([0, 1, 1, 1])
    m = classification_metrics(probs, labels)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["nll"] == pytest.approx(-(torch.tensor([0.9, 0.8, 0.4, 0.7]).log().mean().item()), rel=1e-6)
    assert m["per_class_accuracy"] == [1.0, pytest.approx(2 / 3), None]  # class 2 has no test sample
    assert per_class_accuracy(torch.tensor([2, 2]), torch.tensor([2, 0]), 3) == [0.0, None, 1.0]


def test_flops_of_a_linear_layer_are_two_in_out():
    assert count_flops(nn.Linear(12, 5), (12,)) == 2 * 12 * 5
    assert count_flops(nn.Sequential(nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3)), (12,)) == 2 * (12 * 5 + 5 * 3)
    conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)  # 4 x 9 multiply-adds per output pixel
    assert count_flops(conv, (1, 8, 8)) == 2 * 4 * 9 * 8 * 8


def test_ensemble_is_the_mean_of_teacher_probabilities_and_costs_their_sum():
    g = torch.Generator().manual_seed(0)
    probs = [torch.softmax(torch.randn(7, 4, generator=g), 1) for _ in range(3)]
    mean = ensemble_probs(probs)
    assert torch.allclose(mean, (probs[0] + probs[1] + probs[2]) / 3)
    assert torch.allclose(mean.sum(1), torch.ones(7))
    costs = [{"params": 10, "flops": 100, "latency_ms": 1.0, "throughput": 1000.0},
             {"params": 30, "flops": 300, "latency_ms": 3.0, "throughput": 250.0}]
    assert ensemble_cost(costs) == {"params": 40, "flops": 400, "latency_ms": 4.0, "throughput": pytest.approx(200.0)}


def test_model_cost_on_a_zoo_model():
    model = build_model("student_cnn", num_classes=10, in_channels=1, width=0.25)
    cfg = EvaluateConfig(throughput_batch=4, warmup=0, repeats=1, latency_iters=1)
    cost = model_cost(model, (1, 28, 28), cfg)
    assert cost["params"] == sum(p.numel() for p in model.parameters())
    assert cost["flops"] > 2 * cost["params"]  # convolutions reuse their weights at every pixel
    assert cost["latency_ms"] > 0 and cost["throughput"] > 0


def test_bad_evaluate_params_fail_in_one_line():
    with pytest.raises(UserError, match="evaluate.repeats = 0 must be at least 1"):
        build(EvaluateConfig, {"repeats": 0}, "evaluate")
    with pytest.raises(UserError, match="unknown key"):
        build(EvaluateConfig, {"repeat": 3}, "evaluate")


# ---------------------------------------------------------------- the stage on tiny data


def params_for(root: Path) -> dict:
    params = tiny_distill_params(root, runs={"scratch": {"method": "scratch"}, "kd": {"method": "kd"},
                                             "meal_coop": {"method": "meal", "meal": {"adversarial": "cooperative"}}})
    params["evaluate"] = {"batch_size": 64, "throughput_batch": 8, "warmup": 0, "repeats": 1, "latency_iters": 1}
    return params


@pytest.fixture(scope="module")
def built(tmp_path_factory, fashion_root) -> Path:
    """A directory with params.yaml, teachers, view plan, caches and two trained runs (kd left untrained)."""
    root = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("OMP_NUM_THREADS", "1")
        params = params_for(fashion_root)
        build_tiny_pipeline(params)
        runner = CliRunner()
        for run in TRAINED_RUNS:
            result = runner.invoke(distill_stage.main, ["--run", run, "--quiet", "--device", "cpu"])
            assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def workdir(built, tmp_path, monkeypatch) -> Path:
    """A private copy of the built directory as the working directory."""
    work = tmp_path / "work"
    shutil.copytree(built, work)
    monkeypatch.chdir(work)
    return work


def evaluate(*args: str):
    return CliRunner().invoke(evaluate_stage.main, ["--device", "cpu", *args])


def test_distill_run_writes_its_own_checkpoint_and_metrics(workdir):
    for run in TRAINED_RUNS:
        ckpt = load_checkpoint(paths.student_checkpoint(run))
        metrics = json.loads(paths.student_metrics(run).read_text())
        assert ckpt["finished"] and ckpt["run"] == metrics["run"] == run
    coop = json.loads(paths.student_metrics("meal_coop").read_text())
    assert coop["method"] == "meal" and coop["options"]["adversarial"] == "cooperative"
    assert not paths.student_checkpoint("meal").exists()  # the run's name, not the method's
    # a rerun finds the finished run, also after another run was declared (runs are not its identity);
    # other settings of its own are refused
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["distill"]["runs"]["kd_t4"] = {"method": "kd", "kd": {"temperature": 4.0}}
    Path("params.yaml").write_text(yaml.safe_dump(params))
    again = CliRunner().invoke(distill_stage.main, ["--run", "scratch", "--quiet", "--device", "cpu"])
    assert again.exit_code == 0 and "already trained" in again.output
    refused = CliRunner().invoke(distill_stage.main, ["--run", "scratch", "--epochs", "2", "--quiet", "--device", "cpu"])
    assert "was made with different distill" in one_line_error(refused)


def test_stage_writes_metrics_summary_and_plots(workdir):
    result = evaluate()
    assert result.exit_code == 0, result.output
    assert "kd: no student checkpoint data/student/kd.pt, skipped" in result.output  # declared, not trained
    payload = json.loads(paths.evaluate_metrics().read_text())
    assert set(payload["teachers"]) == set(TEACHERS) and set(payload["students"]) == set(TRAINED_RUNS)
    assert payload["ensemble"]["members"] == list(TEACHERS)
    entries = [*payload["teachers"].values(), payload["ensemble"], *payload["students"].values()]
    for entry in entries:
        assert 0.0 <= entry["accuracy"] <= 1.0 and 0.0 <= entry["ece"] <= 1.0 and entry["nll"] > 0
        assert entry["params"] > 0 and entry["flops"] > 0 and entry["latency_ms"] > 0 and entry["throughput"] > 0
        assert len(entry["per_class_accuracy"]) == len(payload["classes"]) == 10
    teachers = payload["teachers"].values()
    assert payload["ensemble"]["params"] == sum(t["params"] for t in teachers)
    assert payload["ensemble"]["latency_ms"] == pytest.approx(sum(t["latency_ms"] for t in teachers))
    assert payload["num_samples"] == 96 and payload["split"] == "test"

    summary = paths.summary_report().read_text()
    for name in (*TEACHERS, "ensemble", *TRAINED_RUNS):
        assert f"| {name} |" in summary
    for name in PLOTS:
        png = paths.report_plot(name)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"(plots/{name}.png)" in summary


def test_ensemble_metrics_come_from_the_mean_probabilities(workdir):
    """Recompute the ensemble's accuracy from the teachers directly."""
    from pipeline.checkpoints import load_teacher
    from pipeline.pretraining import predict_logits

    assert evaluate().exit_code == 0
    payload = json.loads(paths.evaluate_metrics().read_text())
    test = load_split(build(DataConfig, yaml.safe_load(Path("params.yaml").read_text())["data"], "data"), "test")
    probs = [torch.softmax(predict_logits(load_teacher(paths.teacher_checkpoint(t))[0], test, torch.device("cpu")), 1)
             for t in TEACHERS]
    expected = classification_metrics(torch.stack(probs).mean(0), test.labels)
    assert payload["ensemble"]["accuracy"] == pytest.approx(expected["accuracy"])
    assert payload["ensemble"]["nll"] == pytest.approx(expected["nll"], rel=1e-5)


def test_missing_teacher_checkpoint_is_one_line(workdir):
    paths.teacher_checkpoint("t2").unlink()
    line = one_line_error(evaluate())
    assert "teacher checkpoint data/teachers/t2.pt not found" in line and "stages.pretrain" in line
    assert not paths.evaluate_metrics().exists()  # nothing half-written


def test_listed_student_without_checkpoint_is_one_line(workdir):
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["evaluate"]["runs"] = ["meal_coop", "kd"]
    Path("params.yaml").write_text(yaml.safe_dump(params))
    line = one_line_error(evaluate())
    assert "evaluate.runs lists 'kd' but data/student/kd.pt does not exist" in line
    assert "python -m stages.distill --run kd" in line
    # listing only trained runs evaluates just those
    params["evaluate"]["runs"] = ["meal_coop"]
    Path("params.yaml").write_text(yaml.safe_dump(params))
    assert evaluate().exit_code == 0
    assert list(json.loads(paths.evaluate_metrics().read_text())["students"]) == ["meal_coop"]


def test_teacher_trained_on_other_data_is_refused(workdir):
    ckpt = load_checkpoint(paths.teacher_checkpoint("t1"))
    ckpt["dataset_fingerprint"] = "0" * 64
    save_checkpoint(paths.teacher_checkpoint("t1"), ckpt)
    line = one_line_error(evaluate())
    assert "data/teachers/t1.pt was trained on other data" in line
