"""Checkpoints are plain dicts (state dicts, config as a dict, epoch, best metric), written atomically.

An atomic write (temp file + rename) means a run killed mid-save never leaves a truncated checkpoint
behind, so resuming always finds either the previous epoch's file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.config import UserError


def replace_atomically(path: str | Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` to a temporary name beside `path`, then rename it over `path`: a reader (or a resume
    after a kill) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    replace_atomically(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, what: str = "checkpoint", fix: str = "") -> dict[str, Any]:
    """The checkpoint dict, or a one-line UserError when the file is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found" + (f": {fix}" if fix else ""))
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file: say so, never a traceback
        raise UserError(f"{what} {path} could not be read ({type(exc).__name__}): delete it and rerun") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | Path, payload: Any) -> None:
    """Atomic JSON write (metrics files are read by DVC while other stages run)."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Atomic text write."""
    replace_atomically(path, lambda tmp: tmp.write_text(text))


def load_teacher(path: str | Path, device: torch.device | str = "cpu"):
    """A pretrained teacher in eval mode with frozen weights, and its checkpoint dict.

    The checkpoint records the architecture and its kwargs (see `stages.pretrain`), so a teacher is
    rebuilt from its file alone.
    """
    from pipeline.models import build_model

    ckpt = load_checkpoint(path, "teacher checkpoint", "run `python -m stages.pretrain --teacher NAME` first")
    if not ckpt.get("finished", False):
        raise UserError(f"teacher checkpoint {path} is from an unfinished pretrain run: rerun stages.pretrain to finish it")
    model = build_model(ckpt["arch"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["model"])
    model.eval().requires_grad_(False).to(device)
    return model, ckpt
