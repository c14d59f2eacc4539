"""Process-group helpers shared by the jobs that may run on several ranks."""

from __future__ import annotations


def close_process_group() -> None:
    """Leave together: a rank that exits while gloo still talks to it aborts the others
    ("terminate called without an active exception"), so barrier, then destroy."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
