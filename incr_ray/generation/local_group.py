"""A ``torch.distributed`` group on this machine without Ray — the group Ray Train makes for its
workers — so the student recipe (:mod:`incr_ray.generation.recipe`) runs in the GPU check (one
process) and in multi-rank tests (``torch.multiprocessing`` over gloo)."""

from __future__ import annotations

import os
import socket

import torch.distributed as dist


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (another process may take it later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_group(rank: int, world: int, port: int, backend: str = "gloo") -> None:
    """Join rank ``rank`` of a ``world``-process group on 127.0.0.1:``port``, with the environment
    variables Ray Train sets on a worker (the Trainer and DeepSpeed read them)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group(backend, rank=rank, world_size=world)
