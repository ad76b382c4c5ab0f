"""What every benchmark shares: the device name, timing syncs, and the results JSON it writes."""

from __future__ import annotations

import json
import platform
import shlex
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import torch

from pipeline.config import UserError

RESULTS = Path(__file__).parent / "results"


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_name(device: torch.device) -> str:
    """`cpu`, or `cuda-<gpu name>` (file-name safe): the prefix of the results file."""
    if device.type == "cuda":
        return "cuda-" + "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name(device).lower())
    return "cpu"


def header(name: str, device: torch.device, argv: list[str] | None, packages: tuple[str, ...]) -> dict:
    """The fields every results file starts with: device, the exact command, library versions."""
    args = argv if argv is not None else sys.argv[1:]
    return {
        "device": device_name(device),
        "command": f"python -m bench.{name}" + "".join(" " + shlex.quote(a) for a in args),
        "versions": {"python": platform.python_version(), **{p: version(p) for p in packages},
                     "torch_threads": torch.get_num_threads()},
    }


def write_result(result: dict, name: str, out: Path | None) -> Path:
    """`result` as JSON to `out`, by default bench/results/<device>-<name>.json."""
    out = out or RESULTS / f"{result['device']}-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten {out}")
    return out


def run_main(main: Callable[[], object]) -> None:
    """A benchmark's `__main__`: bad input (a params path, a parameter value) ends in one `Error:` line, as
    in the stages, instead of a traceback."""
    try:
        main()
    except UserError as exc:
        exc.show()
        sys.exit(exc.exit_code)
