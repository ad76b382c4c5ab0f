"""Run a stage with as many processes as `dist.nproc_per_node` says: what dvc.yaml's commands go through.

    python -m pipeline.launch stages.distill --run kd [--params P]

One process (the CPU default): this process becomes `python -m stages.distill --run kd` (exec), exactly the
plain command. N > 1: torchrun's own launcher (`torch.distributed.run`, standalone rendezvous on this machine)
starts N ranks of the stage; if one fails, torchrun stops the others and this ends in one line naming the rank
and how it ended, instead of torchrun's report. Several machines: call torchrun yourself (README,
"Scale-out").

`die_with_agent` is the other end: every stage calls it (stages/__init__.py) before torch is imported, so
no torchrun rank outlives its agent. This module imports torch only inside the functions that need it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from pathlib import Path

from pipeline.config import DEFAULT_PARAMS, UserError, build, load_params, section

PR_SET_PDEATHSIG = 1  # Linux prctl option: the signal this process gets when its parent dies
STAGES = ("stages.pretrain", "stages.cache_teachers", "stages.distill")  # the stages that run distributed


def processes(cfg) -> int:
    """`dist.nproc_per_node` of a DistConfig, with 0 meaning one per visible GPU (1 without a GPU)."""
    import torch

    return cfg.nproc_per_node or max(1, torch.cuda.device_count())


def params_path(args: list[str]) -> str:
    """The stage's `--params` value (or the default), read the way click parses it."""
    for i, arg in enumerate(args):
        if arg == "--params" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--params="):
            return arg.split("=", 1)[1]
    return DEFAULT_PARAMS


def torchrun_args(n: int, module: str, args: list[str]) -> list[str]:
    return ["--standalone", "--nproc_per_node", str(n), "--module", module, *args]


def launch(argv: list[str]) -> int:
    if not argv or argv[0] not in STAGES:
        raise UserError(f"usage: python -m pipeline.launch STAGE [ARGS...], STAGE one of {', '.join(STAGES)}")
    import torch

    from pipeline.dist import DistConfig

    module, args = argv[0], argv[1:]
    n = processes(build(DistConfig, section(load_params(params_path(args)), "dist"), "dist"))
    if n == 1:
        os.execv(sys.executable, [sys.executable, "-m", module, *args])  # the plain command, nothing in between
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if not torch.cuda.is_available():  # ranks split the cores (torchrun alone would give each one thread)
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # this launcher reports failures
    try:
        run(get_args_parser().parse_args(torchrun_args(n, module, args)))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        how = (f"was killed by {signal.Signals(-failure.exitcode).name}" if failure.exitcode < 0
               else f"exited with status {failure.exitcode}")
        raise UserError(f"{module} rank {rank} of {n} (pid {failure.pid}) {how}, so torchrun stopped the other "
                        f"ranks; the rank's own error, if any, is above. Rerun the same command to resume") from None
    return 0


# ---------------------------------------------------------------- the rank side


def die_with_agent() -> None:
    """Under torchrun (TORCHELASTIC_RUN_ID in the environment, Linux): be killed when the agent dies.

    torchrun starts each rank in a session of its own, so a kill of the agent's process group (a scheduler's
    SIGKILL, `kill -9 -PGID`) misses the ranks; an orphan would keep writing, or wait out the collective
    timeout. PR_SET_PDEATHSIG has the kernel SIGKILL this process when its parent dies, whatever the signal;
    armed before torch's import, the unguarded window is Python's own start-up, and a rank already orphaned
    there finds itself re-parented to init and ends at once.
    """
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


def main() -> None:
    try:
        sys.exit(launch(sys.argv[1:]))
    except UserError as err:
        print(f"Error: {err.message}", file=sys.stderr)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
