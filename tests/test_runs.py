"""Named distill runs (pipeline.runs, `stages.distill --run`): merging, validation, one-line refusals.

The end-to-end `--run` training is in tests/test_evaluate.py, whose fixture trains two runs.
"""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from pipeline.config import UserError
from pipeline.runs import check_runs, deep_merge, run_config, run_names, run_section
from stages import distill as distill_stage
from helpers import one_line_error

TEACHERS = ["t1", "t2"]

DISTILL = {
    "method": "kd",
    "epochs": 3,
    "meal": {"adversarial": "alternating", "adv_weight": 0.5},
    "runs": {
        "scratch": {"method": "scratch"},
        "meal": {"method": "meal"},
        "meal_coop": {"method": "meal", "meal": {"adversarial": "cooperative"}, "epochs": 5},
    },
}


def test_deep_merge_merges_mappings_and_replaces_the_rest():
    base = {"a": 1, "m": {"x": 1, "y": {"z": 2}}, "l": [1, 2]}
    merged = deep_merge(base, {"m": {"y": {"w": 3}}, "l": [9], "b": 2})
    assert merged == {"a": 1, "m": {"x": 1, "y": {"z": 2, "w": 3}}, "l": [9], "b": 2}
    assert base == {"a": 1, "m": {"x": 1, "y": {"z": 2}}, "l": [1, 2]}  # inputs untouched


def test_run_section_applies_the_overrides_and_keeps_the_rest():
    assert run_names(DISTILL) == ["scratch", "meal", "meal_coop"]
    section = run_section(DISTILL, "meal_coop")
    assert "runs" not in section
    assert section["method"] == "meal" and section["epochs"] == 5
    assert section["meal"] == {"adversarial": "cooperative", "adv_weight": 0.5}  # deep-merged
    cfg = run_config(DISTILL, "meal_coop", TEACHERS)
    assert cfg.method == "meal" and cfg.method_options["meal"]["adversarial"] == "cooperative" and cfg.runs == {}
    configs = check_runs(DISTILL, TEACHERS)
    assert [c.method for c in configs.values()] == ["scratch", "meal", "meal"]
    assert configs["meal"].method_options["meal"]["adversarial"] == "alternating"
    assert check_runs({"method": "meal"}, TEACHERS) == {}  # `runs` is optional


@pytest.mark.parametrize("runs, fragment", [
    ({"bad": {"method": "meal", "meal": {"adversarial": "bogus"}}}, "distill run 'bad': distill.meal.adversarial"),
    ({"bad": {"method": "nope"}}, "distill run 'bad': distill.method = 'nope'"),
    ({"bad": {"method": "kd", "epoch": 3}}, "distill run 'bad': unknown key(s) epoch"),
    ({"bad": {"method": "kd", "kd": {"alpha": 2.0}}}, "distill run 'bad': distill.kd.alpha"),
    ({"bad": {"method": "kd", "teachers": ["t9"]}}, "distill run 'bad': distill.teachers names 't9'"),
    ({"bad": {"meal": {}}}, "distill.runs.bad has no `method`"),
    ({"bad": "meal"}, "distill.runs.bad must be a mapping"),
    ({"bad": {"method": "kd", "runs": {}}}, "a run cannot hold runs"),
    ({"no/slash": {"method": "kd"}}, "must be letters, digits"),
])
def test_bad_runs_fail_in_one_line_naming_the_run(runs, fragment):
    with pytest.raises(UserError) as err:
        check_runs({"method": "meal", "runs": runs}, TEACHERS)
    assert fragment in err.value.message and "\n" not in err.value.message


def test_runs_must_be_a_mapping():
    with pytest.raises(UserError, match="distill.runs must be a mapping"):
        run_names({"runs": ["meal", "kd"]})


@pytest.fixture
def params_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = {
        "data": {"name": "fashion_mnist", "root": str(tmp_path / "nowhere"), "limit": 64},
        "teachers": {t: {"arch": "student_cnn", "model": {"width": 0.25}} for t in TEACHERS},
        "distill": DISTILL,
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.mark.parametrize("args, fragment", [
    (["--run", "nope"], "distill run 'nope' is not under distill.runs in the params (known: scratch, meal, meal_coop)"),
    (["--run", "meal", "--method", "kd"], "--run meal and --method kd both given"),
])
def test_stage_refuses_unknown_run_and_ambiguous_options(params_file, args, fragment):
    line = one_line_error(CliRunner().invoke(distill_stage.main, ["--quiet", "--device", "cpu", *args]))
    assert fragment in line


def test_one_bad_run_stops_every_run_before_any_work(params_file):
    params = yaml.safe_load(params_file.read_text())
    params["distill"]["runs"]["broken"] = {"method": "meal", "meal": {"d_lr": -1.0}}
    params_file.write_text(yaml.safe_dump(params))
    # training another (valid) run, or no run at all, still refuses: the error names the broken run
    for args in (["--run", "scratch"], []):
        line = one_line_error(CliRunner().invoke(distill_stage.main, ["--quiet", "--device", "cpu", *args]))
        assert "distill run 'broken': distill.meal.d_lr = -1.0 must be positive" in line
