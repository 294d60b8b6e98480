"""Several GPUs for `fit()`: DistributedDataParallel when launched by torchrun.

    torchrun --nproc_per_node=4 -m vprlib.train --places-per-batch 100 ...

torchrun starts one process per GPU and sets WORLD_SIZE, RANK and LOCAL_RANK; `fit` sees
WORLD_SIZE > 1 and then:
- joins the process group (backend "nccl" on CUDA, "gloo" on CPU; same code path) and trains
  on cuda:LOCAL_RANK;
- splits each global batch of `places_per_batch` places evenly over the ranks (`shard_places`):
  rank r gets places [r*p, (r+1)*p) of the batch that a single process would see at that
  step, so the global batches are the same for any number of ranks;
- averages gradients over ranks (DDP); with `gather_for_mining=True` every rank all-gathers the
  descriptors and labels of the whole global batch (`gather_batch`) and computes the loss on it;
- lets rank 0 alone validate, print and write checkpoints and history; the others wait.

Everything here is a no-op for a single process (world_size 1), so `fit` has one code path.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# Ranks other than 0 wait at a barrier while rank 0 validates and writes checkpoints: a full
# benchmark can take many minutes, so the collective timeout is generous (default 10-30 min).
DIST_TIMEOUT = datetime.timedelta(hours=3)


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the run: world_size 1 and rank 0 for a plain single process.

    owns_group: `fit` created the process group, so `fit` destroys it at the end.
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise KeyError(
            f"WORLD_SIZE > 1 but the environment variable {name} is not set "
            "(launch with torchrun, which sets WORLD_SIZE, RANK and LOCAL_RANK)"
        )
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def torchrun_ranks() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) from torchrun's environment; (1, 0, 0) without it.

    A process group the caller already created (e.g. with torch.multiprocessing) counts too.
    """
    if dist.is_available() and dist.is_initialized():
        local = os.environ.get("LOCAL_RANK")
        rank = dist.get_rank()
        return dist.get_world_size(), rank, int(local) if local is not None else rank
    world = _env_int("WORLD_SIZE") if "WORLD_SIZE" in os.environ else 1
    if world <= 1:
        return 1, 0, 0
    return world, _env_int("RANK"), _env_int("LOCAL_RANK")


def places_per_rank(places_per_batch: int, world_size: int) -> int:
    """The per-rank share of the global batch; raises when it does not split evenly."""
    if places_per_batch % world_size:
        lower = places_per_batch // world_size * world_size
        upper = lower + world_size
        options = f"{lower} or {upper}" if lower > 0 else f"{upper}"
        raise ValueError(
            f"places_per_batch ({places_per_batch}) is the global batch and must be divisible "
            f"by the number of processes ({world_size}): try {options}"
        )
    return places_per_batch // world_size


def init_distributed(device: torch.device | None, world_size: int, rank: int, local_rank: int):
    """Join the process group (if not joined yet) and pick this rank's device.

    device None: cuda:LOCAL_RANK when CUDA is available, else the CPU; "cuda" without an index
    also means cuda:LOCAL_RANK. Backend "nccl" on CUDA, "gloo" on the CPU.
    Returns (DistContext, device); for world_size 1 it only resolves the device.
    """
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if world_size <= 1:
        return DistContext(), device
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=DIST_TIMEOUT)
    return DistContext(world_size, rank, local_rank, owns), device


def shard_places(order: list[int], places_per_batch: int, world_size: int, rank: int) -> list[int]:
    """This rank's places, in the order its DataLoader batches them (p = places_per_batch / W).

    Global batch s is order[s*P:(s+1)*P], as in a single process; rank r takes its places
    [r*p, (r+1)*p). A last, partial global batch is padded with places from the start of the
    order up to a multiple of W and split evenly, so every rank runs the same number of steps
    (DDP needs that) and every place is visited; the at most W-1 padded places are seen twice.
    """
    if world_size == 1:
        return list(order)
    p = places_per_rank(places_per_batch, world_size)
    full = len(order) // places_per_batch * places_per_batch
    mine = [
        i
        for s in range(0, full, places_per_batch)
        for i in order[s + rank * p : s + (rank + 1) * p]
    ]
    real, padded = tail_padding(len(order), places_per_batch, world_size)
    if real:
        tail = list(order[full:]) + [order[j % len(order)] for j in range(padded)]
        t = len(tail) // world_size
        mine += tail[rank * t : (rank + 1) * t]
    return mine


def tail_padding(num_places: int, places_per_batch: int, world_size: int) -> tuple[int, int]:
    """(real, padded) places of an epoch's last, partial global batch as `shard_places` cuts
    it: `padded` places from the start of the order fill it up to a multiple of W; (0, 0)
    when the epoch ends on a full batch or for a single process."""
    real = num_places % places_per_batch
    if world_size == 1 or real == 0:
        return 0, 0
    return real, -real % world_size


def broadcast_module(module: torch.nn.Module, ctx: DistContext) -> None:
    """Give every rank rank 0's parameters and buffers of `module` (DDP does this for the
    model; a loss with parameters, e.g. proxies, needs it too, or ranks start apart)."""
    if not ctx.enabled:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def wrap_model(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `model` under torchrun, else `model` itself.

    DDP broadcasts rank 0's weights at construction, so every rank starts the same. Save and
    validate the unwrapped `model` (no "module." prefix in checkpoints).
    """
    if not ctx.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns this rank's slice of the summed gradient.

    Every rank's loss reads every rank's descriptors, so the gradient for this rank's
    descriptors is the sum over ranks of each rank's gradient (an all_reduce, then a slice).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n : (dist.get_rank() + 1) * n]


def gather_batch(
    descriptors: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The descriptors and labels of the whole global batch, in rank order, on every rank.

    The descriptors keep their gradient. Each rank then computes the same full-batch loss L;
    the backward sums the W equal gradients for this rank's own descriptors (W x dL/dx), and
    DDP's average over ranks divides by W: the weight gradient is exactly dL/dw of a single
    process that sees the whole batch, so no loss rescaling is needed.
    (torch.distributed.nn.functional.all_gather does the same but is deprecated in recent torch.)
    """
    all_desc = _AllGatherWithGrad.apply(descriptors)
    parts = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, labels.contiguous())
    return all_desc, torch.cat(parts)


def average_gradients(params: list[torch.Tensor], ctx: DistContext) -> None:
    """Average the gradients of parameters DDP does not manage (e.g. a loss's) over ranks."""
    if not ctx.enabled:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= ctx.world_size


def sum_over_ranks(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Element-wise sums of `values` over all ranks (float64 on the training device)."""
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj: Any, ctx: DistContext) -> list:
    """`obj` of every rank, as a list indexed by rank (pickled; for small things like RNG states)."""
    if not ctx.enabled:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def from_main(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's `obj` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    """Wait for all ranks (e.g. while rank 0 validates or writes a checkpoint)."""
    if ctx.enabled:
        dist.barrier()


def cleanup(ctx: DistContext) -> None:
    """Destroy the process group if `fit` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True on rank 0 of a torchrun launch (from RANK), and in a plain single process."""
    return int(os.environ.get("RANK", "0")) == 0
