"""Checkpoints are plain dicts (state dicts, config as a dict, epoch, best metric), written atomically.

An atomic write (temp file + rename) means a run killed mid-save never leaves a truncated checkpoint
behind, so resuming always finds either the previous epoch's file or the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.config import UserError


def replace_atomically(path: str | Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` to a temporary name beside `path`, then rename it over `path`: a reader (or a resume
    after a kill) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        reason = getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:120]
        raise UserError(f"cannot write {path} ({reason}): free some space or fix the permissions of {path.parent}, "
                        f"then rerun (finished work is kept)") from None


@contextlib.contextmanager
def exclusive_lock(lock: str | Path, what: str):
    """Hold the one-writer lock file `lock` for the block: an exclusive `fcntl.flock`, which the kernel drops when
    its process dies, so a killed writer never blocks a rerun. A second writer ends at once in one line naming
    `what` and the process that holds it. The holder's note is best effort: on a full disk the lock still works.
    """
    lock = Path(lock)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock, "a+")
    except OSError as exc:
        raise UserError(f"cannot take the lock {lock} for {what} ({exc.strerror or exc}): free some space or fix "
                        f"the permissions of {lock.parent}") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserError(f"{what} is being written by {holder}: wait for it to finish, or stop it and "
                            f"rerun") from None
        with contextlib.suppress(OSError):  # the note says who holds it; without space the lock works alone
            f.seek(0)
            f.truncate()
            f.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            f.flush()
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                f.seek(0)
                f.truncate()  # the file stays (unlinking it could let two writers lock two inodes)
            fcntl.flock(f, fcntl.LOCK_UN)


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


def changed_settings(what: str, path: str | Path, changed: list[str], flag: str, action: str = "start over") -> str:
    """The one-line refusal of a file made with other settings: which ones, and the flag that replaces it."""
    return f"{what} {path} was made with different {', '.join(changed)}: pass {flag} to {action}, or delete it"


def load_resumable(path: str | Path, identity: dict[str, Any], restart: bool, what: str, flag: str = "--restart",
                   stored: str | None = None) -> dict[str, Any] | None:
    """The checkpoint at `path` to resume from, or None to start fresh (no file, or changed settings and `restart`).

    `identity` holds the settings a resume must share, compared key by key with the checkpoint's own
    (top-level, or under the key `stored`); a difference without `restart` is a one-line UserError
    naming the keys, so nothing trained is discarded unasked.
    """
    path = Path(path)
    if not path.exists():
        return None
    state = load_checkpoint(path, what)
    recorded = state if stored is None else state.get(stored) or {}
    changed = [k for k, v in identity.items() if recorded.get(k) != v]
    if not changed:
        return state
    if not restart:
        raise UserError(changed_settings(what, path, changed, flag))
    return None


def check_fits_data(what: str, path: str | Path, fingerprint: str | None, model_kwargs: dict[str, Any], data,
                    fix: str) -> None:
    """A one-line UserError unless the model at `path` was trained on `data` (ImageData) and fits its shapes.

    `fingerprint` is the dataset fingerprint the checkpoint recorded; `fix` ends both messages (the command
    that retrains it).
    """
    if fingerprint != data.fingerprint:
        raise UserError(f"{what} {path} was trained on other data than the {data.name} {data.split} split "
                        f"the `data` params give: {fix}")
    classes, channels = model_kwargs.get("num_classes"), model_kwargs.get("in_channels")
    if classes != data.num_classes or channels != data.in_channels:
        raise UserError(f"{what} {path} is for {classes} classes and {channels} channels, the data has "
                        f"{data.num_classes} and {data.in_channels}: {fix}")


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
