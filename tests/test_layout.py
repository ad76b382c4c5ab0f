"""The layout stays readable (docs/design.md section 8): few top-level modules, short functions, thin stages."""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
MAX_TOP_LEVEL = 18  # modules directly under pipeline/, __init__.py included
MAX_FUNCTION_LINES = 80
MAX_DISTILL_STAGE_LINES = 220


def long_functions(folder: Path) -> list[str]:
    """Every function (or method) of the .py files under `folder` longer than MAX_FUNCTION_LINES."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_pipeline_has_few_top_level_modules():
    modules = sorted(p.name for p in (ROOT / "pipeline").glob("*.py"))
    assert len(modules) <= MAX_TOP_LEVEL, modules


def test_no_function_is_longer_than_a_screen():
    assert long_functions(ROOT / "pipeline") + long_functions(ROOT / "stages") == []


def test_the_distill_stage_is_thin():
    assert len((ROOT / "stages" / "distill.py").read_text().splitlines()) <= MAX_DISTILL_STAGE_LINES


def test_the_layout_checks_can_fail(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def f():\n{body}\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert long_functions(tmp_path) == [f"long.py:1 f ({MAX_FUNCTION_LINES + 1} lines)"]
    finally:
        ROOT = saved
