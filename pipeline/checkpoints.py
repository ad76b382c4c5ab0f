"""Checkpoints are plain dicts (state dicts, config as a dict, epoch, best metric), written atomically; and the
file operations every writer shares: atomic replacement, one-writer locks, full-disk errors in one line.

An atomic write (temp file + rename) means a run killed mid-save never leaves a truncated checkpoint
behind, so resuming always finds either the previous epoch's file or the new one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
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
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: two writers never share a temporary
    with disk_errors(f"cannot write {path}", f"fix the permissions of {path.parent}", "rerun (finished work is kept)"):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            os.replace(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if isinstance(exc, RuntimeError):  # torch.save's writer reports a failed write in its own words
                raise _as_os_error(exc, path.parent) from None
            raise


@contextlib.contextmanager
def exclusive_lock(lock: str | Path, what: str, cannot: str | None = None):
    """Hold the one-writer lock file `lock` for the block: an exclusive `fcntl.flock`, which the kernel drops when
    its process dies, so a killed writer never blocks a rerun. A second writer ends at once in one line: "`what`
    is being written by <holder>". `cannot` heads the line when the lock file cannot be made at all. The holder's
    note is written only where there is room (a raw descriptor, so nothing is flushed later): the flock itself
    needs no disk space, so on a full disk the lock holds all the same.
    """
    lock = Path(lock)
    with disk_errors(cannot or f"cannot take the lock {lock} for {what}",
                     f"choose a writable location or fix the permissions of {lock.parent}", "rerun"):
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            raise UserError(f"{what} is being written by {holder}: wait for it to finish, or stop it "
                            f"and rerun") from None
        with contextlib.suppress(OSError):  # no room for the holder's name (a full disk): the lock holds without it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # the file stays (unlinking it could let two writers lock two inodes)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _holder(fd: int, wait_s: float = 1.0) -> str:
    """The lock holder's note: it writes it just after taking the lock, so an empty note is waited for briefly."""
    deadline = time.monotonic() + wait_s
    while not (note := os.pread(fd, 512, 0).decode(errors="replace").strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return note or "another process"


def _as_os_error(exc: RuntimeError, folder: Path) -> OSError:
    """torch.save's RuntimeError as the OSError it stands for: ENOSPC when the folder's disk has no room left."""
    try:
        stats = os.statvfs(folder)
        full = stats.f_bavail * stats.f_frsize < (1 << 20)
    except OSError:
        full = False
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:120]
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if full else OSError(errno.EIO, first)


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the disk (or the user's quota) has no space left."""
    return getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc)


@contextlib.contextmanager
def disk_errors(failed: str, fix: str, then: str = ""):
    """Turn an OSError of the block into one line (a UserError): `failed` (the reason), then `fix`, or on a
    full disk freeing space on it, then `then` (e.g. "rerun ... to resume")."""
    try:
        yield
    except OSError as exc:
        if disk_full(exc):
            reason, fix = os.strerror(errno.ENOSPC), "free space on its disk"
        else:
            reason = exc.strerror or (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise UserError(f"{failed} ({reason}): {fix}" + (f", then {then}" if then else "")) from None


def remove_path(path: Path) -> None:
    """Delete a store (zarr folder or h5 file) or any leftover temp path; absent is fine."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def swap_in(new: Path, final: Path) -> None:
    """Replace `final` (file or folder, may be absent) by the finished `new`, never losing both.

    The old one is renamed aside to `<final>.old` first and deleted only after `new` took its place;
    a cache store's `pipeline.cache.write.recover_swap` finishes the job if a run dies in between.
    """
    old = final.with_name(final.name + ".old")
    remove_path(old)
    if final.exists():
        final.rename(old)
    new.rename(final)
    remove_path(old)


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
