"""Multi-GPU is torchrun + DistributedDataParallel, nothing else: `torchrun --nproc_per_node 4 uda/pretrain.py ...`.

Each process trains on its own share of the P x K batches; the main process evaluates, logs and
writes checkpoints while the others wait at a barrier.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from uda.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group when launched by torchrun (env WORLD_SIZE > 1); a no-op otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def pick_device(info: DistInfo, requested: str = "auto") -> torch.device:
    """'auto' -> this process's GPU when there is one, else the CPU; 'cpu', 'cuda' or 'cuda:N' as asked,
    checked here (before any image is decoded) so a typo or a missing GPU is one clear line."""
    if requested == "auto":
        return torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", str(requested))
    if match is None:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {requested!r}")
    if requested != "cpu":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(match.group(1) or 0)
        if index >= count:
            found = f"{count} CUDA GPU{'s' if count != 1 else ''}" if count else "no CUDA GPU (torch.cuda.is_available() is False)"
            raise ConfigError(f"device={requested} but torch sees {found}: use device=auto or device=cpu")
    return torch.device(requested)


def convert_sync_bn(model: torch.nn.Module, info: DistInfo, sync_bn: bool) -> torch.nn.Module:
    """SyncBatchNorm (batch statistics over all GPUs) when asked for and distributed; once, before training."""
    if not (sync_bn and info.enabled):
        return model
    if not torch.cuda.is_available():
        raise ConfigError("train.sync_bn=true needs CUDA GPUs (PyTorch's SyncBatchNorm has no CPU version)")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap_model(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DDP around the model when distributed, the model itself otherwise. Wrap again after replacing a
    parameter (the UDA stage re-creates the target head each epoch): DDP registers them once."""
    if not info.enabled:
        return model
    device_ids = [info.local_rank] if torch.cuda.is_available() else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def gather_batches(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor (rows: this process's share of a batch) concatenated over the
    processes in rank order, the same on every process; without torchrun, the tensors themselves. The
    momentum memories move by it, so every process holds the memory one process would with the whole batch."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    world = dist.get_world_size()
    count = torch.tensor([len(tensors[0])], device=tensors[0].device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)  # shares may differ in size (a process's last batch): pad to the largest
    counts = [int(c) for c in counts]
    gathered = []
    for tensor in tensors:
        padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
        padded[: len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([part[:n] for part, n in zip(parts, counts)]))
    return tuple(gathered)


def leave_process_group() -> None:
    """At a stage's normal end: wait for every process, then destroy the group. A process that exits with
    the group alive can abort in Gloo's threads at interpreter shutdown ("terminate called without an
    active exception", SIGABRT: pytorch/pytorch#190489), failing a torchrun job whose work is done."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
