"""The README tells the truth: its zoo table matches the code, its commands match CI."""

from pathlib import Path

from pipeline.models import parameter_table

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
