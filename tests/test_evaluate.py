"""Evaluation: calibration, fidelity, FLOPs and ensemble arithmetic on toys; the stage end to end on tiny data.

Setup (`built`, once per module): 96 synthetic 1x28x28 images, two untrained student_cnn (width 0.25)
teachers saved per the contract schema, and two named distill runs (`scratch`, and `meal_coop`: MEAL
with the official cooperative game) with a checkpoint and training metrics per seed (0 and 1) in the
distill stage's layout (data/student/RUN/seedS.pt, .json), written directly: evaluate reads only those,
so its tests need no caches and no training. `kd` is declared and left untrained. Each test works in its
own copy of that directory. `test_stage_reads_what_distill_writes` trains one run through the real
distill stage instead.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from click.testing import CliRunner

from bench.cache_io import calibrate_batchnorm, fake_teacher
from pipeline import paths
from pipeline.checkpoints import load_checkpoint, save_checkpoint, write_json
from pipeline.models import load_teacher
from pipeline.config import UserError, build
from pipeline.data import DataConfig, load_split
from pipeline.evaluate import (
    EvaluateConfig, classification_metrics, count_flops, ensemble_cost, ensemble_log_probs, ensemble_probs,
    expected_calibration_error, fidelity, gap_closed, load_student, model_cost, per_class_accuracy,
)
from pipeline.models import build_model
from pipeline.training import predict_logits
from pipeline.report import PLOTS, results_table
from stages import distill as distill_stage
from stages import evaluate as evaluate_stage
from helpers import TINY_TEACHERS, one_line_error, private_copy, tiny_distill_params

TEACHERS = TINY_TEACHERS
TRAINED_RUNS = {"scratch": "scratch", "meal_coop": "meal"}  # run -> method
SEEDS = (0, 1)
CPU = torch.device("cpu")


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
    probs = [torch.softmax(torch.randn(7, 4, generator=g, dtype=torch.float64), 1) for _ in range(3)]
    mean = ensemble_probs(probs)
    assert torch.allclose(mean, (probs[0] + probs[1] + probs[2]) / 3)
    assert torch.allclose(mean.sum(1), torch.ones(7, dtype=torch.float64))
    assert torch.allclose(ensemble_log_probs([p.log() for p in probs]).exp(), mean)  # the same, from log space
    costs = [{"params": 10, "flops": 100, "latency_ms": 1.0, "throughput": 1000.0},
             {"params": 30, "flops": 300, "latency_ms": 3.0, "throughput": 250.0}]
    assert ensemble_cost(costs) == {"params": 40, "flops": 400, "latency_ms": 4.0, "throughput": pytest.approx(200.0)}


def test_the_ensemble_agrees_with_itself_fully_at_zero_kl():
    g = torch.Generator().manual_seed(1)
    members = [torch.log_softmax(torch.randn(50, 10, generator=g, dtype=torch.float64), 1) for _ in range(3)]
    ensemble = ensemble_log_probs(members)
    assert fidelity(ensemble, ensemble) == {"agreement": 100.0, "kl": pytest.approx(0.0, abs=1e-12)}
    assert fidelity(members[0], ensemble)["kl"] > 0  # a member is not the ensemble


def test_kl_and_agreement_on_a_hand_computed_example():
    reference = torch.tensor([[0.6, 0.4], [0.9, 0.1], [1.0, 0.0]], dtype=torch.float64)  # top-1: 0, 0, 0
    model = torch.tensor([[0.3, 0.7], [0.7, 0.3], [0.8, 0.2]], dtype=torch.float64)  # top-1: 1, 0, 0
    # KL(reference || model) per image; the third image's 0 * log(0 / 0.2) term adds nothing
    rows = [0.6 * math.log(0.6 / 0.3) + 0.4 * math.log(0.4 / 0.7),  # 0.19204
            0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3),  # 0.11632
            1.0 * math.log(1.0 / 0.8)]  # 0.22314
    result = fidelity(model.log(), reference.log())
    assert result["agreement"] == pytest.approx(200 / 3)
    assert result["kl"] == pytest.approx(sum(rows) / 3) == pytest.approx(0.177169, abs=1e-6)


def test_gap_closed_is_zero_for_scratch_one_for_the_ensemble_and_none_without_a_gap():
    assert gap_closed(80.0, 80.0, 90.0) == 0.0 and math.copysign(1, gap_closed(80.0, 80.0, 70.0)) == 1  # never -0.0
    assert gap_closed(90.0, 80.0, 90.0) == 1.0
    assert gap_closed(85.0, 80.0, 90.0) == pytest.approx(0.5)
    assert gap_closed(78.0, 80.0, 90.0) == pytest.approx(-0.2)  # below scratch
    assert gap_closed(85.0, None, 90.0) is None and gap_closed(85.0, 80.0, None) is None
    assert gap_closed(85.0, 80.0, 80.0) is None  # scratch as good as the ensemble: no gap to close


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


def params_for(root: Path, **distill) -> dict:
    params = tiny_distill_params(root, seeds=list(SEEDS), jobs=1, **distill,
                                 runs={"scratch": {"method": "scratch"}, "kd": {"method": "kd"},
                                       "meal_coop": {"method": "meal", "meal": {"adversarial": "cooperative"}}})
    params["evaluate"] = {"batch_size": 64, "throughput_batch": 8, "warmup": 0, "repeats": 1, "latency_iters": 1}
    return params


def write_student(run: str, seed: int, method: str, train, init_seed: int) -> None:
    """One seed's student in the distill stage's layout: a finished checkpoint of a randomly initialised
    student_cnn (BatchNorm statistics measured, as training leaves them) and its training metrics."""
    kwargs = {"num_classes": train.num_classes, "in_channels": train.in_channels, "width": 0.25, "dropout": 0.0}
    torch.manual_seed(init_seed)
    model = build_model("student_cnn", **kwargs)
    calibrate_batchnorm(model, train)
    save_checkpoint(paths.student_checkpoint(run, seed), {
        "student": model.state_dict(), "arch": "student_cnn", "model_kwargs": kwargs, "method": method, "run": run,
        "seed": seed, "epoch": 2, "finished": True, "test_acc": 0.1,
        "identity": {"method": method, "dataset_fingerprint": train.fingerprint},
    })
    history = [{"epoch": e, "loss": 2.3 - 0.1 * e - 0.05 * seed, "test_acc": 0.1 + 0.02 * e + 0.01 * seed}
               for e in (1, 2)]
    write_json(paths.student_seed_metrics(run, seed), {"run": run, "method": method, "seed": seed, "epochs": 2,
                                                       "finished": True, "history": history})


def params_and_teachers(fashion_root) -> tuple[dict, object]:
    """In the working directory: params.yaml and the untrained teacher checkpoints; (params, training split)."""
    params = params_for(fashion_root)
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    train = load_split(build(DataConfig, params["data"], "data"), "train")
    for i, name in enumerate(TEACHERS):
        fake_teacher(paths.teacher_checkpoint(name), train, seed=100 + i, name=name)
    return params, train


@pytest.fixture(scope="module")
def built(tmp_path_factory, fashion_root) -> Path:
    """A directory with params.yaml, two teachers and two runs with a student per seed (kd left untrained)."""
    root = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        params, train = params_and_teachers(fashion_root)
        for i, (run, method) in enumerate(TRAINED_RUNS.items()):
            for seed in SEEDS:
                write_student(run, seed, method, train, init_seed=200 + 10 * i + seed)
    return root


@pytest.fixture
def workdir(built, tmp_path, monkeypatch) -> Path:
    """A private copy of the built directory as the working directory."""
    return private_copy(built, tmp_path, monkeypatch)


def evaluate(*args: str):
    return CliRunner().invoke(evaluate_stage.main, ["--device", "cpu", *args])


def edit_params(change) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    change(params)
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def load_test():
    params = yaml.safe_load(Path("params.yaml").read_text())
    return load_split(build(DataConfig, params["data"], "data"), "test")


def no_outputs() -> bool:
    return not paths.evaluate_metrics().exists() and not paths.summary_report().exists() and \
        not paths.report_plot(PLOTS[0]).parent.exists()


def test_stage_writes_metrics_summary_and_plots(workdir):
    result = evaluate()
    assert result.exit_code == 0, result.output
    assert "kd: no student checkpoint under data/student/kd, skipped" in result.output  # declared, not trained
    payload = json.loads(paths.evaluate_metrics().read_text())
    assert set(payload["teachers"]) == set(TEACHERS) and list(payload["students"]) == list(TRAINED_RUNS)
    assert payload["ensemble"]["members"] == list(TEACHERS) and payload["scratch_reference"] == "scratch"
    entries = [*payload["teachers"].values(), payload["ensemble"], *payload["students"].values()]
    for entry in entries:  # what every reader of the old file used is still there, in the old units
        assert 0.0 <= entry["accuracy"] <= 1.0 and 0.0 <= entry["ece"] <= 1.0 and entry["nll"] > 0
        assert entry["params"] > 0 and entry["flops"] > 0 and entry["latency_ms"] > 0 and entry["throughput"] > 0
        assert len(entry["per_class_accuracy"]) == len(payload["classes"]) == 10
    for entry in [*payload["teachers"].values(), payload["ensemble"]]:
        assert entry["top1"] == pytest.approx(100 * entry["accuracy"], rel=1e-6)
    for name, method in TRAINED_RUNS.items():
        run = payload["students"][name]
        assert run["method"] == method and run["arch"] == "student_cnn"
        assert {"top1_mean", "top1_std", "seeds", "agreement_mean", "kl_mean", "gap_closed_mean"} <= set(run)
        assert [s["seed"] for s in run["seeds"]] == list(SEEDS)
        for s in run["seeds"]:
            assert set(s) == {"seed", "top1", "agreement", "kl", "nll", "ece"}
            assert 0 <= s["top1"] <= 100 and 0 <= s["agreement"] <= 100 and s["kl"] >= 0 and 0 <= s["ece"] <= 1
        tops = [s["top1"] for s in run["seeds"]]
        assert run["top1_mean"] == pytest.approx(statistics.mean(tops))
        assert run["top1_std"] == pytest.approx(statistics.stdev(tops))  # sample std (ddof 1)
        assert run["accuracy"] == pytest.approx(run["top1_mean"] / 100, rel=1e-6)
        assert run["agreement_mean"] == pytest.approx(statistics.mean(s["agreement"] for s in run["seeds"]))
        assert run["kl_mean"] == pytest.approx(statistics.mean(s["kl"] for s in run["seeds"]))
        assert run["nll"] == pytest.approx(statistics.mean(s["nll"] for s in run["seeds"]))
    teachers = payload["teachers"].values()
    assert payload["ensemble"]["params"] == sum(t["params"] for t in teachers)
    assert payload["ensemble"]["latency_ms"] == pytest.approx(sum(t["latency_ms"] for t in teachers))
    assert payload["num_samples"] == 96 and payload["split"] == "test"

    summary = paths.summary_report().read_text()
    assert results_table(payload) in summary  # the README's table is this one
    for name in (*TEACHERS, "ensemble", *TRAINED_RUNS):
        assert f"| {name} |" in summary
    scratch = payload["students"]["scratch"]
    assert f"| {scratch['top1_mean']:.2f} ± {scratch['top1_std']:.2f} | 2 |" in summary
    assert "## Top-1 % per seed" in summary and "| run | seed 0 | seed 1 | mean ± std |" in summary
    for name in PLOTS:
        png = paths.report_plot(name)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"(plots/{name}.png)" in summary
    assert {"accuracy_by_run", "agreement_vs_accuracy"} <= set(PLOTS)


def test_gap_closed_is_measured_from_the_scratch_run(workdir):
    assert evaluate().exit_code == 0
    payload = json.loads(paths.evaluate_metrics().read_text())
    scratch, coop = payload["students"]["scratch"], payload["students"]["meal_coop"]
    ensemble = payload["ensemble"]["top1"]
    assert ensemble != scratch["top1_mean"]  # the fixture has a gap to close
    assert scratch["gap_closed_mean"] == 0.0
    assert coop["gap_closed_mean"] == pytest.approx((coop["top1_mean"] - scratch["top1_mean"]) /
                                                    (ensemble - scratch["top1_mean"]))
    # no run named scratch: the first run whose method is scratch is the reference
    shutil.move(paths.student_dir("scratch"), paths.student_dir("baseline"))
    edit_params(lambda p: p["distill"]["runs"].update(baseline={"method": "scratch"}))
    edit_params(lambda p: p["evaluate"].update(runs=["meal_coop", "baseline"]))
    assert evaluate().exit_code == 0
    again = json.loads(paths.evaluate_metrics().read_text())
    assert again["scratch_reference"] == "baseline" and again["students"]["baseline"]["gap_closed_mean"] == 0.0
    assert again["students"]["meal_coop"]["gap_closed_mean"] == pytest.approx(coop["gap_closed_mean"])
    # without a scratch run there is nothing to measure from
    edit_params(lambda p: p["evaluate"].update(runs=["meal_coop"]))
    assert evaluate().exit_code == 0
    alone = json.loads(paths.evaluate_metrics().read_text())
    assert alone["scratch_reference"] is None and alone["students"]["meal_coop"]["gap_closed_mean"] is None


def test_every_seed_is_evaluated_against_the_true_ensemble(workdir):
    """Recompute the ensemble, and one run's per-seed top-1 and fidelity, from the checkpoints directly."""
    assert evaluate().exit_code == 0
    payload = json.loads(paths.evaluate_metrics().read_text())
    test = load_test()
    probs = [torch.softmax(predict_logits(load_teacher(paths.teacher_checkpoint(t))[0], test, CPU), 1)
             for t in TEACHERS]
    ensemble = torch.stack(probs).mean(0)  # (N, C)
    expected = classification_metrics(ensemble, test.labels)
    assert payload["ensemble"]["accuracy"] == pytest.approx(expected["accuracy"])
    assert payload["ensemble"]["nll"] == pytest.approx(expected["nll"], rel=1e-5)
    for seed, entry in zip(SEEDS, payload["students"]["meal_coop"]["seeds"]):
        student = torch.softmax(predict_logits(load_student(paths.student_checkpoint("meal_coop", seed), CPU)[0],
                                               test, CPU).double(), 1)
        assert entry["top1"] == pytest.approx(100 * (student.argmax(1) == test.labels).double().mean().item())
        agree = (student.argmax(1) == ensemble.argmax(1)).double().mean().item()
        assert entry["agreement"] == pytest.approx(100 * agree)
        kl = (ensemble.double() * (ensemble.double().log() - student.log())).sum(1).mean().item()
        assert entry["kl"] == pytest.approx(kl, rel=1e-4)
    for t, p in zip(TEACHERS, probs):  # a teacher's own fidelity, the reference for the students'
        assert payload["teachers"][t]["agreement"] == pytest.approx(
            100 * (p.argmax(1) == ensemble.argmax(1)).double().mean().item())


def test_one_distill_teacher_is_no_ensemble_and_gives_no_fidelity(workdir):
    edit_params(lambda p: p["distill"].update(teachers=["t1"]))
    result = evaluate()
    assert result.exit_code == 0, result.output
    payload = json.loads(paths.evaluate_metrics().read_text())
    assert "ensemble" not in payload
    for run in payload["students"].values():
        assert run["agreement_mean"] is None and run["kl_mean"] is None and run["gap_closed_mean"] is None
        assert all(s["agreement"] is None and s["kl"] is None for s in run["seeds"])
    assert all(t["agreement"] is None for t in payload["teachers"].values())
    assert results_table(payload) in paths.summary_report().read_text()
    assert paths.report_plot("agreement_vs_accuracy").read_bytes()[:4] == b"\x89PNG"


def test_run_missing_one_seed_is_one_line(workdir):
    paths.student_checkpoint("meal_coop", 1).unlink()
    line = one_line_error(evaluate())
    assert "data/student/meal_coop/seed1.pt" in line and "python -m stages.distill --run meal_coop" in line
    assert no_outputs()  # refused before anything is written


def test_unfinished_seed_is_refused(workdir):
    path = paths.student_checkpoint("scratch", 1)
    save_checkpoint(path, {**load_checkpoint(path), "finished": False, "epoch": 1})
    line = one_line_error(evaluate())
    assert "data/student/scratch/seed1.pt is from an unfinished run" in line
    assert "python -m stages.distill --run scratch" in line and no_outputs()


def test_missing_teacher_checkpoint_is_one_line(workdir):
    paths.teacher_checkpoint("t2").unlink()
    line = one_line_error(evaluate())
    assert "teacher checkpoint data/teachers/t2.pt not found" in line and "stages.pretrain" in line
    assert no_outputs()  # nothing half-written


def test_listed_student_without_checkpoint_is_one_line(workdir):
    edit_params(lambda p: p["evaluate"].update(runs=["meal_coop", "kd"]))
    line = one_line_error(evaluate())
    assert "evaluate.runs lists 'kd' but data/student/kd/seed0.pt does not exist" in line
    assert "python -m stages.distill --run kd" in line
    # listing only trained runs evaluates just those
    edit_params(lambda p: p["evaluate"].update(runs=["meal_coop"]))
    assert evaluate().exit_code == 0
    assert list(json.loads(paths.evaluate_metrics().read_text())["students"]) == ["meal_coop"]


def test_a_run_evaluates_its_own_seeds(workdir):
    """A run's own `seeds` override decides which checkpoints it needs; other seeds on disk are not read."""
    edit_params(lambda p: p["distill"]["runs"]["meal_coop"].update(seeds=[1]))
    assert evaluate().exit_code == 0
    run = json.loads(paths.evaluate_metrics().read_text())["students"]["meal_coop"]
    assert [s["seed"] for s in run["seeds"]] == [1] and run["top1_std"] == 0.0
    assert run["top1_mean"] == run["seeds"][0]["top1"]


def test_teacher_trained_on_other_data_is_refused(workdir):
    ckpt = load_checkpoint(paths.teacher_checkpoint("t1"))
    ckpt["dataset_fingerprint"] = "0" * 64
    save_checkpoint(paths.teacher_checkpoint("t1"), ckpt)
    line = one_line_error(evaluate())
    assert "data/teachers/t1.pt was trained on other data" in line


def test_stage_reads_what_distill_writes(tmp_path, fashion_root, monkeypatch):
    """The real distill stage trains `scratch` for two seeds (no caches needed); evaluate finds both, and its
    per-seed top-1 is the distill stage's own final test accuracy."""
    from stages import plan_views

    monkeypatch.chdir(tmp_path)
    params, train = params_and_teachers(fashion_root)
    runner = CliRunner()
    assert runner.invoke(plan_views.main, []).exit_code == 0
    trained = runner.invoke(distill_stage.main, ["--run", "scratch", "--quiet", "--device", "cpu"])
    assert trained.exit_code == 0, trained.output
    result = evaluate()
    assert result.exit_code == 0, result.output
    run = json.loads(paths.evaluate_metrics().read_text())["students"]["scratch"]
    summary = json.loads(paths.student_metrics("scratch").read_text())
    assert [s["seed"] for s in run["seeds"]] == summary["seeds"] == list(SEEDS)
    assert [s["top1"] for s in run["seeds"]] == pytest.approx([100 * a for a in summary["test_acc"]])
    assert run["gap_closed_mean"] == 0.0 and paths.report_plot("training_curves").is_file()
