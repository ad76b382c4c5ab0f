"""Run a stage with as many processes as `dist.nproc_per_node` says: what dvc.yaml's commands go through.

    python -m pipeline.launch stages.distill --run kd [--params P]

One process (the CPU default): this process becomes `python -m stages.distill --run kd` (exec), exactly the
plain command. N > 1: torchrun's own launcher (`torch.distributed.run`, standalone rendezvous on this machine)
starts N ranks of the stage; if one fails, torchrun stops the others and this ends in one line naming the rank
and how it ended, instead of torchrun's report. Several machines: call torchrun yourself (README,
"Scale-out").
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import torch

from pipeline.config import DEFAULT_PARAMS, UserError, build, load_params, section
from pipeline.dist import DistConfig

STAGES = ("stages.pretrain", "stages.cache_teachers", "stages.distill")  # the stages that run distributed


def processes(cfg: DistConfig) -> int:
    """`dist.nproc_per_node`, with 0 meaning one per visible GPU (1 without a GPU)."""
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


def main() -> None:
    try:
        sys.exit(launch(sys.argv[1:]))
    except UserError as err:
        print(f"Error: {err.message}", file=sys.stderr)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
