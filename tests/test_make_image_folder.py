"""scripts/make_image_folder.py: the generated JPEG folders the file-source tests and benchmarks read."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_image_folder.py"


def make(out: Path, *extra: str) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--classes", "3", "--train-per-class",
                           "4", "--test-per-class", "2", "--min-side", "40", "--max-side", "90", "--workers", "1",
                           *extra], capture_output=True, text=True, check=True)
    return done.stdout


def digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_folder_is_a_pure_function_of_its_options(tmp_path):
    make(tmp_path / "a", "--grey-every", "3")
    make(tmp_path / "b", "--grey-every", "3")
    a, b = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert a == b and len(a) == 3 * 4 + 3 * 2
    make(tmp_path / "c", "--grey-every", "3", "--seed", "1")
    assert digest(tmp_path / "c").keys() == a.keys() and digest(tmp_path / "c") != a
    sizes, modes = set(), []
    for path in sorted((tmp_path / "a").rglob("*.jpg")):
        with Image.open(path) as img:
            assert 40 <= min(img.size) and max(img.size) <= 90
            sizes.add(img.size)
            modes.append(img.mode)
    assert len(sizes) > 5 and modes.count("L") == 18 // 3 and set(modes) == {"L", "RGB"}


def test_the_list_layout_and_the_broken_inputs(tmp_path):
    out = tmp_path / "g"
    printed = make(out, "--test-layout", "list", "--bad")
    lines = (out / "test.txt").read_text().splitlines()
    assert len(lines) == 6 and not list((out / "test").glob("*/"))
    for line in lines:
        rel, label = line.split()
        assert (out / rel).is_file() and rel.startswith(f"test/c{int(label):04d}_")
    first = out / "train" / "c0000"
    assert (first / "zz_truncated.jpg").stat().st_size < min(p.stat().st_size for p in first.glob("0*.jpg"))
    assert not (first / "zz_not_an_image.jpg").read_bytes().startswith(b"\xff\xd8")
    assert (out / "train" / "zz_empty_class").is_dir() and not list((out / "train" / "zz_empty_class").iterdir())
    assert "broken inputs" in printed
