"""The pretrain stage on tiny data: it trains, writes its outputs, resumes, and fails in one line."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

import pipeline.pretraining
from pipeline import paths
from pipeline.models import load_teacher
from pipeline.optim import lr_at
from stages import pretrain as pretrain_stage
from helpers import one_line_error


class Killed(Exception):
    """Stands in for the process being killed mid-run."""


def run(*args: str):
    return CliRunner().invoke(pretrain_stage.main, ["--quiet", *args])


def test_pretrain_writes_checkpoint_and_metrics(tiny_params):
    result = run("--teacher", "cnn")
    assert result.exit_code == 0, result.output
    model, ckpt = load_teacher(paths.teacher_checkpoint("cnn"))
    assert ckpt["finished"] and ckpt["epoch"] == 3 and ckpt["arch"] == "student_cnn"
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    metrics = json.loads(paths.teacher_metrics("cnn").read_text())
    assert metrics["test_acc"] == ckpt["test_acc"] > 0.3  # 10 classes: chance is 0.1
    assert len(metrics["history"]) == 3
    # a second run finds the finished checkpoint and trains nothing more
    again = run("--teacher", "cnn")
    assert again.exit_code == 0 and "already trained" in again.output


def test_killed_run_resumes_and_matches_uninterrupted(tiny_params, monkeypatch):
    assert run("--teacher", "lenet").exit_code == 0
    reference = torch.load(paths.teacher_checkpoint("lenet"), weights_only=False)
    paths.teacher_checkpoint("lenet").unlink()

    real = pipeline.pretraining.train_one_epoch

    def dies_in_epoch_two(*args, **kwargs):
        if args[6] == 1:  # the epoch argument
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline.pretraining, "train_one_epoch", dies_in_epoch_two)
    with pytest.raises(Killed):
        pretrain_stage.main(["--teacher", "lenet", "--quiet"], standalone_mode=False)
    partial = torch.load(paths.teacher_checkpoint("lenet"), weights_only=False)
    assert partial["epoch"] == 1 and not partial["finished"]

    monkeypatch.setattr(pipeline.pretraining, "train_one_epoch", real)
    resumed = run("--teacher", "lenet")
    assert resumed.exit_code == 0 and "resuming after epoch 1" in resumed.output
    final = torch.load(paths.teacher_checkpoint("lenet"), weights_only=False)
    assert final["epoch"] == 3 and final["finished"]
    for key, value in reference["model"].items():
        torch.testing.assert_close(final["model"][key], value, rtol=1e-5, atol=1e-6)


def test_changed_settings_refuse_without_restart(tiny_params):
    assert run("--teacher", "cnn").exit_code == 0
    params = yaml.safe_load(tiny_params.read_text())
    params["teachers"]["cnn"]["pretrain"]["lr"] = 0.07
    tiny_params.write_text(yaml.safe_dump(params))
    before = paths.teacher_checkpoint("cnn").read_bytes()
    line = one_line_error(run("--teacher", "cnn"))
    assert "--restart" in line and "config" in line
    assert paths.teacher_checkpoint("cnn").read_bytes() == before  # nothing destroyed
    assert run("--teacher", "cnn", "--restart").exit_code == 0


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda p: p, "teacher 'nope' is not listed"),
        (lambda p: p["pretrain"].update(momentum=1.5), "pretrain.momentum"),
        (lambda p: p["pretrain"].update(learning_rate=0.1), "unknown key(s) learning_rate"),
        (lambda p: p["pretrain"].update(epochs="ten"), "pretrain.epochs"),
        (lambda p: p["teachers"]["cnn"].update(arch="resnet1000"), "unknown architecture"),
        (lambda p: p["data"].update(name="mnist3d"), "mnist3d"),
        (lambda p: p["data"].update(root="/no/such/dir"), "/no/such/dir"),
    ],
)
def test_bad_input_is_one_line(tiny_params, edit, expected):
    params = yaml.safe_load(tiny_params.read_text())
    edit(params)
    tiny_params.write_text(yaml.safe_dump(params))
    teacher = "nope" if "nope" in expected else "cnn"
    assert expected in one_line_error(run("--teacher", teacher))


def test_missing_params_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "params file" in one_line_error(run("--teacher", "cnn"))


def test_schedules_are_pure_and_bounded():
    for kind in ("cosine", "onecycle", "constant"):
        lrs = [lr_at(s, 100, 0.1, 10, kind) for s in range(100)]
        assert lrs == [lr_at(s, 100, 0.1, 10, kind) for s in range(100)]
        assert max(lrs) == pytest.approx(0.1) and min(lrs) >= 0
        assert lrs[0] == pytest.approx(0.01)


def test_eval_every_tests_only_on_schedule_and_after_the_last_epoch(tiny_params):
    params = yaml.safe_load(tiny_params.read_text())
    params["pretrain"]["eval_every"] = 2
    tiny_params.write_text(yaml.safe_dump(params))
    assert run("--teacher", "lenet").exit_code == 0
    history = json.loads(paths.teacher_metrics("lenet").read_text())["history"]
    assert [row["test_acc"] is not None for row in history] == [False, True, True]
