"""Scale-out with torchrun: the process group, the shard of a batch each rank trains, and what ranks share.

    torchrun --nproc_per_node N -m stages.distill ...     N ranks on one machine (gloo on the CPU, NCCL on GPUs)
    python -m stages.distill ...                          the same code as world size 1: no process group
    python -m pipeline.launch stages.distill ...          what dvc.yaml runs: torchrun with `dist.nproc_per_node`

The rules every distributed loop here follows (docs/design.md section 7):
- the epoch's permutation stays a function of (seed, epoch); global step i takes the same B rows
  `order[i B:(i + 1) B]` whatever the world size, and rank r trains `torch.tensor_split(rows, W)[r]`
  (contiguous, sizes differ by at most one: uneven shards, no padding);
- rank r's loss is weighed by b_r W / B (`shard_weight`), so that DDP's mean over ranks of the gradients
  is the gradient of the global batch's mean loss, whatever the shard sizes;
- randomness that is not per row (MEAL's teacher draw) comes from (seed, epoch) and agrees on every rank;
- rank 0 alone evaluates and writes checkpoints and metrics; every rank loads the same checkpoint, so a run
  resumes with any world size.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from pipeline.config import UserError, check, check_choice

BACKENDS = ("auto", "nccl", "gloo")


@dataclass
class DistConfig:
    nproc_per_node: int = 0  # processes per machine that `python -m pipeline.launch` (dvc.yaml) starts:
    # 0 = one per visible GPU, 1 without a GPU; torchrun users pass their own --nproc_per_node
    backend: str = "auto"  # auto (nccl on CUDA, gloo on the CPU) | nccl | gloo
    sync_bn: bool = False  # BatchNorm statistics over the global batch, not each rank's shard (no effect with
    # one process): torch's SyncBatchNorm on CUDA, AllReduceBatchNorm on the CPU
    timeout_s: int = 1800  # seconds a collective waits for a missing rank before the job ends (not a hang)

    def __post_init__(self) -> None:
        check(self.nproc_per_node >= 0, f"dist.nproc_per_node = {self.nproc_per_node} must be >= 0 (0 = one per GPU)")
        check_choice(self.backend, BACKENDS, "dist.backend")
        check(self.timeout_s >= 1, f"dist.timeout_s = {self.timeout_s} must be at least 1")


@dataclass(frozen=True)
class World:
    """This process's place in the job; World() is the one-process case (no process group)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints, metrics and the store's `complete` mark."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The world torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK (World() without them)."""
    try:
        return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE or LOCAL_RANK is not an integer: launch with torchrun or "
                        "python -m pipeline.launch, or unset them") from None


def backend_for(cfg: DistConfig, device: torch.device) -> str:
    if cfg.backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if cfg.backend == "nccl" and device.type != "cuda":
        raise UserError("dist.backend = nccl needs CUDA GPUs: use dist.backend auto or gloo on the CPU")
    return cfg.backend


def start(cfg: DistConfig, device: torch.device) -> tuple[World, torch.device]:
    """Join the job torchrun started (if any): the process group and this rank's device (cuda:LOCAL_RANK)."""
    world = world_from_env()
    if not world.distributed:
        return world, device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {world.local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                            f"start at most that many processes per node")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(cfg, device), timeout=datetime.timedelta(seconds=cfg.timeout_s),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return world, device


def stop(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def collective_errors(world: World) -> Iterator[None]:
    """A collective that fails because a peer died (gloo: connection closed; a timeout) ends this rank in one
    line instead of a traceback; torchrun then stops the others and says which rank died first."""
    try:
        yield
    except (RuntimeError, dist.DistError) as exc:
        if not world.distributed or isinstance(exc, UserError):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"rank {world.rank} of {world.size}: a collective failed ({first}): another rank died or "
                        f"hung; its own error comes first. Rerun the same command to resume") from None


# ---------------------------------------------------------------- what ranks share


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def broadcast(value: Any, world: World) -> Any:
    """Rank 0's `value` on every rank (a picklable object)."""
    if not world.distributed:
        return value
    box = [value if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """The sum over ranks, in place (returned for chaining); the tensor itself with one process."""
    if world.distributed:
        dist.all_reduce(tensor)
    return tensor


def average_gradients(params: Iterable[nn.Parameter], world: World) -> None:
    """Mean over ranks of each parameter's gradient, in one all-reduce: what DDP does for the student, done by
    hand for the discriminators, whose optimizer may step in the middle of the student's step (the game)."""
    if not world.distributed:
        return
    params = [p for p in params if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


# ---------------------------------------------------------------- the shards of a step


def shard(rows: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's part of a global batch's rows: contiguous, the W parts differing in size by at most one."""
    return rows if not world.distributed else torch.tensor_split(rows, world.size)[world.rank]


def shard_weight(local: int, global_: int, world: World) -> float:
    """b_r W / B: the factor on rank r's mean loss that makes DDP's mean of gradients the global batch's."""
    return 1.0 if not world.distributed else local * world.size / global_


def epoch_rows(order: torch.Tensor, batch_size: int, world: World, first: int = 0,
               stop: int | None = None) -> torch.Tensor:
    """Every row this rank trains in steps [first, stop) (default: all) of the epoch whose permutation is `order`
    (N,), sorted: the rows of the epoch's teacher slab (or of that part of it) it needs."""
    stop = -(-len(order) // batch_size) if stop is None else stop
    parts = [shard(order[s * batch_size:(s + 1) * batch_size], world) for s in range(first, stop)]
    return torch.cat(parts).sort().values


def check_shards(n: int, batch_size: int, world: World, what: str) -> None:
    """Every rank needs a row of every step (DDP and SyncBatchNorm are collectives): the smallest global batch,
    the last, must hold at least W rows."""
    last = n - (-(-n // batch_size) - 1) * batch_size
    if world.distributed and min(last, batch_size) < world.size:
        raise UserError(f"{what}: the last batch of an epoch holds {last} of the {n} rows "
                        f"({n} mod batch_size {batch_size}), fewer than the {world.size} ranks, so a rank would have "
                        f"nothing to train on: change {what}.batch_size or run fewer processes")


def wrap_ddp(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The model in DistributedDataParallel (gradients averaged over ranks during backward); itself with one
    process."""
    if not world.distributed:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------- BatchNorm over the global batch


class _AllReduce(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks of the gradients (every rank's loss used it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class AllReduceBatchNorm(nn.Module):
    """BatchNorm whose training statistics are those of the global batch, through all-reduces of the mean, then
    of the centred squares (BatchNorm's own two-pass statistics): torch's SyncBatchNorm runs on GPUs only, and
    the CPU (gloo) is where the equivalence tests run. It holds the parameters and buffers of the BatchNorm it
    replaces, under their names, so checkpoints load either way."""

    def __init__(self, bn: nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
        super().__init__()
        check(bn.affine and bn.track_running_stats and bn.momentum is not None,
              "dist.sync_bn on the CPU needs BatchNorm with affine parameters, a momentum and running statistics")
        self.eps, self.momentum = bn.eps, bn.momentum
        self.weight, self.bias = bn.weight, bn.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(bn, name))
        self.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()):
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                            self.training, self.momentum, self.eps)
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = _AllReduce.apply(torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device))
        mean = _AllReduce.apply(xf.sum(dims)) / count  # (C,)
        centred = xf - mean.view(shape)
        var = _AllReduce.apply((centred * centred).sum(dims)) / count  # (C,) biased, as BatchNorm normalises
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * count / (count - 1), alpha=m)  # unbiased
        y = centred * torch.rsqrt(var + self.eps).view(shape) * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """Every BatchNorm of `model` made to use the global batch's statistics (dist.sync_bn); unchanged with one
    process, where the local batch is the global one."""
    if not world.distributed:
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_cpu(model)


def _convert_cpu(module: nn.Module) -> nn.Module:
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        return AllReduceBatchNorm(module)
    for name, child in module.named_children():
        setattr(module, name, _convert_cpu(child))
    return module
