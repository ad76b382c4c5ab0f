"""The README tells the truth: its zoo table matches the code, its results the metrics, its commands match CI."""

import json
from pathlib import Path

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


def test_readme_results_table_is_the_pipelines():
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- results-table:start -->\n", "<!-- results-table:end -->"
    table = readme[readme.index(start) + len(start):readme.index(end)].strip()
    assert table == results_table(json.loads((ROOT / paths.evaluate_metrics()).read_text()))
    assert table in (ROOT / paths.summary_report()).read_text()  # the table the evaluate stage wrote
