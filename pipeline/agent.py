"""A torchrun rank dies with its agent: called by stages/__init__.py first thing, before torch is imported.

torchrun starts each rank in a session of its own, so a kill of the agent's process group (a scheduler's
SIGKILL, `kill -9 -PGID`) misses the ranks; an orphan rank would keep writing, or wait out the collective
timeout for peers that are gone. Linux's PR_SET_PDEATHSIG has the kernel SIGKILL this process when its parent
dies, whatever the signal. Armed before torch's import (seconds), the window in which the agent can die
unnoticed is Python's own start-up; a rank whose parent already died there finds itself re-parented to init
and ends at once.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_agent() -> None:
    """Under torchrun (TORCHELASTIC_RUN_ID in the environment, Linux): be killed when the agent dies."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return  # a plain run keeps running when its shell goes (nohup, screen)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (AttributeError, OSError):
        return
    if os.getppid() == 1 and b"torch" not in _cmdline(1):  # orphaned before the call (torchrun may be PID 1)
        os.kill(os.getpid(), signal.SIGKILL)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
