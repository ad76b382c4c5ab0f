"""The README tells the truth: its zoo table matches the code, its results the metrics, its commands match CI."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline import paths
from pipeline.models import parameter_table
from pipeline.report import results_table

ROOT = Path(__file__).parents[1]


def test_readme_zoo_table_matches_the_code():
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- zoo-table:start -->\n", "<!-- zoo-table:end -->"
    table = readme[readme.index(start) + len(start):readme.index(end)].strip()
    assert table == parameter_table()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh && python -m pytest -q" in readme
    assert "bash scripts/setup.sh" in ci and "python -m pytest -q" in ci


def committed(root: Path, path: Path) -> str:
    """The file as committed at HEAD: what the README was written from. A `dvc repro` on this machine rewrites the
    workspace's metrics with this machine's figures (teachers retrain to slightly other weights), so the README is
    never checked against those."""
    proc = subprocess.run(["git", "show", f"HEAD:{path.as_posix()}"], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"not a git checkout with {path} committed: {proc.stderr.strip()[:100]}")
    return proc.stdout


def readme_results_table(root: Path) -> str:
    readme = (root / "README.md").read_text()
    start, end = "<!-- results-table:start -->\n", "<!-- results-table:end -->"
    return readme[readme.index(start) + len(start):readme.index(end)].strip()


def check_readme_results(root: Path) -> None:
    """The README's results table is the one the committed metrics render to, and the committed report holds it."""
    table = readme_results_table(root)
    assert table == results_table(json.loads(committed(root, paths.evaluate_metrics())))
    assert table in committed(root, paths.summary_report())  # the table the evaluate stage wrote


def test_readme_results_table_is_the_pipelines():
    check_readme_results(ROOT)


def test_a_repro_on_this_machine_does_not_turn_the_readme_check_red(tmp_path):
    """The README's two commands in one clone: `dvc repro` rewrites metrics/evaluate.json with this machine's
    figures, and the test command that follows must stay green."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    for rel in (Path("README.md"), paths.evaluate_metrics(), paths.summary_report()):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(committed(ROOT, rel))  # as committed: this very clone may have been repro'd
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "x"]):
        subprocess.run(command, cwd=tmp_path, check=True, env={**env, "PATH": "/usr/bin:/bin"})
    moved = json.loads((tmp_path / paths.evaluate_metrics()).read_text())
    for entry in moved["students"].values():  # what another machine's repro leaves in the workspace
        entry["top1_mean"] += 0.01
    (tmp_path / paths.evaluate_metrics()).write_text(json.dumps(moved))
    assert readme_results_table(tmp_path) != results_table(moved)  # the workspace now disagrees with the README
    check_readme_results(tmp_path)
