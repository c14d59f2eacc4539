"""Process-group helpers shared by the jobs that may run on several ranks."""

from __future__ import annotations

import glob
import os
import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now ("" = every interface of this host)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def close_process_group() -> None:
    """Leave together: a rank that exits while gloo still talks to it aborts the others
    ("terminate called without an active exception"), so barrier, then destroy.

    On CPU, DeepSpeed's shared-memory all-reduce leaves its buffers in /dev/shm
    (``deepspeed_allreduce_buffer_*_{MASTER_ADDR}_{MASTER_PORT}_*``, ~70 MB a rank) and never
    removes them; once every rank is past the barrier, local rank 0 unlinks this job's.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_*"):
            try:
                os.unlink(path)
            except OSError:
                pass
