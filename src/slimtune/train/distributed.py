"""Many processes on torch.distributed: the process group from torchrun's environment, DDP over the trainable
parameters, and FSDP2 (``fully_shard``) of the frozen base when asked.

A run under ``torchrun --nproc_per_node N -m slimtune train ...`` (or ``slimtune train --nproc N``) is N copies of
the same program. Each reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (set by torchrun), checks its config and
data exactly as a single process does, and only then joins the process group, so a bad config or row stops every
rank with the same error instead of leaving the others waiting in a collective. gloo on CPU, NCCL on CUDA
(``cuda:LOCAL_RANK``).

The data of one optimizer step is the same for every number of processes: every rank draws the step's
``grad_accum x world_size`` micro-batches from the same seeded sampler (so the sampler state, and the checkpoint,
is the same on every rank) and keeps its own contiguous share (:meth:`World.share`); only that share is collated.
The loss of the step is the mean over the trained tokens of *all* ranks (their count is all-reduced before the
first forward), and DDP's mean of the ranks' gradients is undone by scaling each rank's loss by ``world_size``,
so 2 processes with grad_accum 1 make the same update as 1 process with grad_accum 2.

All communication is torch's: ``DistributedDataParallel`` (whose reducer only registers parameters with
``requires_grad``: the frozen base is never all-reduced), ``fully_shard``, and ``all_reduce`` / ``broadcast`` /
``all_gather_object`` for a few numbers per step.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what torchrun sets for every worker (and MASTER_ADDR/PORT)


class DistributedError(ValueError):
    """torchrun's environment is malformed, or a run setting cannot work across processes."""


@dataclass(frozen=True)
class World:
    """This process's place among ``world_size`` processes. ``World()`` is a single process (no group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        for name in ("rank", "world_size", "local_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "world_size" else 0):
                raise DistributedError(f"{name}={value!r}: must be an integer >= {int(name == 'world_size')}")
        if self.rank >= self.world_size:
            raise DistributedError(f"rank={self.rank}: must be below world_size={self.world_size}")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, items: Sequence[Any]) -> list[Any]:
        """This rank's contiguous share of a step's ``world_size * k`` micro-batches (rank r: ``[r*k, (r+1)*k)``).
        Raises DistributedError when ``len(items)`` is not a multiple of ``world_size``."""
        if len(items) % self.world_size:
            raise DistributedError(f"{len(items)} micro-batches cannot be split evenly over {self.world_size} ranks")
        k = len(items) // self.world_size
        return list(items[self.rank * k:(self.rank + 1) * k])

    def sum(self, values: Sequence[float]) -> list[float]:
        """The element-wise sum of ``values`` over every rank (float64 all_reduce; the values as they are on
        a single process)."""
        if not self.distributed:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, by rank (all_gather_object: in memory, between our own processes)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    @property
    def device(self) -> torch.device:
        """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def local_processes(env: Mapping[str, str] | None = None) -> int:
    """How many processes share this machine: torchrun's LOCAL_WORLD_SIZE (1 outside torchrun). Raises
    DistributedError when it is set to something other than a positive integer."""
    value = (os.environ if env is None else env).get("LOCAL_WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise DistributedError(f"LOCAL_WORLD_SIZE={value!r}: must be a positive integer (torchrun sets it)")
    return int(value)


def world_from_env(env: Mapping[str, str] | None = None) -> World:
    """The World torchrun describes in ``env`` (default ``os.environ``); a single process when none of
    RANK / WORLD_SIZE / LOCAL_RANK is set. Raises DistributedError naming the variable for a missing or
    malformed one (some set, others not; not an integer; rank out of range)."""
    env = os.environ if env is None else env
    present = [k for k in ENV_VARS if k in env]
    if not present:
        return World()
    missing = [k for k in ENV_VARS if k not in env]
    if missing:
        raise DistributedError(f"{', '.join(present)} set but {', '.join(missing)} not: launch with torchrun "
                               "(python -m torch.distributed.run), which sets all of them")
    values = {}
    for key in ENV_VARS:
        try:
            values[key.lower()] = int(env[key])
        except ValueError:
            raise DistributedError(f"{key}={env[key]!r}: must be an integer") from None
    return World(**values)


def backend(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for CPU ones."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(world: World) -> Iterator[World]:
    """Join the process group torchrun set up (nothing for a single process) and leave it on exit, even on an
    error. Call only once the config and the data have been checked."""
    if not world.distributed:
        yield world
        return
    import torch.distributed as dist

    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)
    dist.init_process_group(backend(world.device), rank=world.rank, world_size=world.world_size,
                            device_id=world.device if world.device.type == "cuda" else None)
    try:
        yield world
        dist.barrier()  # no collective still in flight (FSDP2 may issue async ones) when the group goes
    finally:
        dist.destroy_process_group()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def wrap_ddp(model: nn.Module, world: World) -> nn.Module:
    """``model`` in DistributedDataParallel over its trainable parameters (the frozen base is not registered
    with the reducer, so only adapter gradients are all-reduced). Instead of DDP's start-up broadcast of every
    parameter and buffer (the whole base, identical on every rank: each loaded it from the same file) only
    the trainable tensors are broadcast from rank 0. Returns ``model`` itself for a single process."""
    if not world.distributed:
        return model
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    with torch.no_grad():
        for p in trainable_parameters(model):
            dist.broadcast(p.data, src=0)
    ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, init_sync=False, forward_sync_buffers=False)


def shard_base(model: nn.Module, world: World) -> int:
    """FSDP2: ``fully_shard`` every transformer block (the classes in the model's ``_no_split_modules``) and
    then the root, leaving the trainable parameters out (``ignored_params``): the frozen base is split over
    the ranks and gathered layer by layer in forward and backward, the adapter stays whole on every rank for
    DDP. The base-model fingerprint of each slimtune adapter (what ``save_adapter`` records) is taken first and
    kept in ``model.slimtune_fingerprints``: the base is frozen, and after sharding reading it would be a
    collective that rank 0, saving alone, cannot run. Returns the number of blocks sharded; raises
    DistributedError when the model names no block class."""
    from torch.distributed.fsdp import fully_shard

    from slimtune.files.keys import model_fingerprint

    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise DistributedError(f"train.fsdp=true: {type(model).__name__} names no transformer block class "
                               "(_no_split_modules) to shard; set train.fsdp: false")
    adapters = getattr(model, "slimtune_configs", {})
    model.slimtune_fingerprints = {name: model_fingerprint(model, name) for name in adapters}
    ignored = set(trainable_parameters(model))
    for block in blocks:
        fully_shard(block, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)
    return len(blocks)


def seed_ranks(seed: int, world: World) -> None:
    """Give each rank its own torch random stream (``seed + rank``) for what training draws (dropout): with one
    stream everywhere, ranks with same-shaped batches would drop the same units. Call it once the model and
    the adapter are built (DDP starts every rank from rank 0's trainable tensors anyway). Nothing for a single
    process, whose stream stays that of ``train.seed``."""
    if world.distributed:
        torch.manual_seed(seed + world.rank)


def no_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` for the micro-batches before a step's last one (gradients are only all-reduced once
    per step); nothing for a plain module or when ``sync``."""
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def torchrun_command(nproc: int, args: Sequence[str], python: str | None = None) -> list[str]:
    """The command ``slimtune train --nproc N`` execs: torchrun (``python -m torch.distributed.run``) on this
    machine (``--standalone``: a local rendezvous on a free port) running ``python -m slimtune *args`` in
    ``nproc`` processes. Raises DistributedError for an ``nproc`` below 1, or when already under torchrun."""
    import sys

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise DistributedError(f"--nproc={nproc!r}: must be an integer >= 1 (processes on this machine)")
    if any(k in os.environ for k in ENV_VARS):
        raise DistributedError(f"--nproc={nproc}: this process already runs under torchrun (RANK is set); "
                               "leave --nproc out there")
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(nproc), "-m", "slimtune", *args]
