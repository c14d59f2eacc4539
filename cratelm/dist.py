"""Process-group helpers shared by the jobs that may run on several ranks.

Every collective of the package goes through this module: NCCL takes CUDA tensors only
(a CPU tensor all-reduced over NCCL is refused), gloo takes CPU tensors. `all_reduce`
moves a tensor to the device the group's backend needs (`comm_device`), reduces it there
and writes the result back in place, so callers may keep their sums wherever they are.
"""

from __future__ import annotations

import glob
import os
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

OPS = ("sum", "max", "min")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now ("" = every interface of this host)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def initialized() -> bool:
    """True when a process group is up."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if initialized() else 0


def comm_device(tensor: torch.Tensor, group: Any = None) -> torch.device:
    """The device a collective of ``group``'s backend takes: this rank's GPU for nccl, the
    CPU for gloo, the tensor's own device for a backend that takes both."""
    import torch
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return tensor.device


def all_reduce(tensor: torch.Tensor, op: str = "sum", group: Any = None) -> torch.Tensor:
    """Reduce ``tensor`` over ``group`` (sum, max or min) in place, on the backend's device;
    returns ``tensor``. Without a process group it is left as it is."""
    import torch.distributed as dist

    if op not in OPS:
        raise ValueError(f"all_reduce op={op!r}: choose one of {OPS}")
    if not initialized():
        return tensor
    dev = comm_device(tensor, group)
    work = tensor if tensor.device == dev else _move(tensor, dev)
    dist.all_reduce(work, op=getattr(dist.ReduceOp, op.upper()), group=group)
    if work is not tensor:
        tensor.copy_(_move(work, tensor.device))
    return tensor


def _move(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of ``tensor`` on ``device`` (one place, so a test can stand in for a GPU)."""
    return tensor.to(device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; torch puts the bytes on the backend's device)."""
    import torch.distributed as dist

    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank ``dst`` (None elsewhere)."""
    import torch.distributed as dist

    if not initialized():
        return [obj]
    parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, parts, dst=dst)
    return parts


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    import torch.distributed as dist

    if initialized():
        dist.barrier()


def close_process_group() -> None:
    """Leave together: a rank that exits while gloo still talks to it aborts the others
    ("terminate called without an active exception"), so barrier, then destroy.

    On CPU, DeepSpeed's shared-memory all-reduce leaves its buffers in /dev/shm
    (``deepspeed_allreduce_buffer_*_{MASTER_ADDR}_{MASTER_PORT}_*``, ~70 MB a rank) and never
    removes them; once every rank is past the barrier, local rank 0 unlinks this job's.
    """
    import torch.distributed as dist

    if not initialized():
        return
    barrier()
    dist.destroy_process_group()
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_*"):
            try:
                os.unlink(path)
            except OSError:
                pass
