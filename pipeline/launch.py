"""Run a stage with as many processes as `dist.nproc_per_node` says: what dvc.yaml's commands go through.

    python -m pipeline.launch stages.distill --run kd [--params P]

One process (the CPU default): this process becomes `python -m stages.distill --run kd` (exec), exactly the
plain command. N > 1: torchrun's own launcher (`torch.distributed.run`, standalone rendezvous on this machine)
starts N ranks of the stage; if one fails, torchrun stops the others and this ends in one line naming the rank
and how it ended, instead of torchrun's report. Several machines: call torchrun yourself (README,
"Scale-out").

Beside it, the distill stage's seed pool (`train_seeds_in_processes`): on the CPU every seed of a run trains
in its own `python -m stages.distill ... --seed S` child process, the cores split between them.

`die_with_agent` is the other end of torchrun: every stage calls it (stages/__init__.py) before torch is imported, so
no torchrun rank outlives its agent. This module imports torch only inside the functions that need it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

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


# ---------------------------------------------------------------- the distill stage's seed processes


def seed_jobs(jobs: int, num_seeds: int, device_type: str) -> int:
    """How many seeds train at once. On this kind of CPU two one-thread processes do about twice the work of
    one two-thread process (small convolutions scale poorly across threads), so `0` runs every seed at once
    there; on a GPU the seeds queue (one process already fills it)."""
    if jobs == 0:
        jobs = num_seeds if device_type == "cpu" else 1
    return max(1, min(jobs, num_seeds))


def forwarded_options(ctx, drop: tuple[str, ...]) -> list[str]:
    """The options a click command was called with (those not at their default), as argv for a child process
    of the same command, less the options named in `drop`."""
    import click

    argv: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if not isinstance(param, click.Option) or param.name in drop or value in (None, param.get_default(ctx)):
            continue
        argv += [param.opts[0]] if param.is_flag else [param.opts[0], str(value)]
    return argv


def _die_with_parent() -> None:
    """In a seed's child process: the kernel sends it SIGTERM when the stage dies, even by SIGKILL, so no
    orphan keeps writing a checkpoint that a rerun resumes (Linux prctl PR_SET_PDEATHSIG; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (AttributeError, OSError):
        pass


def train_seeds_in_processes(name: str, seeds: list[int], jobs: int, command: Callable[[int], list[str]],
                             log_of: Callable[[int], Path], epochs_done: Callable[[], int], total_epochs: int,
                             quiet: bool) -> None:
    """Each seed in its own `command(seed)` process, `jobs` at a time, the CPU's threads split between them, its
    output in `log_of(seed)`. A failed seed stops the others and ends the stage with that seed's last line."""
    import click

    threads = max(1, (os.cpu_count() or 1) // jobs)
    click.echo(f"{name}: seeds {', '.join(map(str, seeds))} in {min(jobs, len(seeds))} processes at once, "
               f"{threads} thread(s) each (logs {log_of(seeds[0]).parent}/)")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}  # logs readable while it trains
    pending, running = list(seeds), {}
    bar = tqdm(total=total_epochs, desc=f"{name} epochs (all seeds)", disable=quiet)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                one = pending.pop(0)
                log_of(one).parent.mkdir(parents=True, exist_ok=True)
                log = log_of(one).open("w")
                running[one] = (subprocess.Popen(command(one), stdout=log, stderr=subprocess.STDOUT, env=env,
                                                 preexec_fn=_die_with_parent), log)
            time.sleep(0.5)
            ends = {}
            for one in [one for one, (proc, _) in running.items() if proc.poll() is not None]:
                proc, log = running.pop(one)
                log.close()
                lines = log_of(one).read_text(errors="replace").strip().splitlines()
                ends[one] = (proc.returncode, lines[-1] if lines else "no output")
            for one, (code, last) in ends.items():  # a failure first: it is the stage's last word
                if code != 0:
                    raise UserError(f"{name} seed {one} failed (exit {code}): {last.removeprefix('Error: ')} "
                                    f"(whole log: {log_of(one)})")
            for one, (_, last) in ends.items():
                tqdm.write(f"seed {one}: {last}")
                sys.stdout.flush()  # before any later error line, which click writes (and flushes) at once
            bar.n = epochs_done()
            bar.refresh()
    finally:
        for proc, log in running.values():  # a failure or ^C: no seed keeps training on its own
            proc.terminate()
            proc.wait()
            log.close()
        bar.close()


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
