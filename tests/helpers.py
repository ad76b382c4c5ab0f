"""Assertions shared by the stage tests."""


def one_line_error(result, exit_code: int = 2) -> str:
    """A click result that failed the way users must see failures: one `Error:` line, no traceback."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    return lines[0]
